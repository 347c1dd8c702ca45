"""The Python API: ``plan``, ``emit``, ``load``, ``evaluate`` (and ``profile`` on its own).

Each is a plain function from the previous stage's product to its own; the CLI is a thin
layer over these.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bitplan import __version__
from bitplan.errors import BitplanError
from bitplan.methods.registry import COSTLY_DEFAULT_BITS, DEFAULT_METHODS, candidate_schemes, needs_calibration
from bitplan.methods.scheme import GROUP_SIZES, INTEGER_BITS, Scheme
from bitplan.engines import DEFAULT_ENGINE, PLATFORMS, get_rules
from bitplan.engines.rules import EngineRules, allowed, check_tensor_parallel, restrict_table
from bitplan.planner.emit import formats
from bitplan.planner.deployment import Deployment, default_overhead_bytes, memory_breakdown, parse_size, weight_budget_bytes
from bitplan.planner.objective import assignment_sum, check_objective, decode_time_matrix, latency_cost
from bitplan.planner.plan import Plan
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.planner.refine import refine
from bitplan.planner.search import allocate, check_feasible
from bitplan.planner.speed import decode_step_s
from bitplan.profiles.hardware import get_device
from bitplan.profiles.model_source import BUILTIN_MODELS, cache_dir, folder_hash, resolve_model
from bitplan.profiles.model_spec import ModelSpec, read_config, spec_from_config
from bitplan.profiles.sensitivity import SensitivityTable, cached_table, profile_sensitivity, table_key
from bitplan.profiles.text import builtin_slices, interleaved_windows, tokens_hash, user_slices

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
REFINE_WINDOWS = 4


@dataclass(frozen=True)
class CalibrationSettings:
    """Calibration text and its shape: ``samples`` windows of ``seq_len`` tokens."""

    texts: tuple[Path, ...] = ()  # empty: the built-in Python documentation
    samples: int = 16
    seq_len: int = 512


@dataclass(frozen=True)
class Candidates:
    """The schemes to profile. The default is every method (``DEFAULT_METHODS``) on the whole
    grid, except GPTQ, AWQ and HQQ, which are offered at 2-4 bits, symmetric (``costly_bits``;
    None gives them the whole grid). ``act_formats``: W8A8 activation formats the target runs
    natively (``plan`` narrows it to the target's)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    bits: tuple[int, ...] = INTEGER_BITS
    group_sizes: tuple[int, ...] = GROUP_SIZES
    symmetric: tuple[bool, ...] = (True, False)
    act_formats: tuple[str, ...] = ("int8", "fp8")
    costly_bits: tuple[int, ...] | None = COSTLY_DEFAULT_BITS

    def schemes(self, rules: EngineRules | None = None) -> list[Scheme]:
        """The candidate schemes; with ``rules``, only those some kernel of that engine runs."""
        schemes = candidate_schemes(self.methods, self.bits, self.group_sizes, self.symmetric,
                                    act_formats=self.act_formats, costly_bits=self.costly_bits)
        if rules is not None:
            schemes = [s for s in schemes if rules.takes(s)]
            if all(s.is_dense for s in schemes):
                raise BitplanError(f"no candidate scheme is left for {rules.key}: it runs "
                                   f"{'; '.join(rules.summary()[1:1 + len(rules.kernels)])}. Widen --methods/--bits/--groups, or pick another --engine")
        return schemes

    def for_device(self, device) -> "Candidates":
        """Only the W8A8 formats ``device`` runs natively (int8 or fp8 tensor cores)."""
        return replace(self, act_formats=tuple(f for f in self.act_formats if device.supports(f)))


def calibration_settings_from_plan(plan) -> CalibrationSettings:
    """The calibration a plan was made with (from its provenance)."""
    recorded = plan.provenance["calibration"]
    texts = () if isinstance(recorded["texts"], str) else tuple(Path(p) for p in recorded["texts"])
    return CalibrationSettings(texts, int(recorded["samples"]), int(recorded["seq_len"]))


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)


def calibration_windows(folder: Path, settings: CalibrationSettings, extra: int = 0) -> torch.Tensor:
    """``settings.samples + extra`` windows: the first ``samples`` profile, the rest are held in for refinement."""
    slices = user_slices(list(settings.texts)) if settings.texts else builtin_slices("calibration")
    return interleaved_windows(load_tokenizer(folder), slices, settings.seq_len, settings.samples + extra)


def profile(
    model: str,
    candidates: Candidates = Candidates(),
    calibration: CalibrationSettings = CalibrationSettings(),
    seed: int = 0,
    progress: Progress | None = None,
    use_cache: bool = True,
    rules: EngineRules | None = None,
) -> SensitivityTable:
    """Measure (or read from the cache) the sensitivity table of ``model`` for the candidates
    (those ``rules``' engine runs, when given)."""
    folder = resolve_model(model)
    config = read_config(folder)
    spec = spec_from_config(config)
    schemes = candidates.schemes(rules)
    tokens = calibration_windows(folder, calibration)[: calibration.samples]
    model_hash = folder_hash(folder)
    calibration_hash = tokens_hash(tokens)
    key = table_key(model_hash, calibration_hash, schemes, seed)
    path = cache_dir() / "profiles" / f"{key}.safetensors"
    cached = cached_table(path.parent, key, schemes) if use_cache else None
    if cached is not None:
        log.info("sensitivity table from the cache in %s", path.parent)
        return cached
    provenance = {"model_hash": model_hash, "calibration_hash": calibration_hash, "tokens": list(tokens.shape)}
    table = profile_sensitivity(folder, config, spec, schemes, tokens, seed=seed, progress=progress, provenance=provenance)
    table.save(path)
    return table


def model_source(model: str) -> str:
    """How a plan names its model: the built-in name, or the folder's absolute path."""
    return str(model) if str(model) in BUILTIN_MODELS else str(Path(model).resolve())


def make_deployment(spec: ModelSpec, budget: str | int | None, device, context: int, batch: int,
                    kv_dtype: str, tensor_parallel: int, overhead: str | int | None) -> Deployment:
    """A budget in bytes (or text such as '40GB'), or a target device whose usable memory is the budget."""
    if budget is None and device is None:
        raise BitplanError("give a memory budget (--budget 40GB) or a target device (--target h100-sxm)")
    budget_bytes = (parse_size(budget) if isinstance(budget, str) else int(budget)) if budget is not None else device.usable_memory_bytes
    if overhead is None:
        overhead_bytes = default_overhead_bytes(tensor_parallel) if device else 0
    else:
        overhead_bytes = parse_size(overhead, allow_zero=True) if isinstance(overhead, str) else int(overhead)
    return Deployment(budget_bytes=budget_bytes, context=context, batch=batch, kv_dtype=kv_dtype,
                      tensor_parallel=tensor_parallel, overhead_bytes=overhead_bytes)


def target_device(target: str | None):
    """The catalog device (or profile file) ``target`` names; None for no target or a platform name."""
    return get_device(target) if target and target not in PLATFORMS else None


def engine_rules(engine: str, target: str | None) -> EngineRules:
    """The rules of ``engine`` on the hardware ``target`` names (``bitplan.engines``)."""
    device = target_device(target)
    return get_rules(engine, target, device.compute_capability if device else "", device.arch if device else "")


def predicted_decode(spec: ModelSpec, choice: dict[str, str], device, deployment: Deployment) -> dict:
    """Roofline decode figures of an assignment on a device (``planner.speed``): one step at the
    deployment's batch and context, and one token at batch 1 and the same context."""
    schemes = {name: Scheme.parse(scheme) for name, scheme in choice.items()}
    step_s = decode_step_s(spec, schemes, device, deployment)
    single_s = decode_step_s(spec, schemes, device, replace(deployment, batch=1))
    return {"decode_step_ms": 1e3 * step_s, "decode_tokens_per_s": deployment.batch / step_s,
            "decode_ms_per_token_batch1": 1e3 * single_s, "speed_model": "roofline (bitplan.planner.speed)"}


def plan(
    model: str,
    budget: str | int | None = None,
    target: str | None = None,
    context: int = 2048,
    batch: int = 1,
    kv_dtype: str = "float16",
    tensor_parallel: int = 1,
    overhead: str | int | None = None,
    candidates: Candidates = Candidates(),
    calibration: CalibrationSettings = CalibrationSettings(),
    tie_fused: bool = False,
    trials: int = 16,
    seed: int = 0,
    progress: Progress | None = None,
    objective: str = "quality",
    engine: str = DEFAULT_ENGINE,
) -> Plan:
    """Profile (or reuse the cached profile), allocate exactly, refine with Optuna, return the Plan.

    ``engine`` (``bitplan.engines``) names what will serve the checkpoint; its rules on the
    ``target``'s hardware constrain the search (which schemes each layer may take, fused groups
    sharing one scheme, tensor-parallel shapes). ``objective`` (``planner.objective``):
    ``quality`` minimises predicted KL; ``speed`` and ``balanced`` add the predicted decode time
    on ``target``, which they therefore need.
    """
    device = target_device(target)
    rules = engine_rules(engine, target)
    if check_objective(objective) != "quality" and device is None:
        raise BitplanError(f"--objective {objective} predicts decode time on a device: pass --target NAME (see `bitplan devices`)")
    folder = resolve_model(model)
    config = read_config(folder)
    spec = spec_from_config(config)
    check_tensor_parallel(spec, rules, tensor_parallel)
    deployment = make_deployment(spec, budget, device, context, batch, kv_dtype, tensor_parallel, overhead)
    weight_budget = weight_budget_bytes(spec, deployment)
    if device is not None:
        candidates = candidates.for_device(device)
    tie_fused = tie_fused or rules.fused_share_scheme
    check_feasible(spec, candidates.schemes(rules), weight_budget, deployment.budget_bytes, tie_fused, allowed(rules, spec, tensor_parallel))
    table = restrict_table(profile(model, candidates, calibration, seed, progress, rules=rules), spec, rules, tensor_parallel)
    times = decode_time_matrix(spec, table.layers, table.schemes, table.bytes.numpy() >= 0, device, deployment) if device else None
    extra_cost = latency_cost(objective, table, times) if device else None
    allocation = allocate(table, spec, weight_budget, tie_fused, extra_cost=extra_cost)
    search = {"solver": "scipy.optimize.milp (HiGHS), exact multiple-choice knapsack", "status": allocation.status,
              "mip_gap": allocation.mip_gap, "tie_fused": tie_fused, "weight_budget_bytes": weight_budget,
              "objective": objective}
    predicted = {"score_kl": allocation.score, "metric": table.provenance.get("metric")}
    if trials > 0:
        held_in = calibration_windows(folder, calibration, REFINE_WINDOWS)[calibration.samples :]
        if len(held_in) == 0:
            held_in = calibration_windows(folder, calibration)[:REFINE_WINDOWS]
        meter = QualityMeter(load_dense_model(folder), spec)
        if needs_calibration(candidates.schemes(rules)):
            meter.calibrate(calibration_windows(folder, calibration)[: calibration.samples])
        refinement = refine(table, spec, weight_budget, tie_fused, meter, held_in, trials, seed, progress, extra_cost)
        allocation = refinement.allocation
        predicted.update(score_kl=allocation.score, calibration_kl=refinement.measured_kl, exact_calibration_kl=refinement.exact_kl)
        search.update(refine_trials=refinement.trials, refine_distinct_plans=refinement.distinct_plans, knobs=refinement.knobs,
                      refine_tokens=int(held_in.numel()))
    if device is not None:
        predicted.update(predicted_decode(spec, allocation.choice, device, deployment))
        predicted["linear_decode_ms"] = 1e3 * assignment_sum(table, allocation.choice, times)
    memory = memory_breakdown(spec, allocation.weight_bytes, deployment)
    return Plan(
        model={"source": model_source(model), "model_type": spec.model_type, "hash": table.provenance["model_hash"]},
        deployment=deployment.to_dict(),
        target=target,
        assignments=allocation.choice,
        memory=memory.to_dict(),
        predicted=predicted,
        search=search,
        formats=formats({name: Scheme.parse(s) for name, s in allocation.choice.items()}),
        engine={"name": rules.engine, "platform": rules.platform, "loader": rules.loader, "rules": rules.summary()},
        provenance={"model_hash": table.provenance["model_hash"], "calibration_hash": table.provenance["calibration_hash"],
                    "bitplan_version": __version__, "seed": seed, "metric": table.provenance.get("metric"),
                    "metric_version": table.provenance.get("metric_version"), "candidates": table.schemes,
                    "calibration": {"texts": [str(Path(p).resolve()) for p in calibration.texts] or "builtin:pydoc_data.topics",
                                    "samples": calibration.samples, "seq_len": calibration.seq_len}},
    )
