"""Measured quality: KL to the unquantized model and perplexity, on real tokens.

The unquantized model and a working copy are held side by side; a plan is applied to the copy
by swapping in fake-quantized weights (quantize, then dequantize), the same numbers the emitted
checkpoint decodes to. The model is loaded whole here (small models, tests and benches);
refinement measures block by block with :class:`bitplan.planner.streaming.StreamingMeter`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitplan.kernels.numerics import fake_quant_activations
from bitplan.methods.block import quantize_block
from bitplan.methods.ggml import GGMLQuantized
from bitplan.methods.scheme import DENSE, QuantizedWeight, Scheme
from bitplan.models.spec import SCALE_DTYPES, ModelSpec, family_for, norm_offset, read_config
from bitplan.profiles.kv_cache import kv_rounding


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


def block_variant(layers: list, assignments: dict[str, Scheme], read, stats: dict, spec: ModelSpec
                  ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One block under ``assignments``: its float32 tensors by full name (dequantized Linears,
    folded norms and biases) and the activation format of each W8A8 Linear."""
    quantized = quantize_block(layers, assignments, read, stats, SCALE_DTYPES[spec.dtype], norm_offset(spec.model_type))
    tensors = {f"{name}.weight": (w.dequantize() if isinstance(w, (QuantizedWeight, GGMLQuantized)) else w.to(torch.float32))
               for name, w in quantized.linears.items()}
    tensors.update({name: t.to(torch.float32) for name, t in quantized.replaced.items()})
    return tensors, quantized.activations


@dataclass(frozen=True)
class Quality:
    kl: float  # mean KL(p_ref || p_quant) per token, nats
    perplexity: float
    reference_perplexity: float
    tokens: int

    def to_dict(self) -> dict:
        return {"kl": self.kl, "perplexity": self.perplexity, "reference_perplexity": self.reference_perplexity, "tokens": self.tokens}


class QualityMeter:
    """Measures plans against the reference model on fixed token windows.

    A plan is applied block by block through :func:`bitplan.methods.block.quantize_block`, the
    function emit writes from: quantized Linears become their dequantized weights, folded norms
    and biases are replaced, and W8A8 Linears quantize their input per token (a pre-hook). Each
    block's tensors are cached by its assignments up to ``cache_bytes``, so the trials of a
    refinement, which share most assignments, quantize each block variant once.
    """

    def __init__(self, reference: nn.Module, spec: ModelSpec, batch_size: int = 4, cache_bytes: int = 2 * 2**30):
        self.reference = reference
        self.working = copy.deepcopy(reference)
        self.spec = spec
        self.batch_size = batch_size
        self.params = dict(reference.named_parameters(remove_duplicate=False))
        self.blocks: dict[int, list] = {}
        for layer in spec.layers:
            self.blocks.setdefault(layer.block, []).append(layer)
        self.stats: dict[str, dict] = {}
        self.cache: dict[tuple, tuple[dict[str, torch.Tensor], dict[str, str]]] = {}
        self.cache_bytes = cache_bytes
        self.changed: set[str] = set()
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

    def block_tensors(self, block: int, assignments: dict[str, Scheme]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The float32 tensors (full names) and activation formats block ``block`` runs with."""
        layers = self.blocks[block]
        key = (block, tuple(assignments[layer.name] for layer in layers))
        if key not in self.cache:
            if sum(t.numel() * t.element_size() for tensors, _ in self.cache.values() for t in tensors.values()) > self.cache_bytes:
                self.cache.clear()
            self.cache[key] = block_variant(layers, assignments, self.read, self.stats, self.spec)
        return self.cache[key]

    def set_tensor(self, name: str, tensor: torch.Tensor) -> None:
        module_name, attr = name.rsplit(".", 1)
        setattr(self.working.get_submodule(module_name), attr, nn.Parameter(tensor, requires_grad=False))

    def apply(self, assignments: dict[str, Scheme]) -> None:
        """Fake-quantize the working copy per ``assignments`` (layer name -> scheme; missing = dense)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()
        for name in self.changed:
            self.set_tensor(name, self.params[name])
        self.changed.clear()
        full = {layer.name: assignments.get(layer.name, DENSE) for layer in self.spec.layers}
        for block, layers in self.blocks.items():
            if all(full[layer.name].is_dense for layer in layers):
                continue
            tensors, activations = self.block_tensors(block, full)
            for name, tensor in tensors.items():
                self.set_tensor(name, tensor)
                self.changed.add(name)
            for name, fmt in activations.items():
                hook = lambda module, args, fmt=fmt: (fake_quant_activations(args[0], fmt),)  # noqa: E731
                self.hooks.append(self.working.get_submodule(name).register_forward_pre_hook(hook))

    def measure(self, windows: torch.Tensor) -> Quality:
        return measure_pair(self.reference, self.working, windows, self.batch_size, self.kv)


@torch.no_grad()
def measure_pair(reference: nn.Module, candidate: nn.Module, windows: torch.Tensor, batch_size: int = 4, kv=None) -> Quality:
    """Mean KL(reference || candidate) per token and both perplexities on ``windows`` [n, seq_len];
    ``kv`` rounds the candidate's K and V (``profiles.kv_cache.kv_rounding``)."""
    kl_sum = nll_q = nll_ref = 0.0
    count = 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        ref = torch.log_softmax(reference(ids).logits.float(), dim=-1)
        with kv_rounding(kv):
            quant = torch.log_softmax(candidate(ids).logits.float(), dim=-1)
        kl_sum += float((ref.exp() * (ref - quant)).sum())
        targets = ids[:, 1:].unsqueeze(-1)
        nll_ref -= float(ref[:, :-1].gather(-1, targets).sum())
        nll_q -= float(quant[:, :-1].gather(-1, targets).sum())
        count += ids.numel()
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return Quality(kl_sum / count, math.exp(nll_q / predicted), math.exp(nll_ref / predicted), count)
