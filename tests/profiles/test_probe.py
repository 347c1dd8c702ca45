"""`bitplan probe`: a clean one-line exit without NVML, and the profile it writes with one."""

import argparse
import sys
import types

import pytest

from bitplan.cli.hardware import add_commands
from bitplan.profiles import probe as probe_module
from bitplan.profiles.hardware import get_device
from bitplan.profiles.probe import Measurements, native_formats_for, profile_key


def run_probe(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="bitplan")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["probe", *argv])
    return args.func(args)


class FakeNvmlError(Exception):
    pass


def fake_pynvml(available: bool) -> types.ModuleType:
    """A stand-in for nvidia-ml-py: absent driver, or one H100 SXM."""
    nvml = types.ModuleType("pynvml")
    nvml.NVMLError = FakeNvmlError
    nvml.NVML_CLOCK_SM, nvml.NVML_CLOCK_MEM = 1, 2

    def init():
        if not available:
            raise FakeNvmlError("NVML Shared Library Not Found")

    nvml.nvmlInit = init
    nvml.nvmlShutdown = lambda: None
    nvml.nvmlDeviceGetCount = lambda: 1
    nvml.nvmlDeviceGetHandleByIndex = lambda index: "gpu0"
    nvml.nvmlDeviceGetName = lambda handle: b"NVIDIA H100 80GB HBM3"
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(total=85_520_809_984, free=84_000_000_000)
    nvml.nvmlDeviceGetCudaComputeCapability = lambda handle: (9, 0)
    nvml.nvmlDeviceGetMaxClockInfo = lambda handle, kind: 1980 if kind == 1 else 2619
    nvml.nvmlSystemGetDriverVersion = lambda: "570.00"
    return nvml


def test_without_nvml_says_so_in_one_line_and_exits_cleanly(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(available=False))
    out = tmp_path / "gpu.toml"
    assert run_probe("--out", str(out)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "no NVIDIA driver or GPU found" in lines[0]
    assert not out.exists()


def test_on_this_machine_probe_exits_cleanly(tmp_path, capsys):
    # The real nvidia-ml-py: on a machine without a GPU it must still exit 0 with one line.
    out = tmp_path / "gpu.toml"
    assert run_probe("--out", str(out)) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    assert out.exists() == lines[0].startswith("wrote")


def test_probe_writes_a_profile_that_targets_accept(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(available=True))
    measured = Measurements(copy_bytes_per_s=2.9e12, flops_by_dtype={"fp16": 7.0e14, "bf16": 7.1e14, "fp8": 1.3e15})
    monkeypatch.setattr(probe_module, "benchmark", lambda index: measured)
    out = tmp_path / "h100.toml"
    assert run_probe("--out", str(out)) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}")
    profile = get_device(str(out))
    assert profile.key == "h100-80gb-hbm3" and profile.measured
    assert profile.usable_memory_bytes == pytest.approx(85_520_809_984, rel=1e-4)
    assert profile.bandwidth_bytes_per_s == 2.9e12 and profile.peak_flops_by_dtype["fp8"] == 1.3e15
    assert profile.supports("fp8") and profile.arch == "hopper"  # from the catalog match
    assert "catalog match h100-sxm" in profile.source


def test_probe_without_benchmarks_copies_catalog_figures(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(available=True))
    out = tmp_path / "h100.toml"
    assert run_probe("--out", str(out), "--no-benchmark") == 0
    profile = get_device(str(out))
    assert not profile.measured and profile.bandwidth_bytes_per_s == get_device("h100-sxm").bandwidth_bytes_per_s


def test_helpers():
    assert profile_key("NVIDIA GeForce RTX 4090") == "rtx-4090"
    assert "fp8_e4m3" in native_formats_for("8.9") and "fp8_e4m3" not in native_formats_for("8.0")
    assert "nvfp4" in native_formats_for("10.0") and native_formats_for("7.0") == ["fp16"]
