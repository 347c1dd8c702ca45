"""Speed model against published measurements (each within 25%), and its kernel paths.

Sources:
- TINYCHAT: mit-han-lab/llm-awq TinyChat README, per-token decode latency of Llama-3-8B, FP16
  (Hugging Face implementation) and INT4 (AWQ W4A16, group 128, with zero points), batch 1:
  https://github.com/mit-han-lab/llm-awq/blob/048e19e1e7a982c8fa37aaf9ffb803dc4f1c8a62/tinychat/README.md
- LLAMACPP: GPU-Benchmarks-on-LLM-Inference README, llama.cpp `llama-bench` tg512 (batch 1,
  512 generated tokens) of Llama-3-8B F16, May 2024:
  https://github.com/XiongjieDai/GPU-Benchmarks-on-LLM-Inference/blob/00dd2bdeb2404263f22bd6c1cd46ce397e341db5/README.md
- TRTLLM: TensorRT-LLM v0.5 "Low Latency" table, first-token latency at batch 1, LLaMA 7B,
  2048 input tokens: A100 FP16 133 ms, L40S FP8 73 ms:
  https://github.com/NVIDIA/TensorRT-LLM/blob/138f96d45f90b9667426f7c47297d8c06bafac73/docs/source/performance.md

The efficiency defaults were chosen with the TINYCHAT INT4 points in view (they bracket the
W4A16 factor: 0.70 on the 4090, 0.57 on the A6000); the LLAMACPP and TRTLLM points were not used.
"""

import dataclasses
import json
from pathlib import Path

import pytest

from bitplan.errors import BitplanError
from bitplan.methods.scheme import DENSE, Scheme
from bitplan.models.moe import load_spec
from bitplan.planner.deployment import Deployment, memory_breakdown
from bitplan.planner.speed import Efficiency, decode_prediction, decode_step_s, decode_weight_bytes, estimate, kernel_path, prefill_s
from bitplan.profiles.hardware import get_device

CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"
LLAMA3_8B = json.loads((CONFIGS / "llama-3-8b.json").read_text())
LLAMA_7B = dict(  # huggyllama/llama-7b config.json (LLaMA 1), fp16
    model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, vocab_size=32000, torch_dtype="float16",
)
AWQ_W4G128 = Scheme("awq", 4, 128, False)  # AWQ keeps lm_head in fp16
FP8_W8A8 = Scheme("fp8", 8, 0, True, 8)
TOLERANCE = 0.25


def blocks_plan(spec, scheme) -> dict:
    return {layer.name: scheme for layer in spec.layers if layer.kind != "lm_head"}


def decode_tokens_per_s(spec, plan, device_name: str, context: int) -> float:
    device = get_device(device_name)
    deployment = Deployment(budget_bytes=device.usable_memory_bytes, context=context, batch=1)
    return estimate(spec, plan, device, deployment).decode_tokens_per_s


@pytest.mark.parametrize("device, quantized, published_tokens_per_s, source", [
    ("rtx-4090", False, 1000 / 17.07, "TINYCHAT 4090 FP16 17.07 ms"),
    ("rtx-4090", True, 1000 / 6.66, "TINYCHAT 4090 INT4 6.66 ms"),
    ("rtx-a6000", False, 1000 / 24.95, "TINYCHAT A6000 FP16 24.95 ms"),
    ("rtx-a6000", True, 1000 / 10.68, "TINYCHAT A6000 INT4 10.68 ms"),
])
def test_tinychat_llama3_8b_decode(device, quantized, published_tokens_per_s, source):
    spec, _ = load_spec(LLAMA3_8B)
    plan = blocks_plan(spec, AWQ_W4G128) if quantized else {}
    predicted = decode_tokens_per_s(spec, plan, device, context=512)
    assert abs(predicted / published_tokens_per_s - 1) <= TOLERANCE, (source, predicted)


@pytest.mark.parametrize("device, published_tokens_per_s", [("rtx-4090", 54.84), ("rtx-3090", 47.40)])
def test_llamacpp_llama3_8b_f16_decode(device, published_tokens_per_s):
    spec, _ = load_spec(LLAMA3_8B)
    predicted = decode_tokens_per_s(spec, {}, device, context=256)  # tg512: mean context 256
    assert abs(predicted / published_tokens_per_s - 1) <= TOLERANCE, predicted


@pytest.mark.parametrize("device, fp8, published_ms", [("a100-sxm-80gb", False, 133.0), ("l40s", True, 73.0)])
def test_trtllm_llama_7b_prefill_2048(device, fp8, published_ms):
    spec, _ = load_spec(LLAMA_7B)
    profile = get_device(device)
    plan = blocks_plan(spec, FP8_W8A8) if fp8 else {}
    deployment = Deployment(budget_bytes=profile.usable_memory_bytes, context=2048, prefill_chunk_tokens=2048)
    predicted_ms = 1000 * prefill_s(spec, plan, profile, deployment)
    assert abs(predicted_ms / published_ms - 1) <= TOLERANCE, predicted_ms


def test_kernel_paths_follow_native_formats():
    h100, a100, t4 = get_device("h100-sxm"), get_device("a100-sxm-80gb"), get_device("t4")
    assert kernel_path(FP8_W8A8, h100, "bfloat16").peak_key == "fp8"
    assert kernel_path(FP8_W8A8, a100, "bfloat16").peak_key == "fp16"  # no fp8 on Ampere: W8A16
    int8 = Scheme("smoothquant", 8, 0, True, 8)
    assert kernel_path(int8, a100, "bfloat16").peak_key == "int8"
    assert kernel_path(Scheme("gptq", 4, 128, True), h100, "bfloat16").peak_key == "fp16"
    assert kernel_path(DENSE, t4, "bfloat16").peak_key == "bf16" and t4.peak_flops("bf16") == t4.peak_flops("fp16")


def test_prefill_w8a8_is_faster_where_int8_is_native():
    spec, _ = load_spec(LLAMA_7B)
    profile = get_device("a100-sxm-80gb")
    deployment = Deployment(budget_bytes=profile.usable_memory_bytes, context=4096, prefill_chunk_tokens=4096)
    dense = prefill_s(spec, {}, profile, deployment)
    w8a8 = prefill_s(spec, blocks_plan(spec, Scheme("smoothquant", 8, 0, True, 8)), profile, deployment)
    assert w8a8 < 0.8 * dense


def test_decode_slows_with_context_and_speeds_with_fewer_bits():
    spec, _ = load_spec(LLAMA3_8B)
    h100 = get_device("h100-sxm")
    short, long = (Deployment(budget_bytes=h100.usable_memory_bytes, context=c) for c in (1024, 65536))
    assert decode_step_s(spec, {}, h100, long) > 1.3 * decode_step_s(spec, {}, h100, short)
    w4 = blocks_plan(spec, Scheme("gptq", 4, 128, True))
    assert decode_step_s(spec, w4, h100, short) < 0.5 * decode_step_s(spec, {}, h100, short)


def test_moe_decode_reads_only_routed_experts():
    spec, routing = load_spec(json.loads((CONFIGS / "mixtral-8x7b.json").read_text()))
    b200 = get_device("b200")
    one = Deployment(budget_bytes=b200.usable_memory_bytes, context=1024, batch=1)
    step_moe = decode_step_s(spec, {}, b200, one)
    step_all_experts = decode_step_s(dataclasses.replace(spec, num_experts=0, experts_per_token=0), {}, b200, one)
    assert step_moe < 0.4 * step_all_experts  # 2 of 8 experts: about 12.9B of 46.7B parameters
    assert routing == spec.routing and routing.touched_fraction(1) == pytest.approx(0.25)
    assert routing.touched_fraction(64) == pytest.approx(1.0, abs=1e-6)


def test_qwen3_30b_a3b_decode_reads_active_parameters_memory_counts_all():
    """Qwen3-30B-A3B: 30.5B parameters, 3.3B active (8 of 128 experts per token; Qwen's model card).
    A decode token reads the active ones (embeddings aside: one row); memory holds them all. A dense
    model of the same total reads all of them."""
    config = json.loads((CONFIGS / "qwen3-30b-a3b.json").read_text())
    spec, routing = load_spec(config)
    assert (routing.num_experts, routing.experts_per_token) == (128, 8)
    total_params = spec.linear_weights + spec.unquantized_bytes / spec.dtype_bytes
    embedding_params = spec.vocab_size * spec.hidden_size
    assert total_params == pytest.approx(30.5e9, rel=0.01)
    read = decode_weight_bytes(spec, {}) / spec.dtype_bytes
    assert read + embedding_params == pytest.approx(3.3e9, rel=0.03)  # the active parameters
    as_dense = dataclasses.replace(spec, num_experts=0, experts_per_token=0)  # same bytes, every expert read
    assert decode_weight_bytes(as_dense, {}) == spec.linear_weights * spec.dtype_bytes
    assert decode_weight_bytes(spec, {}) < 0.11 * decode_weight_bytes(as_dense, {})
    assert decode_weight_bytes(spec, {}, batch=64) > 0.9 * spec.linear_weights * spec.dtype_bytes  # big batches touch all
    h100 = get_device("h100-sxm")
    one = Deployment(budget_bytes=h100.usable_memory_bytes, context=1024, batch=1)
    w4 = blocks_plan(spec, Scheme("gptq", 4, 128, True))
    prediction = decode_prediction(spec, {name: s.name for name, s in w4.items()}, h100, one)
    assert prediction["decode_weight_bytes_batch1"] == pytest.approx(decode_weight_bytes(spec, w4))
    assert decode_step_s(spec, w4, h100, one) < 0.2 * decode_step_s(as_dense, w4, h100, one)
    weights_bytes = sum(s.weight_bytes(layer.out_features, layer.in_features, 2) for layer in spec.layers
                        for s in [w4.get(layer.name, DENSE)])
    memory = memory_breakdown(spec, weights_bytes, one)  # every expert's bytes, whatever the routing
    assert memory.quantized_weights_bytes == weights_bytes > 14e9
    assert memory_breakdown(spec, 0, one).workspace_bytes == memory_breakdown(spec, 0, one, 8).workspace_bytes


def test_measured_profiles_and_overrides_change_efficiency():
    h100 = get_device("h100-sxm")
    assert Efficiency.for_profile(h100) == Efficiency()
    measured = Efficiency.for_profile(type(h100)(**{**h100.__dict__, "measured": True}))
    assert measured.dense_bandwidth == pytest.approx(0.80 / 0.90)
    tuned = Efficiency.for_profile(type(h100)(**{**h100.__dict__, "efficiency": {"quantized_bandwidth": 0.75}}))
    assert tuned.quantized_bandwidth == 0.75
    with pytest.raises(BitplanError, match="unknown efficiency factor"):
        Efficiency().with_overrides({"warp_speed": 0.5})
    with pytest.raises(BitplanError, match=r"\(0, 1\]"):
        Efficiency().with_overrides({"dense_bandwidth": 1.5})
