"""Load an emitted checkpoint as a transformers model whose quantized Linears are ``QuantLinear``.

On a CPU the quantized Linears run the reference kernel (dequantize, then ``F.linear``); on a
GPU they run bitplan's Triton kernels. Only safetensors are read; no remote code runs.

The decode works on any part of the model: :func:`decode_into` fills the skeleton's module
under a name prefix (the whole model, or one decoder block) from the checkpoint's tensors under
that prefix. :func:`load` decodes the whole model; :class:`CheckpointRunner` decodes one block at
a time (what ``bitplan eval`` runs, see ``checkpoints.evaluate``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from bitplan.engines.formats import BITPLAN_MODEL_TYPE, Format
from bitplan.errors import BitplanError
from bitplan.kernels.launch import WeightFormat
from bitplan.kernels.qlinear import QuantLinear
from bitplan.models.source import WeightReader, safetensors_files
from bitplan.models.spec import family_for, read_config
from bitplan.profiles.blocks import BlockRunner, restore_buffers, skeleton_model
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


@dataclass(frozen=True)
class Checkpoint:
    """An emitted checkpoint opened for decoding: nothing but its safetensors headers read yet."""

    folder: Path
    config: dict  # config.json as transformers reads it: bitplan's model type resolved, no quantization_config
    modules: dict[str, dict]  # quantized module name -> its config group
    reader: WeightReader = field(repr=False)
    kv_scales: frozenset[str]  # the K/V scale tensors (read into the KV rounding, never into a module)
    kv: KVRounding | None  # the KV cache format the checkpoint declares (None: the engine's native one)


def open_checkpoint(folder: str | os.PathLike) -> Checkpoint:
    """Read ``folder``'s config.json and safetensors headers; refuse what is not a bitplan checkpoint."""
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
    reader = WeightReader(folder)
    modules = quantized_modules(quantization)
    kv_scales = frozenset(n for n in reader.location if n.endswith((".self_attn.k_scale", ".self_attn.v_scale")))
    kv = None
    if quantization.get("kv_cache_scheme"):
        kv = checkpoint_kv_rounding(folder, quantization["kv_cache_scheme"], reader, set(kv_scales), config)
    return Checkpoint(folder, config, modules, reader, kv_scales, kv)


def decode_into(module: nn.Module, prefix: str, checkpoint: Checkpoint, dtype: torch.dtype = torch.float32,
                optional: tuple[str, ...] = ()) -> None:
    """Fill ``module`` (the skeleton's module named ``prefix``, "" for the whole model, on the CPU)
    from the checkpoint's tensors under ``prefix``: each quantized Linear becomes a ``QuantLinear``,
    every other tensor is loaded in ``dtype``. Tensors of the module named in ``optional`` (by
    full-name prefix: a tied head) may be absent."""
    reader, modules = checkpoint.reader, checkpoint.modules
    mine = {name: group for name, group in modules.items() if name.startswith(prefix)}
    for name, group in mine.items():
        module.set_submodule(name[len(prefix):], quant_linear(reader.tensors(f"{name}.", dtype=None), group))
    dense = {name[len(prefix):]: reader.tensor(name, dtype=None).to(dtype) for name in reader.location
             if name.startswith(prefix) and name.rsplit(".", 1)[0] not in modules and name not in checkpoint.kv_scales}
    missing, unexpected = module.load_state_dict(dense, strict=False)
    missing = [m for m in missing if (prefix + m).rsplit(".", 1)[0] not in mine and not (prefix + m).startswith(optional)]
    if missing or unexpected:
        raise BitplanError(f"{checkpoint.folder} does not match its config.json ({len(missing)} missing, {len(unexpected)} unexpected "
                           f"tensors): re-run `bitplan emit`")


def load(folder: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str = "cpu") -> nn.Module:
    """The emitted checkpoint in ``folder`` as a ready-to-run causal LM (eval mode, no grad)."""
    checkpoint = open_checkpoint(folder)
    model = skeleton_model(checkpoint.config).to_empty(device="cpu").to(dtype)
    restore_buffers(model)
    decode_into(model, "", checkpoint, dtype, optional=("lm_head",))
    if getattr(model.config, "tie_word_embeddings", False):  # the config class's default when config.json omits it (Gemma)
        model.tie_weights()
    if checkpoint.kv is not None:
        attach_kv_rounding(model, checkpoint.kv)
    return model.to(device).eval().requires_grad_(False)


class CheckpointRunner(BlockRunner):
    """A :class:`BlockRunner` over an emitted checkpoint: each block decoded as :func:`load` decodes
    it (quantized Linears as ``QuantLinear``, the declared KV cache format attached), one at a time."""

    def __init__(self, checkpoint: Checkpoint):
        super().__init__(checkpoint.config, checkpoint.reader)
        self.checkpoint = checkpoint

    def fill_block(self, block: nn.Module, index: int, overrides: dict[str, torch.Tensor] | None = None) -> None:
        assert not overrides, "a checkpoint's blocks run as emitted"
        decode_into(block, self.block_prefix(index), self.checkpoint)
        if self.checkpoint.kv is not None:
            attach_kv_rounding(block, self.checkpoint.kv)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor | nn.Module]:
        """(final norm weight, lm_head): a quantized head is its ``QuantLinear``."""
        name = self.family.lm_head
        group = self.checkpoint.modules.get(name)
        if group is None:
            return super().head_weights()
        norm = self.reader.tensor(f"{self.family.final_norm}.weight")
        return norm, quant_linear(self.reader.tensors(f"{name}.", dtype=None), group).eval().requires_grad_(False)
