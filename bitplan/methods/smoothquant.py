"""SmoothQuant W8A8 (Xiao et al. 2022, arXiv:2211.10438), simulated exactly as it runs.

Smoothing moves activation outliers into the weights: for Linears sharing an input X,
s_j = max|X_j|^α / max|W_j|^(1−α) (max|W_j| over every row of every Linear in the group),
X' = X diag(s)⁻¹ is folded into the previous norm (or Linear output rows, see
:mod:`bitplan.methods.awq` fold functions, which are the same operation), W' = W diag(s).
Then weights are int8 symmetric per output channel (compressed-tensors ``int-quantized``,
static) and activations int8 symmetric per token, computed at run time.

Run-time activation quantization follows vLLM's ``dynamic_scaled_int8_quant`` kernel:
scale = absmax/127 per token, codes = round-half-even(x · (127/absmax)) saturated to
[−128, 127]; the int8 × int8 product is accumulated exactly (int32 on the device, float64
here, exact for these sizes), then multiplied by the token scale and the channel scale.

Note on α = 0: by the formula, s_j = 1 / max|W_j|, which is *not* the identity (every
smoothed weight column gets absmax 1). "No smoothing" is s = 1; :func:`search_alpha`
always includes it as a candidate, so smoothing is chosen only where it lowers the error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bitplan.kernels.numerics import fake_quant_activations, per_token_int
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import Method, QuantizedWeight, Scheme

W8A8 = Scheme(Method.SMOOTHQUANT, 8, 0, True, act_bits=8)
ALPHA_GRID = tuple(i / 10 for i in range(11))


@dataclass(frozen=True)
class SmoothQuantResult:
    """Chosen smoothing for a group: ``alpha`` None means no smoothing (scales all 1).

    ``scales`` ``[in]`` fold into the previous op (divide); ``quantized`` are the int8
    per-channel weights of W_l · diag(s); ``errors`` maps each candidate to the summed squared
    output error on the calibration samples (key None: no smoothing).
    """

    scales: torch.Tensor
    alpha: float | None
    quantized: list[QuantizedWeight]
    errors: dict


def smoothing_scales(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """s_j = max|X_j|^α / max|W_j|^(1−α), clamped at 1e-5 (as llm-compressor), float32 ``[in]``."""
    weight_absmax = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).to(torch.float32)
    scales = act_absmax.to(torch.float32).pow(alpha) / weight_absmax.clamp_min(1e-5).pow(1.0 - alpha)
    return scales.clamp_min(1e-5)


def w8a8_linear(x: torch.Tensor, quantized: QuantizedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The W8A8 Linear as it runs: int8 activations per token × int8 weights per channel.

    Integer accumulation is exact (float64 holds every partial sum), then scaled by
    token scale × channel scale in float32 and cast back to ``x``'s dtype.
    """
    assert quantized.zero is None and quantized.scheme.group_size == 0, "W8A8 weights are symmetric per channel"
    codes, token_scale = per_token_int(x, quantized.scheme.act_bits)
    accumulated = codes.to(torch.float64) @ quantized.codes.to(torch.float64).T
    out = accumulated.to(torch.float32) * token_scale * quantized.scale.to(torch.float32).reshape(1, -1)
    if bias is not None:
        out = out + bias.to(torch.float32)
    return out.to(x.dtype)


def _candidate_error(weights, samples, references, scales, scheme, scale_dtype) -> tuple[float, list[QuantizedWeight]]:
    """Squared output error of the smoothed W8A8 group against the float group on ``samples``.

    The activations are quantized once per candidate for the whole group and multiplied in
    float32 by the dequantized weights: the same products as :func:`w8a8_linear` up to float32
    rounding, which is far below the differences between candidates this ranks.
    """
    smoothed_x = fake_quant_activations(samples / scales, "int8", scheme.act_bits).to(torch.float32)
    total, quantized = 0.0, []
    for weight, reference in zip(weights, references):
        q = quantize_rtn(weight * scales, scheme, scale_dtype)
        quantized.append(q)
        total += float((smoothed_x @ q.dequantize().T - reference).square().sum(dtype=torch.float64))
    return total, quantized


def search_alpha(
    weights: list[torch.Tensor],
    act_absmax: torch.Tensor,
    samples: torch.Tensor,
    scheme: Scheme = W8A8,
    alphas: tuple[float, ...] = ALPHA_GRID,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> SmoothQuantResult:
    """Choose α (or no smoothing) for Linears sharing an input, by W8A8 output error on ``samples``.

    ``act_absmax`` ``[in]``: max |x_j| over all calibration tokens (``InputStats.absmax``);
    ``samples`` ``[k, in]``: calibration input rows (``InputStats.samples``; a few hundred
    suffice). The search loss is Σ_l ‖X W_lᵀ − W8A8_l(X / s)‖² — what runs (per-token int8 activations, int8 weights), multiplied in float32.
    """
    if scheme.bits != 8 or scheme.group_size != 0 or not scheme.symmetric:
        raise ValueError(f"SmoothQuant stores int8 symmetric per-channel weights; got {scheme.name}")
    weights = [w.detach().to(torch.float32) for w in weights]
    samples = samples.to(torch.float32)
    ones = torch.ones(weights[0].shape[1])
    references = [samples @ weight.T for weight in weights]
    best_error, best_quantized = _candidate_error(weights, samples, references, ones, scheme, scale_dtype)
    best_alpha, best_scales, errors = None, ones, {None: best_error}
    for alpha in alphas:
        scales = smoothing_scales(act_absmax, weights, alpha)
        error, quantized = _candidate_error(weights, samples, references, scales, scheme, scale_dtype)
        errors[alpha] = error
        if error < best_error:
            best_error, best_alpha, best_scales, best_quantized = error, alpha, scales, quantized
    return SmoothQuantResult(best_scales, best_alpha, best_quantized, errors)


def quantize_smoothquant(
    weights: list[torch.Tensor],
    act_absmax: torch.Tensor,
    alpha: float,
    scheme: Scheme = W8A8,
    scale_dtype: torch.dtype = torch.bfloat16,
) -> tuple[torch.Tensor, list[QuantizedWeight]]:
    """Smoothing with a fixed α (the paper's default is 0.5): returns (scales, int8 weights of W·s)."""
    scales = smoothing_scales(act_absmax, weights, alpha)
    return scales, [quantize_rtn(w.detach().to(torch.float32) * scales, scheme, scale_dtype) for w in weights]
