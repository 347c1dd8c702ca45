"""The whole path on the real model: plan -> emit -> load -> evaluate, checked end to end.

Small settings (2 windows of 128 tokens, 9 schemes, 2 refinement trials) keep this under a
minute or two on two cores; the acceptance figures come from bench/ at full settings.
"""

import json

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from safetensors import safe_open

from whole_evaluation import assert_measures_the_whole_model

import bitplan
from bitplan.api import CalibrationSettings, Candidates
from bitplan.checkpoints.evaluate import measure, prepare_evaluation
from bitplan.kernels.qlinear import QuantLinear
from bitplan.methods.registry import quantize
from bitplan.models.source import WeightReader, resolve_model
from bitplan.models.spec import spec_from_folder
from bitplan.planner.quality import QualityMeter, load_dense_model

SMALL = dict(budget="170MB", context=2048, candidates=Candidates(("rtn",), (3, 4, 8), (64, 0)),
             calibration=CalibrationSettings((), 2, 128), trials=2, seed=3)


@pytest.fixture(scope="module")
def planned(private_cache):
    return bitplan.plan("smollm2-135m", **SMALL)


@pytest.fixture(scope="module")
def checkpoint(planned, tmp_path_factory):
    return bitplan.emit(planned, tmp_path_factory.mktemp("emit") / "smollm2-mixed")


def test_plan_fits_the_budget_and_mixes_schemes(planned):
    assert planned.memory.total_bytes <= planned.deployment.budget_bytes == 170_000_000
    assert planned.memory.kv_cache_bytes == 30 * 2 * 3 * 64 * 2048 * 2
    assert len(planned.assignments) == 210 and len(set(planned.assignments.values())) > 1
    predicted = planned.predicted
    assert predicted.validation_kl <= predicted.exact_validation_kl  # never worse than the exact plan on held-back text
    if planned.search.refine_kept == "search":
        assert predicted.calibration_kl < predicted.exact_calibration_kl


def test_same_inputs_and_seed_give_the_same_plan_bytes(planned):
    assert bitplan.plan("smollm2-135m", **SMALL).to_json() == planned.to_json()


def test_emitted_quantized_bytes_equal_the_prediction(planned, checkpoint):
    quantized = 0
    with safe_open(checkpoint / "model.safetensors", framework="pt") as handle:
        for name in handle.keys():
            module = name.rsplit(".", 1)[0]
            if module in planned.assignments:
                tensor = handle.get_tensor(name)
                quantized += tensor.numel() * tensor.element_size()
    assert quantized == planned.memory.quantized_weights_bytes
    assert json.loads((checkpoint / "plan.json").read_text())["integrity"] == json.loads(planned.to_json())["integrity"]


def test_compressed_tensors_decodes_our_layout(planned, checkpoint):
    """An independent decoder: compressed-tensors' own decompressor, on every quantized Linear."""
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    schemes = planned.schemes()
    original = WeightReader(resolve_model("smollm2-135m"))
    emitted = WeightReader(checkpoint)
    checked = 0
    for group in config["config_groups"].values():
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"])
        for name in group["targets"][:3]:
            state = emitted.tensors(f"{name}.", dtype=None)
            state["weight_scale"] = state["weight_scale"].float()
            theirs = PackedQuantizationCompressor.decompress(state, scheme)["weight"]
            ours = quantize(original.tensor(f"{name}.weight"), schemes[name], torch.bfloat16).dequantize()
            assert torch.allclose(theirs.float(), ours, rtol=0, atol=1e-6), name
            checked += 1
    assert checked >= 3


def test_loaded_model_matches_fake_quantized_logits(planned, checkpoint, smollm_folder):
    model = bitplan.load(checkpoint)
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == sum(s != "none" for s in planned.assignments.values())
    meter = QualityMeter(load_dense_model(smollm_folder), spec_from_folder(smollm_folder))
    meter.apply(planned.schemes())
    ids = torch.randint(0, 49152, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, fake = model(ids).logits, meter.working(ids).logits
    assert (ours - fake).abs().max() < 1e-5
    generated = model.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)


def test_evaluate_reports_each_slice(checkpoint):
    report = bitplan.evaluate(checkpoint, samples=1, seq_len=128)
    assert set(report.slices) == {"prose", "code"}
    for quality in report.slices.values():
        assert quality.kl > 0 and quality.perplexity > quality.reference_perplexity * 0.9
        assert 3 < quality.reference_perplexity < 60


def test_streaming_evaluation_measures_the_whole_models(checkpoint):
    """``bitplan eval`` runs the original and the checkpoint block by block and measures what the
    two whole models measure (the path it replaced), on every slice."""
    prepared = prepare_evaluation(checkpoint, samples=2, seq_len=128)
    assert_measures_the_whole_model(measure(prepared), prepared, rel=1e-5)


def test_emit_refuses_to_overwrite(planned, checkpoint):
    with pytest.raises(bitplan.BitplanError, match="already exists"):
        bitplan.emit(planned, checkpoint)
