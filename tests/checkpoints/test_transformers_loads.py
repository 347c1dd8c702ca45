"""transformers as a judge: it loads what bitplan plans for it, with bitplan.load's numbers, and the
rules of ``bitplan.engines.transformers`` stay true as versions move.

Real SmolLM2 weights for the mixed checkpoint; a small random-weight Llama with an untied head for
the quantized lm_head (SmolLM2 ties its head to the embeddings).
"""

import dataclasses
import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from safetensors.torch import save_file

import bitplan
from bitplan.api import CalibrationSettings, Candidates
from bitplan.checkpoints.verify import transformers_agreement
from bitplan.engines.formats import BITPLAN_MODEL_TYPE
from bitplan.methods.scheme import DENSE, Scheme
from bitplan.models.spec import spec_from_folder

CALIBRATION = CalibrationSettings((), 2, 128)


def forced(plan, spec, pick):
    """The plan with every layer's scheme replaced by ``pick(layer)`` (bytes recounted)."""
    chosen = {layer.name: pick(layer) for layer in spec.layers}
    weight_bytes = sum(chosen[l.name].weight_bytes(l.out_features, l.in_features, spec.dtype_bytes) for l in spec.layers)
    return dataclasses.replace(plan, assignments={n: s.name for n, s in chosen.items()},
                               memory=dataclasses.replace(plan.memory, quantized_weights_bytes=weight_bytes))


def unmarked_copy(checkpoint, tmp_path):
    """A copy of a ``--engine bitplan`` checkpoint whose config.json no longer tells other loaders
    to stay away: what transformers would do with those tensors if it tried."""
    import shutil

    copy = tmp_path / f"{checkpoint.name}-unmarked"
    shutil.copytree(checkpoint, copy)
    config = json.loads((copy / "config.json").read_text())
    assert config["model_type"] == BITPLAN_MODEL_TYPE
    config["model_type"] = config.pop("bitplan_model_type")
    config["architectures"] = ["LlamaForCausalLM"]
    config["quantization_config"]["quant_method"] = "compressed-tensors"
    (copy / "config.json").write_text(json.dumps(config))
    return copy


@pytest.fixture(scope="module")
def transformers_plan(private_cache, smollm_folder):
    """A plan for transformers (2/3/4/8 bits, groups 32/64/channel), with block 0 left dense by hand."""
    plan = bitplan.plan("smollm2-135m", budget="150MB", context=256, engine="transformers", trials=0, calibration=CALIBRATION,
                        candidates=Candidates(("rtn",), (2, 3, 4, 8), (32, 64, 0), (True,)))
    planned = {name: Scheme.parse(s) for name, s in plan.assignments.items()}
    return forced(plan, spec_from_folder(smollm_folder), lambda layer: DENSE if layer.block == 0 else planned[layer.name])


@pytest.fixture(scope="module")
def transformers_checkpoint(transformers_plan, tmp_path_factory):
    return bitplan.emit(transformers_plan, tmp_path_factory.mktemp("tf") / "mixed")


def test_a_mixed_checkpoint_planned_for_transformers_loads_there_with_bitplans_logits(transformers_plan, transformers_checkpoint):
    schemes = [Scheme.parse(s) for s in transformers_plan.assignments.values()]
    quantized = [s for s in schemes if not s.is_dense]
    assert len({s.bits for s in quantized}) >= 2 and len({s.group_size for s in quantized}) >= 2, "the plan should mix widths and groups"
    assert any(s.is_dense for s in schemes), "the plan should leave some layers dense"
    assert transformers_plan.engine.name == "transformers"
    result = transformers_agreement(transformers_checkpoint)
    assert result.ok, result.detail
    assert result.max_logit_diff <= 1e-4 and result.top1_agreement == 1.0


def test_a_checkpoint_written_in_shards_loads_there_with_the_same_tensors(transformers_plan, transformers_checkpoint,
                                                                         tmp_path, monkeypatch):
    """A large model's checkpoint comes in several streamed shards and an index: transformers loads it
    with bitplan.load's logits, every tensor is the one-file checkpoint's, and emitting the plan again
    writes the same bytes."""
    from safetensors import safe_open

    from bitplan.checkpoints import emit as emit_module

    monkeypatch.setattr(emit_module, "SHARD_BYTES", 30 * 10**6)
    sharded = bitplan.emit(transformers_plan, tmp_path / "sharded")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and sorted(set(index.values())) == [p.name for p in shards]
    assert not list(sharded.glob("*.partial")) and not list(sharded.glob(".*")), "no side file is left"
    with safe_open(str(transformers_checkpoint / "model.safetensors"), "pt") as whole:
        assert sorted(index) == sorted(whole.keys())
        for shard in shards:
            with safe_open(str(shard), "pt") as part:
                # a shard's data plus its header, or one tensor larger than a shard (SmolLM2's 57 MB embedding)
                assert shard.stat().st_size <= 30 * 10**6 + 2**20 or len(part.keys()) == 1
                assert all(index[name] == shard.name and torch.equal(part.get_tensor(name), whole.get_tensor(name))
                           for name in part.keys())
    result = transformers_agreement(sharded)
    assert result.ok, result.detail
    assert result.max_logit_diff <= 1e-4 and result.top1_agreement == 1.0
    again = bitplan.emit(transformers_plan, tmp_path / "again")  # the same plan, the same bytes (file by file)
    assert all((again / p.name).read_bytes() == p.read_bytes() for p in sharded.iterdir())


def test_every_config_bitplan_writes_for_compressed_tensors_passes_its_validation(transformers_checkpoint):
    config = json.loads((transformers_checkpoint / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.quant_method == "compressed-tensors" and len(parsed.config_groups) == len(config["config_groups"])


def test_transformers_still_cannot_read_what_its_rules_leave_out(private_cache, smollm_folder, tmp_path):
    """If a newer transformers reads asymmetric groups, or quantizes activations as vLLM does, this
    fails: widen ``bitplan/engines/transformers.py`` then."""
    spec = spec_from_folder(smollm_folder)
    base = bitplan.plan("smollm2-135m", budget="400MB", context=256, engine="bitplan", trials=0, calibration=CALIBRATION,
                        candidates=Candidates(("rtn",), (4,), (64,), (True,)))
    asym = forced(base, spec, lambda layer: Scheme.parse("rtn-w4g64a" if layer.block == 0 else "rtn-w8gcs"))
    result = transformers_agreement(unmarked_copy(bitplan.emit(asym, tmp_path / "asym"), tmp_path))
    assert not result.ok and "size mismatch" in result.detail.lower() or "mismatch" in result.detail.lower(), result.detail
    w8a8 = forced(base, spec, lambda layer: Scheme.parse("smoothquant-w8gcsa8" if layer.block < 4 else "none"))
    result = transformers_agreement(unmarked_copy(bitplan.emit(w8a8, tmp_path / "w8a8"), tmp_path))
    assert not result.ok and result.max_logit_diff > 0.05, result.detail


def test_a_checkpoint_for_bitplans_own_loader_is_refused_cleanly_elsewhere(private_cache, smollm_folder, tmp_path):
    spec = spec_from_folder(smollm_folder)
    base = bitplan.plan("smollm2-135m", budget="400MB", context=256, engine="bitplan", trials=0, calibration=CALIBRATION,
                        candidates=Candidates(("rtn",), (4,), (64,), (True,)))
    nf4 = forced(base, spec, lambda layer: Scheme.parse("nf4-w4g64s" if layer.block == 0 else "none"))
    checkpoint = bitplan.emit(nf4, tmp_path / "nf4")
    result = transformers_agreement(checkpoint)
    assert not result.ok and "refused" in result.detail and "bitplan" in result.detail, result.detail
    tokens = torch.tensor([[1, 504, 3458, 282]])
    assert torch.isfinite(bitplan.load(checkpoint)(tokens).logits).all()


@pytest.fixture(scope="module")
def untied_llama(smollm_folder, tmp_path_factory):
    """A small random-weight Llama with its own lm_head, SmolLM2's tokenizer."""
    import shutil

    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("untied") / "llama-untied"
    folder.mkdir()
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         vocab_size=49152, tie_word_embeddings=False, max_position_embeddings=512)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({**config.to_dict(), "dtype": "bfloat16"}))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (smollm_folder / name).is_file():
            shutil.copy(smollm_folder / name, folder / name)
    return folder


def test_a_quantized_lm_head_is_a_target_and_transformers_reads_it(private_cache, untied_llama, tmp_path):
    spec = spec_from_folder(untied_llama)
    base = bitplan.plan(str(untied_llama), budget="100MB", context=128, engine="transformers", trials=0, calibration=CALIBRATION,
                        candidates=Candidates(("rtn",), (4,), (32,), (True,)))
    plan = forced(base, spec, lambda layer: Scheme.parse("rtn-w8gcs" if layer.kind == "lm_head" else "rtn-w4g32s"))
    checkpoint = bitplan.emit(plan, tmp_path / "head")
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    assert "lm_head" not in config["ignore"]
    assert any("lm_head" in group["targets"] for group in config["config_groups"].values())
    result = transformers_agreement(checkpoint)
    assert result.ok, result.detail


def test_imatrix_layers_with_negative_scales_load_there_with_bitplans_logits(transformers_plan, smollm_folder, tmp_path):
    """The imatrix method stores a signed scale per group (the largest weight may take the code -2^(b-1) on either
    side): compressed-tensors' pack-quantized decoding in transformers must give bitplan's numbers."""
    spec = spec_from_folder(smollm_folder)
    picks = {"q": "imatrix-w4g32s", "k": "imatrix-w3g64s", "v": "imatrix-w8gcs", "o": "imatrix-w4g64s",
             "gate": "imatrix-w4g32s", "up": "imatrix-w2g64s", "down": "imatrix-w4g128s"}
    plan = forced(transformers_plan, spec, lambda layer: DENSE if layer.block == 0 else Scheme.parse(picks[layer.kind]))
    checkpoint = bitplan.emit(plan, tmp_path / "imatrix")
    from safetensors import safe_open

    shard = next(checkpoint.glob("*.safetensors"))
    with safe_open(shard, "pt") as f:
        scale = f.get_tensor("model.layers.3.mlp.gate_proj.weight_scale").float()
    assert bool((scale < 0).any()) and bool((scale > 0).any())
    result = transformers_agreement(checkpoint)
    assert result.ok, result.detail
    assert result.max_logit_diff <= 1e-4 and result.top1_agreement == 1.0


@pytest.mark.slow  # AWQ's scale search on every block at emit: minutes on two cores; the signed scales are checked above
def test_awq_imatrix_layers_load_there_with_bitplans_logits(transformers_plan, smollm_folder, tmp_path):
    """AWQ + imatrix: AWQ's scales folded into the norms and the feeding Linears, signed group scales on the
    scaled weights; transformers must decode the checkpoint to bitplan's logits."""
    spec = spec_from_folder(smollm_folder)
    picks = {"q": "awqimatrix-w4g64s", "k": "awqimatrix-w4g64s", "v": "awqimatrix-w4g64s", "o": "awqimatrix-w4g64s",
             "gate": "awqimatrix-w3g64s", "up": "awqimatrix-w3g64s", "down": "awqimatrix-w4g32s"}
    plan = forced(transformers_plan, spec, lambda layer: DENSE if layer.block == 0 or layer.kind not in picks else Scheme.parse(picks[layer.kind]))
    checkpoint = bitplan.emit(plan, tmp_path / "awqimatrix")
    from safetensors import safe_open

    shard = next(checkpoint.glob("*.safetensors"))
    with safe_open(shard, "pt") as f:
        scale = f.get_tensor("model.layers.3.mlp.down_proj.weight_scale").float()
    assert bool((scale < 0).any()) and bool((scale > 0).any())
    result = transformers_agreement(checkpoint)
    assert result.ok, result.detail
    assert result.max_logit_diff <= 1e-4 and result.top1_agreement == 1.0


def test_the_default_methods_plan_emit_and_load_there_with_bitplans_logits(private_cache, tiny_model, tmp_path):
    """The default candidates (imatrix and AWQ + imatrix since stop 30) from profile to a checkpoint transformers
    decodes as bitplan.load does: AWQ's scales folded into the norms and v_proj, signed group scales."""
    candidates = dataclasses.replace(Candidates(), bits=(3, 4), group_sizes=(32, 0))
    plan = bitplan.plan(str(tiny_model), budget="7.2MB", context=64, engine="transformers", trials=0,  # smallest: 7.12 MB
                        calibration=CalibrationSettings((), 2, 64), candidates=candidates)
    methods = {Scheme.parse(s).method.value for s in plan.assignments.values()}
    assert methods <= {"rtn", "imatrix", "awqimatrix", "hqq", "none"} and methods & {"imatrix", "awqimatrix"}, methods
    spec = spec_from_folder(tiny_model)
    picks = {"q": "awqimatrix-w4g32s", "k": "awqimatrix-w4g32s", "v": "awqimatrix-w4g32s", "o": "imatrix-w3g32s",
             "gate": "awqimatrix-w3gcs", "up": "awqimatrix-w3gcs", "down": "awqimatrix-w4g32s"}
    checkpoint = bitplan.emit(forced(plan, spec, lambda layer: Scheme.parse(picks[layer.kind])), tmp_path / "default")
    result = transformers_agreement(checkpoint)
    assert result.ok, result.detail
    assert result.max_logit_diff <= 1e-4 and result.top1_agreement == 1.0
