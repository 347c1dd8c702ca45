"""Measured KL without the whole model in memory: plans run block by block against reference outputs.

The reference (unquantized) model runs once over the measured windows, one decoder block at a
time, and only its final hidden states are kept; the reference log-probabilities are recomputed
from them a few windows at a time (one norm and one head matmul), never stored for the whole
vocabulary. A plan is measured by running the fake-quantized model the same way: each block is
loaded from safetensors, its quantized Linears, folded norms and biases swapped in (the numbers
:class:`bitplan.planner.quality.QualityMeter` and emit use), run over every window's hidden state,
and dropped. Calibration statistics for calibrated methods are gathered in one block-by-block pass
and kept on disk, one file per block, read back when a block is quantized.

Quantized tensors (per (Linear, scheme), or per block variant under a smoothing scheme:
``quality.cached_block``) are computed once; beyond ``cache_bytes`` in memory the least recently
used go to disk and are read back when asked again, so a search quantizes each once.

Memory: one block's weights (float32) and ``cache_bytes`` of quantized tensors (a quantized Linear
as its int8 codes and scales, widened one tensor at a time as its block is filled, a quantized head
``HEAD_ROWS`` rows at a time as it multiplies), plus the hidden states of the measured windows
(twice: reference and candidate) and one batch of logits, whatever the depth.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from bitplan.kernels.numerics import fake_quant_activations
from bitplan.methods.scheme import DENSE, Scheme
from bitplan.models.source import WeightReader, cache_dir
from bitplan.models.spec import ModelSpec
from bitplan.planner.quality import Quality, RowCache, Variant, VariantCache, cached_block
from bitplan.profiles.blocks import BlockRunner, block_input_stats, run_block
from bitplan.profiles.kv_cache import kv_rounding


def log_probs(runner: BlockRunner, hidden: torch.Tensor, norm_weight: torch.Tensor, head_weight: torch.Tensor,
              activation: str | None = None) -> torch.Tensor:
    """float32 log-probabilities of the next token from final hidden states ``[n, seq, width]``."""
    normed = runner.final_norm(hidden, norm_weight)
    if activation:
        normed = fake_quant_activations(normed, activation)
    return torch.log_softmax(runner.logits(normed, head_weight).float(), dim=-1)


def compare(windows: torch.Tensor, reference: Callable[[int], torch.Tensor], candidate: Callable[[int], torch.Tensor]) -> Quality:
    """Mean KL(reference || candidate) per token and both perplexities on ``windows`` [n, seq_len];
    ``reference(i)`` and ``candidate(i)`` give window ``i``'s log-probabilities [1, seq_len, vocab],
    asked for one window at a time (one window's logits in memory)."""
    kl_sum = nll_q = nll_ref = 0.0
    per_window: list[float] = []
    for index in range(windows.shape[0]):
        ref, quant = reference(index), candidate(index)
        window_sum = float((ref.exp() * (ref - quant)).sum())
        kl_sum += window_sum
        per_window.append(window_sum / windows.shape[1])
        targets = windows[index : index + 1, 1:].unsqueeze(-1)
        nll_ref -= float(ref[:, :-1].gather(-1, targets).sum())
        nll_q -= float(quant[:, :-1].gather(-1, targets).sum())
    predicted = windows.shape[0] * (windows.shape[1] - 1)
    return Quality(kl_sum / windows.numel(), math.exp(nll_q / predicted), math.exp(nll_ref / predicted), windows.numel(),
                   tuple(per_window))


@torch.no_grad()
def final_hidden_states(runners: list[BlockRunner], windows: dict[str, torch.Tensor], batch_size: int = 4) -> list[dict[str, torch.Tensor]]:
    """Each runner's final hidden states of every window set (name -> [n, seq_len] token ids).

    The runners (models of the same depth: a reference and a candidate) advance together, block
    by block: block ``i`` of each is loaded, runs every window set, and is dropped before the next
    loads. Memory: one block's weights plus each runner's hidden states of all the windows."""
    depths = {runner.num_blocks for runner in runners}
    assert len(depths) == 1, f"models of different depths: {sorted(depths)}"
    hidden = [{name: runner.embed(ids) for name, ids in windows.items()} for runner in runners]
    positions = [{name: runner.position_embeddings(states) for name, states in mine.items()} for runner, mine in zip(runners, hidden)]
    for index in range(depths.pop()):
        for runner, mine, where in zip(runners, hidden, positions):
            block = runner.load_block(index)
            for name in mine:
                mine[name] = run_block(block, mine[name], where[name], batch_size)
            del block
    return hidden


class StreamingMeter:
    """Measures plans on fixed windows block by block (same interface as ``QualityMeter``:
    :meth:`calibrate`, :meth:`apply`, :meth:`measure`)."""

    def __init__(self, folder: Path, config: dict, spec: ModelSpec, batch_size: int = 4, cache_bytes: int = 2**30,
                 reference_bytes: int = 2**30):
        self.reader = WeightReader(folder)
        self.runner = BlockRunner(config, self.reader)
        self.spec = spec
        self.batch_size = batch_size
        self.blocks: dict[int, list] = {}
        for layer in spec.layers:
            self.blocks.setdefault(layer.block, []).append(layer)
        cache_dir().mkdir(parents=True, exist_ok=True)
        self.work = tempfile.TemporaryDirectory(prefix="refine-", dir=cache_dir())  # removed with the meter
        self.cache = VariantCache(cache_bytes, Path(self.work.name))
        self.calibrated = False
        self.assignments: dict[str, Scheme] = {}
        self.references = RowCache(reference_bytes)  # the reference's final hidden states per window
        self.kv = None  # K/V transform of the candidate's attention (profiles.kv_cache), or None

    def source_name(self, name: str) -> str:
        """The stored tensor behind ``name``: a tied head is the embedding."""
        if name == f"{self.runner.family.lm_head}.weight" and not self.reader.has(name):
            return f"{self.runner.family.embedding}.weight"
        return name

    def read(self, name: str) -> torch.Tensor | None:
        """A source tensor in float32, or None when absent."""
        name = self.source_name(name)
        return self.reader.tensor(name) if self.reader.has(name) else None

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of a source matrix in float32."""
        return self.reader.rows(self.source_name(name), start, stop)

    def calibrate(self, windows: torch.Tensor) -> None:
        """Gather every Linear's input statistics on ``windows`` block by block; each block's go to disk."""
        hidden = self.runner.embed(windows)
        positions = self.runner.position_embeddings(hidden)
        for index in range(self.spec.num_blocks):
            names = [layer.name for layer in self.blocks.get(index, [])]
            stats, hidden = block_input_stats(self.runner.load_block(index), self.runner.block_prefix(index), names, hidden, positions,
                                              self.batch_size)
            torch.save(stats, self.stats_path(index))
        heads = [layer.name for layer in self.blocks.get(-1, [])]
        if heads:
            from bitplan.methods.calibration_stats import planner_stats

            norm_weight = self.runner.final_norm_weight()
            head = planner_stats(self.spec.hidden_size)
            for start in range(0, hidden.shape[0], self.batch_size):
                head.add(self.runner.final_norm(hidden[start : start + self.batch_size], norm_weight))
            torch.save({name: {"input": head} for name in heads}, self.stats_path(-1))
        self.calibrated = True
        self.cache.clear()

    def stats_path(self, block: int) -> Path:
        return Path(self.work.name) / f"stats-block{block}.pt"

    def block_stats(self, block: int) -> dict:
        if not self.calibrated or not self.stats_path(block).is_file():
            return {}
        return torch.load(self.stats_path(block), weights_only=False)

    def block_tensors(self, block: int, assignments: dict[str, Scheme]) -> Variant:
        """The tensors (full names; quantized Linears as codes and scales, widened to float32 as
        the block is filled) and activation formats of block ``block`` under ``assignments``."""
        return cached_block(self.cache, self.blocks[block], assignments, self.read, lambda: self.block_stats(block), self.spec,
                            self.read_rows, compact=True)

    def apply(self, assignments: dict[str, Scheme]) -> None:
        """The plan the next :meth:`measure` runs (layer name -> scheme; missing = dense)."""
        self.assignments = {layer.name: assignments.get(layer.name, DENSE) for layer in self.spec.layers}

    def variant(self, block: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        layers = self.blocks.get(block, [])
        if all(self.assignments.get(layer.name, DENSE).is_dense for layer in layers):
            return {}, {}
        return self.block_tensors(block, self.assignments)

    def run_blocks(self, windows: torch.Tensor, quantized: bool) -> torch.Tensor:
        """Final hidden states of ``windows``, the plan applied when ``quantized``."""
        hidden = self.runner.embed(windows)
        positions = self.runner.position_embeddings(hidden)
        for index in range(self.spec.num_blocks):
            prefix = self.runner.block_prefix(index)
            tensors, activations = self.variant(index) if quantized else ({}, {})
            block = self.runner.load_block(index, {name[len(prefix):]: t for name, t in tensors.items()})
            for name, fmt in activations.items():
                hook = lambda module, args, fmt=fmt: (fake_quant_activations(args[0], fmt),)  # noqa: E731
                block.get_submodule(name[len(prefix):]).register_forward_pre_hook(hook)
            with torch.no_grad():
                hidden = run_block(block, hidden, positions, self.batch_size)
            del block  # before the next one loads
        return hidden

    def heads(self) -> tuple[tuple, tuple]:
        """(final norm, head weight, activation format) of the reference and of the plan; one copy
        of each tensor the plan leaves unchanged."""
        norm_weight, head_weight = self.runner.head_weights()
        tensors, activations = self.variant(-1)
        family = self.runner.family
        quantized = (tensors.get(f"{family.final_norm}.weight", norm_weight), tensors.get(f"{family.lm_head}.weight", head_weight),
                     activations.get(family.lm_head))
        return (norm_weight, head_weight, None), quantized

    def reference(self, windows: torch.Tensor) -> torch.Tensor:
        """The unquantized model's final hidden states of ``windows``, each window's computed once
        while it fits in ``reference_bytes``."""
        return self.references.get(windows, lambda rows: self.run_blocks(rows, quantized=False))

    @torch.no_grad()
    def measure(self, windows: torch.Tensor) -> Quality:
        """Mean KL(reference || plan) per token and both perplexities on ``windows`` [n, seq_len]."""
        reference = self.reference(windows)
        with kv_rounding(self.kv):
            candidate = self.run_blocks(windows, quantized=True)
        ref_head, quant_head = self.heads()
        return compare(windows, lambda i: log_probs(self.runner, reference[i : i + 1], *ref_head),
                       lambda i: log_probs(self.runner, candidate[i : i + 1], *quant_head))
