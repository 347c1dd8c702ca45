"""Load an emitted checkpoint as a transformers model whose quantized Linears are ``QuantLinear``.

On a CPU the quantized Linears run the reference kernel (dequantize, then ``F.linear``); on a
GPU they run bitplan's Triton kernels. Only safetensors are read; no remote code runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from bitplan.engines.formats import BITPLAN_MODEL_TYPE, Format
from bitplan.errors import BitplanError
from bitplan.kernels.launch import WeightFormat
from bitplan.kernels.qlinear import QuantLinear
from bitplan.models.source import WeightReader, safetensors_files
from bitplan.models.spec import family_for, read_config
from bitplan.profiles.blocks import restore_buffers, skeleton_model
from bitplan.profiles.kv_cache import KVRounding, attach_kv_rounding

FORMATS = {Format.PACKED: WeightFormat.INT, Format.INT: WeightFormat.W8A8, Format.FLOAT: WeightFormat.FP8,
           Format.NAIVE: WeightFormat.FP8, Format.NF4: WeightFormat.NF4}  # naive: bitplan writes it for weight-only FP8


def quantized_modules(quantization: dict) -> dict[str, dict]:
    """module name -> its config group, from a compressed-tensors config with exact-name targets."""
    modules = {}
    for group in quantization.get("config_groups", {}).values():
        if group.get("format", quantization.get("format")) not in FORMATS:
            raise BitplanError(f"checkpoint format {group.get('format')!r} is not one bitplan reads ({', '.join(FORMATS)}): emit it with `bitplan emit`")
        for target in group["targets"]:
            if target.startswith("re:"):
                raise BitplanError(f"regex target {target!r}: bitplan.load reads checkpoints with exact module names, as bitplan emits")
            modules[target] = group
    return modules


def quant_linear(tensors: dict[str, torch.Tensor], group: dict) -> QuantLinear:
    """One Linear from its checkpoint tensors and config group."""
    args, activations = group["weights"], group.get("input_activations")
    fmt = FORMATS[group["format"]]
    input_fp8 = bool(activations) and activations.get("type") == "float"
    return QuantLinear.from_checkpoint(tensors, fmt=fmt, bits=int(args["num_bits"]), group_size=int(args.get("group_size") or 0),
                                       input_fp8=input_fp8)


def checkpoint_kv_rounding(folder: Path, scheme: dict, reader: WeightReader, names: set[str], config: dict) -> KVRounding:
    """The fp8 KV cache a ``kv_cache_scheme`` declares, with its per-layer scales (as vLLM runs it)."""
    if (scheme.get("type"), scheme.get("num_bits"), scheme.get("strategy")) != ("float", 8, "tensor"):
        raise BitplanError(f"{folder} declares a KV cache scheme bitplan does not run ({scheme}): re-emit it with bitplan")
    layers = int(config["num_hidden_layers"])
    prefix = family_for(config).block_prefix
    scales = {}
    for which in "kv":
        wanted = [f"{prefix}.{i}.self_attn.{which}_scale" for i in range(layers)]
        if not set(wanted) <= names:
            raise BitplanError(f"{folder} declares an fp8 KV cache but lacks some {which}_scale tensors: re-run `bitplan emit`")
        scales[which] = tuple(float(reader.tensor(name, dtype=None).float().reshape(-1)[0]) for name in wanted)
    return KVRounding("fp8_e4m3", scales["k"], scales["v"])


def load(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The emitted checkpoint in ``folder`` as a ready-to-run causal LM (eval mode, no grad)."""
    folder = Path(folder)
    config = read_config(folder)
    if config.get("model_type") == BITPLAN_MODEL_TYPE:  # planned for --engine bitplan (see emit.mark_for_bitplan)
        config = {**config, "model_type": config.get("bitplan_model_type")}
        config.pop("architectures", None)
    family_for(config)
    quantization = config.pop("quantization_config", None)
    if not quantization or quantization.get("quant_method") not in ("compressed-tensors", "bitplan"):
        raise BitplanError(f"{folder} is not a bitplan checkpoint (no compressed-tensors quantization_config): emit one with `bitplan emit`")
    if not safetensors_files(folder):
        raise BitplanError(f"{folder} has no *.safetensors files: re-run `bitplan emit`")
    model = skeleton_model(config).to_empty(device="cpu").to(dtype)
    restore_buffers(model)
    reader = WeightReader(folder)
    modules = quantized_modules(quantization)
    for name, group in modules.items():
        model.set_submodule(name, quant_linear(reader.tensors(f"{name}.", dtype=None), group))
    kv_scales = {n for n in reader.location if n.endswith((".self_attn.k_scale", ".self_attn.v_scale"))}
    dense = {name: tensor.to(dtype) for name, tensor in ((n, reader.tensor(n, dtype=None)) for n in reader.location)
             if name.rsplit(".", 1)[0] not in modules and name not in kv_scales}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    missing = [m for m in missing if m.rsplit(".", 1)[0] not in modules and not m.startswith("lm_head")]
    if missing or unexpected:
        raise BitplanError(f"{folder} does not match its config.json ({len(missing)} missing, {len(unexpected)} unexpected tensors): re-run `bitplan emit`")
    if getattr(model.config, "tie_word_embeddings", False):  # the config class's default when config.json omits it (Gemma)
        model.tie_weights()
    if quantization.get("kv_cache_scheme"):
        attach_kv_rounding(model, checkpoint_kv_rounding(folder, quantization["kv_cache_scheme"], reader, kv_scales, config))
    return model.to(device).eval().requires_grad_(False)

