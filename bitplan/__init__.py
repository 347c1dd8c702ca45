"""bitplan: a hardware-aware planner for mixed-precision quantization of LLMs."""

__version__ = "0.1.0"
