"""HardwareProfile and the device catalog (seeded from sourced specifications)."""

from __future__ import annotations

import difflib
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from bitplan.errors import BitplanError

GIB = 2**30


@dataclass(frozen=True)
class HardwareProfile:
    """One accelerator: what it holds, how fast it moves bytes, and how fast it computes.

    ``usable_memory_bytes`` is what the driver reports (nvidia-smi), not the marketed label.
    ``peak_flops_by_dtype`` holds dense peaks (fp16, bf16, fp8, int8, ...) in FLOP/s or OP/s.
    """

    key: str
    name: str
    usable_memory_bytes: int
    bandwidth_bytes_per_s: float
    peak_flops_by_dtype: dict[str, float]
    native_formats: tuple[str, ...]
    arch: str
    source: str
    compute_capability: str = ""
    unconfirmed: tuple[str, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["native_formats"] = list(self.native_formats)
        data["unconfirmed"] = list(self.unconfirmed)
        return data


REQUIRED_FIELDS = ("name", "memory_gib", "bandwidth_bytes_per_s", "peak_flops", "source")


def profile_from_entry(key: str, entry: dict, origin: str) -> HardwareProfile:
    """Build a profile from one TOML table; ``origin`` names the file for error messages."""
    missing = [name for name in REQUIRED_FIELDS if name not in entry]
    if missing:
        raise BitplanError(f"device profile {key!r} in {origin} lacks {', '.join(missing)}: add them (see `bitplan devices`)")
    numbers = {"memory_gib": entry["memory_gib"], "bandwidth_bytes_per_s": entry["bandwidth_bytes_per_s"]}
    numbers.update({f"peak_flops.{k}": v for k, v in dict(entry["peak_flops"]).items()})
    bad = [name for name, value in numbers.items() if not isinstance(value, (int, float)) or value <= 0]
    if bad:
        raise BitplanError(f"device profile {key!r} in {origin} has non-positive or non-numeric {', '.join(bad)}: fix the values")
    return HardwareProfile(
        key=key,
        name=str(entry["name"]),
        usable_memory_bytes=int(float(entry["memory_gib"]) * GIB),
        bandwidth_bytes_per_s=float(entry["bandwidth_bytes_per_s"]),
        peak_flops_by_dtype={k: float(v) for k, v in dict(entry["peak_flops"]).items()},
        native_formats=tuple(entry.get("native_formats", ())),
        arch=str(entry.get("arch", "unknown")),
        source=str(entry["source"]),
        compute_capability=str(entry.get("compute_capability", "")),
        unconfirmed=tuple(entry.get("unconfirmed", ())),
    )


def load_catalog() -> dict[str, HardwareProfile]:
    """The built-in catalog, keyed by short name (e.g. ``h100-sxm``)."""
    text = resources.files("bitplan.profiles").joinpath("data/accelerators.toml").read_text()
    data = tomllib.loads(text)
    return {key: profile_from_entry(key, entry, "the built-in catalog") for key, entry in data.items()}


def load_profile_file(path: Path) -> HardwareProfile:
    """A user's own profile: a TOML file with one table (as ``bitplan probe`` writes)."""
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BitplanError(f"cannot read device profile {path}: {exc}; pass a TOML file like `bitplan probe` writes") from exc
    tables = {k: v for k, v in data.items() if isinstance(v, dict) and k != "peak_flops"}
    if len(tables) != 1:
        raise BitplanError(f"device profile {path} must hold exactly one [device] table, found {len(tables)}")
    key, entry = next(iter(tables.items()))
    return profile_from_entry(key, entry, str(path))


def get_device(name_or_path: str) -> HardwareProfile:
    """A device by catalog name, or a profile TOML by path; unknown names suggest the nearest."""
    if name_or_path.endswith(".toml") or Path(name_or_path).is_file():
        if not Path(name_or_path).is_file():
            raise BitplanError(f"device profile {name_or_path} does not exist: write one with `bitplan probe --out {name_or_path}`")
        return load_profile_file(Path(name_or_path))
    catalog = load_catalog()
    key = name_or_path.strip().lower()
    if key in catalog:
        return catalog[key]
    near = difflib.get_close_matches(key, list(catalog), n=3, cutoff=0.4)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise BitplanError(f"unknown device {name_or_path!r}: {hint}run `bitplan devices` for the list, or pass a profile .toml")
