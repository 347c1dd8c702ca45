"""Compare devices for one model: the best plan that fits each, its memory, quality and speed.

Works from config.json alone. Sensitivity comes from the documented prior (``planner.prior``,
marked ``prior-kl``) unless a measured table with the same layers is given.

Per device: the deployment's budget is the device's usable memory; the runtime overhead is
``default_overhead_bytes(tensor_parallel)``; what remains after unquantized tensors, KV cache
and workspace is the weight budget, spent by the same exact allocation ``bitplan plan`` uses
(``planner.search.allocate``, fused groups sharing one scheme, the objective's time term added
as in ``planner.objective``). When even the smallest plan does not fit, the result says how much
memory that smallest plan needs.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitplan.errors import BitplanError
from bitplan.methods.scheme import Scheme
from bitplan.models.moe import Routing
from bitplan.models.spec import ModelSpec
from bitplan.planner.deployment import (
    DEFAULT_PREFILL_CHUNK_TOKENS,
    Deployment,
    MemoryBreakdown,
    default_overhead_bytes,
    max_batch,
    memory_breakdown,
    weight_budget_bytes,
)
from bitplan.planner.objective import check_objective, decode_time_matrix, latency_cost
from bitplan.planner.prior import PRIOR_METRIC, prior_table
from bitplan.planner.search import allocate, build_units, smallest_allocation
from bitplan.planner.speed import estimate
from bitplan.profiles.hardware import HardwareProfile
from bitplan.profiles.tables import SensitivityTable

DEFAULT_SCHEMES = (
    "none", "gptq-w8gcs", "gptq-w6g128s", "gptq-w5g128s", "gptq-w4g32s",
    "gptq-w4g128s", "gptq-w3g128s", "gptq-w2g64s",
)


@dataclass
class DeviceResult:
    """One row of the comparison."""

    device: str
    device_name: str
    usable_memory_bytes: int
    fits: bool
    weight_budget_bytes: int  # what the deployment leaves for Linear weights, all devices together
    memory: MemoryBreakdown
    weights_bytes: int  # all Linears as planned, all devices together
    bits_per_weight: float
    scheme_shares: dict[str, float]  # scheme -> share of Linear parameters
    predicted_loss: float
    loss_metric: str
    decode_tokens_per_s: float  # per sequence at the requested batch (0 when it does not fit)
    prefill_tokens_per_s: float
    max_batch: int
    decode_tokens_per_s_at_max_batch: float
    assignments: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["memory"] = self.memory.to_dict()
        return data


@dataclass(frozen=True)
class CompareSettings:
    context: int = 8192
    batch: int = 1
    kv_dtype: str = "bfloat16"
    tensor_parallel: int = 1
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS
    objective: str = "quality"
    schemes: tuple[str, ...] = DEFAULT_SCHEMES

    def __post_init__(self) -> None:
        check_objective(self.objective)

    def deployment(self, device: HardwareProfile) -> Deployment:
        return Deployment(
            budget_bytes=device.usable_memory_bytes, context=self.context, batch=self.batch,
            kv_dtype=self.kv_dtype, tensor_parallel=self.tensor_parallel,
            overhead_bytes=default_overhead_bytes(self.tensor_parallel),
            prefill_chunk_tokens=self.prefill_chunk_tokens,
        )


def parse_schemes(names: tuple[str, ...]) -> list[Scheme]:
    schemes = [Scheme.parse(name) for name in names]
    if not schemes:
        raise BitplanError("no candidate schemes: pass e.g. --schemes none,gptq-w4g128s")
    return schemes


def _shares(spec: ModelSpec, plan: dict[str, Scheme]) -> dict[str, float]:
    total = spec.linear_weights
    shares: dict[str, float] = defaultdict(float)
    for layer in spec.layers:
        shares[plan[layer.name].name] += layer.num_weights / total
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


def compare_device(spec: ModelSpec, routing: Routing | None, table: SensitivityTable, device: HardwareProfile,
                   settings: CompareSettings) -> DeviceResult:
    """The best plan (or the smallest, when nothing fits) for one device, with its figures."""
    deployment = settings.deployment(device)
    experts = routing.experts_per_token if routing else 1
    budget = weight_budget_bytes(spec, deployment, experts)
    times = decode_time_matrix(spec, table.layers, table.schemes, table.bytes.numpy() >= 0, device, deployment)
    extra_cost = latency_cost(settings.objective, table, times)
    try:
        allocation, fits = allocate(table, spec, budget, tie_fused=True, extra_cost=extra_cost), True
    except BitplanError:
        allocation, fits = smallest_allocation(table, spec, tie_fused=True), False
    plan = {name: Scheme.parse(scheme) for name, scheme in allocation.choice.items()}
    weights = allocation.weight_bytes
    largest = max_batch(spec, weights, deployment, experts)
    speed = estimate(spec, plan, device, deployment) if fits else None
    at_max = estimate(spec, plan, device, Deployment(**{**deployment.to_dict(), "batch": largest})) if largest else None
    return DeviceResult(
        device=device.key, device_name=device.name, usable_memory_bytes=device.usable_memory_bytes, fits=fits,
        weight_budget_bytes=budget,
        memory=memory_breakdown(spec, weights, deployment, experts), weights_bytes=weights,
        bits_per_weight=8.0 * weights / spec.linear_weights,
        scheme_shares=_shares(spec, plan), predicted_loss=allocation.score,
        loss_metric=str(table.provenance.get("metric", PRIOR_METRIC)),
        decode_tokens_per_s=speed.decode_tokens_per_s / deployment.batch if speed else 0.0,
        prefill_tokens_per_s=speed.prefill_tokens_per_s if speed else 0.0,
        max_batch=largest, decode_tokens_per_s_at_max_batch=at_max.decode_tokens_per_s if at_max else 0.0,
        assignments={name: scheme.name for name, scheme in plan.items()},
    )


@dataclass
class Comparison:
    model_type: str
    settings: CompareSettings
    loss_metric: str
    results: list[DeviceResult]
    curve: list[tuple[int, float]]  # (Linear weight bytes, predicted loss): the quality/bytes front

    def to_dict(self) -> dict:
        return {
            "model_type": self.model_type, "settings": asdict(self.settings), "loss_metric": self.loss_metric,
            "results": [r.to_dict() for r in self.results], "curve": self.curve,
        }


def quality_curve(table: SensitivityTable, spec: ModelSpec, points: int = 24) -> list[tuple[int, float]]:
    """Best predicted loss against Linear bytes, for the plot: the plans that minimise
    ``score + λ · bytes`` over a sweep of λ. Each is the exact optimum at its own size (a
    Lagrangian point lies on the lower convex hull of the allocation's (bytes, score) front)."""
    units = build_units(table, spec, tie_fused=True)
    slopes = [abs(a[2] - b[2]) / (b[1] - a[1]) for unit in units for a, b in zip(unit.options, unit.options[1:]) if b[1] > a[1]]
    slopes = [s for s in slopes if s > 0]
    if not slopes:
        return []
    low, high = math.log(min(slopes)), math.log(max(slopes))
    front = set()
    for k in range(4 * points):
        lam = math.exp(low + (high - low) * k / max(1, 4 * points - 1))
        picks = [min(unit.options, key=lambda o: (o[2] + lam * o[1], o[1])) for unit in units]
        front.add((sum(p[1] for p in picks), sum(p[2] for p in picks)))
    front.add((sum(unit.options[0][1] for unit in units), sum(unit.options[0][2] for unit in units)))
    front.add((sum(unit.options[-1][1] for unit in units), sum(unit.options[-1][2] for unit in units)))
    ordered = sorted(front)
    step = max(1, len(ordered) // points)
    return [(int(b), float(s)) for b, s in ordered[::step]] + ([] if (len(ordered) - 1) % step == 0 else [(int(ordered[-1][0]), float(ordered[-1][1]))])


def compare(spec: ModelSpec, routing: Routing | None, devices: list[HardwareProfile], settings: CompareSettings,
            table=None) -> Comparison:
    """Compare devices for one model; ``table`` is a measured sensitivity table or None (prior)."""
    schemes = parse_schemes(settings.schemes) if table is None else [Scheme.parse(n) for n in table.schemes]
    if table is None:
        table = prior_table(spec, schemes, routing)
    elif list(table.layers) != [layer.name for layer in spec.layers]:
        raise BitplanError("the sensitivity table's layers do not match the model's config.json: profile this model")
    results = [compare_device(spec, routing, table, device, settings) for device in devices]
    metric = str(table.provenance.get("metric", PRIOR_METRIC))
    return Comparison(spec.model_type, settings, metric, results, quality_curve(table, spec))


def write_plot(comparison: Comparison, path: Path) -> None:
    """Predicted loss against Linear weight bytes, with each device's weight budget marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError as exc:
        raise BitplanError(f"--plot needs matplotlib ({exc}): pip install matplotlib") from exc
    figure, axes = pyplot.subplots(figsize=(9, 5))
    if comparison.curve:
        sizes, losses = zip(*comparison.curve)
        axes.plot([b / 1e9 for b in sizes], losses, marker=".", color="black", label="best plan at each size")
    colors = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, result in enumerate(comparison.results):
        budget_gb = result.weight_budget_bytes / 1e9
        axes.axvline(budget_gb, color=colors[k % len(colors)], linestyle="--", label=f"{result.device} budget {budget_gb:.1f} GB")
    axes.set_xlabel("Linear weights (GB, all devices together)")
    metric = "prior KL, nats/token (documented prior)" if comparison.loss_metric == PRIOR_METRIC else comparison.loss_metric
    axes.set_ylabel(f"predicted loss: {metric}")
    axes.set_yscale("symlog", linthresh=1e-4)
    axes.set_ylim(bottom=0)
    s = comparison.settings
    axes.set_title(f"{comparison.model_type}: context {s.context}, batch {s.batch}, KV {s.kv_dtype}, TP {s.tensor_parallel}")
    axes.legend(fontsize=8)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    pyplot.close(figure)
