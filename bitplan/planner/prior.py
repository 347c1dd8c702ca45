"""A documented prior for layer sensitivity, used when no measured table exists.

It lets ``bitplan compare`` plan a 70B or 405B model from config.json alone. Every score it
produces is marked ``metric = "prior-kl"`` so no output passes it off as a measurement.

    score(layer, scheme) = PRIOR_KL_AT_W4G128_RTN * share(layer) * relative_error(scheme)

``share`` is the layer's part of the model's weighted parameter count, weight =
``numel * kind_factor * position_factor * routing_fraction``, normalized to sum to 1 over all
quantizable Linears, so a model quantized uniformly with RTN w4 g128 symmetric scores exactly
``PRIOR_KL_AT_W4G128_RTN``. The assumptions, each a round number rather than a fit:

- Total scale: 0.08 nats/token for uniform RTN w4 g128. llama.cpp's quantize table lists
  Llama-3-8B Q4_1 (4-bit, group 32, with minimum) at +0.451 perplexity over about 6.2, a
  log-perplexity (cross-entropy) increase of about 0.07; group 128 without zero point is coarser.
- Bits: uniform quantization noise power falls by 4x per extra bit (step size halves), so
  ``relative_error = 4 ** (4 - bits)`` before the factors below.
- Groups: smaller groups shrink each group's range: g32 0.70, g64 0.82, g128 1.00, per-channel
  1.80 (outlier columns stretch a whole row's range in LLM weights).
- Zero points: asymmetric grids use the range better: x0.85.
- Methods: error-compensating methods beat round-to-nearest (AWQ paper, arXiv 2306.00978,
  Llama perplexities at INT3/INT4 g128 rank AWQ < GPTQ < RTN): GPTQ and AWQ x0.70, HQQ and NF4
  x0.85, RTN and SmoothQuant x1.00.
- FP8 (e4m3, per-channel scale): three mantissa bits, relative error like a 6.5-bit grid.
- Activations: 8-bit activations add 0.02 (relative), 4-bit add 1.0.
- Kinds (llama.cpp's Q4_K_M gives attn_v, ffn_down and output more bits than the rest):
  v 2.0, down 2.0, lm_head 3.0, q 0.5, k 0.5, others 1.0; experts by their role (w2 = down).
- Position: blocks in the first and last eighth of the stack x2.0 (llama.cpp ``use_more_bits``).
- Routing: an expert serves k of E tokens, so its weight is scaled by k/E.
"""

from __future__ import annotations

import math

import torch

from bitplan.methods.scheme import Method, Scheme
from bitplan.models.moe import EXPERT_KIND, Routing, expert_role
from bitplan.models.spec import LayerSpec, ModelSpec
from bitplan.profiles.tables import SensitivityTable

PRIOR_METRIC = "prior-kl"
PRIOR_KL_AT_W4G128_RTN = 0.08  # nats/token, see the module notes
GROUP_FACTORS = {32: 0.70, 64: 0.82, 128: 1.00, 0: 1.80}
ASYMMETRIC_FACTOR = 0.85
METHOD_FACTORS = {
    Method.RTN: 1.00, Method.SMOOTHQUANT: 1.00, Method.GPTQ: 0.70, Method.AWQ: 0.70, Method.AWQ_GPTQ: 0.70, Method.AWQ_IMATRIX: 0.70,
    Method.HQQ: 0.85, Method.IMATRIX: 0.85, Method.NF4: 0.85, Method.FP8: 1.00,
}
FP8_EQUIVALENT_BITS = 6.5
ACTIVATION_ERROR = {16: 0.0, 8: 0.02, 4: 1.0}
KIND_FACTORS = {"q": 0.5, "k": 0.5, "v": 2.0, "o": 1.0, "gate": 1.0, "up": 1.0, "down": 2.0, "lm_head": 3.0}
EDGE_BLOCK_FACTOR = 2.0


def _group_factor(group_size: int) -> float:
    if group_size in GROUP_FACTORS:
        return GROUP_FACTORS[group_size]
    return GROUP_FACTORS[128] * math.sqrt(group_size / 128)  # other sizes: range grows slowly


def relative_error(scheme: Scheme) -> float:
    """Error of a scheme relative to RTN w4 g128 symmetric (= 1.0); 0 for dense."""
    if scheme.is_dense:
        return 0.0
    bits = FP8_EQUIVALENT_BITS if scheme.method == Method.FP8 else scheme.bits
    error = 4.0 ** (4 - bits) * METHOD_FACTORS.get(scheme.method, 1.0)
    if scheme.method != Method.FP8:
        error *= _group_factor(scheme.group_size) * (1.0 if scheme.symmetric else ASYMMETRIC_FACTOR)
    return error + ACTIVATION_ERROR.get(scheme.act_bits, 1.0)


def layer_weight(spec: ModelSpec, layer: LayerSpec, routing: Routing | None) -> float:
    """Unnormalized prior weight of a layer (see the module notes)."""
    kind = expert_role(layer)
    weight = float(layer.num_weights) * KIND_FACTORS.get(kind, 1.0)
    edge = max(1, spec.num_blocks // 8)
    if 0 <= layer.block < edge or layer.block >= spec.num_blocks - edge:
        weight *= EDGE_BLOCK_FACTOR
    if layer.kind == EXPERT_KIND and routing is not None:
        weight *= routing.active_fraction
    return weight


def prior_table(spec: ModelSpec, schemes: list[Scheme], routing: Routing | None = None) -> SensitivityTable:
    """The prior's table for every quantizable Linear of ``spec`` and every candidate scheme, shaped like a
    measured one (NaN score and -1 bytes where a scheme cannot store a layer), marked ``metric = "prior-kl"``."""
    weights = torch.tensor([layer_weight(spec, layer, routing) for layer in spec.layers], dtype=torch.float64)
    share = weights / weights.sum()
    errors = torch.tensor([relative_error(s) for s in schemes], dtype=torch.float64)
    scores = PRIOR_KL_AT_W4G128_RTN * share[:, None] * errors[None, :]
    sizes = torch.full((len(spec.layers), len(schemes)), -1, dtype=torch.int64)
    for i, layer in enumerate(spec.layers):
        for j, scheme in enumerate(schemes):
            if scheme.fits(layer.in_features):
                sizes[i, j] = scheme.weight_bytes(layer.out_features, layer.in_features, spec.dtype_bytes)
    scores[sizes < 0] = math.nan
    provenance = {"metric": PRIOR_METRIC, "prior_kl_at_w4g128_rtn": PRIOR_KL_AT_W4G128_RTN, "model": spec.model_type}
    return SensitivityTable([layer.name for layer in spec.layers], [s.name for s in schemes], scores, sizes, provenance)
