"""HardwareProfile and the device catalog (seeded from sourced specifications).

The catalog lives in ``data/accelerators.toml``: one table per device with its usable memory
(what the driver reports, ``memory_gib``), memory bandwidth, dense peak throughput per format,
native formats, architecture and a source for every figure. A user's own profile is a TOML file
with one such table (``bitplan probe`` writes one), passed wherever a device name is accepted.

Optional keys a profile may add:

- ``measured = true``: bandwidth and peaks were measured on the device (``bitplan probe``),
  not copied from a data sheet; the speed model then applies smaller efficiency factors.
- ``efficiency = { dense_bandwidth = 0.85, ... }``: overrides of the speed model's efficiency
  factors (names in ``bitplan.planner.speed.Efficiency``), e.g. from the kernel benchmark.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from bitplan.errors import BitplanError

GIB = 2**30

REQUIRED_FIELDS = ("name", "memory_gib", "bandwidth_bytes_per_s", "peak_flops", "source")

# Native-format names (as the catalog spells them) grouped by the kernel path they enable.
FORMAT_FAMILIES = {
    "fp8": ("fp8_e4m3", "fp8_e5m2", "fp8_e4m3fnuz", "fp8_e5m2fnuz", "mxfp8"),
    "int8": ("int8",),
    "int4": ("int4",),
    "fp4": ("mxfp4", "nvfp4"),
    "bf16": ("bf16",),
}


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
    measured: bool = False
    efficiency: dict[str, float] = field(default_factory=dict)

    def supports(self, family: str) -> bool:
        """Whether the device runs a format family (``fp8``, ``int8``, ``int4``, ``fp4``) natively."""
        return any(fmt in self.native_formats for fmt in FORMAT_FAMILIES.get(family, (family,)))

    def peak_flops(self, dtype: str) -> float:
        """Dense peak for a dtype; bf16 falls back to fp16 on devices without bf16 (V100, T4)."""
        if dtype in self.peak_flops_by_dtype:
            return self.peak_flops_by_dtype[dtype]
        if dtype in ("bf16", "bfloat16", "float16") and "fp16" in self.peak_flops_by_dtype:
            return self.peak_flops_by_dtype["fp16"]
        raise KeyError(dtype)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["native_formats"] = list(self.native_formats)
        data["unconfirmed"] = list(self.unconfirmed)
        return data


def _check_numbers(key: str, entry: dict, origin: str) -> None:
    peaks = entry["peak_flops"]
    if not isinstance(peaks, dict) or not peaks:
        raise BitplanError(f"device profile {key!r} in {origin}: peak_flops must be a table like {{ fp16 = 312e12 }}")
    numbers = {"memory_gib": entry["memory_gib"], "bandwidth_bytes_per_s": entry["bandwidth_bytes_per_s"]}
    numbers.update({f"peak_flops.{k}": v for k, v in peaks.items()})
    numbers.update({f"efficiency.{k}": v for k, v in dict(entry.get("efficiency", {})).items()})
    bad = [n for n, v in numbers.items() if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0]
    if bad:
        raise BitplanError(f"device profile {key!r} in {origin} has non-positive or non-numeric {', '.join(bad)}: fix the values")


def _check_texts(key: str, entry: dict, origin: str) -> None:
    formats = entry.get("native_formats", [])
    if not isinstance(formats, list) or not all(isinstance(f, str) for f in formats):
        raise BitplanError(f"device profile {key!r} in {origin}: native_formats must be a list of names like [\"fp16\", \"int8\"]")
    if not isinstance(entry.get("efficiency", {}), dict):
        raise BitplanError(f"device profile {key!r} in {origin}: efficiency must be a table like {{ dense_bandwidth = 0.8 }}")


def profile_from_entry(key: str, entry: dict, origin: str) -> HardwareProfile:
    """Build a profile from one TOML table; ``origin`` names the file for error messages."""
    missing = [name for name in REQUIRED_FIELDS if name not in entry]
    if missing:
        raise BitplanError(f"device profile {key!r} in {origin} lacks {', '.join(missing)}: add them (see `bitplan devices`)")
    _check_texts(key, entry, origin)
    _check_numbers(key, entry, origin)
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
        measured=bool(entry.get("measured", False)),
        efficiency={k: float(v) for k, v in dict(entry.get("efficiency", {})).items()},
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
    tables = {k: v for k, v in data.items() if isinstance(v, dict) and k not in ("peak_flops", "efficiency")}
    if len(tables) != 1:
        raise BitplanError(f"device profile {path} must hold exactly one [device] table, found {len(tables)}")
    key, entry = next(iter(tables.items()))
    return profile_from_entry(key, entry, str(path))


def nearest_device_names(name: str, count: int = 3) -> list[str]:
    """Catalog keys closest to ``name`` (by key, or by the device's full name)."""
    catalog = load_catalog()
    text = name.strip().lower()
    near = difflib.get_close_matches(text, list(catalog), n=count, cutoff=0.4)
    by_name = {profile.name.lower(): key for key, profile in catalog.items()}
    for match in difflib.get_close_matches(text, list(by_name), n=count, cutoff=0.4):
        if by_name[match] not in near:
            near.append(by_name[match])
    return near[:count]


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
    near = nearest_device_names(key)
    hint = f"did you mean {', '.join(near)}? " if near else ""
    raise BitplanError(f"unknown device {name_or_path!r}: {hint}run `bitplan devices` for the list, or pass a profile .toml")


def get_devices(names: str) -> list[HardwareProfile]:
    """Comma-separated device names or profile paths, in order, without duplicates."""
    keys = [part.strip() for part in names.split(",") if part.strip()]
    if not keys:
        raise BitplanError("no devices given: pass e.g. --targets h100-sxm,l40s,rtx-4090 (see `bitplan devices`)")
    return [get_device(key) for key in dict.fromkeys(keys)]


def _name_words(text: str) -> set[str]:
    drop = {"nvidia", "geforce", "tesla", "amd", "instinct", "gb", "generation"}
    words = set(re.findall(r"[a-z]+\d*|\d+[a-z]*", text.lower()))
    return {w for w in words if w not in drop}


def match_catalog_device(reported_name: str, memory_bytes: int) -> HardwareProfile | None:
    """The catalog entry for a name as NVML reports it (e.g. 'NVIDIA H100 80GB HBM3'),
    preferring entries whose memory is within 10% of the reported total; None if nothing fits."""
    words = _name_words(reported_name)
    best, best_score = None, 0.0
    for profile in load_catalog().values():
        theirs = _name_words(profile.name) | _name_words(profile.key.replace("-", " "))
        overlap = len(words & theirs) / max(1, len(words))
        close = abs(profile.usable_memory_bytes - memory_bytes) <= 0.1 * memory_bytes
        score = overlap + (0.5 if close else 0.0)
        if overlap > 0 and score > best_score:
            best, best_score = profile, score
    return best
