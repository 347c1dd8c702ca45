"""bitplan: a hardware-aware planner for mixed-precision quantization of LLMs.

    plan = bitplan.plan("smollm2-135m", budget="150MB", context=2048)
    bitplan.emit(plan, "out/smollm2-mixed")
    model = bitplan.load("out/smollm2-mixed")
    report = bitplan.evaluate("out/smollm2-mixed")
"""

__version__ = "0.1.0"

from bitplan.errors import BitplanError  # noqa: E402
from bitplan.planner.api import plan, profile  # noqa: E402
from bitplan.planner.emit import emit  # noqa: E402
from bitplan.planner.evaluate import evaluate  # noqa: E402
from bitplan.planner.load import load  # noqa: E402

__all__ = ["BitplanError", "emit", "evaluate", "load", "plan", "profile", "__version__"]
