"""Synthetic audiences for the demo, load tests and benchmarks.

Rows are deterministic for a seed. A share of rows is deliberately bad (invalid numbers,
landlines, missing phones, duplicates of earlier rows) so that planning has something to reject.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

__all__ = ["AudienceMix", "generate_csv", "generate_rows"]

#: Example mobile numbers of ten regions (libphonenumber's own examples) minus their last six
#: digits: any six digits after them are valid mobile numbers, so 10 million distinct ones exist.
_MOBILE_STEMS = (
    "+447400",  # GB
    "+4915123",  # DE
    "+33612",  # FR
    "+34612",  # ES
    "+12015",  # US (fixed line or mobile)
    "+61412",  # AU
    "+5511961",  # BR
    "+918123",  # IN
    "+31612",  # NL
    "+393123",  # IT
)
_NAMES = ("Ada", "Grace", "Linus", "Margaret", "Ken", "Barbara", "Dennis", "Frances", "Alan", "Radia")


@dataclass(frozen=True, kw_only=True)
class AudienceMix:
    invalid: float = 0.02
    missing: float = 0.01
    duplicates: float = 0.02


def generate_rows(count: int, *, seed: int = 7, mix: AudienceMix | None = None) -> Iterator[dict[str, str]]:
    """Yield ``count`` rows with columns id, phone, first_name."""
    mix = mix or AudienceMix()
    rng = random.Random(seed)
    issued: list[str] = []
    serial = 0
    for i in range(count):
        roll = rng.random()
        if roll < mix.invalid:
            phone = "+1" + "".join(rng.choice("0123456789") for _ in range(rng.choice((3, 5, 14))))
        elif roll < mix.invalid + mix.missing:
            phone = ""
        elif roll < mix.invalid + mix.missing + mix.duplicates and issued:
            phone = rng.choice(issued)
        else:
            stem = _MOBILE_STEMS[serial % len(_MOBILE_STEMS)]
            phone = f"{stem}{(serial // len(_MOBILE_STEMS)) % 1_000_000:06d}"
            serial += 1
            issued.append(phone)
            if len(issued) > 10_000:
                issued = issued[-5_000:]
        yield {"id": f"r{i:08d}", "phone": phone, "first_name": rng.choice(_NAMES)}


def generate_csv(path: Path, count: int, *, seed: int = 7, mix: AudienceMix | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "phone", "first_name"])
        writer.writeheader()
        writer.writerows(generate_rows(count, seed=seed, mix=mix))
    return path
