"""bitplan: a hardware-aware planner for mixed-precision quantization of LLMs.

    plan = bitplan.plan("smollm2-135m", budget="170MB", context=2048)
    bitplan.emit(plan, "out/smollm2-mixed")
    model = bitplan.load("out/smollm2-mixed")
    report = bitplan.evaluate("out/smollm2-mixed")

The API is imported on first use, so ``import bitplan.kernels`` stays light.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_API = {
    "BitplanError": "bitplan.errors",
    "plan": "bitplan.api",
    "profile": "bitplan.api",
    "emit": "bitplan.checkpoints.emit",
    "evaluate": "bitplan.checkpoints.evaluate",
    "load": "bitplan.checkpoints.load",
}
__all__ = [*_API, "__version__"]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'bitplan' has no attribute {name!r}")
