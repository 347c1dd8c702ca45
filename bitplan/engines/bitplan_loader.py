"""bitplan's own loader (``bitplan.load``) and kernels: every scheme bitplan writes.

The reference kernel (dequantize, then ``F.linear``) runs any group size that divides a layer's
inputs; the Triton kernels take the same layouts (``bitplan/kernels``). This is the only engine
that reads NF4 (``bitplan-nf4``). It loads a model on one device. Checkpoints planned for it are
marked so that other loaders refuse them (see ``bitplan.checkpoints.emit``).
"""

from __future__ import annotations

from bitplan.engines.formats import Format
from bitplan.engines.rules import EngineRules, Kernel

SOURCE = "bitplan/kernels/reference.py and bitplan/kernels/launch.py"
ALL_GROUPS = frozenset({0, 32, 64, 128})

RULES = EngineRules(
    engine="bitplan",
    platform="any",
    loader="bitplan",
    kernels=(
        Kernel("bitplan int", SOURCE, frozenset({Format.PACKED}), frozenset({2, 3, 4, 5, 6, 8}), ALL_GROUPS, frozenset({True, False})),
        Kernel("bitplan nf4", SOURCE, frozenset({Format.NF4}), frozenset({4}), frozenset({32, 64, 128}), frozenset({True})),
        Kernel("bitplan fp8", SOURCE, frozenset({Format.NAIVE}), frozenset({8}), ALL_GROUPS, frozenset({True})),
        Kernel("bitplan W8A8-FP8", SOURCE, frozenset({Format.FLOAT}), frozenset({8}), frozenset({0}), frozenset({True}),
               activations=frozenset({"fp8"})),
        Kernel("bitplan W8A8 int8", SOURCE, frozenset({Format.INT}), frozenset({8}), frozenset({0}), frozenset({True}),
               activations=frozenset({"int8"})),
    ),
    fused_share_scheme=False,
    quantized_lm_head=True,
    tensor_parallel=False,
    sources={"lm_head": SOURCE, "fused": "bitplan.load keeps every HF Linear separate"},
)
