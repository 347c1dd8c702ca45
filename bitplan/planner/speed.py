"""Roofline speed model: decode and prefill time per Linear and scheme, plus attention.

Each Linear costs ``max(bytes / (bandwidth x e_bw), flops / (peak x e_c))`` where the bytes are
the exact checkpoint bytes of its scheme and the peak is that of the path the scheme runs on:

- dense (``none``): bf16/fp16 tensor cores (fp16 peak where bf16 is missing, e.g. V100, T4);
- weight-only ``W{b}A16`` (RTN, GPTQ, AWQ, HQQ, NF4): dequantize to fp16, fp16 tensor cores;
- ``W8A8`` integer (``act_bits`` 8): int8 tensor cores only where int8 is native, else W8A16;
- FP8 (method ``fp8``): fp8 tensor cores on Ada, Hopper, Blackwell (native ``fp8_*``), else it
  runs weight-only (Marlin-style W8A16) on fp16 units;
- attention: decode reads the KV cache once per step; prefill is causal (T^2 / 2 products).

Mixture-of-experts (``ModelSpec.routing``, read from the family's config keys such as
``num_experts_per_tok`` of ``num_experts``/``num_local_experts``): a decode step of B tokens reads
only the experts some token is routed to (expected share ``1 - (1 - k/E)^B``; at batch 1 the
active k of E) and multiplies each token with k of E experts. Shared experts and routers run for
every token, like dense Linears. The memory model (``planner.deployment``) counts every expert.
Tensor parallelism divides bytes and FLOPs by N and adds two all-reduces per block.

Efficiency factors (``Efficiency``) have these documented defaults, fractions of the profile's
spec-sheet bandwidth or dense peak:

- ``dense_bandwidth`` 0.80: fp16 GEMV at batch 1. Streaming copies reach about 90% of the
  spec-sheet bandwidth (``copy_fraction_of_spec``) and GEMV about 90% of a copy.
- ``quantized_bandwidth`` 0.65: dequantizing GEMV kernels (AWQ/TinyChat, ExLlama, Marlin) load
  scales and zero points and spend ALU time unpacking; TinyChat's W4A16 Llama-3-8B decode on an
  RTX 4090 (6.66 ms/token) implies 0.70, on an RTX A6000 (10.68 ms) 0.57.
- ``fp8_bandwidth`` 0.80: native fp8 GEMMs read weights like dense ones.
- ``attention_bandwidth`` 0.70: paged decode attention over the KV cache.
- ``dense_compute`` 0.70, ``quantized_compute`` 0.60, ``low_precision_compute`` 0.55,
  ``attention_compute`` 0.50: large GEMMs (prefill) reach 70-80% of the dense peak in cuBLAS,
  less with dequantization, fp8/int8 scaling epilogues, and flash attention.
- ``step_overhead_s`` 0: engines with CUDA graphs (vLLM, TensorRT-LLM) hide launch costs; an
  eager engine adds several ms per token (set it, e.g. from a measured decode step).
- ``allreduce_latency_s`` 10 us per all-reduce, ``interconnect_bytes_per_s`` 100 GB/s
  (NVLink-class; PCIe boards are slower: override).

A profile measured by ``bitplan probe`` (``measured = true``) already holds achieved copy
bandwidth and matmul throughput, so bandwidth factors are divided by ``copy_fraction_of_spec``
and compute factors by ``MEASURED_COMPUTE_FRACTION``. A profile's ``efficiency`` table (e.g.
from the kernel benchmark) overrides any factor by name.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

from bitplan.errors import BitplanError
from bitplan.methods.scheme import DENSE, Method, Scheme
from bitplan.models.spec import EXPERT_KIND, LayerSpec, ModelSpec, Routing
from bitplan.planner.deployment import Deployment, kv_cache_bytes
from bitplan.profiles.hardware import HardwareProfile

MEASURED_COMPUTE_FRACTION = 0.85  # achieved / spec peak that a probe's large matmul already shows
_DTYPE_KEY = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass(frozen=True)
class Efficiency:
    """Fractions of spec-sheet bandwidth and peak that kernels reach (see the module notes)."""

    dense_bandwidth: float = 0.80
    quantized_bandwidth: float = 0.65
    fp8_bandwidth: float = 0.80
    attention_bandwidth: float = 0.70
    dense_compute: float = 0.70
    quantized_compute: float = 0.60
    low_precision_compute: float = 0.55
    attention_compute: float = 0.50
    copy_fraction_of_spec: float = 0.90
    step_overhead_s: float = 0.0
    allreduce_latency_s: float = 10e-6
    interconnect_bytes_per_s: float = 100e9

    @classmethod
    def for_profile(cls, profile: HardwareProfile) -> "Efficiency":
        """Defaults, rescaled for measured profiles, then the profile's own overrides."""
        base = cls()
        if profile.measured:
            base = base._rescaled_for_measured()
        return base.with_overrides(profile.efficiency, origin=profile.key)

    def _rescaled_for_measured(self) -> "Efficiency":
        updates = {}
        for item in fields(self):
            value = getattr(self, item.name)
            if item.name.endswith("_bandwidth"):
                updates[item.name] = min(1.0, value / self.copy_fraction_of_spec)
            elif item.name.endswith("_compute"):
                updates[item.name] = min(1.0, value / MEASURED_COMPUTE_FRACTION)
        return replace(self, **updates)

    def with_overrides(self, overrides: dict[str, float], origin: str = "overrides") -> "Efficiency":
        names = {item.name for item in fields(self)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise BitplanError(f"unknown efficiency factor {', '.join(unknown)} in {origin}: use {', '.join(sorted(names))}")
        fractions = [k for k, v in overrides.items() if not k.endswith(("_s", "_per_s")) and not 0 < v <= 1]
        if fractions:
            raise BitplanError(f"efficiency factor {', '.join(fractions)} in {origin} must be in (0, 1]")
        return replace(self, **{k: float(v) for k, v in overrides.items()})

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class KernelPath:
    """The units a scheme runs on: which peak, and which efficiency factors apply."""

    name: str
    peak_key: str
    bandwidth_factor: str
    compute_factor: str


def kernel_path(scheme: Scheme, profile: HardwareProfile, model_dtype: str) -> KernelPath:
    """Where a scheme's matmul runs on this device (see the module notes)."""
    dense_key = _DTYPE_KEY.get(model_dtype, "fp16")
    if scheme.is_dense:
        return KernelPath("dense", dense_key, "dense_bandwidth", "dense_compute")
    if scheme.method == Method.FP8:
        if profile.supports("fp8") and "fp8" in profile.peak_flops_by_dtype:
            return KernelPath("fp8", "fp8", "fp8_bandwidth", "low_precision_compute")
        return KernelPath("w8a16 (fp8 emulated)", "fp16", "quantized_bandwidth", "quantized_compute")
    if scheme.act_bits in (4, 8):
        units = f"int{scheme.act_bits}"
        if profile.supports(units) and units in profile.peak_flops_by_dtype:
            return KernelPath(f"w{scheme.bits}a{scheme.act_bits}", units, "quantized_bandwidth", "low_precision_compute")
    return KernelPath(f"w{scheme.bits}a16", "fp16", "quantized_bandwidth", "quantized_compute")


@dataclass(frozen=True)
class Roofline:
    """The device numbers one estimate uses."""

    profile: HardwareProfile
    efficiency: Efficiency
    model_dtype: str

    def time_s(self, scheme: Scheme, bytes_moved: float, flops: float) -> float:
        path = kernel_path(scheme, self.profile, self.model_dtype)
        bandwidth = self.profile.bandwidth_bytes_per_s * getattr(self.efficiency, path.bandwidth_factor)
        peak = self.profile.peak_flops(path.peak_key) * getattr(self.efficiency, path.compute_factor)
        return max(bytes_moved / bandwidth, flops / peak)

    def attention_time_s(self, bytes_moved: float, flops: float) -> float:
        bandwidth = self.profile.bandwidth_bytes_per_s * self.efficiency.attention_bandwidth
        peak = self.profile.peak_flops(_DTYPE_KEY.get(self.model_dtype, "fp16")) * self.efficiency.attention_compute
        return max(bytes_moved / bandwidth, flops / peak)


DENSE_SCHEME = DENSE


def scheme_of(plan: dict[str, Scheme], layer: LayerSpec) -> Scheme:
    """The scheme a plan gives a layer; layers it leaves out stay dense."""
    return plan.get(layer.name, DENSE_SCHEME)


def _layer_weight_bytes(layer: LayerSpec, scheme: Scheme, spec: ModelSpec) -> int:
    return scheme.weight_bytes(layer.out_features, layer.in_features, spec.dtype_bytes)


def _linear_read_bytes(spec: ModelSpec, layer: LayerSpec, scheme: Scheme, step: "_Step") -> float:
    """Expected bytes of one Linear a device reads per weight pass: an expert only when a token is routed to it."""
    weight = _layer_weight_bytes(layer, scheme, spec) / step.tp
    if layer.kind == EXPERT_KIND and step.routing is not None:
        weight *= step.routing.touched_fraction(step.tokens_per_read)
    return weight


def _linear_time_s(roof: Roofline, spec: ModelSpec, layer: LayerSpec, scheme: Scheme, step: "_Step") -> float:
    flops = 2.0 * step.tokens * layer.in_features * layer.out_features / step.tp
    if layer.kind == EXPERT_KIND and step.routing is not None:
        flops *= step.routing.active_fraction
    if layer.kind == "lm_head":
        flops = 2.0 * step.logit_rows * layer.in_features * layer.out_features / step.tp
    return roof.time_s(scheme, _linear_read_bytes(spec, layer, scheme, step) * step.weight_reads, flops)


@dataclass(frozen=True)
class _Step:
    """One pass over the weights: ``tokens`` multiplied, weights read ``weight_reads`` times."""

    tokens: int
    tokens_per_read: int
    weight_reads: int
    logit_rows: int
    tp: int
    routing: Routing | None


def linear_decode_time_s(roof: Roofline, spec: ModelSpec, layer: LayerSpec, scheme: Scheme, deployment: Deployment) -> float:
    """Seconds one Linear adds to a decode step under a scheme (the search's per-option time)."""
    batch = deployment.batch
    return _linear_time_s(roof, spec, layer, scheme, _Step(batch, batch, 1, batch, deployment.tensor_parallel, spec.routing))


def _weights_time_s(roof: Roofline, spec: ModelSpec, plan: dict[str, Scheme], step: _Step) -> float:
    cache: dict[tuple, float] = {}  # many Linears share a shape, kind and scheme
    total = 0.0
    for layer in spec.layers:
        scheme = scheme_of(plan, layer)
        key = (layer.in_features, layer.out_features, layer.kind, scheme)
        if key not in cache:
            cache[key] = _linear_time_s(roof, spec, layer, scheme, step)
        total += cache[key]
    if spec.tie_word_embeddings:  # logits reuse the embedding matrix, read as a dense GEMV
        head = LayerSpec("lm_head", "lm_head", -1, spec.hidden_size, spec.vocab_size, "")
        total += _linear_time_s(roof, spec, head, DENSE_SCHEME, step)
    return total


def decode_weight_bytes(spec: ModelSpec, plan: dict[str, Scheme], batch: int = 1) -> float:
    """Expected weight bytes one decode step of ``batch`` tokens reads (all devices together): every
    dense Linear, the experts some token is routed to (k of E at batch 1), and a tied lm_head."""
    step = _Step(batch, batch, 1, batch, 1, spec.routing)
    total = sum(_linear_read_bytes(spec, layer, scheme_of(plan, layer), step) for layer in spec.layers)
    if spec.tie_word_embeddings:
        total += spec.vocab_size * spec.hidden_size * spec.dtype_bytes
    return total


def _allreduce_time_s(eff: Efficiency, spec: ModelSpec, tokens: int, count: int, tp: int) -> float:
    if tp == 1:
        return 0.0
    message_bytes = tokens * spec.hidden_size * spec.dtype_bytes
    return 2 * spec.num_blocks * count * (eff.allreduce_latency_s + message_bytes / eff.interconnect_bytes_per_s)


@dataclass(frozen=True)
class SpeedEstimate:
    """Predicted step time and throughput of one deployment."""

    decode_step_s: float
    decode_tokens_per_s: float  # all sequences together: batch / step time
    prefill_s: float
    prefill_tokens_per_s: float
    path_by_scheme: dict[str, str]

    def to_dict(self) -> dict:
        return asdict(self)


def decode_step_s(spec: ModelSpec, plan: dict[str, Scheme], profile: HardwareProfile, deployment: Deployment,
                  efficiency: Efficiency | None = None) -> float:
    """Seconds for one decode step: one new token for each of ``batch`` sequences at full context."""
    eff = efficiency or Efficiency.for_profile(profile)
    roof = Roofline(profile, eff, spec.dtype)
    batch, tp = deployment.batch, deployment.tensor_parallel
    step = _Step(batch, batch, 1, batch, tp, spec.routing)
    kv_bytes = kv_cache_bytes(spec, deployment)
    attention_flops = 4.0 * batch * deployment.context * spec.num_heads * spec.head_dim * spec.num_blocks / tp
    return (
        _weights_time_s(roof, spec, plan, step)
        + roof.attention_time_s(kv_bytes, attention_flops)
        + _allreduce_time_s(eff, spec, batch, 1, tp)
        + eff.step_overhead_s
    )


def prefill_s(spec: ModelSpec, plan: dict[str, Scheme], profile: HardwareProfile, deployment: Deployment,
              efficiency: Efficiency | None = None) -> float:
    """Seconds to prefill ``batch`` prompts of ``context`` tokens in chunks of ``prefill_chunk_tokens``.

    Weights are read once per chunk; logits are computed for the last token of each prompt only.
    """
    eff = efficiency or Efficiency.for_profile(profile)
    roof = Roofline(profile, eff, spec.dtype)
    tokens = deployment.batch * deployment.context
    chunk = min(deployment.prefill_chunk_tokens, tokens)
    chunks = math.ceil(tokens / chunk)
    tp = deployment.tensor_parallel
    step = _Step(tokens, chunk, chunks, deployment.batch, tp, spec.routing)
    context = deployment.context
    attention_flops = 2.0 * deployment.batch * context * context * spec.num_heads * spec.head_dim * spec.num_blocks / tp
    kv_bytes = kv_cache_bytes(spec, deployment) * (chunks + 1) / 2  # each chunk reads the KV written so far
    return (
        _weights_time_s(roof, spec, plan, step)
        + roof.attention_time_s(kv_bytes, attention_flops)
        + _allreduce_time_s(eff, spec, chunk, chunks, tp)
        + eff.step_overhead_s * chunks
    )


def estimate(spec: ModelSpec, plan: dict[str, Scheme], profile: HardwareProfile, deployment: Deployment,
             efficiency: Efficiency | None = None) -> SpeedEstimate:
    """Decode and prefill speed of a plan on a device for a deployment."""
    eff = efficiency or Efficiency.for_profile(profile)
    step_s = decode_step_s(spec, plan, profile, deployment, eff)
    fill_s = prefill_s(spec, plan, profile, deployment, eff)
    paths = {s.name: kernel_path(s, profile, spec.dtype).name for s in {scheme_of(plan, lay) for lay in spec.layers}}
    return SpeedEstimate(
        decode_step_s=step_s,
        decode_tokens_per_s=deployment.batch / step_s,
        prefill_s=fill_s,
        prefill_tokens_per_s=deployment.batch * deployment.context / fill_s,
        path_by_scheme=paths,
    )


def decode_prediction(spec: ModelSpec, choice: dict[str, str], device: HardwareProfile, deployment: Deployment) -> dict[str, float | str]:
    """Roofline decode figures of an assignment on a device: one step at the deployment's batch and
    context, and one token at batch 1 and the same context."""
    schemes = {name: Scheme.parse(scheme) for name, scheme in choice.items()}
    step_s = decode_step_s(spec, schemes, device, deployment)
    single_s = decode_step_s(spec, schemes, device, replace(deployment, batch=1))
    return {"decode_step_ms": 1e3 * step_s, "decode_tokens_per_s": deployment.batch / step_s,
            "decode_ms_per_token_batch1": 1e3 * single_s,
            "decode_weight_bytes_batch1": decode_weight_bytes(spec, schemes, 1),
            "speed_model": "roofline (bitplan.planner.speed)"}
