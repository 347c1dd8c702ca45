"""A KV format's cost is measured with K and V rounded inside attention; both meters agree, and a
checkpoint that declares an fp8 cache loads into a model that runs it."""

from __future__ import annotations

import pytest
import torch

from tiny_models import CONFIG, write_tiny_model

from bitplan.models.source import open_model
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.planner.streaming import StreamingMeter
from bitplan.profiles.kv_cache import KVAbsmax, KVRounding, attach_kv_rounding, kv_rounding, measure_kv_costs

KV_CONFIG = {**CONFIG, "head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 1}


@pytest.fixture(scope="module")
def kv_model(tmp_path_factory, smollm_folder):
    return open_model(write_tiny_model(tmp_path_factory.mktemp("kv") / "model", smollm_folder, config=KV_CONFIG))


def windows(n: int = 2, length: int = 48) -> torch.Tensor:
    return torch.randint(0, 49152, (n, length), generator=torch.Generator().manual_seed(1))


def test_rounding_reaches_every_layer_and_leaves_the_model_after(kv_model):
    model = load_dense_model(kv_model.folder)
    ids = windows()
    with torch.no_grad():
        before = model(ids).logits
        seen = KVAbsmax()
        with kv_rounding(seen):
            same = model(ids).logits
        with kv_rounding(KVRounding("q4_0")):
            rounded = model(ids).logits
        after = model(ids).logits
    assert sorted(seen.k) == [0, 1] and all(v > 0 for v in seen.v.values())
    assert torch.equal(same, before) and torch.equal(after, before)
    assert not torch.allclose(rounded, before, atol=1e-4)


def test_both_meters_measure_the_same_costs_and_coarser_formats_cost_more(kv_model):
    ids = windows()
    dtypes = ["bfloat16", "fp8_e4m3", "fp8_e5m2", "q8_0", "q4_0"]
    whole = measure_kv_costs(QualityMeter(load_dense_model(kv_model.folder), kv_model.spec), ids, dtypes, 2)
    streaming = measure_kv_costs(StreamingMeter(kv_model.folder, kv_model.config, kv_model.spec), ids, dtypes, 2)
    for dtype in dtypes:
        assert whole[dtype].kl == pytest.approx(streaming[dtype].kl, rel=1e-3, abs=1e-7)
    assert whole["bfloat16"].kl == 0.0
    assert 0 < whole["q8_0"].kl < whole["fp8_e4m3"].kl < whole["q4_0"].kl
    assert len(whole["fp8_e4m3"].rounding.k_scales) == 2


def test_an_attached_cache_format_matches_the_measured_rounding(kv_model):
    ids = windows(1)
    rounding = KVRounding("fp8_e4m3", (0.01, 0.02), (0.03, 0.04))
    model = load_dense_model(kv_model.folder)
    with torch.no_grad(), kv_rounding(rounding):
        expected = model(ids).logits
    attach_kv_rounding(model, rounding)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, expected)
