"""Measured quality: KL to the unquantized model and perplexity, on real tokens.

The unquantized model and a working copy are held side by side; a plan is applied to the copy
by swapping in fake-quantized weights (quantize, then dequantize), the same numbers the emitted
checkpoint decodes to. The model is loaded whole here (small models, tests and benches);
refinement measures block by block with :class:`bitplan.planner.streaming.StreamingMeter`.

Quantized tensors are computed once and kept (:class:`VariantCache`, up to a memory cap): per
(Linear, scheme), which is exact because a Linear's quantization reads only its own weight and
the reference model's statistics of its input; per block variant where a smoothing scheme (AWQ,
SmoothQuant) folds scales across a block's Linears, so one Linear's result depends on another's
scheme. The reference model's log-probabilities are kept too, per window (:class:`RowCache`): the
search draws different windows of one pool each generation, and each is run through the
reference once while it fits.
"""

from __future__ import annotations

import copy
import math
import shutil
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitplan.kernels.numerics import fake_quant_activations
from bitplan.methods.block import quantize_block
from bitplan.methods.ggml import GGMLQuantized
from bitplan.methods.registry import SMOOTHING
from bitplan.methods.scheme import DENSE, QuantizedWeight, Scheme
from bitplan.models.spec import SCALE_DTYPES, ModelSpec, family_for, norm_offset, read_config
from bitplan.profiles.kv_cache import kv_rounding
from bitplan.profiles.text import tokens_hash

# float32 tensors by full name (or, compact, a Linear's codes and scales), activation format per W8A8 Linear
Variant = tuple[dict[str, torch.Tensor | QuantizedWeight], dict[str, str]]


def load_dense_model(folder: Path) -> nn.Module:
    """The unquantized model in float32 from safetensors (no remote code). A mixture of experts
    runs its experts unfused, one Linear each, as plans quantize them (``models.experts``)."""
    from transformers import AutoModelForCausalLM

    config = read_config(folder)
    if family_for(config).experts is not None:
        from bitplan.models.source import WeightReader
        from bitplan.profiles.blocks import unfused_dense_model

        return unfused_dense_model(config, WeightReader(folder))

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    return model.eval().requires_grad_(False)


def block_variant(layers: list, assignments: dict[str, Scheme], read, stats: dict, spec: ModelSpec, read_rows=None,
                  compact: bool = False) -> Variant:
    """One block under ``assignments``: its float32 tensors by full name (dequantized Linears,
    folded norms and biases) and the activation format of each W8A8 Linear. With ``read_rows``
    a large Linear nothing folds into (a 128k-vocabulary head) is read and quantized a row range
    at a time, as emit does (the same codes; its float32 source is never whole). With ``compact``,
    a Linear quantized to codes and scales stays so (:class:`QuantizedWeight`, a quarter of its
    float32 bytes or less), widened by whoever runs it (``BlockRunner.fill_block``, ``BlockRunner.logits``)."""
    quantized = quantize_block(layers, assignments, read, stats, SCALE_DTYPES[spec.dtype], norm_offset(spec.model_type), read_rows)
    tensors = {f"{name}.weight": widened(w, compact) for name, w in quantized.linears.items()}
    tensors.update({name: t.to(torch.float32) for name, t in quantized.replaced.items()})
    return tensors, quantized.activations


def widened(weight, compact: bool) -> torch.Tensor | QuantizedWeight:
    """A quantized Linear's weight as a variant keeps it: float32, or its codes and scales when ``compact``."""
    if isinstance(weight, QuantizedWeight):
        return weight if compact else weight.dequantize()
    return weight.dequantize() if isinstance(weight, GGMLQuantized) else weight.to(torch.float32)


def variant_bytes(variant: Variant) -> int:
    return sum(t.nbytes if isinstance(t, QuantizedWeight) else t.numel() * t.element_size() for t in variant[0].values())


def stored_variant(variant: Variant) -> Variant:
    """``variant`` as ``torch.save`` writes it and ``torch.load(weights_only=True)`` reads it back: plain tensors,
    a compact Linear as a dict of its tensors and scheme name (:func:`restored_variant` undoes it)."""
    tensors = {name: {"codes": t.codes, "scale": t.scale, "zero": t.zero, "scheme": t.scheme.name} if isinstance(t, QuantizedWeight) else t
               for name, t in variant[0].items()}
    return tensors, variant[1]


def restored_variant(stored: Variant) -> Variant:
    tensors = {name: QuantizedWeight(t["codes"], t["scale"], t["zero"], Scheme.parse(t["scheme"])) if isinstance(t, dict) else t
               for name, t in stored[0].items()}
    return tensors, stored[1]


class VariantCache:
    """Quantized tensors computed once: the least recently used leave memory beyond ``memory_bytes``
    (the newest always stays); with ``spill_dir`` they are written there first and read back when
    asked again, up to ``disk_bytes`` on disk (default: half the space free there when the cache is
    made); beyond that an evicted variant is dropped and computed again if asked for (a float32
    variant of every Linear of an 8B model is 28 GB per scheme). ``computed`` counts the variants
    quantized so far, ``dropped`` those evicted without a copy on disk."""

    def __init__(self, memory_bytes: int, spill_dir: Path | None = None, disk_bytes: int | None = None):
        self.memory_bytes = memory_bytes
        self.spill_dir = spill_dir
        if spill_dir is not None and disk_bytes is None:
            disk_bytes = shutil.disk_usage(spill_dir).free // 2
        self.disk_bytes = disk_bytes or 0
        self.memory: OrderedDict[tuple, Variant] = OrderedDict()
        self.spilled: dict[tuple, Path] = {}
        self.held = 0
        self.spilled_bytes = 0
        self.computed = 0
        self.dropped = 0

    def get(self, key: tuple, compute: Callable[[], Variant], expected_bytes: int = 0) -> Variant:
        """The variant of ``key``, computed by ``compute`` if neither in memory nor on disk. With
        ``expected_bytes`` (its size, when known), older variants leave memory first to make room:
        a 2.1 GB head variant is not computed beside a full cache."""
        if key in self.memory:
            self.memory.move_to_end(key)
            variant = self.memory[key]
        else:
            self.evict(self.memory_bytes - expected_bytes, keep=0)
            if key in self.spilled:
                variant = restored_variant(torch.load(self.spilled[key], weights_only=True))
            else:
                variant = compute()
                self.computed += 1
            self.memory[key] = variant
            self.held += variant_bytes(variant)
        self.evict(self.memory_bytes, keep=1)
        return variant

    def evict(self, limit: int, keep: int) -> None:
        """Move the least recently used variants out of memory (to disk while it has room, else
        dropped) until at most ``limit`` bytes are held or ``keep`` variants remain."""
        while self.held > limit and len(self.memory) > keep:
            old_key, old = self.memory.popitem(last=False)
            size = variant_bytes(old)
            self.held -= size
            if self.spill_dir is None or old_key in self.spilled:
                continue
            if self.spilled_bytes + size > self.disk_bytes:
                self.dropped += 1
                continue
            path = self.spill_dir / f"variant-{len(self.spilled)}.pt"
            torch.save(stored_variant(old), path)
            self.spilled[old_key] = path
            self.spilled_bytes += path.stat().st_size

    def clear(self) -> None:
        for path in self.spilled.values():
            path.unlink(missing_ok=True)
        self.memory.clear()
        self.spilled.clear()
        self.held = 0
        self.spilled_bytes = 0


def cached_block(cache: VariantCache, layers: list, assignments: dict[str, Scheme], read, stats: Callable[[], dict],
                 spec: ModelSpec, read_rows=None, compact: bool = False) -> Variant:
    """:func:`block_variant` through ``cache``: assembled from per-(Linear, scheme) entries, or one
    entry per block variant when a smoothing scheme couples the block's Linears. Dense Linears
    (a cast to the checkpoint dtype) are not kept. ``stats()`` gives the block's statistics when needed."""
    if any(assignments[layer.name].method in SMOOTHING for layer in layers):
        key = ("block", tuple(layer.name for layer in layers), tuple(assignments[layer.name] for layer in layers))
        return cache.get(key, lambda: block_variant(layers, assignments, read, stats(), spec, compact=compact))
    tensors, activations = {}, {}
    for layer in layers:
        scheme = assignments[layer.name]
        alone = lambda layer=layer, scheme=scheme: block_variant([layer], {layer.name: scheme}, read,  # noqa: E731
                                                                 {} if scheme.is_dense else stats(), spec, read_rows, compact)
        held = layer.out_features * layer.in_features * (1 if compact else 4)  # about: int8 codes or float32
        part = alone() if scheme.is_dense else cache.get(("linear", layer.name, scheme), alone, held)
        tensors.update(part[0])
        activations.update(part[1])
    return tensors, activations


class RowCache:
    """Per-window results (one tensor per row of the windows, keyed by the row's tokens), computed
    once and kept up to ``max_bytes``, least recently used first out. ``get`` stacks the rows of a
    window set, computing the missing ones together."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.rows: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self.held = 0

    def get(self, windows: torch.Tensor, compute: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``compute(rows)`` [n, ...] per window of ``windows`` [n, seq_len], from the cache where it holds them."""
        keys = [(row.numel(), tokens_hash(row.contiguous())) for row in windows]
        missing = [index for index, key in enumerate(keys) if key not in self.rows]
        fresh = dict(zip(missing, compute(windows[missing].contiguous()))) if missing else {}
        stacked = torch.stack([fresh[index] if index in fresh else self.rows[key] for index, key in enumerate(keys)])
        for index, key in enumerate(keys):
            if index in fresh:
                self.rows[key] = fresh[index].clone()  # not a view: a view would hold the whole batch
                self.held += fresh[index].numel() * fresh[index].element_size()
            self.rows.move_to_end(key)
        while self.held > self.max_bytes and self.rows:
            _, old = self.rows.popitem(last=False)
            self.held -= old.numel() * old.element_size()
        return stacked


@dataclass(frozen=True)
class Quality:
    kl: float  # mean KL(p_ref || p_quant) per token, nats
    perplexity: float
    reference_perplexity: float
    tokens: int
    window_kl: tuple[float, ...] = ()  # mean KL per token of each window, in order (paired comparisons of plans)

    def to_dict(self) -> dict:
        return {"kl": self.kl, "perplexity": self.perplexity, "reference_perplexity": self.reference_perplexity, "tokens": self.tokens}


class QualityMeter:
    """Measures plans against the reference model on fixed token windows.

    A plan is applied block by block through :func:`bitplan.methods.block.quantize_block`, the
    function emit writes from: quantized Linears become their dequantized weights, folded norms
    and biases are replaced, and W8A8 Linears quantize their input per token (a pre-hook).
    Quantized tensors are kept per (Linear, scheme) (per block variant under smoothing schemes) up
    to ``cache_bytes`` (:func:`cached_block`), so the trials of a search quantize each once; the
    reference's log-probabilities of each measured window are kept up to ``reference_bytes``.
    """

    def __init__(self, reference: nn.Module, spec: ModelSpec, batch_size: int = 4, cache_bytes: int = 2 * 2**30,
                 reference_bytes: int = 3 * 2**30):
        self.reference = reference
        self.working = copy.deepcopy(reference)
        self.spec = spec
        self.batch_size = batch_size
        self.params = dict(reference.named_parameters(remove_duplicate=False))
        self.blocks: dict[int, list] = {}
        for layer in spec.layers:
            self.blocks.setdefault(layer.block, []).append(layer)
        self.stats: dict[str, dict] = {}
        self.cache = VariantCache(cache_bytes)
        self.references = RowCache(reference_bytes)  # the reference's log-probs per window
        self.current: dict[str, torch.Tensor] = {}  # tensors of the working copy that differ from the reference
        self.hooks: list = []
        self.kv = None  # K/V transform of the candidate's attention (profiles.kv_cache), or None

    def calibrate(self, windows: torch.Tensor) -> None:
        """Gather every Linear's input statistics on ``windows`` (needed by calibrated methods)."""
        from bitplan.methods.calibration_stats import PLANNER_SAMPLES, PLANNER_STRIDE, collect_input_stats, planner_stats

        batches = list(windows.split(self.batch_size))
        names = [layer.name for layer in self.spec.layers]
        collected = collect_input_stats(self.reference, batches, names, max_samples=PLANNER_SAMPLES, sample_stride=PLANNER_STRIDE)
        self.stats = {name: {"input": stats} for name, stats in collected.items()}
        for layer in self.spec.layers:  # a Linear no token reached (an expert the router never chose): empty statistics
            self.stats.setdefault(layer.name, {"input": planner_stats(layer.in_features)})
        self.cache.clear()

    def read(self, name: str) -> torch.Tensor | None:
        tensor = self.params.get(name)
        return None if tensor is None else tensor.data

    def block_tensors(self, block: int, assignments: dict[str, Scheme]) -> Variant:
        """The float32 tensors (full names) and activation formats block ``block`` runs with."""
        return cached_block(self.cache, self.blocks[block], assignments, self.read, lambda: self.stats, self.spec)

    def set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        module_name, attr = name.rsplit(".", 1)
        setattr(self.working.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))

    def apply(self, assignments: dict[str, Scheme]) -> None:
        """Fake-quantize the working copy per ``assignments`` (layer name -> scheme; missing = dense)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        full = {layer.name: assignments.get(layer.name, DENSE) for layer in self.spec.layers}
        wanted: dict[str, torch.Tensor] = {}
        activations: dict[str, str] = {}
        for block, layers in self.blocks.items():
            if all(full[layer.name].is_dense for layer in layers):
                continue
            tensors, formats = self.block_tensors(block, full)
            wanted.update(tensors)
            activations.update(formats)
        for name in self.current.keys() - wanted.keys():
            self.set_tensor(name, self.params[name])
        for name, tensor in wanted.items():
            if self.current.get(name) is not tensor:
                self.set_tensor(name, tensor)
        self.current = wanted
        for name, fmt in activations.items():
            hook = lambda module, args, fmt=fmt: (fake_quant_activations(args[0], fmt),)  # noqa: E731
            self.hooks.append(self.working.get_submodule(name).register_forward_pre_hook(hook))

    def measure(self, windows: torch.Tensor) -> Quality:
        return measure_pair(self.reference, self.working, windows, self.batch_size, self.kv, self.reference_log_probs(windows))

    @torch.no_grad()
    def reference_log_probs(self, windows: torch.Tensor) -> list[torch.Tensor]:
        """The reference's log-probabilities of ``windows``, one tensor per batch; each window's
        computed once while it fits in ``reference_bytes`` (:class:`RowCache`)."""

        def compute(rows: torch.Tensor) -> torch.Tensor:
            return torch.cat([torch.log_softmax(self.reference(ids).logits.float(), dim=-1) for ids in rows.split(self.batch_size)])

        return list(self.references.get(windows, compute).split(self.batch_size))


@torch.no_grad()
def measure_pair(reference: nn.Module, candidate: nn.Module, windows: torch.Tensor, batch_size: int = 4, kv=None,
                 reference_log_probs: list[torch.Tensor] | None = None) -> Quality:
    """Mean KL(reference || candidate) per token and both perplexities on ``windows`` [n, seq_len];
    ``kv`` rounds the candidate's K and V (``profiles.kv_cache.kv_rounding``); ``reference_log_probs``
    (one tensor per batch of ``batch_size`` windows) stand in for running the reference."""
    kl_sum = nll_q = nll_ref = 0.0
    count = 0
    per_window: list[float] = []
    for index, start in enumerate(range(0, windows.shape[0], batch_size)):
        ids = windows[start : start + batch_size]
        if reference_log_probs is not None:
            ref = reference_log_probs[index]
        else:
            ref = torch.log_softmax(reference(ids).logits.float(), dim=-1)
        with kv_rounding(kv):
            quant = torch.log_softmax(candidate(ids).logits.float(), dim=-1)
        window_sums = (ref.exp() * (ref - quant)).sum(dim=(1, 2))
        kl_sum += float(window_sums.sum())
        per_window += (window_sums / ids.shape[1]).tolist()
        targets = ids[:, 1:].unsqueeze(-1)
        nll_ref -= float(ref[:, :-1].gather(-1, targets).sum())
        nll_q -= float(quant[:, :-1].gather(-1, targets).sum())
        count += ids.numel()
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return Quality(kl_sum / count, math.exp(nll_q / predicted), math.exp(nll_ref / predicted), count, tuple(per_window))
