"""Compare devices for one model: the best plan that fits each, its memory, quality and speed.

Works from config.json alone. Sensitivity comes from the documented prior (``planner.prior``,
marked ``prior-kl``) unless a measured table with the same layers is given.

Per device: the deployment's budget is the device's usable memory; the runtime overhead is
``default_overhead_bytes(tensor_parallel)``; what remains after unquantized tensors, KV cache
and workspace is the weight budget, spent by a multiple-choice knapsack over fused groups
(Linears an engine fuses must share a scheme). When even the smallest plan does not fit, the
result says how much memory that smallest plan needs.

The allocator here is private and simple: per group, the lower convex hull of (bytes, cost);
start at the cheapest point of every hull, take upgrades in order of cost saved per byte while
they fit, then one pass of exact swaps for leftover bytes. Its gap to the optimum is at most
one group's step. (The spine's ``planner.search`` did not exist when this was written.)
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitplan.errors import BitplanError
from bitplan.methods.scheme import Scheme
from bitplan.planner.deployment import (
    DEFAULT_PREFILL_CHUNK_TOKENS, Deployment, MemoryBreakdown, default_overhead_bytes,
    max_batch, memory_breakdown, weight_budget_bytes,
)
from bitplan.planner.objective import check_objective, cost_weights, reference_scales
from bitplan.planner.prior import PRIOR_METRIC, prior_table
from bitplan.planner.speed import Efficiency, Roofline, estimate, linear_decode_time_s
from bitplan.profiles.hardware import HardwareProfile
from bitplan.profiles.model_spec import ModelSpec
from bitplan.profiles.moe import Routing

DEFAULT_SCHEMES = (
    "none", "gptq-w8gcs", "gptq-w6g128s", "gptq-w5g128s", "gptq-w4g32s",
    "gptq-w4g128s", "gptq-w3g128s", "gptq-w2g64s",
)


@dataclass(frozen=True)
class GroupOption:
    """One scheme for a fused group: its total bytes, predicted loss and decode time."""

    scheme_index: int
    bytes: int
    score: float
    time_s: float


@dataclass
class Group:
    key: str
    layer_indices: list[int]
    options: list[GroupOption]


def fused_groups(spec: ModelSpec, table) -> list[Group]:
    """Layers that must share a scheme, in model order (``table`` gives bytes and scores)."""
    members: dict[str, list[int]] = defaultdict(list)
    for index, layer in enumerate(spec.layers):
        members[layer.fused_key].append(index)
    groups = []
    for key, indices in members.items():
        options = []
        for j in range(len(table.schemes)):
            sizes = [int(table.bytes[i, j]) for i in indices]
            if min(sizes) < 0:
                continue
            score = float(sum(float(table.scores[i, j]) for i in indices))
            options.append(GroupOption(j, sum(sizes), score, 0.0))
        if not options:
            raise BitplanError(f"no candidate scheme can store layer group {key}: add a per-channel or dense scheme")
        groups.append(Group(key, indices, options))
    return groups


def _hull(options: list[GroupOption], cost) -> list[GroupOption]:
    """Lower convex hull of (bytes, cost), cheapest bytes first, dominated options dropped."""
    ordered = sorted(options, key=lambda o: (o.bytes, cost(o)))
    front: list[GroupOption] = []
    for option in ordered:
        if front and cost(option) >= cost(front[-1]):
            continue
        front.append(option)
    hull: list[GroupOption] = []
    for option in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            slope_ab = (cost(b) - cost(a)) / max(1, b.bytes - a.bytes)
            slope_ac = (cost(option) - cost(a)) / max(1, option.bytes - a.bytes)
            if slope_ac <= slope_ab:
                hull.pop()
            else:
                break
        hull.append(option)
    return hull


def allocate(groups: list[Group], budget_bytes: int, cost) -> list[GroupOption] | None:
    """Minimize the summed ``cost(option)`` with total bytes <= budget; None when infeasible."""
    hulls = [_hull(g.options, cost) for g in groups]
    chosen = [0] * len(groups)
    used = sum(h[0].bytes for h in hulls)
    if used > budget_bytes:
        return None
    steps = []
    for g, hull in enumerate(hulls):
        for k in range(1, len(hull)):
            gain = (cost(hull[k]) - cost(hull[k - 1])) / max(1, hull[k].bytes - hull[k - 1].bytes)
            steps.append((gain, g, k))
    steps.sort()
    for _, g, k in steps:
        if chosen[g] != k - 1:
            continue
        extra = hulls[g][k].bytes - hulls[g][k - 1].bytes
        if used + extra <= budget_bytes:
            chosen[g], used = k, used + extra
    picks = [hulls[g][k] for g, k in enumerate(chosen)]
    return _fill_leftover(groups, picks, budget_bytes - used, cost)


def _fill_leftover(groups: list[Group], picks: list[GroupOption], left_bytes: int, cost) -> list[GroupOption]:
    """One pass of the best single-group swaps that still fit (off-hull options included)."""
    for g, group in enumerate(groups):
        current = picks[g]
        better = [o for o in group.options if cost(o) < cost(current) and o.bytes - current.bytes <= left_bytes]
        if better:
            best = min(better, key=cost)
            left_bytes -= best.bytes - current.bytes
            picks[g] = best
    return picks


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


def _with_times(groups: list[Group], spec: ModelSpec, schemes: list[Scheme], roof: Roofline, deployment: Deployment,
                routing: Routing | None) -> list[Group]:
    cache: dict[tuple, float] = {}  # many Linears share a shape, kind and scheme

    def time_s(index: int, scheme_index: int) -> float:
        layer = spec.layers[index]
        key = (layer.in_features, layer.out_features, layer.kind, scheme_index)
        if key not in cache:
            cache[key] = linear_decode_time_s(roof, spec, layer, schemes[scheme_index], deployment, routing)
        return cache[key]

    timed = []
    for group in groups:
        options = [
            GroupOption(o.scheme_index, o.bytes, o.score, sum(time_s(i, o.scheme_index) for i in group.layer_indices))
            for o in group.options
        ]
        timed.append(Group(group.key, group.layer_indices, options))
    return timed


def _cost_function(objective: str, groups: list[Group]):
    """The objective's cost of one option (definitions and scales: ``planner.objective``)."""
    weights = cost_weights(objective, *reference_scales(
        ([o.score for o in g.options], [o.time_s for o in g.options]) for g in groups))
    return lambda o: weights(o.score, o.time_s)


def _smallest(groups: list[Group]) -> list[GroupOption]:
    return [min(g.options, key=lambda o: (o.bytes, o.score)) for g in groups]


def _plan(spec: ModelSpec, groups: list[Group], picks: list[GroupOption], schemes: list[Scheme]) -> dict[str, Scheme]:
    return {spec.layers[i].name: schemes[p.scheme_index] for g, p in zip(groups, picks) for i in g.layer_indices}


def _shares(spec: ModelSpec, plan: dict[str, Scheme]) -> dict[str, float]:
    total = spec.linear_weights
    shares: dict[str, float] = defaultdict(float)
    for layer in spec.layers:
        shares[plan[layer.name].name] += layer.num_weights / total
    return dict(sorted(shares.items(), key=lambda item: -item[1]))


def compare_device(spec: ModelSpec, routing: Routing | None, table, schemes: list[Scheme],
                   device: HardwareProfile, settings: CompareSettings, base_groups: list[Group]) -> DeviceResult:
    """The best plan (or the smallest, when nothing fits) for one device, with its figures."""
    deployment = settings.deployment(device)
    experts = routing.experts_per_token if routing else 1
    roof = Roofline(device, Efficiency.for_profile(device), spec.dtype)
    groups = _with_times(base_groups, spec, schemes, roof, deployment, routing)
    cost = _cost_function(settings.objective, groups)
    budget = weight_budget_bytes(spec, deployment, experts)
    picks = allocate(groups, budget, cost)
    fits = picks is not None
    picks = picks if fits else _smallest(groups)
    plan = _plan(spec, groups, picks, schemes)
    weights = sum(p.bytes for p in picks)
    memory = memory_breakdown(spec, weights, deployment, experts)
    largest = max_batch(spec, weights, deployment, experts)
    speed = estimate(spec, plan, device, deployment, routing) if fits else None
    at_max = estimate(spec, plan, device, Deployment(**{**deployment.to_dict(), "batch": largest}), routing) if largest else None
    return DeviceResult(
        device=device.key, device_name=device.name, usable_memory_bytes=device.usable_memory_bytes, fits=fits,
        weight_budget_bytes=budget,
        memory=memory, weights_bytes=weights, bits_per_weight=8.0 * weights / spec.linear_weights,
        scheme_shares=_shares(spec, plan), predicted_loss=sum(p.score for p in picks),
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


def quality_curve(groups: list[Group], points: int = 24) -> list[tuple[int, float]]:
    """Best predicted loss at budgets from the smallest plan to the largest (for the plot)."""
    low = sum(min(o.bytes for o in g.options) for g in groups)
    high = sum(max(o.bytes for o in g.options) for g in groups)
    curve = []
    for k in range(points):
        budget = int(low + (high - low) * k / max(1, points - 1))
        picks = allocate(groups, budget, lambda o: o.score)
        if picks is not None:
            curve.append((sum(p.bytes for p in picks), sum(p.score for p in picks)))
    return curve


def compare(spec: ModelSpec, routing: Routing | None, devices: list[HardwareProfile], settings: CompareSettings,
            table=None) -> Comparison:
    """Compare devices for one model; ``table`` is a measured sensitivity table or None (prior)."""
    schemes = parse_schemes(settings.schemes) if table is None else [Scheme.parse(n) for n in table.schemes]
    if table is None:
        table = prior_table(spec, schemes, routing)
    elif list(table.layers) != [layer.name for layer in spec.layers]:
        raise BitplanError("the sensitivity table's layers do not match the model's config.json: profile this model")
    groups = fused_groups(spec, table)
    results = [compare_device(spec, routing, table, schemes, device, settings, groups) for device in devices]
    metric = str(table.provenance.get("metric", PRIOR_METRIC))
    return Comparison(spec.model_type, settings, metric, results, quality_curve(groups))


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
