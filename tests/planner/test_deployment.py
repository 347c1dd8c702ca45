"""Memory model: hand-computed KV cases and published reference points (each with its source).

Sources:
- VLLM019: llm-d-planner's accuracy report, vLLM v0.19.0 on one H100-80GB (79.19 GiB as
  cudaMemGetInfo reports), gpu_memory_utilization 0.95, max_num_batched_tokens 8192,
  max_num_seqs 1024 (the OPENAI_API_SERVER defaults its logs print):
  https://github.com/llm-d-incubation/llm-d-planner/blob/fbd68515a903397a1b785a2189dc7512b0d55680/accuracy/results/v0.19.0/accuracy_report.md
- VLLM10511: vLLM PR #10511, `vllm serve meta-llama/Meta-Llama-3-8B` memory profile on an H100
  (79.22 GiB, utilization 0.90): https://github.com/vllm-project/vllm/pull/10511
- LLAMACPP: GPU-Benchmarks-on-LLM-Inference README, llama.cpp GGUF sizes of Llama 3 (F16 14.96 /
  131.42 GB; 70B Q8_0 69.83 GiB from dranger003's table in llama.cpp PR #6745):
  https://github.com/XiongjieDai/GPU-Benchmarks-on-LLM-Inference/blob/00dd2bdeb2404263f22bd6c1cd46ce397e341db5/README.md
"""

import json
from pathlib import Path

import pytest

from bitplan.errors import BitplanError
from bitplan.methods.scheme import DENSE, Scheme
from bitplan.models.moe import load_spec
from bitplan.models.spec import spec_from_config
from bitplan.planner.deployment import (
    Deployment,
    default_overhead_bytes,
    kv_bytes_per_token,
    kv_cache_bytes,
    max_batch,
    memory_breakdown,
    parse_size,
    weight_budget_bytes,
    workspace_bytes,
)
from bitplan.profiles.hardware import get_device

GIB = 2**30
CONFIGS = Path(__file__).resolve().parents[1] / "data" / "configs"
TOLERANCE = 0.10


def config(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


LLAMA_31_8B = config("llama-3-8b")  # Llama-3.1-8B has the same shapes as Llama-3-8B
QWEN25_7B = dict(  # Qwen/Qwen2.5-7B-Instruct config.json
    model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False, torch_dtype="bfloat16",
)
CODELLAMA_7B = dict(  # codellama/CodeLlama-7b-hf config.json
    model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
    num_attention_heads=32, num_key_value_heads=32, vocab_size=32016, torch_dtype="bfloat16",
)


def close(predicted: float, published: float, tolerance: float = TOLERANCE) -> bool:
    return abs(predicted - published) <= tolerance * published


def plan_bytes(spec, scheme_for) -> int:
    return sum(scheme_for(layer).weight_bytes(layer.out_features, layer.in_features, spec.dtype_bytes) for layer in spec.layers)


def dense_model_bytes(spec, tp: int = 1) -> int:
    m = memory_breakdown(spec, plan_bytes(spec, lambda layer: DENSE), Deployment(budget_bytes=1, tensor_parallel=tp))
    return m.quantized_weights_bytes + m.unquantized_bytes


# ---- hand-computed KV cache cases -------------------------------------------------------

def test_kv_cache_hand_computed_llama3_8b():
    spec, _ = load_spec(LLAMA_31_8B)
    # 32 blocks x 2 (K, V) x 8 KV heads x 128 head_dim x 2 bytes = 131072 bytes per token
    assert kv_bytes_per_token(spec, "bfloat16") == 131072
    deployment = Deployment(budget_bytes=GIB, context=8192, batch=4)
    assert kv_cache_bytes(spec, deployment) == 131072 * 8192 * 4 == 4 * GIB
    assert kv_cache_bytes(spec, Deployment(budget_bytes=GIB, context=8192, batch=4, kv_dtype="fp8")) == 2 * GIB
    assert kv_cache_bytes(spec, Deployment(budget_bytes=GIB, context=8192, batch=4, kv_dtype="int8")) == 2 * GIB
    assert kv_cache_bytes(spec, Deployment(budget_bytes=GIB, context=8192, batch=4, tensor_parallel=2)) == 2 * GIB


def test_kv_heads_replicate_beyond_their_count():
    spec, _ = load_spec(config("llama-3-70b"))  # 8 KV heads, 80 blocks
    per_token_tp8 = 80 * 2 * 1 * 128 * 2
    assert kv_bytes_per_token(spec, "float16", 8) == per_token_tp8
    assert kv_bytes_per_token(spec, "float16", 16) == per_token_tp8  # one head per device, replicated


def test_mixtral_shapes_match_published_parameter_counts():
    # Mistral AI: Mixtral 8x7B has 46.7B parameters and uses 12.9B per token.
    spec, routing = load_spec(config("mixtral-8x7b"))
    total = spec.linear_weights + spec.unquantized_bytes // spec.dtype_bytes
    assert close(total, 46.7e9, 0.01)
    experts = sum(layer.num_weights for layer in spec.layers if layer.kind == "expert")
    active = total - experts + experts * routing.active_fraction
    assert close(active, 12.9e9, 0.02)
    assert kv_bytes_per_token(spec, "bfloat16") == 131072


# ---- published reference points ---------------------------------------------------------

@pytest.mark.parametrize("tp, published_gib", [(1, 14.99), (2, 7.51), (4, 3.77)])
def test_vllm019_llama31_8b_weights(tp, published_gib):
    spec, _ = load_spec(LLAMA_31_8B)
    assert close(dense_model_bytes(spec, tp) / GIB, published_gib)  # VLLM019, TP sensitivity table


def test_vllm019_qwen25_7b_weights():
    spec, _ = load_spec(QWEN25_7B)
    assert close(dense_model_bytes(spec) / GIB, 14.25)  # VLLM019, 14.25 GiB


def test_vllm019_llama31_8b_fp8_weights():
    # VLLM019: `--quantization fp8` (Linears in E4M3, lm_head kept in bf16): 8.49 GiB
    spec, _ = load_spec(LLAMA_31_8B)
    fp8 = Scheme("fp8", 8, 0, True, 8)
    weights = plan_bytes(spec, lambda layer: DENSE if layer.kind == "lm_head" else fp8)
    assert close((weights + spec.unquantized_bytes) / GIB, 8.49)


@pytest.mark.parametrize("model, kv_dtype, pool_gib, published_tokens", [
    (LLAMA_31_8B, "bfloat16", 58.11, 476_016),
    (LLAMA_31_8B, "fp8", 58.11, 952_032),
    (QWEN25_7B, "bfloat16", 58.53, 1_096_000),
])
def test_vllm019_kv_pool_tokens(model, kv_dtype, pool_gib, published_tokens):
    spec, _ = load_spec(model)  # VLLM019: KV pool in GiB and the token count vLLM derived from it
    assert close(pool_gib * GIB / kv_bytes_per_token(spec, kv_dtype), published_tokens)


@pytest.mark.parametrize("model, published_gib", [(LLAMA_31_8B, 1.89), (QWEN25_7B, 2.21), (CODELLAMA_7B, 0.77)])
def test_vllm019_activation_peak(model, published_gib):
    # VLLM019 "Actual activ (GiB)" (CodeLlama: the +523.38% error on the 4.80 GiB constant).
    # vLLM profiles 8192 batched tokens and samples for max_num_seqs = 1024 sequences.
    spec, _ = load_spec(model)
    deployment = Deployment(budget_bytes=80 * GIB, context=8192, batch=1024, prefill_chunk_tokens=8192)
    assert close(workspace_bytes(spec, deployment) / GIB, published_gib)


def test_vllm019_end_to_end_kv_tokens():
    # VLLM019: 0.95 x 79.19 GiB; vLLM fits 476,016 KV tokens for Llama-3.1-8B at TP 1.
    spec, _ = load_spec(LLAMA_31_8B)
    budget = int(0.95 * 79.19 * GIB)
    profile_run = Deployment(budget_bytes=budget, context=8192, batch=1024, prefill_chunk_tokens=8192,
                             overhead_bytes=default_overhead_bytes(1))
    rest = memory_breakdown(spec, plan_bytes(spec, lambda layer: DENSE), profile_run)
    pool = budget - rest.quantized_weights_bytes - rest.unquantized_bytes - rest.workspace_bytes - rest.overhead_bytes
    assert close(pool / kv_bytes_per_token(spec, "bfloat16"), 476_016)


def test_vllm_pr10511_llama3_8b():
    # VLLM10511: weights 14.96 GiB (TP 1) and 7.48 GiB (TP 2); of 71.29 GiB, 53.29 GiB left for KV
    # with max_num_seqs 256 and 8192 batched tokens (the vLLM 0.6 defaults).
    spec, _ = load_spec(config("llama-3-8b"))
    assert close(dense_model_bytes(spec, 1) / GIB, 14.96)
    assert close(dense_model_bytes(spec, 2) / GIB, 7.48)
    deployment = Deployment(budget_bytes=int(71.29 * GIB), context=8192, batch=256, prefill_chunk_tokens=8192,
                            overhead_bytes=default_overhead_bytes(1))
    rest = memory_breakdown(spec, plan_bytes(spec, lambda layer: DENSE), Deployment(**{**deployment.to_dict(), "context": 1}))
    pool = deployment.budget_bytes - (rest.total_bytes - rest.kv_cache_bytes)
    assert close(pool / GIB, 53.29)


@pytest.mark.parametrize("name, published_gib", [("llama-3-8b", 14.96), ("llama-3-70b", 131.42)])
def test_llamacpp_f16_sizes(name, published_gib):
    spec, _ = load_spec(config(name))  # LLAMACPP "Original size (f16)"
    assert close(dense_model_bytes(spec) / GIB, published_gib)


def test_llamacpp_q8_0_llama3_70b():
    # LLAMACPP perplexity table: Q8_0 = 8-bit codes with one fp16 scale per 32 weights (our
    # rtn-w8g32s with fp16 scales) for every matrix; llama.cpp also quantizes the embedding,
    # which bitplan keeps in bf16.
    spec, _ = load_spec(config("llama-3-70b"))
    q8_0 = Scheme("rtn", 8, 32, True)
    weights = sum(q8_0.weight_bytes(layer.out_features, layer.in_features, 2) for layer in spec.layers)
    assert close((weights + spec.unquantized_bytes) / GIB, 69.83)


# ---- behaviour --------------------------------------------------------------------------

def test_workspace_is_shared_chunk_and_sampler_max():
    spec, _ = load_spec(LLAMA_31_8B)
    small = Deployment(budget_bytes=GIB, context=100, batch=2, prefill_chunk_tokens=512)
    # 200 tokens (shorter than the chunk) x (3 x 14336 + 4 x 4096) x 2 bytes
    assert workspace_bytes(spec, small) == 200 * (3 * 14336 + 4 * 4096) * 2
    many = Deployment(budget_bytes=GIB, context=100, batch=4096, prefill_chunk_tokens=512)
    assert workspace_bytes(spec, many) == 4096 * 128256 * 16


def test_a_mixture_of_experts_prefill_runs_its_experts_width_not_the_dense_one():
    """Qwen3-30B-A3B: each token runs 8 experts of moe_intermediate_size 768 (not intermediate_size
    6144 eight times, an 8x over-count of the prefill workspace)."""
    spec = spec_from_config(config("qwen3-30b-a3b"))
    small = Deployment(budget_bytes=GIB, context=200, prefill_chunk_tokens=512)
    assert workspace_bytes(spec, small) == 200 * (3 * 8 * 768 + 4 * 2048) * 2


def test_max_batch_is_the_largest_that_fits():
    spec, _ = load_spec(LLAMA_31_8B)
    weights = plan_bytes(spec, lambda layer: DENSE)
    deployment = Deployment(budget_bytes=80 * GIB, context=8192, overhead_bytes=GIB)
    best = max_batch(spec, weights, deployment)
    fits = memory_breakdown(spec, weights, Deployment(**{**deployment.to_dict(), "batch": best})).total_bytes
    over = memory_breakdown(spec, weights, Deployment(**{**deployment.to_dict(), "batch": best + 1})).total_bytes
    assert fits <= 80 * GIB < over
    assert max_batch(spec, weights, Deployment(budget_bytes=10 * GIB, context=8192)) == 0


def test_weight_budget_and_overhead_with_tensor_parallel():
    spec, _ = load_spec(LLAMA_31_8B)
    assert default_overhead_bytes(1) == GIB and default_overhead_bytes(2) == 3 * GIB
    one = Deployment(budget_bytes=20 * GIB, context=1024, overhead_bytes=GIB)
    two = Deployment(budget_bytes=20 * GIB, context=1024, overhead_bytes=GIB, tensor_parallel=2)
    assert weight_budget_bytes(spec, two) > 2 * weight_budget_bytes(spec, one) - 2 * GIB


@pytest.mark.parametrize("field, value", [("context", 0), ("batch", 0), ("tensor_parallel", 0), ("kv_dtype", "fp4")])
def test_bad_deployments_raise(field, value):
    with pytest.raises(BitplanError):
        Deployment(**{"budget_bytes": GIB, field: value})


def test_parse_size():
    assert parse_size("40GiB") == 40 * GIB and parse_size("150MB") == 150_000_000
    with pytest.raises(BitplanError):
        parse_size("40 parsecs")


def test_a_zero_overhead_is_allowed_but_not_a_zero_budget():
    assert parse_size("0", allow_zero=True) == 0 and parse_size("0MB", allow_zero=True) == 0
    with pytest.raises(BitplanError, match="not positive"):
        parse_size("0MB")
    from bitplan.planner.deployment import deployment_for

    deployment = deployment_for("2GB", get_device("rtx-4090"), 2048, 1, "float16", 1, "0")
    assert deployment.overhead_bytes == 0 and deployment.budget_bytes == 2_000_000_000
