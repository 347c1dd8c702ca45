"""Every method's checkpoint format, emitted and loaded back on the real model.

One hand-made assignment puts AWQ (folded into a norm, and into up_proj's rows), AWQ + GPTQ, SmoothQuant
W8A8, FP8 (weight-only and W8A8), NF4, GPTQ and RTN into one checkpoint; the loaded model must
give the fake-quantized model's logits, compressed-tensors must decode its standard formats,
and a smoothing group that mixes methods must be refused.
"""

import dataclasses
import json

import pytest
import torch
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme

import bitplan
from bitplan.api import CalibrationSettings, Candidates
from bitplan.kernels.qlinear import QuantLinear
from bitplan.methods.block import quantize_block
from bitplan.methods.scheme import Scheme
from bitplan.models.source import WeightReader, resolve_model
from bitplan.models.spec import spec_from_folder
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.profiles.calibration import calibration_windows

CALIBRATION = CalibrationSettings((), 2, 128)
BLOCK_SCHEMES = {
    0: {"q": "awq-w4g64s", "k": "awq-w4g64s", "v": "awq-w4g64s", "o": "fp8-w8gcsa8",
        "gate": "smoothquant-w8gcsa8", "up": "smoothquant-w8gcsa8", "down": "awq-w4gca"},
    1: dict.fromkeys(("q", "k", "v", "o", "gate", "up", "down"), "nf4-w4g64s"),
    2: {"q": "fp8-w8g64s", "k": "gptq-w4g64s", "v": "gptq-w4gcs", "o": "none", "gate": "awq-w8gcs", "up": "awq-w8gcs", "down": "rtn-w3g64a"},
    3: {"q": "awqgptq-w4g64s", "k": "awqgptq-w4g64s", "v": "awqgptq-w4g64s", "gate": "awqgptq-w3g64s", "up": "awqgptq-w3g64s"},
}


def assignments_for(spec) -> dict[str, Scheme]:
    chosen = {}
    for layer in spec.layers:
        name = BLOCK_SCHEMES.get(layer.block, {}).get(layer.kind, "rtn-w4g64s")
        chosen[layer.name] = Scheme.parse(name)
    return chosen


@pytest.fixture(scope="module")
def mixed_plan(private_cache, smollm_folder):
    base = bitplan.plan("smollm2-135m", budget="400MB", context=256, candidates=Candidates(("rtn",), (4,), (64,)),
                        calibration=CALIBRATION, trials=0, engine="bitplan")
    spec = spec_from_folder(smollm_folder)
    chosen = assignments_for(spec)
    weight_bytes = sum(chosen[l.name].weight_bytes(l.out_features, l.in_features, spec.dtype_bytes) for l in spec.layers)
    memory = dataclasses.replace(base.memory, quantized_weights_bytes=weight_bytes)
    return dataclasses.replace(base, assignments={n: s.name for n, s in chosen.items()}, memory=memory)


@pytest.fixture(scope="module")
def checkpoint(mixed_plan, tmp_path_factory):
    return bitplan.emit(mixed_plan, tmp_path_factory.mktemp("emit") / "mixed-methods")


@pytest.fixture(scope="module")
def meter(mixed_plan, smollm_folder):
    meter = QualityMeter(load_dense_model(smollm_folder), spec_from_folder(smollm_folder))
    meter.calibrate(calibration_windows(smollm_folder, CALIBRATION)[: CALIBRATION.samples])
    meter.apply(mixed_plan.schemes())
    return meter


def test_loaded_checkpoint_gives_the_measured_models_logits(checkpoint, meter):
    model = bitplan.load(checkpoint)
    layers = {name: module for name, module in model.named_modules() if isinstance(module, QuantLinear)}
    assert layers["model.layers.0.self_attn.o_proj"].input_fp8 and layers["model.layers.1.mlp.up_proj"].fmt == "nf4"
    assert layers["model.layers.0.mlp.gate_proj"].fmt == "w8a8"
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, measured, reference = model(ids).logits, meter.working(ids).logits, meter.reference(ids).logits
    assert (ours - measured).abs().max() < 1e-4
    assert (ours - reference).abs().max() > 1e-2  # it is quantized


def test_smoothing_scales_are_folded_into_norms_and_up_rows(checkpoint, smollm_folder):
    emitted, original = WeightReader(checkpoint), WeightReader(smollm_folder)
    for norm in ("model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"):
        assert not torch.equal(emitted.tensor(norm), original.tensor(norm)), norm
    assert torch.equal(emitted.tensor("model.layers.5.input_layernorm.weight"), original.tensor("model.layers.5.input_layernorm.weight"))
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    formats = {g["format"] for g in config["config_groups"].values()}
    assert formats == {"pack-quantized", "int-quantized", "float-quantized", "naive-quantized", "bitplan-nf4"}
    assert config["format"] == "mixed-precision"


def test_compressed_tensors_infers_our_formats_and_decodes_them(checkpoint, meter):
    """compressed-tensors infers the same format for each standard config group, and its own
    decompressor turns our W8A8 and FP8 tensors into the weights the measured model runs."""
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    emitted = WeightReader(checkpoint)
    checked = 0
    for group in config["config_groups"].values():
        if group["format"] == "bitplan-nf4":
            continue
        scheme = QuantizationScheme(targets=group["targets"], weights=group["weights"], input_activations=group["input_activations"])
        assert infer_module_format(torch.nn.Linear, scheme).value == group["format"]
        if group["format"] == "pack-quantized":
            continue
        for name in group["targets"]:
            state = emitted.tensors(f"{name}.", dtype=None)
            state = {"weight": state["weight"], "weight_scale": state["weight_scale"].float()}
            theirs = NaiveQuantizationCompressor.decompress(state, scheme)["weight"]
            ours = meter.working.get_submodule(name).weight
            assert torch.allclose(theirs.float(), ours.float(), rtol=0, atol=1e-6), name
            checked += 1
    assert checked >= 4


def test_a_smoothing_group_that_mixes_methods_is_refused(smollm_folder):
    spec = spec_from_folder(smollm_folder)
    layers = [layer for layer in spec.layers if layer.block == 0]
    chosen = {layer.name: Scheme.parse("awq-w4g64s") for layer in layers}
    chosen["model.layers.0.self_attn.k_proj"] = Scheme.parse("rtn-w4g64s")
    reader = WeightReader(resolve_model("smollm2-135m"))
    with pytest.raises(bitplan.BitplanError, match="input_layernorm must all take"):
        quantize_block(layers, chosen, reader.tensor, {}, torch.bfloat16)
