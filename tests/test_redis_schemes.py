"""The API's pipelined connection speaks ``rediss://`` (TLS, with redis-py's options) as well as
``redis://``: a TLS-terminating proxy in front of the session's real server stands in for a
managed TLS Redis (the embedded valkey is built without TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import redis

from dispatch.api.pipelined import PipelinedRedis


def _self_signed(directory: Path) -> tuple[Path, Path]:
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@contextlib.asynccontextmanager
async def _tls_proxy(redis_url: str, cert: Path, key: Path) -> AsyncIterator[int]:
    target = urlsplit(redis_url)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(target.hostname, target.port)
        await asyncio.gather(pump(client_r, server_w), pump(server_r, client_w))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


async def test_pipelined_connection_over_tls(redis_url: str, redis_client: redis.Redis, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    redis_client.hset("tls-probe", "field", "over-tls")
    parts = urlsplit(redis_url)
    db = parts.path or "/0"
    auth = parts.netloc.rpartition("@")[0]  # the embedded server's password
    auth = f"{auth}@" if auth else ""
    async with _tls_proxy(redis_url, cert, key) as port:
        trusted = PipelinedRedis(f"rediss://{auth}localhost:{port}{db}?ssl_ca_certs={cert}")
        try:
            assert await trusted.hget("tls-probe", "field") == b"over-tls"
        finally:
            await trusted.aclose()
        # redis-py's default: the certificate is checked, so an unknown one is refused
        untrusted = PipelinedRedis(f"rediss://{auth}localhost:{port}{db}")
        try:
            with pytest.raises((redis.ConnectionError, ssl.SSLError)):
                await untrusted.hget("tls-probe", "field")
        finally:
            await untrusted.aclose()
