"""The deployment a budget must cover, and the memory it takes, counted in one place.

Per device (``tensor_parallel`` devices share the model):

    total = quantized Linear weights / TP     (codes, scales, zero points; exact, ``kernels.layout``)
          + unquantized tensors / TP          (embeddings, norms, biases; vocab-parallel like vLLM)
          + KV cache                          (blocks x 2 x kv_heads/TP x head_dim x context x batch x dtype)
          + workspace                         (max of one prefill step's activations and the sampler)
          + overhead                          (CUDA context, allocator, NCCL buffers)

Workspace. A serving engine runs one forward step over at most ``prefill_chunk_tokens`` tokens
(vLLM's ``max_num_batched_tokens``), then samples one token for each of ``batch`` sequences.
The two peaks do not overlap, so the workspace is their maximum:

- prefill step: per token, the MLP's gate/up output (2 x intermediate / TP), the activation
  product (intermediate / TP), the down output, the normed input and the residual stream
  (4 x hidden), in the checkpoint dtype;
- sampler: per sequence and vocabulary entry, fp32 logits (4 B), the sorted copy that top-k/top-p
  needs (4 B) and its int64 sort indices (8 B): ``SAMPLER_BYTES_PER_LOGIT`` = 16.

Checked against vLLM 0.19's printed "activation peak memory" for Llama-3.1-8B (1.89 GiB, sampler
bound), Qwen2.5-7B (2.21 GiB, sampler bound) and CodeLlama-7B (0.77 GiB, MLP bound) in
``tests/planner/test_deployment.py``.

Overhead. ``DEFAULT_GPU_OVERHEAD_BYTES`` (1 GiB) covers the CUDA context (0.51 GiB measured by
vLLM at start-up on an H100) plus the gap between the memory nvidia-smi reports and what
``cudaMemGetInfo`` hands out (79.65 vs 79.19 GiB on an H100 SXM). With tensor parallelism NCCL
buffers add about 2 GiB per device (vLLM 0.19 reports 2.07-2.13 GiB non-torch memory at TP 2-4
against 0.25 GiB at TP 1): see :func:`default_overhead_bytes`.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from bitplan.errors import BitplanError
from bitplan.methods.kv_cache import ALIASES, KV_FORMATS, kv_format
from bitplan.models.spec import EXPERT_KIND, ModelSpec

KV_DTYPES = (*KV_FORMATS, *ALIASES)  # names --kv-dtype takes (formats and bytes: methods.kv_cache)
DEFAULT_GPU_OVERHEAD_BYTES = 1 * 2**30  # CUDA context + allocator slack (see module notes)
TENSOR_PARALLEL_OVERHEAD_BYTES = 2 * 2**30  # NCCL / custom all-reduce buffers per device
DEFAULT_PREFILL_CHUNK_TOKENS = 512
SAMPLER_BYTES_PER_LOGIT = 16  # fp32 logits + fp32 sorted copy + int64 sort indices
MAX_BATCH_SEARCHED = 1 << 20

_UNITS = {
    "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?|\.\d+)\s*(?P<unit>[kmgt]i?b|b)\s*$", re.IGNORECASE)


def parse_size(text: str, allow_zero: bool = False) -> int:
    """Parse '150MB', '40GB', '40GiB', '0.5TB' into bytes (decimal MB/GB, binary MiB/GiB).

    ``allow_zero`` (overheads) also accepts '0' and '0MB'; budgets must be positive."""
    if allow_zero and str(text).strip() == "0":
        return 0
    match = _SIZE.match(str(text))
    if not match:
        raise BitplanError(f"cannot read the size {text!r}: write a number and a unit, e.g. 150MB, 40GB, 40GiB or 0.5TB")
    value = float(match["number"]) * _UNITS[match["unit"].lower()]
    if value <= 0 and not (allow_zero and value == 0):
        raise BitplanError(f"the size {text!r} is not positive: give a budget above zero, e.g. 150MB")
    return int(value)


def format_bytes(count: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(count) >= size:
            return f"{count / size:.2f} {unit}"
    return f"{int(count)} B"


def deployment_for(budget: str | int | None, device, context: int = 2048, batch: int = 1, kv_dtype: str = "float16",
                   tensor_parallel: int = 1, overhead: str | int | None = None) -> Deployment:
    """A budget in bytes (or text such as '40GB'), or a target device whose usable memory is the budget.

    The overhead defaults to ``default_overhead_bytes`` on a device, 0 for a bare budget."""
    if budget is None and device is None:
        raise BitplanError("give a memory budget (--budget 40GB) or a target device (--target h100-sxm)")
    budget_bytes = (parse_size(budget) if isinstance(budget, str) else int(budget)) if budget is not None else device.usable_memory_bytes
    if overhead is None:
        overhead_bytes = default_overhead_bytes(tensor_parallel) if device else 0
    else:
        overhead_bytes = parse_size(overhead, allow_zero=True) if isinstance(overhead, str) else int(overhead)
    return Deployment(budget_bytes=budget_bytes, context=context, batch=batch, kv_dtype=kv_dtype,
                      tensor_parallel=tensor_parallel, overhead_bytes=overhead_bytes)


def default_overhead_bytes(tensor_parallel: int = 1) -> int:
    """Runtime memory outside the model on each device: CUDA context, allocator, NCCL buffers."""
    return DEFAULT_GPU_OVERHEAD_BYTES + (TENSOR_PARALLEL_OVERHEAD_BYTES if tensor_parallel > 1 else 0)


@dataclass(frozen=True)
class Deployment:
    """What runs beside the weights: context, batch, KV dtype, tensor parallelism, overhead.

    ``prefill_chunk_tokens`` is the most tokens one forward step processes, shared by the batch
    (vLLM's ``max_num_batched_tokens``).
    """

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
        kv_format(self.kv_dtype)  # one line for an unknown dtype
        if self.overhead_bytes < 0:
            raise BitplanError("overhead cannot be negative")
        if self.prefill_chunk_tokens < 1:
            raise BitplanError(f"prefill chunk must be at least 1 token, got {self.prefill_chunk_tokens}")

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

    @classmethod
    def from_dict(cls, data: dict) -> "MemoryBreakdown":
        terms = {k: int(v) for k, v in data.items() if k != "total_bytes"}
        breakdown = cls(**terms)
        if "total_bytes" in data and int(data["total_bytes"]) != breakdown.total_bytes:
            raise ValueError(f"memory terms sum to {breakdown.total_bytes}, not the recorded total {data['total_bytes']}")
        return breakdown


def kv_heads_per_device(spec: ModelSpec, tensor_parallel: int) -> int:
    """KV heads one device holds: split over TP, replicated once TP exceeds the head count."""
    return max(1, -(-spec.num_kv_heads // tensor_parallel))


def kv_bytes_per_token(spec: ModelSpec, kv_dtype: str, tensor_parallel: int = 1) -> int:
    """K and V of one token in every block, on one device (block formats' scales included)."""
    heads = kv_heads_per_device(spec, tensor_parallel)
    values = spec.num_blocks * 2 * heads * spec.head_dim
    return -(-values * kv_format(kv_dtype).bytes_per_value.numerator // kv_format(kv_dtype).bytes_per_value.denominator)


def kv_cache_bytes(spec: ModelSpec, deployment: Deployment) -> int:
    """K and V for every block, KV head, position and sequence (split over tensor parallel)."""
    per_token = kv_bytes_per_token(spec, deployment.kv_dtype, deployment.tensor_parallel)
    return per_token * deployment.context * deployment.batch


def prefill_step_tokens(deployment: Deployment) -> int:
    """Tokens in one forward step: the chunk budget, or all prompts if they are shorter."""
    return min(deployment.prefill_chunk_tokens, deployment.context * deployment.batch)


def prefill_activation_bytes(spec: ModelSpec, deployment: Deployment, experts_per_token: int | None = None) -> int:
    """Activations alive during one prefill step's MLP (see the module notes).

    ``experts_per_token`` > 1 for mixture-of-experts blocks: each token runs that many experts
    (None: the spec's routing, 1 for a dense model).
    """
    experts_per_token = experts_per_token or spec.experts_per_token or 1
    tp = deployment.tensor_parallel
    per_token = 3 * mlp_width_per_token(spec, experts_per_token) // tp + 4 * spec.hidden_size
    return prefill_step_tokens(deployment) * per_token * spec.dtype_bytes


def mlp_width_per_token(spec: ModelSpec, experts_per_token: int) -> int:
    """The MLP's intermediate width one token runs through: ``intermediate_size`` for a dense model;
    for a mixture of experts, ``experts_per_token`` experts of their own width (the expert Linears'
    inner dimension, e.g. Qwen3-MoE's ``moe_intermediate_size``) plus any dense MLP of the block (a
    shared expert)."""
    if not spec.num_experts:
        return experts_per_token * spec.intermediate_size
    expert = next(layer for layer in spec.layers if layer.kind == EXPERT_KIND)
    shared = sum(layer.in_features for layer in spec.layers if layer.kind == "down" and layer.block == expert.block)
    width = expert.out_features if expert.in_features == spec.hidden_size else expert.in_features
    return experts_per_token * width + shared


def sampler_bytes(spec: ModelSpec, deployment: Deployment) -> int:
    """Logits and sampling buffers for one token of every sequence (all vocab, on every device)."""
    return deployment.batch * spec.vocab_size * SAMPLER_BYTES_PER_LOGIT


def workspace_bytes(spec: ModelSpec, deployment: Deployment, experts_per_token: int | None = None) -> int:
    """Peak transient memory: the larger of a prefill step's activations and the sampler's."""
    return max(prefill_activation_bytes(spec, deployment, experts_per_token), sampler_bytes(spec, deployment))


def memory_breakdown(
    spec: ModelSpec, quantized_weights_bytes: int, deployment: Deployment, experts_per_token: int | None = None
) -> MemoryBreakdown:
    """The memory one device holds for a plan whose quantized Linears take the given bytes."""
    tp = deployment.tensor_parallel
    return MemoryBreakdown(
        quantized_weights_bytes=-(-quantized_weights_bytes // tp),
        unquantized_bytes=-(-spec.unquantized_bytes // tp),
        kv_cache_bytes=kv_cache_bytes(spec, deployment),
        workspace_bytes=workspace_bytes(spec, deployment, experts_per_token),
        overhead_bytes=deployment.overhead_bytes,
    )


def weight_budget_bytes(spec: ModelSpec, deployment: Deployment, experts_per_token: int | None = None) -> int:
    """Bytes left for quantized Linear weights (all devices together) once everything else is
    counted; may be negative when even the KV cache and overhead do not fit."""
    rest = memory_breakdown(spec, 0, deployment, experts_per_token)
    return (deployment.budget_bytes - rest.total_bytes) * deployment.tensor_parallel


def fits(spec: ModelSpec, quantized_weights_bytes: int, deployment: Deployment, experts_per_token: int | None = None) -> bool:
    return memory_breakdown(spec, quantized_weights_bytes, deployment, experts_per_token).total_bytes <= deployment.budget_bytes


def max_batch(spec: ModelSpec, quantized_weights_bytes: int, deployment: Deployment, experts_per_token: int | None = None) -> int:
    """The largest batch that fits at the deployment's context (0 when not even one sequence does).

    Memory grows monotonically with the batch, so a doubling then bisection search is exact.
    """

    def ok(batch: int) -> bool:
        trial = Deployment(**{**deployment.to_dict(), "batch": batch})
        return fits(spec, quantized_weights_bytes, trial, experts_per_token)

    if not ok(1):
        return 0
    low, high = 1, 2
    while high <= MAX_BATCH_SEARCHED and ok(high):
        low, high = high, high * 2
    if high > MAX_BATCH_SEARCHED:
        return low
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if ok(middle) else (low, middle)
    return low
