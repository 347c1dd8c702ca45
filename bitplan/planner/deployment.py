"""The deployment a budget must cover, and the memory it takes, counted in one place.

total = quantized Linear weights (codes, scales, zero points; exact, from ``kernels.layout``)
      + tensors left unquantized (embeddings, norms, biases, an untied lm_head unless quantized)
      + KV cache (blocks x 2 x kv_heads x head_dim x context x batch x KV dtype bytes)
      + activation workspace for one prefill chunk
      + runtime overhead (CUDA context, allocator): 0 for a bare byte budget unless given,
        DEFAULT_GPU_OVERHEAD_BYTES when planning for a device.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from bitplan.errors import BitplanError
from bitplan.profiles.model_spec import ModelSpec

KV_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "fp8": 1, "int8": 1}
DEFAULT_GPU_OVERHEAD_BYTES = 1 * 2**30  # CUDA context + allocator slack, measured typical 0.5-1 GiB
DEFAULT_PREFILL_CHUNK_TOKENS = 512

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[kmgt]i?b|b)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """Parse '150MB', '40GB', '40GiB', '0.5TB' into bytes (decimal MB/GB, binary MiB/GiB)."""
    match = _SIZE.match(str(text))
    if not match:
        raise BitplanError(f"cannot read the size {text!r}: write a number and a unit, e.g. 150MB, 40GB, 40GiB or 0.5TB")
    value = float(match["number"]) * _UNITS[match["unit"].lower()]
    if value <= 0:
        raise BitplanError(f"the size {text!r} is not positive: give a budget above zero, e.g. 150MB")
    return int(value)


def format_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


@dataclass(frozen=True)
class Deployment:
    """What runs beside the weights: context, batch, KV dtype, tensor parallelism, overhead."""

    budget_bytes: int
    context: int = 2048
    batch: int = 1
    kv_dtype: str = "float16"
    tensor_parallel: int = 1
    overhead_bytes: int = 0
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS

    def __post_init__(self) -> None:
        if self.context < 1:
            raise BitplanError(f"context must be at least 1 token, got {self.context}")
        if self.batch < 1:
            raise BitplanError(f"batch must be at least 1, got {self.batch}")
        if self.tensor_parallel < 1:
            raise BitplanError(f"tensor parallel must be at least 1, got {self.tensor_parallel}")
        if self.kv_dtype not in KV_DTYPE_BYTES:
            raise BitplanError(f"unknown KV cache dtype {self.kv_dtype!r}: choose one of {', '.join(KV_DTYPE_BYTES)}")
        if self.overhead_bytes < 0:
            raise BitplanError("overhead cannot be negative")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Deployment":
        return cls(**data)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device of one deployment, term by term."""

    quantized_weights_bytes: int
    unquantized_bytes: int
    kv_cache_bytes: int
    workspace_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return (
            self.quantized_weights_bytes + self.unquantized_bytes + self.kv_cache_bytes
            + self.workspace_bytes + self.overhead_bytes
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "total_bytes": self.total_bytes}


def kv_cache_bytes(spec: ModelSpec, deployment: Deployment) -> int:
    """K and V for every block, KV head, position and sequence (split over tensor parallel)."""
    per_token = spec.num_blocks * 2 * spec.num_kv_heads * spec.head_dim * KV_DTYPE_BYTES[deployment.kv_dtype]
    return per_token * deployment.context * deployment.batch // deployment.tensor_parallel


def workspace_bytes(spec: ModelSpec, deployment: Deployment) -> int:
    """Activations of one prefill chunk: the widest MLP intermediate (gate, up, product) plus
    the residual stream, plus float32 logits for the last position of each sequence."""
    tokens = min(deployment.prefill_chunk_tokens, deployment.context) * deployment.batch
    hidden_terms = 3 * spec.intermediate_size // deployment.tensor_parallel + 4 * spec.hidden_size
    logits = deployment.batch * spec.vocab_size * 4
    return tokens * hidden_terms * spec.dtype_bytes + logits


def memory_breakdown(spec: ModelSpec, quantized_weights_bytes: int, deployment: Deployment) -> MemoryBreakdown:
    """The memory one device holds for a plan whose quantized Linears take the given bytes."""
    tp = deployment.tensor_parallel
    return MemoryBreakdown(
        quantized_weights_bytes=quantized_weights_bytes // tp,
        unquantized_bytes=spec.unquantized_bytes // tp,
        kv_cache_bytes=kv_cache_bytes(spec, deployment),
        workspace_bytes=workspace_bytes(spec, deployment),
        overhead_bytes=deployment.overhead_bytes,
    )


def weight_budget_bytes(spec: ModelSpec, deployment: Deployment) -> int:
    """Bytes left for quantized Linear weights once everything else is counted (may be < 0)."""
    rest = memory_breakdown(spec, 0, deployment)
    return (deployment.budget_bytes - rest.total_bytes) * deployment.tensor_parallel
