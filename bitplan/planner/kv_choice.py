"""The KV cache's format as a decision of the search: weight bytes traded against KV bytes.

For each KV format the engine runs, the budget left for quantized weights is what remains once
that format's cache (at the deployment's context and batch) and everything else is counted; the
exact allocation spends it; the format's own measured cost (``profiles.kv_cache``) is added to
the plan's predicted KL. The format with the lowest total wins (ties: the larger cache, which
loses less when the prediction errs). A format whose cache leaves no room for the smallest plan
is listed as infeasible.

The engine keeps one format for every layer (vLLM's ``--kv-cache-dtype`` and llama.cpp's
``--cache-type-k/-v`` are model-wide), so the choice is one per plan. KL costs of weights and
KV cache add here; ``bench/kv_joint.py`` measures how far that holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from bitplan.errors import BitplanError
from bitplan.methods.kv_cache import KV_FORMATS, kv_format
from bitplan.models.spec import ModelSpec
from bitplan.planner.deployment import Deployment, format_bytes, kv_cache_bytes, weight_budget_bytes

AUTO = "auto"


@dataclass(frozen=True)
class KVOption:
    """One KV format's outcome: its cache, the weights' budget and score, and the total."""

    dtype: str
    kv_cache_bytes: int
    weight_budget_bytes: int
    kv_kl: float
    weight_score_kl: float | None = None  # None: the smallest plan does not fit beside this cache
    infeasible: str | None = None

    @property
    def total_kl(self) -> float:
        return float("inf") if self.weight_score_kl is None else self.weight_score_kl + self.kv_kl

    def to_dict(self) -> dict:
        data = {"dtype": self.dtype, "kv_cache_bytes": self.kv_cache_bytes, "weight_budget_bytes": self.weight_budget_bytes,
                "kv_kl": self.kv_kl}
        if self.weight_score_kl is not None:
            data.update(weight_score_kl=self.weight_score_kl, total_kl=self.total_kl)
        if self.infeasible:
            data["infeasible"] = self.infeasible
        return data


def native_kv_dtype(spec: ModelSpec) -> str:
    """The 16-bit dtype an engine's "auto" cache takes: the checkpoint's (float16 for float32 models)."""
    return spec.dtype if spec.dtype in ("float16", "bfloat16") else "float16"


def kv_candidates(requested: str, engine_dtypes: tuple[str, ...], spec: ModelSpec) -> list[str]:
    """``auto``: the checkpoint's 16-bit dtype and every quantized format the engine runs; otherwise the one asked for."""
    if requested == AUTO:
        return [native_kv_dtype(spec)] + [d for d in engine_dtypes if not KV_FORMATS[d].native]
    return [kv_format(requested).name]


def choose_kv(spec: ModelSpec, deployment: Deployment, kv_kl: dict[str, float], allocate_for: Callable[[int], object],
              smallest_weight_bytes: int) -> tuple[str, object, list[KVOption]]:
    """The format with the lowest predicted total, its allocation, and every format's outcome.

    ``allocate_for(weight_budget_bytes)`` is the exact allocation (an object with ``score``);
    ``smallest_weight_bytes`` the smallest plan's weights (infeasible below it)."""
    options, allocations = [], {}
    for dtype, kl in kv_kl.items():
        trial = replace(deployment, kv_dtype=dtype)
        budget = weight_budget_bytes(spec, trial)
        cache = kv_cache_bytes(spec, trial)
        if budget < smallest_weight_bytes:
            options.append(KVOption(dtype, cache, budget, kl, None,
                                    f"leaves {format_bytes(max(budget, 0))} for weights, the smallest plan needs "
                                    f"{format_bytes(smallest_weight_bytes)}"))
            continue
        allocations[dtype] = allocate_for(budget)
        options.append(KVOption(dtype, cache, budget, kl, float(allocations[dtype].score)))
    feasible = [o for o in options if o.weight_score_kl is not None]
    if not feasible:
        raise BitplanError(f"no KV cache format leaves room for the weights at context {deployment.context} x batch "
                           f"{deployment.batch} in {format_bytes(deployment.budget_bytes)} ({options[0].infeasible} with "
                           f"{options[0].dtype}): raise --budget or lower --context/--batch")
    best = min(feasible, key=lambda o: (o.total_kl, -o.kv_cache_bytes))
    return best.dtype, allocations[best.dtype], options


KV_COST_VERSION = 1  # the measurement's code (profiles.kv_cache, methods.kv_cache); part of the cache key


@dataclass(frozen=True)
class KVMeasured:
    """Measured costs of the candidate formats on calibration tokens, and the fp8_e4m3 scales."""

    kl: dict[str, float]
    tokens: int
    k_scales: tuple[float, ...] = ()
    v_scales: tuple[float, ...] = ()


def measure_kv(source, dtypes: list[str], calibration, use_cache: bool = True) -> KVMeasured:
    """Each format's KL on the calibration windows with the weights dense (cached under the model's
    hash, the tokens' hash, the formats and ``KV_COST_VERSION``); 16-bit formats cost 0 unmeasured."""
    import hashlib
    import json

    from bitplan.atomic import write_text_atomic
    from bitplan.models.source import cache_dir
    from bitplan.planner.refine import choose_meter
    from bitplan.profiles.calibration import calibration_windows
    from bitplan.profiles.kv_cache import measure_kv_costs
    from bitplan.profiles.text import tokens_hash

    quantized = [d for d in dtypes if not KV_FORMATS[d].native]
    if not quantized:
        return KVMeasured({d: 0.0 for d in dtypes}, 0)
    windows = calibration_windows(source.folder, calibration)
    key = hashlib.sha256(json.dumps([source.hash, tokens_hash(windows), sorted(quantized), KV_COST_VERSION]).encode()).hexdigest()[:24]
    path = cache_dir() / "kv" / f"{key}.json"
    if use_cache and path.is_file():
        data = json.loads(path.read_text())
    else:
        costs = measure_kv_costs(choose_meter(source), windows, quantized, source.spec.num_blocks)
        scales = next((c.rounding for c in costs.values() if c.rounding.k_scales), None)
        data = {"kl": {d: c.kl for d, c in costs.items()}, "tokens": int(windows.numel()),
                "k_scales": list(scales.k_scales) if scales else [], "v_scales": list(scales.v_scales) if scales else []}
        write_text_atomic(path, json.dumps(data, sort_keys=True))
    kl = {d: (0.0 if KV_FORMATS[d].native else float(data["kl"][d])) for d in dtypes}
    return KVMeasured(kl, int(data["tokens"]), tuple(data["k_scales"]), tuple(data["v_scales"]))
