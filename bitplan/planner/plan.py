"""Plan: the product of the search, saved as plan.json.

Every part is a typed, frozen dataclass with ``to_dict``/``from_dict``. The file is canonical
JSON (sorted keys, no timestamps, optional figures left out when absent), so the same inputs and
seed give the same bytes. ``integrity`` is the sha256 of everything else: a plan edited by hand
is refused by ``emit`` with a message saying so. A plan file of another schema version is
refused with one line naming both versions.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from bitplan.atomic import json_digest, sealed_json, write_text_atomic
from bitplan.errors import BitplanError
from bitplan.methods.scheme import Scheme
from bitplan.planner.deployment import Deployment, MemoryBreakdown
from bitplan.planner.limits import SliceLimits
from bitplan.profiles.calibration import CalibrationSettings

SCHEMA_VERSION = 2  # 2: the engine the plan was made for (name, platform, rules enforced)


def _compact(data: dict) -> dict:
    """A dataclass's dict without the optional fields it does not hold."""
    return {key: value for key, value in data.items() if value is not None}


def _build(cls, data: dict):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise TypeError(f"{cls.__name__} has no field {', '.join(unknown)}")
    return cls(**data)


@dataclass(frozen=True)
class ModelRef:
    """Which model: the built-in name or the folder's absolute path, its type, its weights' hash."""

    source: str
    model_type: str
    hash: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelRef":
        return _build(cls, data)


@dataclass(frozen=True)
class Prediction:
    """What the plan is expected to cost in quality (nats/token) and, with a target, in time."""

    score_kl: float
    metric: str | None = None
    calibration_kl: float | None = None  # measured on held-in calibration tokens (refinement)
    exact_calibration_kl: float | None = None  # the exact allocation's, on the same tokens
    validation_kl: float | None = None  # measured on held-back calibration tokens the search never chose on
    exact_validation_kl: float | None = None  # the exact allocation's, on those tokens
    calibrated_kl: float | None = None  # score_kl through planner.score_calibration: expected KL on unseen text
    calibrated_within: float | None = None  # the calibration's stated factor (fitted plans' largest ratio either way)
    decode_step_ms: float | None = None
    decode_tokens_per_s: float | None = None
    decode_ms_per_token_batch1: float | None = None
    decode_weight_bytes_batch1: float | None = None  # weights one token reads: a mixture of experts' active experts only
    linear_decode_ms: float | None = None
    speed_model: str | None = None
    kv_cache_kl: float | None = None  # the KV cache format's own measured cost, added to the weights'

    def to_dict(self) -> dict:
        return _compact(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "Prediction":
        return _build(cls, data)


@dataclass(frozen=True)
class SearchRecord:
    """How the assignment was found: the exact solver's outcome and the refinement's."""

    solver: str
    status: str
    mip_gap: float
    tie_fused: bool
    weight_budget_bytes: int
    objective: str
    refine_trials: int | None = None  # the measured search's trials (the exact plan's and one per generation)
    refine_distinct_plans: int | None = None
    refine_tokens: int | None = None  # the held-in pool's tokens the search draws its windows from
    knobs: dict | None = None  # plans of bitplan before the measured search: per-kind score multipliers (no longer written)
    refine_candidates: int | None = None  # plans the search measured, on any number of tokens
    refine_measured_tokens: int | None = None  # tokens those measurements ran
    refine_stopped_by: str | None = None  # "trials", "clock" (--search-minutes) or "no moves"
    refine_seconds: float | None = None  # the search's wall-clock seconds, recorded only when the clock ended it
    search_minutes: float | None = None  # the time budget given
    slice_bounds: dict | None = None  # each limited slice's bound on predicted KL (``planner.slices``)
    uniform_scheme: str | None = None  # the best uniform plan relative slice limits refer to
    method_factors: dict | None = None  # each method's probe and the factor its scores were scaled by (``planner.method_factors``)
    refine_validation_tokens: int | None = None  # held-back tokens the kept plan was confirmed on
    refine_kept: str | None = None  # the kept plan: "search", "exact" or "probe <method>" (the best on the held-back tokens)
    refine_search_gain: list | None = None  # the best searched plan's held-back gain over the best baseline and its standard error

    def to_dict(self) -> dict:
        return _compact(asdict(self))

    @classmethod
    def from_dict(cls, data: dict) -> "SearchRecord":
        return _build(cls, data)


@dataclass(frozen=True)
class Provenance:
    """Where the plan came from: the model and calibration hashes, the code, the seed, the candidates."""

    model_hash: str
    calibration_hash: str
    bitplan_version: str
    seed: int
    metric: str | None
    metric_version: int | None
    candidates: tuple[str, ...]
    calibration: CalibrationSettings

    def to_dict(self) -> dict:
        return {**{f.name: getattr(self, f.name) for f in fields(self)}, "candidates": list(self.candidates),
                "calibration": self.calibration.to_dict()}

    @classmethod
    def from_dict(cls, data: dict) -> "Provenance":
        return _build(cls, {**data, "candidates": tuple(data["candidates"]),
                            "calibration": CalibrationSettings.from_dict(data["calibration"])})


@dataclass(frozen=True)
class EngineRecord:
    """The engine and platform the plan obeys, and its rules in words."""

    name: str
    platform: str
    loader: str
    rules: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        return {**asdict(self), "rules": list(self.rules)}

    @classmethod
    def from_dict(cls, data: dict) -> "EngineRecord":
        return _build(cls, {**data, "rules": tuple(data.get("rules", ()))})


@dataclass(frozen=True)
class KVCacheRecord:
    """The KV cache format the search chose, what it costs, and what the engine needs to run it.

    ``k_scales``/``v_scales``: fp8_e4m3's per-layer scales (emit writes them as the checkpoint's
    ``self_attn.k_scale``/``v_scale``); ``options``: every candidate format's outcome
    (``planner.kv_choice.KVOption``); ``engine_flags``: what to pass the engine at run time."""

    dtype: str
    kl: float
    tokens: int
    options: tuple[dict, ...] = ()
    k_scales: tuple[float, ...] = ()
    v_scales: tuple[float, ...] = ()
    engine_flags: str = ""

    def to_dict(self) -> dict:
        return {**asdict(self), "options": [dict(o) for o in self.options], "k_scales": list(self.k_scales),
                "v_scales": list(self.v_scales)}

    @classmethod
    def from_dict(cls, data: dict) -> "KVCacheRecord":
        return _build(cls, {**data, "options": tuple(data.get("options", ())), "k_scales": tuple(data.get("k_scales", ())),
                            "v_scales": tuple(data.get("v_scales", ()))})


@dataclass(frozen=True)
class FormatCount:
    format: str
    layers: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Plan:
    """Every layer's scheme, what the deployment costs, and where the plan came from."""

    model: ModelRef
    deployment: Deployment
    target: str | None  # catalog device or platform, or None for a bare byte budget
    assignments: dict[str, str]  # layer name -> scheme name
    memory: MemoryBreakdown
    predicted: Prediction
    search: SearchRecord
    provenance: Provenance
    engine: EngineRecord
    formats: dict[str, FormatCount] = field(default_factory=dict)  # scheme -> checkpoint format, layers
    kv_cache: KVCacheRecord | None = None
    slice_limits: SliceLimits | None = None  # --max-slice-kl / --max-slice-regression, as given
    predicted_slice_kl: dict[str, float] | None = None  # each calibration slice's predicted KL (nats/token)
    schema_version: int = SCHEMA_VERSION
    integrity: str = field(default="", compare=False)
    search_seconds: float | None = field(default=None, compare=False)  # this run's measured search, for the CLI; not in plan.json

    def schemes(self) -> dict[str, Scheme]:
        return {name: Scheme.parse(scheme).check() for name, scheme in self.assignments.items()}

    def body(self) -> dict:
        return {"model": self.model.to_dict(), "deployment": self.deployment.to_dict(), "target": self.target,
                "assignments": dict(self.assignments), "memory": self.memory.to_dict(), "predicted": self.predicted.to_dict(),
                "search": self.search.to_dict(), "provenance": self.provenance.to_dict(), "engine": self.engine.to_dict(),
                "formats": {name: count.to_dict() for name, count in self.formats.items()}, "schema_version": self.schema_version,
                **({"kv_cache": self.kv_cache.to_dict()} if self.kv_cache else {}),
                **({"slice_limits": self.slice_limits.to_dict()} if self.slice_limits else {}),
                **({"predicted_slice_kl": dict(sorted(self.predicted_slice_kl.items()))} if self.predicted_slice_kl else {})}

    def to_json(self) -> str:
        return sealed_json(self.body())

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, data: dict, integrity: str = "") -> "Plan":
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown fields {', '.join(unknown)}")
        return cls(model=ModelRef.from_dict(data["model"]), deployment=Deployment.from_dict(data["deployment"]),
                   target=data["target"], assignments=dict(data["assignments"]), memory=MemoryBreakdown.from_dict(data["memory"]),
                   predicted=Prediction.from_dict(data["predicted"]), search=SearchRecord.from_dict(data["search"]),
                   provenance=Provenance.from_dict(data["provenance"]), engine=EngineRecord.from_dict(data["engine"]),
                   formats={name: FormatCount(**count) for name, count in data.get("formats", {}).items()},
                   kv_cache=KVCacheRecord.from_dict(data["kv_cache"]) if data.get("kv_cache") else None,
                   slice_limits=SliceLimits.from_dict(data["slice_limits"]) if "slice_limits" in data else None,
                   predicted_slice_kl=dict(data["predicted_slice_kl"]) if "predicted_slice_kl" in data else None,
                   schema_version=data["schema_version"], integrity=integrity)


def load_plan(path: Path) -> Plan:
    """Read and check a plan.json: valid JSON, known schema, untampered, every scheme known."""
    path = Path(path)
    if not path.is_file():
        raise BitplanError(f"plan file {path} does not exist: write one with `bitplan plan MODEL --budget ... --out {path}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BitplanError(f"{path} is not valid JSON ({exc}): re-create it with `bitplan plan`") from exc
    if not isinstance(data, dict) or "schema_version" not in data:
        raise BitplanError(f"{path} is not a bitplan plan (no schema_version): re-create it with `bitplan plan`")
    if data["schema_version"] != SCHEMA_VERSION:
        raise BitplanError(f"{path} has plan schema version {data['schema_version']}, this bitplan reads version {SCHEMA_VERSION} "
                           f"(version 2 records the engine the plan was made for): re-create it with `bitplan plan`")
    stored = data.pop("integrity", "")
    if json_digest(data) != stored:
        raise BitplanError(f"{path} was modified after bitplan wrote it (integrity hash mismatch): re-run `bitplan plan` rather than editing the plan")
    try:
        plan = Plan.from_dict(data, integrity=stored)
        plan.schemes()
    except (TypeError, KeyError, ValueError) as exc:
        raise BitplanError(f"{path} has unexpected or missing fields ({exc}): re-create it with `bitplan plan`") from exc
    return plan
