"""``bitplan probe``: read the local GPU with NVML, measure it with PyTorch, write a profile.

NVML (nvidia-ml-py) gives the name, total and free memory, maximum clocks and the compute
capability. PyTorch measures:

- device-to-device copy bandwidth: ``dst.copy_(src)`` of a 1 GiB buffer, bytes read plus bytes
  written per second (the figure a streaming kernel achieves, below the spec sheet);
- dense matmul throughput per dtype: fp16, bf16, tf32 and fp32 with ``torch.matmul``, int8 with
  ``torch._int_mm`` and fp8 (e4m3) with ``torch._scaled_mm`` where the device runs them, on
  8192-square operands, 2 N^3 operations per product.

The profile is a TOML file with one table, which ``get_device(path)`` and every ``--target``
accept. It is marked ``measured = true`` so the speed model rescales its efficiency factors.
Native formats and spec-sheet figures come from the catalog entry matching the NVML name, when
there is one. With no NVIDIA driver, no GPU, or no nvidia-ml-py, :func:`probe` raises
:class:`ProbeUnavailable` with a one-line reason; the CLI prints it and exits 0.
"""

from __future__ import annotations

import datetime
import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from bitplan.profiles.hardware import GIB, HardwareProfile, match_catalog_device

COPY_BYTES = 1 << 30
MATMUL_SIZE = 8192
REPEATS = 10


class ProbeUnavailable(Exception):
    """No GPU can be probed here; the message says why in one line."""


@dataclass(frozen=True)
class NvmlReading:
    name: str
    memory_total_bytes: int
    memory_free_bytes: int
    sm_clock_max_mhz: int
    memory_clock_max_mhz: int
    compute_capability: str
    driver_version: str


@dataclass
class Measurements:
    copy_bytes_per_s: float = 0.0
    flops_by_dtype: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_nvml(index: int = 0) -> NvmlReading:
    """Read one GPU through NVML; ProbeUnavailable when there is no driver or no such GPU."""
    try:
        pynvml = importlib.import_module("pynvml")
    except ImportError as exc:
        raise ProbeUnavailable(f"nvidia-ml-py is not installed ({exc}): install it to probe a GPU") from exc
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise ProbeUnavailable(f"no NVIDIA driver or GPU found (NVML: {exc}); nothing to probe") from exc
    try:
        count = pynvml.nvmlDeviceGetCount()
        if not 0 <= index < count:
            raise ProbeUnavailable(f"GPU index {index} does not exist ({count} GPU(s) found); nothing to probe")
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        return NvmlReading(
            name=_text(pynvml.nvmlDeviceGetName(handle)),
            memory_total_bytes=int(memory.total),
            memory_free_bytes=int(memory.free),
            sm_clock_max_mhz=int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_SM)),
            memory_clock_max_mhz=int(pynvml.nvmlDeviceGetMaxClockInfo(handle, pynvml.NVML_CLOCK_MEM)),
            compute_capability=f"{major}.{minor}",
            driver_version=_text(pynvml.nvmlSystemGetDriverVersion()),
        )
    except pynvml.NVMLError as exc:
        raise ProbeUnavailable(f"NVML could not read GPU {index} ({exc}); nothing to probe") from exc
    finally:
        pynvml.nvmlShutdown()


def _time_s(torch, run, repeats: int) -> float:
    """Median seconds of ``run()`` on the current CUDA stream, after one warm-up."""
    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000.0)
    return sorted(times)[len(times) // 2]


def measure_copy_bytes_per_s(torch, device: str, size_bytes: int = COPY_BYTES, repeats: int = REPEATS) -> float:
    """Device-to-device copy: bytes read plus bytes written per second."""
    source = torch.empty(size_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    seconds = _time_s(torch, lambda: target.copy_(source), repeats)
    return 2.0 * size_bytes / seconds


def _matmul_runner(torch, dtype_key: str, n: int, device: str):
    if dtype_key in ("fp16", "bf16", "fp32", "tf32"):
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(dtype_key, torch.float32)
        torch.backends.cuda.matmul.allow_tf32 = dtype_key == "tf32"
        a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
        return lambda: torch.matmul(a, b)
    if dtype_key == "int8":
        a = torch.randint(-64, 64, (n, n), device=device, dtype=torch.int8)
        b = torch.randint(-64, 64, (n, n), device=device, dtype=torch.int8)
        return lambda: torch._int_mm(a, b)
    if dtype_key == "fp8":
        a = torch.randn(n, n, device=device).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=device).to(torch.float8_e4m3fn).t()
        one = torch.ones((), device=device)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    raise ValueError(dtype_key)


def measure_matmul_flops(torch, dtype_key: str, device: str, n: int = MATMUL_SIZE, repeats: int = REPEATS) -> float:
    """Dense matmul throughput (2 n^3 per product); raises RuntimeError where unsupported."""
    run = _matmul_runner(torch, dtype_key, n, device)
    try:
        return 2.0 * n**3 / _time_s(torch, run, repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def benchmark(index: int = 0) -> Measurements:
    """Copy bandwidth and matmul peaks measured with PyTorch on GPU ``index``."""
    import torch

    result = Measurements()
    if not torch.cuda.is_available():
        result.notes.append("PyTorch has no CUDA here: bandwidth and peaks copied from the catalog, not measured")
        return result
    device = f"cuda:{index}"
    result.copy_bytes_per_s = measure_copy_bytes_per_s(torch, device)
    for key in ("fp16", "bf16", "tf32", "fp32", "int8", "fp8"):
        try:
            result.flops_by_dtype[key] = measure_matmul_flops(torch, key, device)
        except (RuntimeError, TypeError, AttributeError) as exc:
            result.notes.append(f"{key} matmul not measured: {str(exc).splitlines()[0][:120]}")
    return result


def native_formats_for(compute_capability: str) -> list[str]:
    """Formats NVIDIA tensor cores run natively, by compute capability (when the catalog has no entry)."""
    major, minor = (int(part) for part in compute_capability.split(".")[:2])
    version = major + minor / 10
    formats = ["fp16"]
    if version >= 7.5:
        formats += ["int8", "int4"]
    if version >= 8.0:
        formats += ["bf16", "tf32"]
    if version >= 8.9:
        formats += ["fp8_e4m3", "fp8_e5m2"]
    if version >= 10.0:
        formats = [f for f in formats if f != "int4"] + ["mxfp8", "mxfp6", "mxfp4", "nvfp4"]
    return formats


def profile_key(name: str) -> str:
    words = re.findall(r"[a-z0-9]+", name.lower())
    return "-".join(w for w in words if w not in ("nvidia", "geforce", "tesla")) or "local-gpu"


def profile_entry(reading: NvmlReading, measured: Measurements, match: HardwareProfile | None, when: str) -> dict:
    """The TOML table of a probed device."""
    has_measurements = measured.copy_bytes_per_s > 0 and bool(measured.flops_by_dtype)
    if not has_measurements and match is None:
        raise ProbeUnavailable(f"{reading.name}: nothing measured and no catalog entry to fall back on; run where PyTorch sees CUDA")
    bandwidth = measured.copy_bytes_per_s if has_measurements else match.bandwidth_bytes_per_s
    peaks = dict(measured.flops_by_dtype) if has_measurements else dict(match.peak_flops_by_dtype)
    source = f"bitplan probe {when}: nvidia-ml-py (driver {reading.driver_version})"
    source += " + PyTorch copy and matmul benchmarks" if has_measurements else "; figures from the catalog"
    entry = {
        "name": reading.name,
        "memory_gib": round(reading.memory_total_bytes / GIB, 3),
        "memory_free_gib": round(reading.memory_free_bytes / GIB, 3),
        "bandwidth_bytes_per_s": bandwidth,
        "peak_flops": peaks,
        "native_formats": list(match.native_formats) if match else native_formats_for(reading.compute_capability),
        "arch": match.arch if match else "unknown",
        "compute_capability": reading.compute_capability,
        "sm_clock_max_mhz": reading.sm_clock_max_mhz,
        "memory_clock_max_mhz": reading.memory_clock_max_mhz,
        "measured": has_measurements,
        "source": source + (f"; catalog match {match.key}" if match else ""),
    }
    if match:
        entry["spec_bandwidth_bytes_per_s"] = match.bandwidth_bytes_per_s
        entry["spec_peak_flops"] = dict(match.peak_flops_by_dtype)
    if measured.notes:
        entry["notes"] = list(measured.notes)
    return entry


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    raise TypeError(type(value))


def to_toml(key: str, entry: dict) -> str:
    lines = ["# Device profile written by `bitplan probe`; pass this file wherever a device name goes.", f"[{key}]"]
    lines += [f"{name} = {_toml_value(value)}" for name, value in entry.items()]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ProbeResult:
    path: Path
    key: str
    entry: dict


def probe(out_path: Path, index: int = 0, run_benchmarks: bool = True) -> ProbeResult:
    """Probe GPU ``index`` and write its profile to ``out_path``."""
    reading = read_nvml(index)
    measured = benchmark(index) if run_benchmarks else Measurements(notes=["benchmarks skipped (--no-benchmark)"])
    match = match_catalog_device(reading.name, reading.memory_total_bytes)
    when = datetime.date.today().isoformat()
    key = profile_key(reading.name)
    entry = profile_entry(reading, measured, match, when)
    path = Path(out_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_toml(key, entry))
    return ProbeResult(path, key, entry)
