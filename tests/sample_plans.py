"""Plans made by hand for tests (the API makes them the real way)."""

from bitplan.planner.deployment import Deployment, MemoryBreakdown
from bitplan.planner.plan import EngineRecord, ModelRef, Plan, Prediction, Provenance, SearchRecord
from bitplan.profiles.calibration import CalibrationSettings


def sample_plan(assignments: dict[str, str], model_hash: str = "ab", weight_bytes: int = 0, engine: str = "vllm",
                platform: str = "cuda-sm80", tensor_parallel: int = 1) -> Plan:
    return Plan(
        model=ModelRef("smollm2-135m", "llama", model_hash),
        deployment=Deployment(budget_bytes=10**9, tensor_parallel=tensor_parallel),
        target=None,
        assignments=dict(assignments),
        memory=MemoryBreakdown(weight_bytes, 0, 0, 0, 0),
        predicted=Prediction(score_kl=0.1),
        search=SearchRecord("hand-made", "optimal", 0.0, False, 10**9, "quality"),
        provenance=Provenance(model_hash, "cd", "0.1.0", 0, None, None, ("rtn-w4g64s",), CalibrationSettings()),
        engine=EngineRecord(engine, platform, "compressed-tensors"),
    )
