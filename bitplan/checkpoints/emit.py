"""Emit: a plan becomes a deployable checkpoint folder.

Layout (compressed-tensors, as vLLM loads it), one format per scheme (``FORMATS``):

- integer weight-only (RTN, GPTQ, AWQ, HQQ): ``pack-quantized``: ``weight_packed``,
  ``weight_scale``, ``weight_zero_point`` when asymmetric, ``weight_shape`` (``kernels.layout``);
- SmoothQuant W8A8: ``int-quantized``: ``weight`` int8, ``weight_scale`` ``[out, 1]``, and
  dynamic per-token int8 ``input_activations``;
- FP8: ``weight`` float8_e4m3fn, ``weight_scale`` float32 ``[out, groups]``; W8A8-FP8 adds
  dynamic per-token FP8 ``input_activations`` and is ``float-quantized``, weight-only FP8 is
  ``naive-quantized`` (the formats compressed-tensors itself infers for these schemes);
- NF4: no standard format holds it, so bitplan's own ``bitplan-nf4``: ``weight_packed`` uint8
  ``[out, in/2]`` (two code-book indices per byte, the even input in the low nibble) and
  ``weight_absmax`` float32 ``[out, in/block]``; its config group says ``"type": "nf4"``. Only
  ``bitplan.load`` reads it; ``plan.json``'s ``formats`` says which engines load which layers.

AWQ and SmoothQuant scales are folded into the norm or Linear that feeds each group
(:mod:`bitplan.methods.block`), so the model keeps its shape. Everything else is copied as in
the source; ``config.json`` gets a ``quantization_config`` with one config group per scheme whose
targets are exact module names; tokenizer files and ``plan.json`` are copied in. Written to a
temporary folder beside the target, then renamed into place, so a failure leaves nothing
half-written.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch

from bitplan.atomic import SafetensorsStream, staging_folder
from bitplan.engines import get_rules
from bitplan.engines.formats import BITPLAN_MODEL_TYPE, Format, checkpoint_format
from bitplan.engines.rules import assignment_violations
from bitplan.errors import BitplanError
from bitplan.kernels import layout
from bitplan.memory import release_freed_memory
from bitplan.methods.block import quantize_block
from bitplan.methods.registry import needs_calibration
from bitplan.methods.scheme import Method, QuantizedWeight, Scheme
from bitplan.models.source import TOKENIZER_FILES, WeightReader, folder_hash, resolve_model
from bitplan.models.spec import SCALE_DTYPES, ModelSpec, family_for, norm_offset, read_config, spec_from_config
from bitplan.planner.plan import Plan, load_plan
from bitplan.profiles.blocks import BlockRunner, block_input_stats
from bitplan.profiles.calibration import calibration_windows
from bitplan.profiles.text import tokens_hash

log = logging.getLogger(__name__)
SHARD_BYTES = 2 * 10**9


def linear_tensors(quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One Linear's checkpoint tensors in its scheme's format, names without the module prefix."""
    scheme = quantized.scheme
    fmt = checkpoint_format(scheme)
    if fmt == Format.INT:
        return {"weight": quantized.codes.to(torch.int8).contiguous(), "weight_scale": quantized.scale.contiguous()}
    if fmt in (Format.FLOAT, Format.NAIVE):
        return {"weight": quantized.codes.view(torch.float8_e4m3fn).contiguous(), "weight_scale": quantized.scale.to(torch.float32).contiguous()}
    if fmt == Format.NF4:
        from bitplan.methods.nf4 import pack_nf4

        return {"weight_packed": pack_nf4((quantized.codes.to(torch.int16) + 8).to(torch.uint8)),
                "weight_absmax": quantized.scale.to(torch.float32).contiguous()}
    return packed_tensors(quantized)


def packed_tensors(quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One Linear's pack-quantized tensors, names without the module prefix."""
    scheme = quantized.scheme
    tensors = {
        "weight_packed": layout.pack_codes(quantized.codes, scheme.bits),
        "weight_scale": quantized.scale.contiguous(),
        "weight_shape": torch.tensor(quantized.shape, dtype=torch.int64),
    }
    if quantized.zero is not None:
        tensors["weight_zero_point"] = layout.pack_codes(quantized.zero, scheme.bits, dim=0)
    return tensors


def weight_args(scheme: Scheme) -> dict:
    kind = {Method.FP8: "float", Method.NF4: "nf4"}.get(scheme.method, "int")
    return {
        "num_bits": scheme.bits,
        "type": kind,
        "symmetric": scheme.symmetric,
        "strategy": "group" if scheme.group_size else "channel",
        "group_size": scheme.group_size or None,
        "dynamic": False,
        "observer": "minmax",
        "actorder": None,
        "block_structure": None,
    }


def input_args(scheme: Scheme) -> dict | None:
    """Dynamic per-token activations for W8A8 schemes (as vLLM runs them), else None."""
    if not scheme.act_quantized:
        return None
    return {"num_bits": scheme.act_bits, "type": "float" if scheme.method == Method.FP8 else "int", "symmetric": True,
            "strategy": "token", "group_size": None, "dynamic": True, "observer": None, "actorder": None, "block_structure": None}


def quantization_config(assignments: dict[str, Scheme]) -> dict:
    """compressed-tensors ``quantization_config``: one group per scheme, exact module names as targets.

    Dense Linears are listed under ``ignore``; ``lm_head`` too when it is tied to the embeddings
    or left dense. A quantized ``lm_head`` is a target of its group like any other Linear.
    """
    by_scheme: dict[Scheme, list[str]] = {}
    for name, scheme in assignments.items():
        if not scheme.is_dense:
            by_scheme.setdefault(scheme, []).append(name)
    groups = {
        f"group_{index}": {
            "targets": sorted(names),
            "weights": weight_args(scheme),
            "input_activations": input_args(scheme),
            "output_activations": None,
            "format": str(checkpoint_format(scheme)),
        }
        for index, (scheme, names) in enumerate(sorted(by_scheme.items()))
    }
    dense = sorted(name for name, scheme in assignments.items() if scheme.is_dense)
    head_quantized = "lm_head" in assignments and not assignments["lm_head"].is_dense
    return {
        "quant_method": "compressed-tensors",
        "format": "mixed-precision" if len(groups) > 1 else next((g["format"] for g in groups.values()), str(Format.PACKED)),
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": sorted(set(dense) | (set() if head_quantized else {"lm_head"})),
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": metadata.version("compressed-tensors"),
    }


def kv_cache_scheme(plan: Plan) -> dict | None:
    """compressed-tensors ``kv_cache_scheme`` for a plan whose KV cache is fp8_e4m3 with per-layer
    scales (what vLLM loads, ``engines.vllm.KV_CUDA``); None otherwise (other formats are run-time
    flags, ``plan.kv_cache.engine_flags``)."""
    kv = plan.kv_cache
    if kv is None or kv.dtype != "fp8_e4m3" or engine_rules_of(plan).loader != "compressed-tensors":
        return None
    return {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False, "symmetric": True,
            "group_size": None, "block_structure": None, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def kv_scale_tensors(plan: Plan, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Each attention layer's calibrated K and V scales, named as llm-compressor writes them
    (``...self_attn.k_scale``, which vLLM remaps to ``self_attn.attn.k_scale``)."""
    kv = plan.kv_cache
    if len(kv.k_scales) != spec.num_blocks or len(kv.v_scales) != spec.num_blocks:
        raise BitplanError(f"the plan's fp8 KV cache has {len(kv.k_scales)} scales for {spec.num_blocks} layers: "
                           "re-create it with `bitplan plan`")
    prefix = family_for({"model_type": spec.model_type}).block_prefix
    tensors = {}
    for index in range(spec.num_blocks):
        tensors[f"{prefix}.{index}.self_attn.k_scale"] = torch.tensor([kv.k_scales[index]], dtype=torch.float32)
        tensors[f"{prefix}.{index}.self_attn.v_scale"] = torch.tensor([kv.v_scales[index]], dtype=torch.float32)
    return tensors


def mark_for_bitplan(config: dict) -> dict:
    """A checkpoint planned for ``--engine bitplan`` may hold what no other loader reads (NF4).
    Its config.json says so in a way others refuse cleanly: ``model_type`` "bitplan" (transformers
    and vLLM stop with "does not recognize this architecture") and ``quant_method`` "bitplan";
    the real model type is kept in ``bitplan_model_type`` for ``bitplan.load``."""
    quantization = {**config["quantization_config"], "quant_method": "bitplan"}
    return {**config, "model_type": BITPLAN_MODEL_TYPE, "bitplan_model_type": config["model_type"],
            "architectures": ["BitplanCheckpoint"], "quantization_config": quantization}


def check_plan_against_model(plan: Plan, spec: ModelSpec) -> dict[str, Scheme]:
    assignments = plan.schemes()
    names = {layer.name for layer in spec.layers}
    unknown = sorted(set(assignments) - names)
    missing = sorted(names - set(assignments))
    if unknown or missing:
        raise BitplanError(f"the plan does not match the model ({len(unknown)} unknown, {len(missing)} missing layers): re-run `bitplan plan`")
    for layer in spec.layers:
        if not assignments[layer.name].fits(layer.in_features):
            scheme = assignments[layer.name]
            why = (f"whose blocks of {scheme.group_size} do not divide its {layer.in_features} inputs"
                   f" (llama-quantize would silently write {layout.llama_quantize_type(scheme.ggml_type, layer.in_features)} instead)"
                   if scheme.method == Method.GGML else f"whose group does not divide {layer.in_features}")
            raise BitplanError(f"the plan gives {layer.name} the scheme {scheme}, {why}: re-run `bitplan plan`")
    return assignments


class ShardWriter:
    """Writes tensors into ``model-XXXXX.safetensors`` shards of at most ``SHARD_BYTES`` (or one tensor
    larger than that), each streamed to disk as it comes (:class:`bitplan.atomic.SafetensorsStream`):
    emit holds one block's tensors, never a shard's."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.shard: SafetensorsStream | None = None
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.shard is not None and self.shard.bytes and self.shard.bytes + size > SHARD_BYTES:
            self.flush()
        if self.shard is None:
            filename = f"model-{len(self.files) + 1:05d}.safetensors"
            self.shard = SafetensorsStream(self.folder / filename, metadata={"format": "pt"})
        self.shard.add(name, tensor)

    def flush(self) -> None:
        if self.shard is not None:
            self.shard.close()
            self.files.append((self.shard.path.name, self.shard.names))
            self.shard = None

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.folder / self.files[0][0], self.folder / "model.safetensors")
            return
        weight_map = {name: filename for filename, names in self.files for name in names}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2, sort_keys=True))


def emit(plan: Plan | str | os.PathLike, out: str | os.PathLike, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write the checkpoint for ``plan`` (a Plan or a plan.json path) into the new folder ``out``."""
    plan = plan if isinstance(plan, Plan) else load_plan(Path(plan))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BitplanError(f"{out} already exists and is not an empty folder: choose another --out or remove it")
    if engine_rules_of(plan).engine == "llama.cpp":
        raise BitplanError("the plan is for llama.cpp, whose GGUF types no safetensors checkpoint holds: "
                           "emit it with --format gguf (a GGUF file) or --format recipe (a llama-quantize recipe)")
    folder, config, spec, assignments = open_plan_model(plan)
    try:
        with staging_folder(out) as staging:
            written = write_checkpoint(folder, config, spec, assignments, plan, staging, progress)
            expected = plan.memory.quantized_weights_bytes * plan.deployment.tensor_parallel
            if written != expected:
                raise AssertionError(f"emitted {written} bytes of Linear weights, the plan predicted {expected}")
    except OSError as exc:
        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR) and out.exists():
            raise BitplanError(f"{out} was created by another run while this one wrote the checkpoint (this copy was dropped): "
                               f"choose another --out or remove it") from exc
        raise
    return out


def open_plan_model(plan: Plan) -> tuple[Path, dict, ModelSpec, dict[str, Scheme]]:
    """The plan's model (folder, config, spec) after checking it is the one the plan was made
    for, and its assignments after checking them against the model and the plan's engine."""
    folder = resolve_model(plan.model.source)
    if folder_hash(folder) != plan.model.hash:
        raise BitplanError(f"the weights in {folder} differ from those the plan was made for: re-run `bitplan plan` on this model")
    config = read_config(folder)
    spec = spec_from_config(config)
    assignments = check_plan_against_model(plan, spec)
    check_engine_rules(plan, spec, assignments)
    return folder, config, spec, assignments


def engine_rules_of(plan: Plan):
    """The rules of the engine a plan was made for (its name and platform, as plan.json records them)."""
    return get_rules(plan.engine.name, plan.engine.platform if plan.engine.platform != "any" else None)


def check_engine_rules(plan: Plan, spec: ModelSpec, assignments: dict[str, Scheme]) -> None:
    """Refuse a plan that its own engine cannot run (a hand-made or hand-edited plan), naming the layer and the rule."""
    from bitplan.engines.rules import model_refusal

    rules = engine_rules_of(plan)
    tp = plan.deployment.tensor_parallel
    problems = ([model_refusal(spec, rules, tp)] if model_refusal(spec, rules, tp) else []) + assignment_violations(rules, spec, assignments, tp)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise BitplanError(f"the plan breaks the rules of {rules.key}: {problems[0]}{more}: re-run `bitplan plan --engine {rules.engine}`")


def write_checkpoint(folder: Path, config: dict, spec: ModelSpec, assignments: dict[str, Scheme], plan: Plan,
                     staging: Path, progress) -> int:
    """Quantize and write every tensor; returns the bytes of the Linear weights as written.

    Block by block: when a calibrated method (GPTQ) is assigned, the plan's calibration tokens
    run through the unquantized blocks to gather each Linear's input statistics, exactly as
    profiling saw them.
    """
    reader = WeightReader(folder)
    writer = ShardWriter(staging)
    report = progress or (lambda stage, done, total: None)
    calibration = CalibrationPass(folder, config, plan, reader) if needs_calibration(assignments.values()) else None
    by_block: dict[int, list[str]] = {}
    for name in sorted(reader.location):
        by_block.setdefault(block_of(name, spec), []).append(name)
    linear_bytes = 0
    scale_dtype = SCALE_DTYPES[spec.dtype]
    read = lambda name: reader.tensor(name) if name in reader.location else None  # noqa: E731
    for done, block in enumerate(sorted(by_block, key=lambda b: (b < 0, b)), 1):
        release_freed_memory()  # a plan without calibrated methods loads no block (bitplan.memory)
        stats = calibration.block_stats(block, spec) if calibration else {}
        layers = [layer for layer in spec.layers if layer.block == block]
        quantized = (quantize_block(layers, assignments, read, stats, scale_dtype, norm_offset(spec.model_type), reader.rows)
                     if layers else None)
        del stats  # GPTQ's Hessians (down_proj's alone is in_features^2 floats) go before the writes and the next block's
        for name in by_block[block]:
            linear_bytes += write_tensor(name, reader, quantized, writer)
        del quantized
        report("emit", done, len(by_block))
    kv_scheme = kv_cache_scheme(plan)
    if kv_scheme is not None:
        for name, scale in kv_scale_tensors(plan, spec).items():
            writer.add(name, scale)
    writer.finish()
    config = {**config, "quantization_config": {**quantization_config(assignments), "kv_cache_scheme": kv_scheme}}
    if engine_rules_of(plan).loader == "bitplan":
        config = mark_for_bitplan(config)
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for filename in TOKENIZER_FILES:
        if (folder / filename).is_file():
            shutil.copy2(folder / filename, staging / filename)
    (staging / "plan.json").write_text(plan.to_json())
    return linear_bytes


def block_of(tensor_name: str, spec: ModelSpec) -> int:
    """The decoder block a tensor belongs to, or -1 (embeddings, final norm, lm_head)."""
    prefix = family_for({"model_type": spec.model_type}).block_prefix + "."
    if not tensor_name.startswith(prefix):
        return -1
    index = tensor_name[len(prefix):].split(".", 1)[0]
    return int(index) if index.isdigit() else -1


def write_tensor(name: str, reader: WeightReader, quantized, writer: ShardWriter) -> int:
    """Write one source tensor as the block's quantization left it; returns Linear weight bytes."""
    module = name.removesuffix(".weight")
    if quantized is not None and name.endswith(".weight") and module in quantized.linears:
        result = quantized.linears[module]
        if isinstance(result, torch.Tensor):
            writer.add(name, result)
            return result.numel() * result.element_size()
        written = 0
        for suffix, tensor in linear_tensors(result).items():
            written += tensor.numel() * tensor.element_size()
            writer.add(f"{module}.{suffix}", tensor)
        return written
    if quantized is not None and name in quantized.replaced:
        writer.add(name, quantized.replaced[name])
        return 0
    writer.add(name, reader.tensor(name, dtype=None))
    return 0


class CalibrationPass:
    """Re-runs the plan's calibration tokens block by block to give calibrated methods their statistics."""

    def __init__(self, folder: Path, config: dict, plan: Plan, reader: WeightReader):
        settings = plan.provenance.calibration
        tokens = calibration_windows(folder, settings)[: settings.samples]
        if tokens_hash(tokens) != plan.provenance.calibration_hash:
            raise BitplanError("the calibration text differs from the one the plan was made with: restore it, or re-run `bitplan plan`")
        self.runner = BlockRunner(config, reader)
        self.hidden = self.runner.embed(tokens)
        self.positions = self.runner.position_embeddings(self.hidden)

    def block_stats(self, index: int, spec: ModelSpec) -> dict:
        """Statistics of block ``index``'s Linears (blocks in order; -1, the head, after the last)."""
        if index < 0:
            return self.head_stats(spec)
        block = self.runner.load_block(index)
        names = [layer.name for layer in spec.layers if layer.block == index]
        stats, self.hidden = block_input_stats(block, self.runner.block_prefix(index), names, self.hidden, self.positions)
        return stats

    def head_stats(self, spec: ModelSpec) -> dict:
        from bitplan.methods.calibration_stats import planner_stats

        heads = [layer.name for layer in spec.layers if layer.block < 0]
        if not heads:
            return {}
        norm_weight = self.runner.final_norm_weight()
        stats = planner_stats(spec.hidden_size)
        stats.add(self.runner.final_norm(self.hidden, norm_weight))
        return {name: {"input": stats} for name in heads}
