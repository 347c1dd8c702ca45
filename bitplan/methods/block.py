"""One decoder block's Linears under a plan: the single place that turns assignments into tensors.

Emit writes what this returns; the quality meter runs what this returns; so the checkpoint and
the measured model are the same numbers. Steps, in order:

1. Smoothing groups fed by a Linear (``mlp.up_proj`` -> ``down_proj``; ``v_proj`` -> ``o_proj``
   without grouped-query attention) whose members take AWQ or SmoothQuant get their scales from
   the unquantized weights; the feeding Linear's output rows (and bias) are divided by them.
2. Smoothing groups fed by a norm get their scales (from the weights after step 1); the norm's
   weight is divided by them, rounded to the checkpoint dtype. A norm computing
   ``x * (offset + w)`` (Gemma: offset 1) stores ``w' = (offset + w) / s - offset``.
3. Every other Linear is quantized by its method on its (possibly row-folded) weight, or left
   dense in the checkpoint dtype.

Members of a smoothing group take one smoothing scheme together or none (the search enforces it;
a hand-made plan that breaks it is refused here). A Linear with nothing to fold into (o_proj
under grouped-query attention) runs its smoothing method with s = 1. Linears with ``act_bits`` 8 quantize their
input per token at run time: ``activations[name]`` says in which format ("int8" or "fp8").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from bitplan.errors import BitplanError
from bitplan.methods.registry import SMOOTHING, quantize_by_rows, quantize_row_ranges, quantize_smoothing_group, row_chunks
from bitplan.methods.scheme import Method, QuantizedWeight, Scheme
from bitplan.models.spec import LayerSpec

NO_CLIP_KINDS = ("q", "k")  # AWQ's reference does not clip q and k (attention scores amplify it)


@dataclass
class QuantizedBlock:
    """``linears``: each Linear's QuantizedWeight, or its dense weight in the checkpoint dtype.
    ``replaced``: other tensors changed by folding (full tensor names: norm weights, feeder biases).
    ``activations``: Linear name -> run-time activation format for W8A8 layers.
    ``smoothing``: previous-op name -> (scheme name, alpha) for each smoothed group."""

    linears: dict[str, QuantizedWeight | torch.Tensor] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    activations: dict[str, str] = field(default_factory=dict)
    smoothing: dict[str, tuple[str, float | None]] = field(default_factory=dict)


def previous_op(layer: LayerSpec) -> str:
    """Full module name of the op whose output feeds ``layer`` (for folding), e.g. ``model.layers.3.input_layernorm``."""
    head = layer.name.rsplit(f".{layer.block}.", 1)[0]
    return f"{head}.{layer.block}.{layer.smoothed_by}"


def clip_flags(members: list[LayerSpec]) -> dict[str, bool]:
    """Which Linears AWQ may clip (all but q and k, as its reference)."""
    return {m.name: m.kind not in NO_CLIP_KINDS for m in members}


def activation_format(scheme: Scheme) -> str | None:
    if not scheme.act_quantized:
        return None
    return "fp8" if scheme.method == Method.FP8 else "int8"


def smoothing_groups(layers: list[LayerSpec], assignments: dict[str, Scheme]) -> dict[str, tuple[Scheme, list[LayerSpec]]]:
    """previous-op name -> (its smoothing scheme, member layers), checking the plan is consistent."""
    groups: dict[str, list[LayerSpec]] = {}
    for layer in layers:
        if layer.smoothed_by:
            groups.setdefault(previous_op(layer), []).append(layer)
    chosen = {}
    for layer in layers:
        scheme = assignments[layer.name]
        if scheme.method not in SMOOTHING:
            continue
        if not layer.smoothed_by:
            continue  # nothing to fold into: the method runs with s = 1 on this Linear alone
        key = previous_op(layer)
        members = groups[key]
        if any(assignments[m.name] != scheme for m in members):
            raise BitplanError(f"the Linears fed by {key} must all take {scheme} or none take a smoothing scheme: re-run `bitplan plan`")
        chosen[key] = (scheme, members)
    return chosen


def quantize_block(layers: list[LayerSpec], assignments: dict[str, Scheme], read: Callable[[str], torch.Tensor | None],
                   stats: dict[str, dict], scale_dtype: torch.dtype, norm_offset: float = 0.0,
                   read_rows: Callable[[str, int, int], torch.Tensor] | None = None) -> QuantizedBlock:
    """Quantize one block's ``layers`` per ``assignments``.

    ``read(tensor_name)`` returns a source tensor (float32) or None when absent (e.g. a bias);
    ``stats[name]["input"]`` are a Linear's calibration statistics (needed by GPTQ, AWQ,
    SmoothQuant); ``scale_dtype`` is the checkpoint dtype (scales, dense and folded tensors);
    ``norm_offset`` is what the family's norms add to their weight (``models.spec.norm_offset``).
    With ``read_rows(tensor_name, start, stop)``, a Linear larger than ``registry.ROW_CHUNK`` that
    nothing folds into (a 128k-vocabulary head) is read and quantized a row range at a time.
    """
    result = QuantizedBlock()
    names = {layer.name for layer in layers}
    groups = smoothing_groups(layers, assignments)
    by_rows = {layer.name for layer in layers if read_rows is not None and len(row_chunks(layer.out_features, layer.in_features)) > 1
               and assignments[layer.name].method not in SMOOTHING and assignments[layer.name].method != Method.GGML
               and layer.name not in groups}  # nothing folds into it
    # what smoothing reads across Linears is read first; every other Linear when its turn comes, and each
    # float32 weight is dropped once quantized (a block's worth of float32 is never held at once)
    coupled = {member.name for _, members in groups.values() for member in members} | (set(groups) & names)
    weights = {layer.name: read(f"{layer.name}.weight").to(torch.float32) for layer in layers if layer.name in coupled}

    def weight(name: str) -> torch.Tensor:
        return weights.pop(name) if name in weights else read(f"{name}.weight").to(torch.float32)
    done: dict[str, QuantizedWeight] = {}
    order = sorted(groups, key=lambda key: key not in names)  # Linear-fed groups first (step 1), then norm-fed
    for key in order:
        scheme, members = groups[key]
        group = quantize_smoothing_group({m.name: weights[m.name] for m in members}, scheme, scale_dtype,
                                         stats[members[0].name]["input"], clip_flags(members))
        done.update(group.quantized)
        result.smoothing[key] = (scheme.name, group.alpha)
        if key in names:  # fold into the feeding Linear's output rows, before it is quantized
            if key in done:
                raise BitplanError(f"{key} is quantized before its output is folded: unsupported block layout")
            weights[key] = weights[key] / group.scales.unsqueeze(1)
            bias = read(f"{key}.bias")
            if bias is not None:
                result.replaced[f"{key}.bias"] = (bias.to(torch.float32) / group.scales).to(scale_dtype)
        else:
            norm = read(f"{key}.weight").to(torch.float32)
            result.replaced[f"{key}.weight"] = ((norm + norm_offset) / group.scales - norm_offset).to(scale_dtype)
    for layer in layers:
        scheme = assignments[layer.name]
        if scheme.method in SMOOTHING and not layer.smoothed_by:
            alone = quantize_smoothing_group({layer.name: weight(layer.name)}, scheme, scale_dtype, stats[layer.name]["input"],
                                             clip_flags([layer]), foldable=False)
            done[layer.name] = alone.quantized[layer.name]
        if layer.name in done:
            result.linears[layer.name] = done[layer.name]
        elif layer.name in by_rows:
            rows = lambda start, stop, name=f"{layer.name}.weight": read_rows(name, start, stop)  # noqa: E731
            if scheme.is_dense:
                dense = torch.empty(layer.out_features, layer.in_features, dtype=scale_dtype)
                for start, stop in row_chunks(layer.out_features, layer.in_features):
                    dense[start:stop] = rows(start, stop)
                result.linears[layer.name] = dense
            else:
                result.linears[layer.name] = quantize_row_ranges(rows, layer.out_features, layer.in_features, scheme, scale_dtype,
                                                                 stats.get(layer.name, {}))
        elif scheme.is_dense:
            result.linears[layer.name] = weight(layer.name).to(scale_dtype)
        else:
            result.linears[layer.name] = quantize_by_rows(weight(layer.name), scheme, scale_dtype, stats.get(layer.name, {}))
        weights.pop(layer.name, None)
        if activation_format(scheme):
            result.activations[layer.name] = activation_format(scheme)
    return result
