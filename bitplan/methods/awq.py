"""AWQ (Lin et al. 2023, arXiv:2306.00978): activation-aware per-input-channel weight scaling.

For Linears sharing an input X (q/k/v, gate/up, or one Linear), AWQ scales input channel j
by s_j = s_X,j^α, where s_X = mean |x_j| over calibration tokens, normalised so that
max(s)·min(s) = 1, quantizes W·diag(s), and folds diag(s)⁻¹ into the operation that produces
X (a norm weight or the previous Linear's output rows), so the model keeps its shape. α is
searched on the grid {0, 1/20, ..., 19/20} (the reference ``auto_scale``, n_grid = 20); α = 0
is s = 1, i.e. RTN, so the search never loses to RTN on calibration data.

The search loss is the squared output error of the group's own Linears,
Σ_l ‖W_l X − Q(W_l s) s⁻¹ X‖², computed exactly from the second moment M = X Xᵀ / n as
Σ_l tr(ΔW_l M ΔW_lᵀ): no tokens are kept. (The reference measures q/k/v on the attention
block output and gate/up on the MLP output; we measure the Linears themselves.)

Weight clipping (the reference ``auto_clip``, on by default): after scaling, each output
row's group is clamped to ±max·(1 − i/20), i < 10, choosing i per (row, group) by the group's
own output error Δw M_gg Δwᵀ (M_gg the group's diagonal block of M, in scaled coordinates).
As in the reference, q and k are not clipped.

AWQ + GPTQ (``gptq_shrink`` given; the method ``awqgptq``): the same scale search, then GPTQ
quantizes each scaled weight W·diag(s) against the Hessian of the scaled input, diag(s)⁻¹ M diag(s)⁻¹,
instead of rounding it, as llm-compressor's AWQ-then-GPTQ recipes do. No clipping: GPTQ's error
feedback replaces it (clipping first measured worse: held-out KL 0.130 against 0.108 at 4 bits, SmolLM2).

AWQ + imatrix (``imatrix`` True; the method ``awqimatrix``): the same scale search, then each scaled weight
W·diag(s) takes llama.cpp's importance-weighted scale search (methods/imatrix.py) with the importance of the
scaled input, mean(x²)/s², instead of clipping and rounding: the α search ranks scales by the whole output
error, the imatrix search picks each group's step by its own weighted error. Symmetric grids only. On five
real Linears of SmolLM2 (block 3, g64, pydoc) it leaves 0.49x (3 bits) and 0.56x (4 bits) of RTN's output
error on held-out tokens, imatrix alone 0.54x and 0.59x, AWQ 0.65x and 0.71x.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.kernels.numerics import grouped
from bitplan.methods import gptq
from bitplan.methods.imatrix import quantize_imatrix
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import QuantizedWeight, Scheme

N_GRID = 20
MAX_SHRINK = 0.5


@dataclass(frozen=True)
class AwqResult:
    """What AWQ returns for one group of Linears sharing an input.

    ``scales`` ``[in]``: fold into the previous op with :func:`fold_scales_into_norm` or
    :func:`fold_scales_into_previous_linear`. ``quantized``: the quantized *scaled* weights
    Q(W_l · diag(s)), in the order given. ``alpha``: the chosen exponent. ``losses``: the
    search loss for each α on the grid (calibration output MSE summed over the Linears).
    """

    scales: torch.Tensor
    quantized: list[QuantizedWeight]
    alpha: float
    losses: list[float]


def awq_scales(mean_abs: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = s_X^α, clamped at 1e-4 and normalised so that max(s)·min(s) = 1 (as the reference)."""
    scales = mean_abs.to(torch.float32).pow(alpha).clamp_min(1e-4)
    return scales / torch.sqrt(scales.max() * scales.min())


def output_error(delta: torch.Tensor, second_moment: torch.Tensor) -> float:
    """tr(ΔW M ΔWᵀ) = ‖ΔW X‖² / n: the product in float32 (BLAS speed; this only ranks
    candidates), the sum in float64."""
    d = delta.to(torch.float32)
    return float(((d @ second_moment.to(torch.float32)) * d).sum(dtype=torch.float64))


def scaled_rtn_error(
    weights: list[torch.Tensor], scales: torch.Tensor, second_moment: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype
) -> float:
    """Σ_l tr(ΔW_l M ΔW_lᵀ) with ΔW_l = W_l − Q(W_l s) / s: the search loss for one scale vector."""
    total = 0.0
    for weight in weights:
        approx = quantize_rtn(weight * scales, scheme, scale_dtype).dequantize() / scales
        total += output_error(weight - approx, second_moment)
    return total


def search_alpha(
    weights: list[torch.Tensor],
    mean_abs: torch.Tensor,
    second_moment: torch.Tensor,
    scheme: Scheme,
    scale_dtype: torch.dtype = torch.bfloat16,
    n_grid: int = N_GRID,
) -> tuple[float, torch.Tensor, list[float]]:
    """Grid search of α in {i / n_grid}; returns (best α, its scales, loss per grid point)."""
    losses = []
    for step in range(n_grid):
        scales = awq_scales(mean_abs, step / n_grid)
        losses.append(scaled_rtn_error(weights, scales, second_moment, scheme, scale_dtype))
    best = min(range(n_grid), key=lambda i: losses[i])
    return best / n_grid, awq_scales(mean_abs, best / n_grid), losses


def clip_weight(
    weight: torch.Tensor, second_moment: torch.Tensor, scheme: Scheme, scale_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The reference ``auto_clip`` for one (already scaled) weight: returns the clamped weight.

    For each (row, group) tries max_val = absmax·(1 − i/20), i = 0..9, clamps to
    [−max_val, max_val], RTN-quantizes, and keeps the i with the least group output error.
    """
    width = weight.shape[1] if scheme.group_size == 0 else scheme.group_size
    groups = grouped(weight.to(torch.float32), scheme.group_size)  # [out, G, g]
    count = groups.shape[1]
    blocks = torch.stack([second_moment[g * width:(g + 1) * width, g * width:(g + 1) * width] for g in range(count)])
    original_max = groups.abs().amax(dim=-1, keepdim=True)
    best_error = torch.full(groups.shape[:2], float("inf"))
    best_max = original_max.clone()
    for step in range(int(MAX_SHRINK * N_GRID)):
        max_val = original_max * (1 - step / N_GRID)
        clamped = torch.maximum(torch.minimum(groups, max_val), -max_val)
        approx = grouped(quantize_rtn(clamped.reshape(weight.shape), scheme, scale_dtype).dequantize(), scheme.group_size)
        delta = groups - approx
        error = torch.einsum("ogi,gij,ogj->og", delta, blocks, delta)
        better = error < best_error
        best_error = torch.where(better, error, best_error)
        best_max = torch.where(better.unsqueeze(-1), max_val, best_max)
    return torch.maximum(torch.minimum(groups, best_max), -best_max).reshape(weight.shape)


def quantize_awq(
    weights: list[torch.Tensor],
    mean_abs: torch.Tensor,
    second_moment: torch.Tensor,
    scheme: Scheme,
    clip: list[bool] | bool = True,
    scale_dtype: torch.dtype = torch.bfloat16,
    n_grid: int = N_GRID,
    gptq_shrink: float | None = None,
    imatrix: bool = False,
) -> AwqResult:
    """AWQ for a group of Linears ``weights`` (each ``[out_l, in]``) sharing one input.

    ``mean_abs`` ``[in]``: per-channel mean |x| (``InputStats.mean_abs``). ``second_moment``
    ``[in, in]``: X Xᵀ / n (``InputStats.second_moment``). ``clip``: one flag per Linear (or
    one for all) to run the clip search; the reference leaves q and k unclipped. ``gptq_shrink``:
    quantize the scaled weights with GPTQ (that Hessian shrink, :func:`gptq.gptq_rows`) instead of
    clipping and rounding them. ``imatrix``: quantize them with the importance-weighted scale search instead
    (importance diag(M)/s², no clipping).
    """
    in_features = weights[0].shape[1]
    for weight in weights:
        if weight.shape[1] != in_features or not scheme.fits(in_features):
            raise ValueError(f"AWQ group needs equal inputs divisible by the group; got {weight.shape}")
    weights = [w.detach().to(torch.float32) for w in weights]
    alpha, scales, losses = search_alpha(weights, mean_abs, second_moment, scheme, scale_dtype, n_grid)
    flags = [clip] * len(weights) if isinstance(clip, bool) else list(clip)
    scaled_moment = second_moment / scales.unsqueeze(0) / scales.unsqueeze(1)
    quantized = []
    for weight, do_clip in zip(weights, flags):
        scaled = weight * scales
        if gptq_shrink is not None:
            quantized.append(gptq.quantize_gptq(scaled, scaled_moment.clone(), scheme, gptq.BLOCK, gptq.DAMP, gptq.ACT_ORDER,
                                                scale_dtype=scale_dtype, shrink=gptq_shrink)[0])
            continue
        if imatrix:
            quantized.append(quantize_imatrix(scaled, scheme, torch.diagonal(second_moment) / (scales * scales), scale_dtype))
            continue
        if do_clip:
            scaled = clip_weight(scaled, scaled_moment, scheme, scale_dtype)
        quantized.append(quantize_rtn(scaled, scheme, scale_dtype))
    return AwqResult(scales, quantized, alpha, losses)


def effective_weight(quantized: QuantizedWeight, scales: torch.Tensor) -> torch.Tensor:
    """The weight the unfolded model sees: Q(W s) / s (for measuring against the original W)."""
    return quantized.dequantize() / scales


def fold_scales_into_norm(norm_weight: torch.Tensor, scales: torch.Tensor, norm_bias: torch.Tensor | None = None):
    """New (weight, bias) of the norm feeding the group: both divided by s, channel by channel."""
    weight = norm_weight / scales.to(norm_weight.dtype)
    bias = None if norm_bias is None else norm_bias / scales.to(norm_bias.dtype)
    return weight, bias


def fold_scales_into_previous_linear(weight: torch.Tensor, bias: torch.Tensor | None, scales: torch.Tensor):
    """New (weight, bias) of the Linear feeding the group (v → o, up → down): output rows / s."""
    new_weight = weight / scales.to(weight.dtype).unsqueeze(1)
    new_bias = None if bias is None else bias / scales.to(bias.dtype)
    return new_weight, new_bias


def scale_weight_inputs(weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W · diag(s): the full-precision weight of a Linear in the group after folding."""
    return weight * scales.to(weight.dtype).unsqueeze(0)
