"""`bitplan compare` on Llama-3-8B, Llama-3-70B, Llama-3.1-405B and Mixtral-8x7B config.json files.

The memory column is checked against totals computed by hand below from the public configs.
"""

import argparse
import itertools
import json
from pathlib import Path

import pytest

from bitplan.cli.hardware import add_commands, render_table
from bitplan.errors import BitplanError
from bitplan.methods.scheme import Scheme
from bitplan.models.moe import load_spec
from bitplan.planner.compare import CompareSettings, compare
from bitplan.planner.prior import prior_table
from bitplan.profiles.hardware import get_devices

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"
DEVICES = "h100-sxm,a100-pcie-40gb,l40s,rtx-4090,a10,mi300x"
GIB = 2**30


def spec_of(name: str):
    return load_spec(json.loads((CONFIGS / f"{name}.json").read_text()))


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="bitplan")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


@pytest.fixture(scope="module")
def comparisons():
    out = {}
    for name in ("llama-3-8b", "llama-3-70b", "mixtral-8x7b"):
        spec, routing = spec_of(name)
        out[name] = compare(spec, routing, get_devices(DEVICES), CompareSettings(context=8192))
    return out


def result(comparisons, model: str, device: str):
    return next(r for r in comparisons[model].results if r.device == device)


# ---- hand-computed memory ---------------------------------------------------------------

def test_llama3_8b_on_h100_dense(comparisons):
    r = result(comparisons, "llama-3-8b", "h100-sxm")
    block = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336  # q, o, k, v, gate, up, down
    params = 32 * block + 2 * 128256 * 4096 + 32 * 2 * 4096 + 4096  # + embed, lm_head, norms
    weights = 2 * params  # bf16: nothing needs quantizing on 79.65 GiB
    kv = 32 * 2 * 8 * 128 * 2 * 8192
    workspace = 512 * (3 * 14336 + 4 * 4096) * 2  # one 512-token prefill step
    total = weights + kv + workspace + GIB
    assert params == 8_030_261_248 and total == 18_268_823_552
    assert r.fits and set(r.scheme_shares) == {"none"}
    assert r.memory.total_bytes == total
    assert "18.27" in row_text(comparisons["llama-3-8b"], "h100-sxm")


def test_llama3_70b_does_not_fit_an_a10(comparisons):
    r = result(comparisons, "llama-3-70b", "a10")
    numel = 80 * (2 * 8192 * 8192 + 2 * 8192 * 1024 + 3 * 8192 * 28672) + 128256 * 8192
    weights_2bit = numel * 2 // 8 + numel // 64 * 2 + 561 * 16  # codes + fp16 scale per 64 + shapes
    unquantized = (128256 * 8192 + 80 * 2 * 8192 + 8192) * 2
    kv = 80 * 2 * 8 * 128 * 2 * 8192
    workspace = 512 * (3 * 28672 + 4 * 8192) * 2
    needed = weights_2bit + unquantized + kv + workspace + GIB
    assert needed == 25_531_081_488
    assert not r.fits and r.memory.total_bytes == needed and needed > r.usable_memory_bytes
    assert "needs 25.53 GB" in row_text(comparisons["llama-3-70b"], "a10")


def test_llama31_405b_plans_from_its_config():
    """A 405B model plans from config.json alone: 2 bits cannot bring it under an H100's 80 GB, an
    MI300X's 192 GB takes it at about 4 bits (memory counted from the public config, as above)."""
    spec, routing = spec_of("llama-3.1-405b")
    numel = 126 * (2 * 16384 * 16384 + 2 * 16384 * 1024 + 3 * 16384 * 53248)
    assert spec.linear_weights == numel + 128256 * 16384  # the blocks' Linears and the untied head
    rows = compare(spec, routing, get_devices("h100-sxm,mi300x"), CompareSettings(context=8192)).results
    h100, mi300x = (next(r for r in rows if r.device == d) for d in ("h100-sxm", "mi300x"))
    assert not h100.fits and h100.memory.total_bytes > 2 * (numel // 8) > h100.usable_memory_bytes
    assert mi300x.fits and mi300x.memory.total_bytes <= mi300x.usable_memory_bytes
    assert 3.5 < 8 * mi300x.memory.quantized_weights_bytes / spec.linear_weights < 4.5


def test_mixtral_on_mi300x_dense(comparisons):
    r = result(comparisons, "mixtral-8x7b", "mi300x")
    block = 2 * 4096 * 4096 + 2 * 4096 * 1024 + 8 * 3 * 4096 * 14336
    params = 32 * block + 2 * 32000 * 4096 + 32 * 2 * 4096 + 4096 + 32 * 8 * 4096  # + router
    kv = 32 * 2 * 8 * 128 * 2 * 8192
    workspace = 512 * (2 * 3 * 14336 + 4 * 4096) * 2  # each token runs 2 experts
    total = 2 * params + kv + workspace + GIB
    assert total == 95_657_926_656
    assert r.fits and r.memory.total_bytes == total
    assert "95.66" in row_text(comparisons["mixtral-8x7b"], "mi300x")


def row_text(comparison, device: str) -> str:
    import io

    from rich.console import Console

    console = Console(width=250, record=True, file=io.StringIO())
    console.print(render_table(comparison))
    rows = [line for line in console.export_text().splitlines() if line.startswith("│")]
    return next(line for line in rows if line.split("│")[1].strip() == device)


# ---- every model x device ---------------------------------------------------------------

@pytest.mark.parametrize("model", ["llama-3-8b", "llama-3-70b", "mixtral-8x7b"])
def test_each_device_is_consistent(comparisons, model):
    comparison = comparisons[model]
    assert comparison.loss_metric == "prior-kl"
    spec, _ = spec_of(model)
    for r in comparison.results:
        assert r.fits == (r.memory.total_bytes <= r.usable_memory_bytes), r.device
        if r.fits:
            assert r.decode_tokens_per_s > 0 and r.prefill_tokens_per_s > 0 and r.max_batch >= 1
        groups = {}
        for layer in spec.layers:  # fused groups share one scheme
            groups.setdefault(layer.fused_key, set()).add(r.assignments[layer.name])
        assert all(len(schemes) == 1 for schemes in groups.values())
    fitting = [r for r in comparison.results if r.fits]
    # more memory never gives a worse predicted loss
    for a, b in itertools.combinations(fitting, 2):
        if a.weight_budget_bytes <= b.weight_budget_bytes:
            assert b.predicted_loss <= a.predicted_loss + 1e-12


def test_speed_objective_trades_quality_for_time():
    spec, routing = spec_of("llama-3-8b")
    settings = dict(context=4096, schemes=("none", "gptq-w8gcs", "gptq-w4g128s"))
    quality = compare(spec, routing, get_devices("h100-sxm"), CompareSettings(**settings)).results[0]
    speed = compare(spec, routing, get_devices("h100-sxm"), CompareSettings(objective="speed", **settings)).results[0]
    assert speed.decode_tokens_per_s > 2 * quality.decode_tokens_per_s
    assert speed.predicted_loss > quality.predicted_loss


def test_measured_table_replaces_the_prior():
    spec, routing = spec_of("llama-3-8b")
    schemes = [Scheme.parse(n) for n in ("none", "gptq-w4g128s")]
    table = prior_table(spec, schemes)
    table.provenance = {"metric": "fisher-kl"}
    comparison = compare(spec, routing, get_devices("rtx-4090"), CompareSettings(context=2048), table)
    assert comparison.loss_metric == "fisher-kl" and comparison.results[0].loss_metric == "fisher-kl"
    table.layers = table.layers[1:]
    with pytest.raises(BitplanError, match="do not match"):
        compare(spec, routing, get_devices("rtx-4090"), CompareSettings(), table)


def test_compare_uses_the_exact_allocation_of_plan():
    """The same table and budget give compare's plan and search.allocate's, fused groups tied."""
    from bitplan.planner.deployment import weight_budget_bytes
    from bitplan.planner.search import allocate

    spec, routing = spec_of("llama-3-8b")
    settings = CompareSettings(context=4096, schemes=("none", "gptq-w8gcs", "gptq-w4g128s", "gptq-w3g128s"))
    table = prior_table(spec, [Scheme.parse(n) for n in settings.schemes])
    device = get_devices("rtx-4090")[0]
    row = compare(spec, routing, [device], settings, table).results[0]
    exact = allocate(table, spec, weight_budget_bytes(spec, settings.deployment(device)), tie_fused=True)
    assert row.fits and row.assignments == exact.choice and row.predicted_loss == pytest.approx(exact.score)


# ---- the CLI and bad input --------------------------------------------------------------

def test_cli_compare_prints_the_table_and_marks_the_prior(tmp_path, capsys):
    out_json, out_png = tmp_path / "c.json", tmp_path / "c.png"
    argv = ["compare", str(CONFIGS / "llama-3-8b.json"), "--targets", "h100-sxm,l40s", "--context", "4096", "--json", str(out_json)]
    pytest.importorskip("matplotlib")
    argv += ["--plot", str(out_png)]
    assert run_cli(*argv) == 0
    text = capsys.readouterr().out
    assert "h100-sxm" in text and "l40s" in text and "PRIOR" in text
    data = json.loads(out_json.read_text())
    assert [r["device"] for r in data["results"]] == ["h100-sxm", "l40s"]
    assert out_png.stat().st_size > 10_000


def test_unknown_device_suggests_nearest():
    with pytest.raises(BitplanError, match="did you mean.*h100-sxm"):
        run_cli("compare", str(CONFIGS / "llama-3-8b.json"), "--targets", "h100-sxn")


@pytest.mark.parametrize("flag", ["--context", "--batch"])
def test_zero_context_or_batch(flag):
    with pytest.raises(BitplanError, match="at least 1"):
        run_cli("compare", str(CONFIGS / "llama-3-8b.json"), "--targets", "l40s", flag, "0")


@pytest.mark.parametrize("body, message", [
    ('name = "x"\nmemory_gib = 24\nsource = "me"\n', "lacks bandwidth_bytes_per_s, peak_flops"),
    ('name = "x"\nmemory_gib = -24\nbandwidth_bytes_per_s = 1e12\npeak_flops = { fp16 = 1e14 }\nsource = "me"\n', "non-positive"),
    ('name = "x"\nmemory_gib = 24\nbandwidth_bytes_per_s = 1e12\npeak_flops = { fp16 = -1e14 }\nsource = "me"\n', "peak_flops.fp16"),
])
def test_bad_profile_toml(tmp_path, body, message):
    path = tmp_path / "gpu.toml"
    path.write_text("[mygpu]\n" + body)
    with pytest.raises(BitplanError, match=message):
        run_cli("compare", str(CONFIGS / "llama-3-8b.json"), "--targets", str(path))


def test_missing_config_and_bad_objective(tmp_path):
    with pytest.raises(BitplanError, match="neither a config.json"):
        run_cli("compare", str(tmp_path / "nothing.json"))
    with pytest.raises(BitplanError, match="unknown objective"):
        CompareSettings(objective="vibes")
