"""What a KV-cache format costs in quality: the model run with every cached K and V rounded.

transformers' attention modules hand their keys (after RoPE) and values to one attention
function (``ALL_ATTENTION_FUNCTIONS["sdpa"]``); :func:`kv_rounding` swaps in a function that
rounds them first, with ``methods.kv_cache.round_kv``, which is what an engine keeping its cache
in that format attends over. The meters of ``planner.quality`` and ``planner.streaming`` run
their candidate (never their reference) inside it when their ``kv`` is set, so the same
measurement gives a KV format's own cost or a whole plan's (weights and KV together).

fp8_e4m3 needs one scale per layer for K and one for V: :class:`KVAbsmax` records the largest
magnitude each layer's K and V reach on the calibration text, and the scale is absmax / 448 (as
llm-compressor calibrates the compressed-tensors ``kv_cache_scheme`` that vLLM loads).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from bitplan.methods.kv_cache import kv_format, round_kv, tensor_scale


@dataclass(frozen=True)
class KVRounding:
    """Round K and V of layer ``i`` to ``dtype`` (with ``k_scales[i]`` / ``v_scales[i]`` for fp8_e4m3)."""

    dtype: str
    k_scales: tuple[float, ...] = ()
    v_scales: tuple[float, ...] = ()

    def __call__(self, key: torch.Tensor, value: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = kv_format(self.dtype).scale == "tensor"
        k_scale = self.k_scales[layer] if scaled else None
        v_scale = self.v_scales[layer] if scaled else None
        return round_kv(key, self.dtype, k_scale), round_kv(value, self.dtype, v_scale)


@dataclass
class KVAbsmax:
    """Leaves K and V unchanged and records each layer's largest |K| and |V|."""

    k: dict[int, float] = field(default_factory=dict)
    v: dict[int, float] = field(default_factory=dict)

    def __call__(self, key: torch.Tensor, value: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.k[layer] = max(self.k.get(layer, 0.0), float(key.abs().max()))
        self.v[layer] = max(self.v.get(layer, 0.0), float(value.abs().max()))
        return key, value

    def rounding(self, dtype: str, num_layers: int) -> KVRounding:
        """The rounding to ``dtype`` with scales from the recorded maxima."""
        if kv_format(dtype).scale != "tensor":
            return KVRounding(dtype)
        missing = [i for i in range(num_layers) if i not in self.k]
        assert not missing, f"no K/V seen for layers {missing}"
        return KVRounding(dtype, tuple(tensor_scale(self.k[i]) for i in range(num_layers)),
                          tuple(tensor_scale(self.v[i]) for i in range(num_layers)))


@contextmanager
def kv_rounding(transform):
    """Inside this block every sdpa attention call sees ``transform(key, value, layer_idx)``'s K and V
    (nothing changes when ``transform`` is None)."""
    if transform is None:
        yield
        return
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    local = ALL_ATTENTION_FUNCTIONS._local_mapping
    previous = local.get("sdpa")
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def attention(module, query, key, value, *args, **kwargs):
        key, value = transform(key, value, module.layer_idx)
        return original(module, query, key, value, *args, **kwargs)

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        yield
    finally:
        if previous is None:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = previous


@dataclass(frozen=True)
class KVCost:
    """A KV format's measured cost: KL (nats/token) of the model with only its cache rounded."""

    dtype: str
    kl: float
    tokens: int
    rounding: KVRounding

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "kl": self.kl, "tokens": self.tokens}


def measure_kv_costs(meter, windows: torch.Tensor, dtypes: list[str], num_layers: int) -> dict[str, KVCost]:
    """Each quantized format's cost on ``windows`` with the weights left dense (``meter``: a
    ``QualityMeter`` or ``StreamingMeter``); native 16-bit formats cost 0 by definition."""
    meter.apply({})
    absmax = KVAbsmax()
    meter.kv = absmax
    meter.measure(windows)
    costs = {}
    for dtype in dtypes:
        rounding = absmax.rounding(dtype, num_layers)
        if kv_format(dtype).native:
            costs[dtype] = KVCost(dtype, 0.0, int(windows.numel()), rounding)
            continue
        meter.kv = rounding
        quality = meter.measure(windows)
        assert math.isfinite(quality.kl), f"KL of the {dtype} KV cache is not finite"
        costs[dtype] = KVCost(dtype, max(quality.kl, 0.0), quality.tokens, rounding)
    meter.kv = None
    return costs


KV_ATTENTION = "bitplan_kv"  # the attention function of a model whose own cache format is attached


def _kv_attention(module, query, key, value, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    key, value = module.kv_transform(key, value, module.layer_idx)
    return sdpa_attention_forward(module, query, key, value, *args, **kwargs)


def attach_kv_rounding(model, rounding: KVRounding) -> None:
    """Make ``model`` (a transformers causal LM, or one of its decoder blocks) keep its K and V in
    ``rounding``'s format from now on: every attention module rounds them before attending, as the
    engine's cache would."""
    from transformers import AttentionInterface

    AttentionInterface.register(KV_ATTENTION, _kv_attention)
    for module in model.modules():
        if hasattr(module, "layer_idx") and hasattr(module, "k_proj"):
            module.kv_transform = rounding
            module.config._attn_implementation = KV_ATTENTION  # the model's config, or a block's copy of it
    if hasattr(model, "config"):
        model.config._attn_implementation = KV_ATTENTION
