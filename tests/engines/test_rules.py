"""Engine rules inside the search: fused groups never split, only formats the target runs, even shards.

Plans here are made by the exact search over the sensitivity prior of real large-model shapes
(Llama-3-70B, Qwen2-72B from config.json), so each runs in a fraction of a second.
"""

import json
from pathlib import Path

import pytest

from bitplan.api import Candidates
from bitplan.engines import ENGINES, PLATFORMS, RULES, get_rules
from bitplan.engines.rules import allowed, assignment_violations, partition_shape, restrict_table
from bitplan.errors import BitplanError
from bitplan.methods.scheme import Scheme
from bitplan.models.spec import spec_from_config
from bitplan.planner.prior import prior_table
from bitplan.planner.search import allocate, smallest_plan_bytes

CONFIGS = Path(__file__).parents[1] / "data" / "configs"


def spec_of(name: str):
    return spec_from_config(json.loads((CONFIGS / f"{name}.json").read_text()))


def plan_for(spec, rules, tp: int, bits_per_weight: float):
    """The exact allocation under the engine's rules at an average of ``bits_per_weight`` bits."""
    schemes = Candidates().schemes(rules)
    table = restrict_table(prior_table(spec, schemes), spec, rules, tp)
    budget = int(spec.linear_weights * bits_per_weight / 8)
    assert smallest_plan_bytes(spec, schemes, rules.fused_share_scheme, allowed(rules, spec, tp)) <= budget
    allocation = allocate(table, spec, budget, tie_fused=rules.fused_share_scheme)
    return {name: Scheme.parse(s) for name, s in allocation.choice.items()}


def test_every_rule_names_its_source():
    for rules in RULES.values():
        assert rules.kernels and all(kernel.source for kernel in rules.kernels), rules.key
        assert rules.sources.get("lm_head") and rules.sources.get("fused"), rules.key


@pytest.mark.parametrize("platform", ["cuda-sm80", "cuda-sm90"])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_vllm_plan_keeps_fused_groups_whole_runs_on_its_target_and_shards_evenly(platform, tp):
    spec = spec_of("llama-3-70b")
    rules = get_rules("vllm", platform)
    chosen = plan_for(spec, rules, tp, bits_per_weight=5.0)
    assert assignment_violations(rules, spec, chosen, tp) == []
    quantized = [s for s in chosen.values() if not s.is_dense]
    assert len({s.name for s in quantized}) > 1, "a 5-bit average on a mixed candidate set should mix schemes"
    for layer in spec.layers:
        scheme = chosen[layer.name]
        siblings = {chosen[m.name] for m in spec.fused_members(layer)}
        assert siblings == {scheme}, f"{layer.name}: fused group split into {siblings}"
        assert rules.takes(scheme), f"{layer.name}: {scheme} has no kernel on {platform}"
        k, n = partition_shape(layer, spec, tp)
        if scheme.group_size:
            assert k % scheme.group_size == 0, f"{layer.name}: group {scheme.group_size} straddles a partition of {k}"
        if layer.kind in ("o", "down"):
            assert k * tp == layer.in_features
        if layer.kind == "lm_head":
            assert scheme.is_dense or rules.quantized_lm_head


def test_a_group_that_would_straddle_a_tensor_parallel_partition_is_never_chosen():
    # Qwen2-72B: down_proj has 29568 = 231 x 128 inputs; at tp 2 each device holds 14784 = 115.5 x 128.
    spec = spec_of("qwen2-72b")
    rules = get_rules("vllm", "cuda-sm90")
    down = next(layer for layer in spec.layers if layer.kind == "down")
    g128 = Scheme.parse("rtn-w4g128s")
    assert rules.layer_refusal(down, g128, spec, tp=1) is None
    assert "does not divide the 14784 inputs per partition" in rules.layer_refusal(down, g128, spec, tp=2)
    chosen = plan_for(spec, rules, tp=2, bits_per_weight=4.6)
    downs = {chosen[layer.name] for layer in spec.layers if layer.kind == "down"}
    assert all(s.is_dense or s.group_size != 128 for s in downs), downs
    assert any(not s.is_dense for s in downs)
    assert assignment_violations(rules, spec, chosen, 2) == []


def test_tensor_parallel_must_split_heads_evenly():
    spec = spec_of("llama-3-70b")  # 64 heads, 8 KV heads
    rules = get_rules("vllm", "cuda-sm80")
    from bitplan.engines.rules import model_refusal

    assert model_refusal(spec, rules, 8) is None and model_refusal(spec, rules, 16) is None  # 16 > 8: KV heads replicate
    assert "does not divide the model's 64 attention heads" in model_refusal(spec, rules, 7)
    assert "runs on one device" in model_refusal(spec, get_rules("transformers"), 2)


def test_each_engine_offers_only_what_it_runs():
    everything = {s.name for s in Candidates().schemes()}
    offered = {engine: {s.name for s in Candidates().schemes(get_rules(engine))} for engine in ENGINES}
    assert offered["bitplan"] == everything
    assert not any(n.startswith("nf4") or "-w3" in n or "-w2" in n for n in offered["vllm"])
    assert not any(n.endswith("a") or n.startswith("smoothquant") or n.startswith("nf4") for n in offered["transformers"] - {"none"})
    assert "smoothquant-w8gcsa8" in offered["vllm"] and "rtn-w3g64s" in offered["transformers"]
    assert all(n.startswith("ggml-") for n in offered["llama.cpp"] - {"none"}) and "ggml-q4_k" in offered["llama.cpp"]
    with pytest.raises(BitplanError, match="no candidate scheme is left for vllm"):
        Candidates(("nf4",)).schemes(get_rules("vllm"))


def test_a_plan_that_splits_a_fused_group_or_uses_a_foreign_format_is_named_layer_by_layer():
    spec = spec_of("llama-3-70b")
    rules = get_rules("vllm", "cuda-sm80")
    chosen = {layer.name: Scheme.parse("rtn-w4g128s") for layer in spec.layers}
    chosen["model.layers.3.self_attn.k_proj"] = Scheme.parse("rtn-w8g128s")
    chosen["model.layers.5.mlp.down_proj"] = Scheme.parse("nf4-w4g64s")
    problems = assignment_violations(rules, spec, chosen)
    assert any(p.startswith("model.layers.5.mlp.down_proj (nf4-w4g64s): no kernel of vllm") for p in problems)
    assert any(p.startswith("block 3 qkv: vllm runs qkv as one fused Linear") for p in problems)
    assert assignment_violations(get_rules("bitplan"), spec, chosen) == []


def test_an_engine_that_cannot_run_on_the_target_is_refused():
    with pytest.raises(BitplanError, match="unknown engine 'tensorrt'"):
        get_rules("tensorrt")
    with pytest.raises(BitplanError, match="engine vllm has no rules in bitplan for mi300x"):
        get_rules("vllm", "mi300x", compute_capability="", arch="cdna3")
    with pytest.raises(BitplanError, match="compute capability 7.5"):
        get_rules("vllm", "t4", compute_capability="7.5")
    assert get_rules("vllm", "h100-sxm", compute_capability="9.0").platform == "cuda-sm90"
    assert get_rules("vllm", "a100-pcie-40gb", compute_capability="8.0").platform == "cuda-sm80"
    assert {get_rules("vllm", p).platform for p in PLATFORMS} == set(PLATFORMS)
