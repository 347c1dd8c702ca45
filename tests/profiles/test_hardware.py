"""Device catalog, profile files, name lookup and `bitplan devices`."""

import argparse
import tomllib
from pathlib import Path

import pytest

from bitplan.cli.hardware import add_commands
from bitplan.errors import BitplanError
from bitplan.profiles.hardware import (
    GIB,
    get_device,
    get_devices,
    load_catalog,
    load_profile_file,
    match_catalog_device,
    nearest_device_names,
)

SHARED_CATALOG = Path("/work/shared/reference/accelerators.toml")
GOOD = 'name = "My GPU"\nmemory_gib = 24\nbandwidth_bytes_per_s = 1e12\npeak_flops = { fp16 = 1.5e14, int8 = 3e14 }\nsource = "data sheet"\n'


def test_catalog_has_every_device_with_a_source():
    catalog = load_catalog()
    assert len(catalog) == 28
    for key, profile in catalog.items():
        assert profile.source.strip(), key
        assert profile.usable_memory_bytes > 0 and profile.bandwidth_bytes_per_s > 0 and profile.peak_flops_by_dtype
    h100 = catalog["h100-sxm"]
    assert h100.usable_memory_bytes == int(79.65 * GIB)  # 81559 MiB as nvidia-smi reports, not "80 GB"
    assert h100.supports("fp8") and not catalog["a100-sxm-80gb"].supports("fp8")
    assert catalog["a100-sxm-80gb"].supports("int8") and catalog["b200"].supports("fp4")


@pytest.mark.skipif(not SHARED_CATALOG.is_file(), reason="shared reference not mounted")
def test_catalog_matches_the_shared_reference():
    shared = tomllib.loads(SHARED_CATALOG.read_text())
    assert set(shared) == set(load_catalog())


def test_get_device_by_name_and_nearest_names():
    assert get_device("L40S").key == "l40s"
    with pytest.raises(BitplanError, match="did you mean rtx-4090"):
        get_device("rtx4090")
    assert "h100-sxm" in nearest_device_names("h100")
    assert [d.key for d in get_devices("l40s, h100-sxm,l40s")] == ["l40s", "h100-sxm"]
    with pytest.raises(BitplanError, match="no devices"):
        get_devices(" , ")


def test_profile_file_round_trip(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text("[mygpu]\n" + GOOD + 'native_formats = ["fp16", "int8"]\nefficiency = { dense_bandwidth = 0.9 }\n')
    profile = get_device(str(path))
    assert profile.key == "mygpu" and profile.usable_memory_bytes == 24 * GIB
    assert profile.supports("int8") and profile.efficiency == {"dense_bandwidth": 0.9}
    assert profile.peak_flops("bf16") == 1.5e14  # falls back to fp16


@pytest.mark.parametrize("body, message", [
    ('name = "x"\nsource = "y"\n', "lacks memory_gib, bandwidth_bytes_per_s, peak_flops"),
    (GOOD.replace("memory_gib = 24", "memory_gib = -1"), "non-positive or non-numeric memory_gib"),
    (GOOD.replace("1e12", '"fast"'), "bandwidth_bytes_per_s"),
    (GOOD.replace("peak_flops = { fp16 = 1.5e14, int8 = 3e14 }", "peak_flops = 5"), "peak_flops must be a table"),
    (GOOD + "native_formats = 3\n", "native_formats must be a list"),
    (GOOD + "efficiency = { dense_bandwidth = 0 }\n", "efficiency.dense_bandwidth"),
])
def test_bad_profiles_say_what_to_fix(tmp_path, body, message):
    path = tmp_path / "bad.toml"
    path.write_text("[bad]\n" + body)
    with pytest.raises(BitplanError, match=message):
        load_profile_file(path)


def test_unreadable_or_absent_profile(tmp_path):
    with pytest.raises(BitplanError, match="bitplan probe --out"):
        get_device(str(tmp_path / "absent.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("[x\nname=")
    with pytest.raises(BitplanError, match="cannot read device profile"):
        get_device(str(broken))
    two = tmp_path / "two.toml"
    two.write_text("[a]\n" + GOOD + "[b]\n" + GOOD)
    with pytest.raises(BitplanError, match="exactly one"):
        get_device(str(two))


@pytest.mark.parametrize("reported, memory_bytes, key", [
    ("NVIDIA H100 80GB HBM3", 85_520_809_984, "h100-sxm"),
    ("NVIDIA GeForce RTX 4090", 25_757_220_864, "rtx-4090"),
    ("NVIDIA A100-SXM4-80GB", 85_899_345_920, "a100-sxm-80gb"),
    ("NVIDIA A100-PCIE-40GB", 42_949_672_960, "a100-pcie-40gb"),
    ("Tesla T4", 16_106_127_360, "t4"),
])
def test_nvml_names_match_the_catalog(reported, memory_bytes, key):
    assert match_catalog_device(reported, memory_bytes).key == key


def test_devices_command_lists_the_catalog(capsys):
    parser = argparse.ArgumentParser(prog="bitplan")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["devices"])
    assert args.func(args) == 0
    text = capsys.readouterr().out
    assert all(key in text for key in ("h100-sxm", "mi300x", "gaudi3", "rtx-4090"))
    args = parser.parse_args(["devices", "--json"])
    assert args.func(args) == 0
    assert '"h100-sxm"' in capsys.readouterr().out
