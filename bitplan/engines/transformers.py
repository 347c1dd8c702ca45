"""transformers (5.24, with compressed-tensors 0.20.1) loading a bitplan checkpoint: what it reads right.

``AutoModelForCausalLM.from_pretrained`` hands a compressed-tensors ``quantization_config`` to
compressed-tensors, which decompresses every quantized Linear back to a dense weight on load.
Measured here (``tests/checkpoints/test_transformers_loads.py`` keeps each claim honest; the
logits are compared with ``bitplan.load``'s on the real SmolLM2 weights):

- ``pack-quantized`` symmetric, 2/3/4/5/6/8 bits, groups 32/64/128 and per channel, mixed in one
  checkpoint with dense layers: loads, logits equal to ``bitplan.load``'s (max difference 0.0);
- ``pack-quantized`` asymmetric: fails, "size mismatch" on the packed ``weight_zero_point``
  (compressed-tensors expects ``[out, groups]``, the packed tensor is ``[ceil(out*b/32), groups]``);
- ``float-quantized`` W8A8-FP8 per channel and ``naive-quantized`` FP8 weight-only (per channel,
  per group): loads, logits equal;
- ``int-quantized`` W8A8 int8: loads, but compressed-tensors quantizes activations with
  ``absmax / 127.5`` where vLLM's kernel (and bitplan) use ``absmax / 127``: logits differ by up
  to 2.5, so the plan's measured quality would not be what transformers computes. Left out;
- NF4 (``bitplan-nf4``): compressed-tensors' config validation rejects the whole config. Left out.

transformers runs each HF Linear on its own (nothing is fused) on one device.
"""

from __future__ import annotations

from bitplan.engines.formats import Format
from bitplan.engines.rules import EngineRules, Kernel

MEASURED = "measured: tests/checkpoints/test_transformers_loads.py"

RULES = EngineRules(
    engine="transformers",
    platform="any",
    loader="compressed-tensors",
    kernels=(
        Kernel("compressed-tensors decompress (int)", MEASURED, frozenset({Format.PACKED}), frozenset({2, 3, 4, 5, 6, 8}),
               frozenset({0, 32, 64, 128}), frozenset({True})),
        Kernel("compressed-tensors decompress (fp8)", MEASURED, frozenset({Format.NAIVE}), frozenset({8}),
               frozenset({0, 32, 64, 128}), frozenset({True})),
        Kernel("compressed-tensors W8A8-FP8", MEASURED, frozenset({Format.FLOAT}), frozenset({8}), frozenset({0}),
               frozenset({True}), activations=frozenset({"fp8"})),
    ),
    fused_share_scheme=False,
    quantized_lm_head=True,
    tensor_parallel=False,
    sources={"lm_head": MEASURED, "fused": "transformers' Llama runs q/k/v and gate/up as separate nn.Linear"},
)
