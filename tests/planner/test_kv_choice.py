"""The KV cache's format as a search variable: weight bytes traded against KV bytes, per engine."""

from __future__ import annotations

import pytest

from bitplan.engines import get_rules
from bitplan.engines.rules import check_kv_dtype, kv_engine_flags
from bitplan.errors import BitplanError
from bitplan.models.spec import spec_from_config
from bitplan.planner.deployment import Deployment, kv_cache_bytes
from bitplan.planner.kv_choice import choose_kv, kv_candidates

LLAMA_8B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "torch_dtype": "bfloat16",
            "max_position_embeddings": 131072}


class Scored:
    def __init__(self, score):
        self.score = score


def weight_score(budget_bytes: int) -> Scored:
    """A stand-in allocation: halving the weights' bytes costs 0.1 nats (below 8 GB), nothing above."""
    return Scored(0.0 if budget_bytes >= 8e9 else 0.1 * (8e9 / budget_bytes - 1))


def test_long_context_trades_kv_bytes_for_weight_bytes():
    spec = spec_from_config(LLAMA_8B)
    deployment = Deployment(budget_bytes=40 * 10**9, context=32768, batch=8, kv_dtype="bfloat16")
    assert kv_cache_bytes(spec, deployment) > 8e9  # the cache outweighs 8-bit weights
    dtypes = kv_candidates("auto", get_rules("vllm", "cuda-sm90").kv_cache_dtypes, spec)
    assert dtypes == ["bfloat16", "fp8_e4m3", "fp8_e5m2"]
    chosen, allocation, options = choose_kv(spec, deployment, {"bfloat16": 0.0, "fp8_e4m3": 0.01, "fp8_e5m2": 0.03},
                                            weight_score, 2 * 10**9)
    by_dtype = {o.dtype: o for o in options}
    assert chosen == "fp8_e4m3"
    assert by_dtype["fp8_e4m3"].weight_budget_bytes > by_dtype["bfloat16"].weight_budget_bytes
    assert by_dtype["fp8_e4m3"].total_kl < by_dtype["bfloat16"].total_kl


def test_short_context_keeps_the_sixteen_bit_cache():
    spec = spec_from_config(LLAMA_8B)
    deployment = Deployment(budget_bytes=48 * 10**9, context=2048, batch=1, kv_dtype="bfloat16")
    chosen, _, _ = choose_kv(spec, deployment, {"bfloat16": 0.0, "fp8_e4m3": 0.01}, weight_score, 2 * 10**9)
    assert chosen == "bfloat16"


def test_a_cache_that_leaves_no_room_is_listed_infeasible_and_none_fitting_is_one_line():
    spec = spec_from_config(LLAMA_8B)
    deployment = Deployment(budget_bytes=38 * 10**9, context=32768, batch=8, kv_dtype="bfloat16")
    chosen, _, options = choose_kv(spec, deployment, {"bfloat16": 0.0, "fp8_e4m3": 0.01}, weight_score, 3 * 10**9)
    assert chosen == "fp8_e4m3" and "smallest plan needs" in options[0].infeasible
    with pytest.raises(BitplanError, match="no KV cache format leaves room"):
        choose_kv(spec, deployment, {"bfloat16": 0.0}, weight_score, 3 * 10**9)


def test_engines_run_the_formats_they_list_and_refuse_others():
    assert check_kv_dtype(get_rules("vllm", "cpu-avx512"), "fp8") == "fp8_e4m3"
    assert check_kv_dtype(get_rules("llama.cpp"), "q4_0") == "q4_0"
    with pytest.raises(BitplanError, match="vllm on cuda-sm80 cannot keep the KV cache in int8"):
        check_kv_dtype(get_rules("vllm"), "int8")
    with pytest.raises(BitplanError, match="transformers on any cannot keep the KV cache in fp8_e4m3"):
        check_kv_dtype(get_rules("transformers"), "fp8_e4m3")
    assert kv_engine_flags("llama.cpp", "q4_0").endswith("-ctv q4_0") and kv_engine_flags("vllm", "fp8_e4m3") == ""
    assert kv_candidates("auto", get_rules("transformers").kv_cache_dtypes, spec_from_config(LLAMA_8B)) == ["bfloat16"]
