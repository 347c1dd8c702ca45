"""vLLM's fused-MoE rules inside the search: a block's experts take one scheme, one its MoE kernels run.

Shapes: Qwen3-30B-A3B (hidden 2048, 128 experts of width 768), 2 blocks, planned by the exact
search over the sensitivity prior; and the tiny Qwen3-MoE of the family tests (hidden 64).
"""

import json
from pathlib import Path

import pytest

from bitplan.api import Candidates
from bitplan.engines import get_rules
from bitplan.engines.rules import allowed, assignment_violations, restrict_table
from bitplan.methods.scheme import DENSE, Scheme
from bitplan.models.spec import EXPERT_KIND, spec_from_config
from bitplan.planner.prior import prior_table
from bitplan.planner.search import allocate

CONFIGS = Path(__file__).parents[1] / "data" / "configs"
QWEN3_30B = {**json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text()), "num_hidden_layers": 2}
TINY = dict(model_type="qwen3_moe", hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=49152, num_experts=4, num_experts_per_tok=2,
            tie_word_embeddings=True)


def vllm_plan(spec, platform: str, bits_per_weight: float) -> dict[str, Scheme]:
    rules = get_rules("vllm", platform)
    table = restrict_table(prior_table(spec, Candidates().schemes(rules), spec.routing), spec, rules)
    allocation = allocate(table, spec, int(spec.linear_weights * bits_per_weight / 8), tie_fused=rules.fused_share_scheme)
    return {name: Scheme.parse(s) for name, s in allocation.choice.items()}


@pytest.mark.parametrize("platform", ["cuda-sm80", "cuda-sm90"])
def test_a_vllm_moe_plan_gives_each_blocks_experts_one_scheme_its_moe_kernels_run(platform):
    spec = spec_from_config(QWEN3_30B)
    rules = get_rules("vllm", platform)
    chosen = vllm_plan(spec, platform, bits_per_weight=5.0)
    assert assignment_violations(rules, spec, chosen) == []
    for block in range(spec.num_blocks):
        experts = {chosen[layer.name] for layer in spec.layers if layer.kind == EXPERT_KIND and layer.block == block}
        assert len(experts) == 1, f"block {block}: experts split into {experts}"
        scheme = experts.pop()
        assert scheme.is_dense or any(kernel.takes(scheme) for kernel in rules.expert_kernels), scheme
    assert any(not chosen[layer.name].is_dense for layer in spec.layers if layer.kind == EXPERT_KIND)


def test_on_vllms_cpu_platforms_experts_stay_dense():
    spec = spec_from_config(QWEN3_30B)
    for platform in ("cpu-avx2", "cpu-avx512"):
        rules = get_rules("vllm", platform)
        expert = next(layer for layer in spec.layers if layer.kind == EXPERT_KIND)
        assert "AMX" in rules.layer_refusal(expert, Scheme("rtn", 4, 128, True), spec)
        assert not allowed(rules, spec)(expert, Scheme("smoothquant", 8, 0, True, 8))
        chosen = vllm_plan(spec, platform, bits_per_weight=15.5)  # experts are 95% of the weights
        assert all(chosen[layer.name].is_dense for layer in spec.layers if layer.kind == EXPERT_KIND)
        assert assignment_violations(rules, spec, chosen) == []
        assert any("experts (fused MoE) stay dense" in line for line in rules.summary())


def test_moe_kernel_rules_as_vllm_selects_them():
    """What vLLM 0.32's oracle answered (tests/checkpoints/test_vllm_moe.py asks it again)."""
    wide, tiny = spec_from_config(QWEN3_30B), spec_from_config(TINY)
    sm90 = get_rules("vllm", "cuda-sm90")

    def refusal(spec, scheme):
        return sm90.layer_refusal(next(layer for layer in spec.layers if layer.kind == EXPERT_KIND), scheme, spec)

    assert refusal(wide, Scheme("rtn", 4, 0, True)) is None  # Marlin: hidden 2048 % 128, per channel
    assert refusal(wide, Scheme("rtn", 8, 128, True)) is None
    assert "no fused-MoE kernel" in refusal(wide, Scheme("rtn", 8, 128, False))  # asymmetric 8-bit: no backend
    assert "no fused-MoE kernel" in refusal(wide, Scheme("rtn", 3, 128, True))
    assert "no fused-MoE kernel" in refusal(wide, Scheme("fp8", 8, 0, True))  # weight-only FP8: refused for MoE
    assert refusal(wide, Scheme("fp8", 8, 0, True, 8)) is None
    assert refusal(tiny, Scheme("rtn", 4, 32, True)) is None  # Triton WNA16 (hidden 64 is no Marlin shape)
    assert refusal(tiny, Scheme("rtn", 4, 0, True)) is not None  # Triton WNA16 takes groups only
    assert "FP8" not in " ".join(kernel.name for kernel in get_rules("vllm", "cuda-sm80").expert_kernels)


def test_experts_of_a_block_with_two_schemes_are_refused_in_one_line():
    spec = spec_from_config(QWEN3_30B)
    rules = get_rules("vllm", "cuda-sm90")
    w4 = Scheme("rtn", 4, 128, True)
    plan = {layer.name: w4 if layer.kind == EXPERT_KIND else DENSE for layer in spec.layers}
    plan["model.layers.1.mlp.experts.5.down_proj"] = Scheme("rtn", 8, 128, True)
    problems = assignment_violations(rules, spec, plan)
    assert len(problems) == 1 and "\n" not in problems[0]
    assert problems[0].startswith("block 1 experts: vllm runs experts as a fused-MoE layer holding every expert, which needs one scheme")
    assert "compressed_tensors_moe.py" in problems[0]
