"""Measured quality: KL to the unquantized model and perplexity, on real tokens.

The unquantized model and a working copy are held side by side; a plan is applied to the copy
by swapping in fake-quantized weights (quantize, then dequantize), the same numbers the emitted
checkpoint decodes to. The model is loaded whole here (135M-scale test models; evaluation of
very large models block by block is future work).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from bitplan.methods.registry import quantize
from bitplan.methods.scheme import Scheme
from bitplan.profiles.model_spec import ModelSpec
from bitplan.profiles.sensitivity import SCALE_DTYPES


def load_dense_model(folder: Path) -> nn.Module:
    """The unquantized model in float32 from safetensors (no remote code)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    return model.eval().requires_grad_(False)


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

    Dequantized weights are cached per (layer, scheme) up to ``cache_bytes``, so the trials of a
    refinement, which share most of their assignments, quantize each pair once.
    """

    def __init__(self, reference: nn.Module, spec: ModelSpec, batch_size: int = 4, cache_bytes: int = 2 * 2**30):
        self.reference = reference
        self.working = copy.deepcopy(reference)
        self.spec = spec
        self.batch_size = batch_size
        self.originals = {layer.name: reference.get_submodule(layer.name).weight for layer in spec.layers}
        self.stats: dict[str, dict] = {}
        self.cache: dict[tuple[str, Scheme], torch.Tensor] = {}
        self.cache_bytes = cache_bytes

    def calibrate(self, windows: torch.Tensor) -> None:
        """Gather every Linear's input statistics on ``windows`` (needed by calibrated methods)."""
        from bitplan.methods.calibration_stats import collect_input_stats

        batches = list(windows.split(self.batch_size))
        collected = collect_input_stats(self.reference, batches, list(self.originals), max_samples=0)
        self.stats = {name: {"input": stats} for name, stats in collected.items()}
        self.cache.clear()

    def dequantized(self, name: str, scheme: Scheme) -> torch.Tensor:
        key = (name, scheme)
        if key not in self.cache:
            if sum(t.numel() * t.element_size() for t in self.cache.values()) > self.cache_bytes:
                self.cache.clear()
            weight = self.originals[name].data
            self.cache[key] = quantize(weight, scheme, SCALE_DTYPES[self.spec.dtype], self.stats.get(name, {})).dequantize()
        return self.cache[key]

    def apply(self, assignments: dict[str, Scheme]) -> None:
        """Fake-quantize the working copy per ``assignments`` (layer name -> scheme)."""
        for name, original in self.originals.items():
            module = self.working.get_submodule(name)
            scheme = assignments.get(name)
            if scheme is None or scheme.is_dense:
                module.weight = original
                continue
            module.weight = nn.Parameter(self.dequantized(name, scheme), requires_grad=False)

    def measure(self, windows: torch.Tensor) -> Quality:
        return measure_pair(self.reference, self.working, windows, self.batch_size)


@torch.no_grad()
def measure_pair(reference: nn.Module, candidate: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> Quality:
    """Mean KL(reference || candidate) per token and both perplexities on ``windows`` [n, seq_len]."""
    kl_sum = nll_q = nll_ref = 0.0
    count = 0
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start : start + batch_size]
        ref = torch.log_softmax(reference(ids).logits.float(), dim=-1)
        quant = torch.log_softmax(candidate(ids).logits.float(), dim=-1)
        kl_sum += float((ref.exp() * (ref - quant)).sum())
        targets = ids[:, 1:].unsqueeze(-1)
        nll_ref -= float(ref[:, :-1].gather(-1, targets).sum())
        nll_q -= float(quant[:, :-1].gather(-1, targets).sum())
        count += ids.numel()
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return Quality(kl_sum / count, math.exp(nll_q / predicted), math.exp(nll_ref / predicted), count)
