"""Sensitivity profile: how far each (layer, scheme) moves the model's next-token distribution.

Metric ``fisher-kl``. Quantizing one Linear changes its output by ``dY = (W - Q(W)) X``. To
second order, the mean KL from the unquantized model's next-token distribution is

    KL ~= 1/(2N) * sum_t sum_c g_tc^2 * dY_tc^2

where ``g_t = d log p(y_t) / dY_t`` with ``y_t`` sampled from the model itself (the Fisher
information, N tokens). bitplan factors ``g_tc^2 ~= a_t * b_c`` (token weight ``a_t = sum_c g_tc^2``,
channel weight ``b_c = sum_t g_tc^2 / sum_t a_t``, which keeps both marginals exact), so

    score = 1/(2N) * sum_c b_c * (dW H dW^T)_cc,   H = sum_t a_t x_t x_t^T.

``H`` is kept as the weighted rows ``sqrt(a_t) x_t`` while they are fewer than the Linear's inputs
(``calibration_stats.OuterSum``): ``(dW H dW^T)_cc = sum_t (dW_c . sqrt(a_t) x_t)^2``.

One forward pass stores each block's input; one backward pass, block by block from the top,
recomputes each block, collects ``H`` and ``b`` for its Linears and scores every scheme there.
Only one block's weights are held at a time. Each finished block's rows go to the cache as the
profile goes (``profiles.resume``): an interrupted profile resumes at the first unfinished block.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from bitplan.kernels.numerics import fake_quant_activations
from bitplan.methods.block import activation_format, clip_flags, previous_op
from bitplan.methods.calibration_stats import OuterSum, planner_stats
from bitplan.methods.registry import CALIBRATED, SMOOTHING, quantize, quantize_smoothing_group, row_chunks
from bitplan.methods.scheme import Scheme
from bitplan.models.source import ModelSource, WeightReader, cache_dir
from bitplan.models.spec import SCALE_DTYPES, LayerSpec, ModelSpec
from bitplan.profiles.blocks import HEAD_ROWS, BlockRunner, run_block
from bitplan.profiles.calibration import CalibrationSettings, calibration_slices
from bitplan.profiles.distributed import barrier, join_launcher_group, run_workers, share_columns, world
from bitplan.profiles.resume import ProfileCheckpoint
from bitplan.profiles.spill import ACTIVATION_CAP_BYTES, BlockInputs
from bitplan.profiles.tables import METRIC, METRIC_VERSION, SensitivityTable, cached_table, table_key
from bitplan.profiles.text import SliceWindows, tokens_hash

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]


FOLDS = 2  # cross-fitting on one slice: its windows alternate between this many folds


def window_folds(labels: tuple[int, ...] | list[int], num_slices: int) -> list[int]:
    """Each window's fold. With several calibration slices, the fold is the slice: a fitted method is
    fitted to the other slices and scored on this one (leave one domain out: what its gain is worth
    on text of a kind it was not fitted to). With one slice, windows alternate between ``FOLDS`` folds."""
    if num_slices > 1:
        return list(labels)
    return [w % FOLDS for w in range(len(labels))]


class LayerStats:
    """Accumulates, per calibration slice ``s`` and fold ``f``, ``H_sf = sum_t a_t x_t x_t^T`` (as
    weighted rows while they are few, ``calibration_stats.OuterSum``), and per slice ``sum_t g_tc^2``
    and ``sum_t a_t``, for one Linear; and per fold the plain input statistics calibrated methods fit
    to. ``window_slices[w]`` is window ``w``'s slice; hooks see the windows in order, a chunk at a time."""

    def __init__(self, in_features: int, out_features: int, window_slices: list[int] | tuple[int, ...] = (0,), num_slices: int = 1):
        num_folds = num_slices if num_slices > 1 else FOLDS
        self.folds = [planner_stats(in_features) for _ in range(num_folds)]  # what GPTQ, AWQ, SmoothQuant, ggml fit to
        self.hessian = [[OuterSum(in_features, torch.float64) for _ in range(num_folds)] for _ in range(num_slices)]
        self.grad_sq = torch.zeros(num_slices, out_features, dtype=torch.float64)
        self.slice_token_weight = torch.zeros(num_slices, dtype=torch.float64)
        self.window_slices = torch.tensor(window_slices, dtype=torch.int64)
        self.window_folds = torch.tensor(window_folds(list(window_slices), num_slices), dtype=torch.int64)
        self.windows_seen = 0
        self.pending_input: torch.Tensor | None = None
        self.pending_slices: torch.Tensor | None = None
        self.pending_folds: torch.Tensor | None = None

    @property
    def token_weight(self) -> float:
        return float(self.slice_token_weight.sum())

    @property
    def cross_fitted(self) -> bool:
        """Whether every fold saw tokens (one calibration window: fitted methods are scored in sample)."""
        return len(self.folds) > 1 and all(fold.count for fold in self.folds)

    def forward_hook(self, module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        self.record_input(inputs[0])
        output.register_hook(self.grad_hook)

    def record_input(self, x: torch.Tensor) -> None:
        """The input rows the next :meth:`grad_hook` pairs with its output gradient."""
        x = x.detach()
        self.pending_input = x.reshape(-1, x.shape[-1])
        if x.dim() == 3:  # [windows, tokens, width]: each row's slice and fold are its window's
            seen = slice(self.windows_seen, self.windows_seen + x.shape[0])
            labels = self.window_slices[seen] if len(self.window_slices) > 1 else torch.zeros(x.shape[0], dtype=torch.int64)
            folds = self.window_folds[seen] if len(self.window_folds) > 1 else torch.zeros(x.shape[0], dtype=torch.int64)
            self.windows_seen += x.shape[0]
            self.pending_slices = labels.repeat_interleave(x.shape[1])
            self.pending_folds = folds.repeat_interleave(x.shape[1])
        else:  # routed rows of unknown windows (no profiled architecture today): credited to the first slice and fold
            self.pending_slices = torch.zeros(self.pending_input.shape[0], dtype=torch.int64)
            self.pending_folds = torch.zeros(self.pending_input.shape[0], dtype=torch.int64)
        for f in self.pending_folds.unique().tolist():
            self.folds[f].add(self.pending_input[self.pending_folds == f])

    def grad_hook(self, grad: torch.Tensor) -> None:
        g2 = grad.detach().reshape(-1, grad.shape[-1]).to(torch.float64).pow(2)
        a = g2.sum(1)
        x = self.pending_input.to(torch.float64)
        for s in self.pending_slices.unique().tolist():
            in_slice = self.pending_slices == s
            self.grad_sq[s] += g2[in_slice].sum(0)
            self.slice_token_weight[s] += a[in_slice].sum()
            for f in self.pending_folds[in_slice].unique().tolist():
                rows = in_slice & (self.pending_folds == f)
                self.hessian[s][f].add(x[rows] * a[rows].sqrt().unsqueeze(1))
        self.pending_input = self.pending_slices = self.pending_folds = None

    def samples(self) -> torch.Tensor:
        """Kept input rows of every fold (the activation rounding's share of a W8A8 score)."""
        return torch.cat([fold.samples for fold in self.folds if fold.count])

    def channel_weight(self, s: int | None = None) -> torch.Tensor:
        """``b_c`` of slice ``s`` (None: of all tokens pooled)."""
        if s is None:
            return self.grad_sq.sum(0) / max(self.token_weight, 1e-300)
        return self.grad_sq[s] / max(float(self.slice_token_weight[s]), 1e-300)

    def slice_tokens(self, s: int) -> int:
        return int((self.window_slices == s).sum()) if len(self.window_slices) > 1 else self.windows_seen

    def mean_token_weight(self, s: int, tokens_per_window: int) -> float:
        return float(self.slice_token_weight[s]) / max(self.slice_tokens(s) * tokens_per_window, 1)


def score_scheme(weight: torch.Tensor, quantized: torch.Tensor, hessians: list[OuterSum], channel_weight: torch.Tensor, num_tokens: int) -> float:
    """1/(2N) sum_c b_c (dW H dW^T)_cc for one layer and scheme, ``H`` the sum of ``hessians``."""
    delta = (weight - quantized).to(torch.float32)
    per_row = sum(h.quadratic(delta) for h in hessians)
    return float((channel_weight * per_row).sum()) / (2 * max(num_tokens, 1))


def activation_score(effective: torch.Tensor, samples: torch.Tensor, fmt: str, stats: LayerStats, s: int, tokens_per_window: int,
                     rows: tuple[int, int] | None = None) -> float:
    """The run-time activation rounding's share of slice ``s``'s score, from the kept input rows:
    ``mean(a)/2 * mean_k sum_c b_c ((Qa(x_k) - x_k) W^T)_c^2`` (``x`` as the Linear sees it; the
    kept rows are shared by the slices)."""
    delta = (fake_quant_activations(samples, fmt) - samples) @ effective.T.to(torch.float32)
    per_channel = delta.to(torch.float64).pow(2).mean(0)
    channel = stats.channel_weight(s) if rows is None else stats.channel_weight(s)[rows[0] : rows[1]]
    return stats.mean_token_weight(s, tokens_per_window) / 2 * float((channel * per_channel).sum())


def head_gradient(
    runner: BlockRunner, hidden: torch.Tensor, generator: torch.Generator, head_stats: LayerStats | None = None, chunk: int = 2
) -> torch.Tensor:
    """d sum_t log p(y_t) / d hidden for labels y_t sampled from the model's own distribution.

    With ``head_stats`` the lm_head's own statistics are collected on the way (untied heads).
    The head's part is written out (d/dlogits = onehot(y) - p, then through the head a row range
    at a time, ``HEAD_ROWS``), so no widened copy of a 128k-vocabulary head is kept for a
    backward pass; autograd runs the final norm only.
    """
    norm_weight, head_weight = runner.head_weights()
    cap = getattr(runner.hf, "final_logit_softcapping", None)
    ranges = [(a, min(a + HEAD_ROWS, head_weight.shape[0])) for a in range(0, head_weight.shape[0], HEAD_ROWS)]
    grads = []
    for start in range(0, hidden.shape[0], chunk):
        h = hidden[start : start + chunk].detach().clone().requires_grad_(True)
        normed = runner.final_norm(h, norm_weight)
        with torch.no_grad():
            raw = torch.cat([normed @ head_weight[a:b].float().T for a, b in ranges], dim=-1)  # the head's output
            logits = torch.tanh(raw / cap) * cap if cap else raw
            log_probs = torch.log_softmax(logits.float(), dim=-1)
            probs = log_probs.exp().reshape(-1, log_probs.shape[-1])
            labels = torch.multinomial(probs, 1, generator=generator)
            grad = (-probs).scatter_add_(1, labels, torch.ones_like(labels, dtype=probs.dtype)).reshape(raw.shape)
            if cap:
                grad = grad * (1 - torch.tanh(raw / cap).pow(2))
            if head_stats is not None:
                head_stats.record_input(normed)
                head_stats.grad_hook(grad)
            grad_normed = sum(grad[..., a:b] @ head_weight[a:b].float() for a, b in ranges)
        normed.backward(grad_normed)
        grads.append(h.grad)
    return torch.cat(grads)


def block_layers(spec: ModelSpec, block: int) -> list[LayerSpec]:
    return [layer for layer in spec.layers if layer.block == block]


def profile_sensitivity(
    folder: Path,
    config: dict,
    spec: ModelSpec,
    schemes: list[Scheme],
    tokens: torch.Tensor,
    seed: int = 0,
    progress: Progress | None = None,
    provenance: dict | None = None,
    checkpoint: ProfileCheckpoint | None = None,
    slices: SliceWindows | None = None,
    activation_cap: int = ACTIVATION_CAP_BYTES,
) -> SensitivityTable:
    """Measure the table for ``tokens`` [sequences, seq_len], block by block.

    ``slices`` names each window's slice (default: one slice, "all"): every slice's score is
    measured on its own windows, and the table's score is their mean weighted by ``slices.weights``.
    With ``checkpoint``, each finished block's rows go to it as the profile goes, and a profile it
    holds finished blocks of resumes below them (reporting ``("resumed", blocks, total)``). Block
    inputs beyond ``activation_cap`` bytes wait on disk (``profiles.spill``)."""
    slices = slices or SliceWindows(tokens, (0,) * tokens.shape[0], ("all",), (1.0,))
    new_stats = lambda layer: LayerStats(layer.in_features, layer.out_features, slices.labels, len(slices.names))  # noqa: E731
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    reader = WeightReader(folder)
    runner = BlockRunner(config, reader)
    report = progress or (lambda stage, done, total: None)
    names = [layer.name for layer in spec.layers]
    scores = torch.full((len(names), len(schemes)), float("nan"), dtype=torch.float64)
    sizes = torch.full((len(names), len(schemes)), -1, dtype=torch.int64)
    per_slice = torch.full((len(slices.names), len(names), len(schemes)), float("nan"), dtype=torch.float64)
    num_tokens = tokens.numel()
    table = (scores, sizes, per_slice, slices)
    resume = checkpoint.resume() if checkpoint is not None else None
    top, kept_grad = resume if resume is not None else (None, None)
    start = spec.num_blocks if top is None else top  # blocks start.. (and the head) are finished
    rank, workers = world()  # distributed: each rank scores its columns, rank 0 writes the checkpoint
    barrier()  # every rank has read the resume point before anything is written
    resumed, checkpoint = checkpoint, checkpoint if rank == 0 else None

    block_inputs = BlockInputs(activation_cap)  # beyond the cap, on disk until their block is scored
    with torch.no_grad():
        hidden = runner.embed(tokens)
        positions = runner.position_embeddings(hidden)
        for index in range(spec.num_blocks if top is None else start):
            block_inputs.put(index, hidden)
            if top is not None and index == start - 1:
                break
            block = runner.load_block(index)
            hidden = run_block(block, hidden, positions)
            del block  # before the next one loads
            report("forward", index + 1, spec.num_blocks)
    head = next((layer for layer in spec.layers if layer.block < 0), None)
    if top is None:
        head_stats = new_stats(head) if head else None
        grad = head_gradient(runner, hidden, generator, head_stats)
        if head is not None:
            score_block([head], {head.name: head_stats}, reader, spec, schemes, names, table, tokens.shape[1])
            share_columns(scores, sizes, [names.index(head.name)], per_slice)
        if checkpoint is not None:
            checkpoint.save_gradient(spec.num_blocks, grad)
            checkpoint.save_unit(None, [names.index(head.name)] if head else [], scores, sizes, {head.name: head_stats} if head else {},
                                 per_slice)
    else:
        for block in [None, *range(start, spec.num_blocks)]:
            resumed.load_unit(block, scores, sizes, per_slice)
        grad = kept_grad
        log.info("profile resumed below block %d: %d of %d blocks were finished", start, spec.num_blocks - start, spec.num_blocks)
        report("resumed", spec.num_blocks - start, spec.num_blocks)

    for index in reversed(range(start)):
        block = runner.load_block(index)
        layers = block_layers(spec, index)
        stats = {layer.name: new_stats(layer) for layer in layers}
        prefix = runner.block_prefix(index)
        handles = [block.get_submodule(name[len(prefix):]).register_forward_hook(stats[name].forward_hook) for name in stats]
        grads_in = []
        inputs = block_inputs.take(index)
        for first in range(0, tokens.shape[0], 4):
            h = inputs[first : first + 4].clone().requires_grad_(True)
            block(h, position_embeddings=positions).backward(grad[first : first + 4])
            grads_in.append(h.grad)
        for handle in handles:
            handle.remove()
        grad = torch.cat(grads_in)
        inputs = block = None  # before the next one loads
        score_block(layers, stats, reader, spec, schemes, names, table, tokens.shape[1])
        share_columns(scores, sizes, [names.index(layer.name) for layer in layers], per_slice)
        if checkpoint is not None:
            checkpoint.save_gradient(index, grad)
            checkpoint.save_unit(index, [names.index(layer.name) for layer in layers], scores, sizes, stats, per_slice)
            checkpoint.drop_gradient(index + 1)
        report("score", spec.num_blocks - index, spec.num_blocks)

    block_inputs.close()
    provenance = dict(provenance or {}, metric=METRIC, metric_version=METRIC_VERSION, num_tokens=num_tokens, seed=seed)
    return SensitivityTable(names, [s.name for s in schemes], scores, sizes, provenance, list(slices.names), per_slice, list(slices.weights))


def score_block(layers, stats, reader, spec, schemes, names, table, tokens_per_window: int) -> None:
    """Score every scheme on this block's Linears (or the head); smoothing schemes group by group.

    ``table`` is ``(scores, sizes, per_slice, slices)``: each slice's score of a cell is measured
    on its own tokens, the cell's score is their weighted mean.
    A smoothing scheme's weight change is measured in unfolded coordinates, ``Q(W s) / s - W``;
    a W8A8 scheme adds the activation rounding where the Linear runs (on ``x / s``, by ``Q(W s)``).
    A fitted method (``methods.registry.CALIBRATED``: GPTQ, AWQ, SmoothQuant, ggml's importance
    matrix) is cross-fitted: for each fold (``window_folds``: each calibration slice, or alternate
    windows of a single one), quantized to the other folds' input statistics and scored on this
    fold's tokens, so its score is what it loses on tokens it was not fitted to (every token is
    scored once).
    One Linear's weight is held at a time (a smoothing group's together), in float32: it is read,
    every scheme of this rank is scored on it, and it is dropped before the next is read. Each
    quantized version is scored as soon as it is made and dropped (a fitted method's folds one
    after the other). A Linear larger than ``methods.registry.ROW_CHUNK`` (a big vocabulary's
    head) is read and scored a row range at a time (``row_chunks``; the score sums over rows), so
    the profile never holds it whole in float32.
    """
    scores, sizes, per_slice, slices = table
    scale_dtype = SCALE_DTYPES[spec.dtype]
    num_slices = len(slices.names)

    class SliceScores:
        """Each slice's score of ``layer``'s output rows ``rows`` (a range; None: all), summed over
        the quantized versions of ``weight`` added one at a time: each is scored on the tokens of
        the fold it was held out from (None: on all), plus, for a W8A8 format, the activation
        rounding of the input rows it sees at run time (its share: 1 / ``versions``)."""

        def __init__(self, layer, rows, weight, versions: int, fmt=None):
            self.layer_stats, self.rows, self.weight, self.versions, self.fmt = stats[layer.name], rows, weight, versions, fmt
            self.out = [0.0] * num_slices

        def add(self, effective: torch.Tensor, samples: torch.Tensor | None, fold: int | None) -> None:
            layer_stats, rows = self.layer_stats, self.rows
            for s in range(num_slices):
                tokens = layer_stats.slice_tokens(s) * tokens_per_window
                channel = layer_stats.channel_weight(s) if rows is None else layer_stats.channel_weight(s)[rows[0] : rows[1]]
                held_out = layer_stats.hessian[s] if fold is None else [layer_stats.hessian[s][fold]]
                self.out[s] += score_scheme(self.weight, effective, held_out, channel, tokens)
                if self.fmt:
                    self.out[s] += activation_score(effective, samples, self.fmt, layer_stats, s, tokens_per_window, rows) / self.versions

    def fitted_folds(layer) -> list[int | None]:
        """The folds held out in turn (None: none, fitted and scored in sample, when a fold is empty)."""
        return list(range(len(stats[layer.name].folds))) if stats[layer.name].cross_fitted else [None]

    def fold_inputs(layer, held_out: int | None):
        """The input statistics of every fold but ``held_out``."""
        folds = [part for f, part in enumerate(stats[layer.name].folds) if f != held_out and part.count]
        if len(folds) == 1:
            return folds[0]
        merged = planner_stats(layer.in_features)
        for part in folds:
            merged.merge(part)
        return merged

    def record(layer, column, parts: list[list[float]]) -> None:
        row = names.index(layer.name)
        for s in range(num_slices):
            per_slice[s, row, column] = sum(part[s] for part in parts)
        scores[row, column] = float(sum(w * float(per_slice[s, row, column]) for s, w in enumerate(slices.weights)))

    rank, workers = world()
    mine = [(column, scheme) for column, scheme in enumerate(schemes) if column % workers == rank]  # others: another rank's (profiles.distributed)
    for column, scheme in mine:
        for layer in layers:
            if scheme.fits(layer.in_features):
                sizes[names.index(layer.name), column] = scheme.weight_bytes(layer.out_features, layer.in_features, spec.dtype_bytes)
            if scheme.is_dense:
                scores[names.index(layer.name), column] = 0.0
                per_slice[:, names.index(layer.name), column] = 0.0
    quantized = [(column, scheme) for column, scheme in mine if not scheme.is_dense]

    per_layer = [(column, scheme) for column, scheme in quantized if scheme.method not in SMOOTHING]
    for layer in layers:  # one Linear at a time: read, every scheme scored, dropped
        fitting = [(column, scheme) for column, scheme in per_layer if scheme.fits(layer.in_features)]
        if not fitting:
            continue
        samples = stats[layer.name].samples() if any(activation_format(scheme) for _, scheme in fitting) else None
        parts: dict[int, list[list[float]]] = {column: [] for column, _ in fitting}
        chunks = row_chunks(layer.out_features, layer.in_features)
        for rows in chunks if len(chunks) > 1 else [None]:
            weight = reader.tensor(f"{layer.name}.weight") if rows is None else reader.rows(f"{layer.name}.weight", *rows)
            for column, scheme in fitting:
                fmt, fitted = activation_format(scheme), scheme.method in CALIBRATED
                folds = fitted_folds(layer) if fitted else [None]
                part = SliceScores(layer, rows, weight, len(folds), fmt)
                for fold in folds:  # each fold's quantization scored as soon as it is made
                    effective = quantize(weight, scheme, scale_dtype, {"input": fold_inputs(layer, fold)} if fitted else {}).dequantize()
                    part.add(effective, samples if fmt else None, fold)
                    del effective
                parts[column].append(part.out)
            del weight
        for column, _ in fitting:
            record(layer, column, parts[column])

    smoothing = [(column, scheme) for column, scheme in quantized if scheme.method in SMOOTHING]
    groups: dict[str, list] = {}  # every smoothing scheme's groups: the Linears that share an input
    for layer in layers:
        if any(scheme.fits(layer.in_features) for _, scheme in smoothing):
            groups.setdefault(previous_op(layer) if layer.smoothed_by else layer.name, []).append(layer)
    for group_layers in groups.values():  # one group's weights at a time: read, every smoothing scheme scored, dropped
        weights = {member.name: reader.tensor(f"{member.name}.weight") for member in group_layers}
        for column, scheme in smoothing:
            members = [member for member in group_layers if scheme.fits(member.in_features)]
            if not members:
                continue
            fmt = activation_format(scheme)
            folds = fitted_folds(members[0])
            parts = {member.name: SliceScores(member, None, weights[member.name], len(folds), fmt) for member in members}
            samples = stats[members[0].name].samples() if fmt else None
            for fold in folds:
                inputs = fold_inputs(members[0], fold)
                group = quantize_smoothing_group({m.name: weights[m.name] for m in members}, scheme, scale_dtype, inputs, clip_flags(members),
                                                 foldable=bool(members[0].smoothed_by))
                for member in members:
                    folded = group.quantized[member.name].dequantize()
                    parts[member.name].add(folded / group.scales, samples / group.scales if fmt else None, fold)
                    del folded
                del group
            for member in members:
                record(member, column, [parts[member.name].out])
        del weights


def sensitivity_table(source: ModelSource, schemes: list[Scheme], calibration: CalibrationSettings, seed: int = 0,
                      progress: Progress | None = None, use_cache: bool = True, workers: int = 1) -> SensitivityTable:
    """The table of ``source`` for ``schemes``: from the cache when one holds them, else measured and cached.

    ``workers`` > 1 spawns that many processes that share the scoring (``profiles.distributed``);
    under ``torchrun`` the launcher's processes share it."""
    slices = calibration_slices(source.folder, calibration)
    tokens = slices.tokens
    calibration_hash = tokens_hash(tokens)
    key = table_key(source.hash, calibration_hash, schemes, seed, slices.digest())
    folder = cache_dir() / "profiles"
    cached = cached_table(folder, key, schemes) if use_cache else None
    if cached is not None:
        log.info("sensitivity table from the cache in %s", folder)
        return cached
    join_launcher_group()
    if workers > 1 and world()[1] == 1:
        run_workers(workers, sensitivity_table, source, schemes, calibration, seed, None, use_cache)
        return SensitivityTable.load(folder / f"{key}.safetensors")
    provenance = {"model_hash": source.hash, "calibration_hash": calibration_hash, "tokens": list(tokens.shape)}
    checkpoint = ProfileCheckpoint(folder / "blocks" / key, source.spec.num_blocks)
    if not use_cache and world()[0] == 0:
        checkpoint.remove()  # measure afresh: no finished blocks of an earlier run either
    barrier()
    table = profile_sensitivity(source.folder, source.config, source.spec, schemes, tokens, seed=seed, progress=progress,
                                provenance=provenance, checkpoint=checkpoint, slices=slices)
    if world()[0] == 0:
        table.save(folder / f"{key}.safetensors")
        checkpoint.remove()
    barrier()  # the table is in the cache when any rank returns
    return table
