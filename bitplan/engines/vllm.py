"""vLLM 0.32 serving compressed-tensors checkpoints: which kernels run which schemes, per platform.

Read from vLLM 0.32's own selection code (paths under ``vllm/``; ``CT`` is
``model_executor/layers/quantization/compressed_tensors/``, ``KL`` is
``model_executor/kernels/linear/``) and checked by running it: ``bitplan/checkpoints/vllm_judge.py
kernels`` asks vLLM's scheme and kernel selection about every Linear of a checkpoint, for sm_80
and sm_90 under a stand-in CUDA platform and for this CPU for real (``tests/checkpoints/test_vllm_judges.py``).

- Weight-only integers (``CompressedTensorsWNA16``, CT/schemes/compressed_tensors_wNa16.py:36-53)
  accept 2..8 bits in the config, but only 4- and 8-bit ones find a kernel (KL/__init__.py:523-548):
  without the optional Humming package, 2/3/5/6-bit layers fail with "Failed to find a kernel".
- CUDA tries Machete (sm_90 only: 4/8-bit, symmetric or with zero points, groups 64/128/channel,
  K % 64 and N % 128; KL/mixed_precision/machete.py:28-52), then Marlin (4-bit symmetric or with
  zero points, 8-bit symmetric, groups 32/64/128/channel; tiles are zero-padded since 0.32;
  KL/mixed_precision/marlin.py:36-69). A group may not straddle a tensor-parallel partition
  (``verify_group_size_divides_partition``, distributed/utils.py:65-80).
- The CPU build tries ``CPUWNA16`` (4-bit only, K and N per partition multiples of 32,
  KL/mixed_precision/cpu.py:26-55), whose GEMM ``cpu_gemm_wna16`` exists only in the AVX-512
  builds of ``vllm._C`` (not ``_C_AVX2``) and only for bf16/fp16 activations.
- W8A8 int8 (``CompressedTensorsW8A8Int8``): CUTLASS on CUDA, oneDNN (``CPUInt8``) on CPUs, per
  channel with dynamic per-token activations (CT/compressed_tensors.py:532-548).
- W8A8-FP8 needs compute capability 8.9: below it vLLM silently serves the checkpoint as
  weight-only FP8 (CT/compressed_tensors.py:893-912), so the activation rounding the plan measured
  would not happen; it is not offered on sm_80. On sm_90 CUTLASS FP8; on CPU
  ``ChannelWiseTorchFP8`` (measured on AVX-512; slow).
- Weight-only FP8 per channel runs through Marlin FP8 on CUDA (no CPU kernel); per group it is
  refused everywhere (``AttributeError`` at CT/compressed_tensors.py:516).
- q/k/v and gate/up are one fused Linear (models/llama.py:475-478): all shards must take one
  scheme (CT/utils.py:53-70 raises for ignored-or-not shards; differing groups fail at weight
  load, model_executor/parameter.py:197). A quantized ``lm_head`` needs an explicit target
  (CT/compressed_tensors.py:186-195) and follows the same kernel rules; embeddings stay dense.

Mixture of experts (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral): a block's experts are one
``RoutedExperts`` layer whose method ``CompressedTensorsMoEMethod.get_moe_method`` picks
(CT/compressed_tensors_moe/compressed_tensors_moe.py:26-201), and whose constructor runs the
expert-kernel oracle (``layers/fused_moe/oracle/``). Checked by running that selection
(``vllm_judge.py moe``) on Qwen3-30B-A3B's shapes for sm_80, sm_90 and this CPU
(``tests/checkpoints/test_vllm_moe.py``):

- one scheme per block: gate, up and down of expert 0 must resolve to the same scheme
  (compressed_tensors_moe.py:44-55 raises "All MoE projections need to have same quantization
  scheme"); the other experts are not looked up but load into the same ``[experts, N, K]``
  tensors under that one method (compressed_tensors_moe_wna16.py:151-195), so every expert of
  a block takes one scheme;
- weight-only integers: pack-quantized only (compressed_tensors_moe.py:90-103); on CUDA the
  Marlin MoE kernel (oracle/int_wna16.py:126-143, 207-226): 4-bit symmetric or with zero points,
  8-bit symmetric, groups 32/64/128/channel, hidden size % 128, a group dividing the expert
  width per partition (utils/marlin_utils.py:356-387); where Marlin's shape rule fails, the
  Triton WNA16 MoE kernel (oracle/int_wna16.py:194-205): 4-bit, 8-bit symmetric, groups only
  (per channel asserts, compressed_tensors_moe_wna16.py:125-127); 3-bit and asymmetric 8-bit
  find no backend;
- W8A8 int8 (per channel, dynamic per token): Triton fused MoE on CUDA (oracle/int8.py);
- W8A8 FP8: CUTLASS/Triton on sm_90; on sm_80 Marlin FP8 runs it weight-only (as for Linears,
  not offered there); weight-only FP8 is refused for MoE ("only format: pack-quantized");
- CPU: every quantized MoE kernel needs AMX tiles (fused_moe/experts/cpu_moe.py:840-846 int4,
  1000-1006 int8; 457-461 FP8 block-128 only) and an AMX host is not one of bitplan's CPU
  platforms: experts stay dense (``CPUUnquantizedExperts``, cpu_moe.py:144-145). On this AVX-512
  host vLLM refuses int4/int8 MoE ("No WNA16 MoE backend supports the deployment configuration").
"""

from __future__ import annotations

from bitplan.engines.formats import Format
from bitplan.engines.rules import EngineRules, Kernel

WNA16 = "vllm/model_executor/layers/quantization/compressed_tensors/schemes/compressed_tensors_wNa16.py"
FUSED = ("vllm/model_executor/models/llama.py:475-478 packed_modules_mapping; compressed_tensors/utils.py:53-70 "
         "'vLLM requires all to use the same scheme'")
LM_HEAD = "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors.py:186-195 (explicit lm_head target)"
CHANNEL_AND_GROUPS = frozenset({0, 32, 64, 128})
BOTH = frozenset({True, False})
SYMMETRIC = frozenset({True})

MACHETE = Kernel("Machete WNA16", "vllm/model_executor/kernels/linear/mixed_precision/machete.py:28-52",
                 frozenset({Format.PACKED}), frozenset({4, 8}), frozenset({0, 64, 128}), BOTH, k_multiple=64, n_multiple=128)
MARLIN_INT4 = Kernel("Marlin WNA16 int4", "vllm/model_executor/kernels/linear/mixed_precision/marlin.py:36-69",
                     frozenset({Format.PACKED}), frozenset({4}), CHANNEL_AND_GROUPS, BOTH)
MARLIN_INT8 = Kernel("Marlin WNA16 int8", "vllm/model_executor/layers/quantization/utils/marlin_utils.py:48-95 (uint8b128 only)",
                     frozenset({Format.PACKED}), frozenset({8}), CHANNEL_AND_GROUPS, SYMMETRIC)
CUTLASS_INT8 = Kernel("CUTLASS W8A8 int8", "vllm/model_executor/kernels/linear/scaled_mm/cutlass.py:34-45",
                      frozenset({Format.INT}), frozenset({8}), frozenset({0}), SYMMETRIC, activations=frozenset({"int8"}))
CUTLASS_FP8 = Kernel("CUTLASS W8A8 FP8 (cc >= 8.9)", "vllm/model_executor/kernels/linear/__init__.py:443-476",
                     frozenset({Format.FLOAT}), frozenset({8}), frozenset({0}), SYMMETRIC, activations=frozenset({"fp8"}))
MARLIN_FP8 = Kernel("Marlin FP8 weight-only", "vllm/model_executor/kernels/linear/__init__.py:506-521",
                    frozenset({Format.NAIVE}), frozenset({8}), frozenset({0}), SYMMETRIC)
CPU_WNA16 = Kernel("CPUWNA16 int4 (AVX-512 build)", "vllm/model_executor/kernels/linear/mixed_precision/cpu.py:26-55",
                   frozenset({Format.PACKED}), frozenset({4}), CHANNEL_AND_GROUPS, BOTH, k_multiple=32, n_multiple=32)
CPU_INT8 = Kernel("CPUInt8 W8A8 (oneDNN)", "vllm/model_executor/kernels/linear/scaled_mm/cpu.py:33-45",
                  frozenset({Format.INT}), frozenset({8}), frozenset({0}), SYMMETRIC, activations=frozenset({"int8"}))
CPU_FP8 = Kernel("ChannelWiseTorchFP8 W8A8", "vllm/model_executor/kernels/linear/scaled_mm/pytorch.py:37-49,199-210",
                 frozenset({Format.FLOAT}), frozenset({8}), frozenset({0}), SYMMETRIC, activations=frozenset({"fp8"}))


# KV cache formats (--kv-cache-dtype; fp8_e4m3 with per-layer scales read from a compressed-tensors kv_cache_scheme,
# vllm/model_executor/layers/attention/attention.py:280-291).
KV_CUDA = ("vllm/v1/attention/backends/flash_attn.py:288-294 (FlashAttention: fp8_e4m3), "
           "triton_attn.py:302-312 (Triton backend: fp8_e4m3, fp8_e5m2)")
KV_CPU = "vllm/v1/attention/backends/cpu_attn.py:57-62 (CPU attention: fp8, fp8_e4m3, fp8_e5m2)"
KV_DTYPES = ("float16", "bfloat16", "fp8_e4m3", "fp8_e5m2")

CT_MOE = "vllm/model_executor/layers/quantization/compressed_tensors/compressed_tensors_moe/"
EXPERTS_SHARE = (f"{CT_MOE}compressed_tensors_moe.py:44-55 'All MoE projections need to have same quantization scheme'; "
                 f"{CT_MOE}compressed_tensors_moe_wna16.py:151-195 (all experts in one [experts, N, K] tensor)")
MARLIN_MOE_INT4 = Kernel("Marlin MoE int4", "vllm/model_executor/layers/fused_moe/oracle/int_wna16.py:126-143,207-226; "
                         "quantization/utils/marlin_utils.py:356-387", frozenset({Format.PACKED}), frozenset({4}), CHANNEL_AND_GROUPS,
                         BOTH, hidden_multiple=128)
MARLIN_MOE_INT8 = Kernel("Marlin MoE int8", "vllm/model_executor/layers/fused_moe/oracle/int_wna16.py:126-143,207-226 (uint8b128 only)",
                         frozenset({Format.PACKED}), frozenset({8}), CHANNEL_AND_GROUPS, SYMMETRIC, hidden_multiple=128)
TRITON_MOE_WNA16_INT4 = Kernel("Triton WNA16 MoE int4", "vllm/model_executor/layers/fused_moe/oracle/int_wna16.py:194-205; "
                               f"{CT_MOE}compressed_tensors_moe_wna16.py:125-127 (groups only)",
                               frozenset({Format.PACKED}), frozenset({4}), frozenset({32, 64, 128}), BOTH)
TRITON_MOE_WNA16_INT8 = Kernel("Triton WNA16 MoE int8", "vllm/model_executor/layers/fused_moe/oracle/int_wna16.py:194-205; "
                               f"{CT_MOE}compressed_tensors_moe_wna16.py:125-127 (groups only)",
                               frozenset({Format.PACKED}), frozenset({8}), frozenset({32, 64, 128}), SYMMETRIC)
TRITON_MOE_INT8 = Kernel("Triton MoE W8A8 int8", f"{CT_MOE}compressed_tensors_moe_w8a8_int8.py; fused_moe/oracle/int8.py",
                         frozenset({Format.INT}), frozenset({8}), frozenset({0}), SYMMETRIC, activations=frozenset({"int8"}))
CUTLASS_MOE_FP8 = Kernel("CUTLASS/Triton MoE W8A8 FP8 (cc >= 8.9)", f"{CT_MOE}compressed_tensors_moe_w8a8_fp8.py; fused_moe/oracle/fp8.py",
                         frozenset({Format.FLOAT}), frozenset({8}), frozenset({0}), SYMMETRIC, activations=frozenset({"fp8"}))
CPU_MOE_DENSE = ("vllm/model_executor/layers/fused_moe/experts/cpu_moe.py:840-846,1000-1006 (quantized CPU MoE kernels need AMX "
                 "tiles; on AVX-512/AVX2 hosts 'No WNA16 MoE backend supports the deployment configuration')")


def _rules(platform: str, *kernels: Kernel, experts: tuple[Kernel, ...] = ()) -> EngineRules:
    cpu = platform.startswith("cpu")
    return EngineRules("vllm", platform, "compressed-tensors", kernels, fused_share_scheme=True, quantized_lm_head=True,
                       tensor_parallel=True, sources={"fused": FUSED, "lm_head": LM_HEAD, "bits": WNA16, "experts_share": EXPERTS_SHARE,
                                                      "experts": CPU_MOE_DENSE if cpu else f"{CT_MOE}compressed_tensors_moe.py:26-201"},
                       kv_cache_dtypes=KV_DTYPES, kv_cache_source=KV_CPU if cpu else KV_CUDA, expert_kernels=experts)


RULES = {
    "cuda-sm80": _rules("cuda-sm80", MARLIN_INT4, MARLIN_INT8, CUTLASS_INT8, MARLIN_FP8,
                        experts=(MARLIN_MOE_INT4, MARLIN_MOE_INT8, TRITON_MOE_WNA16_INT4, TRITON_MOE_WNA16_INT8, TRITON_MOE_INT8)),
    "cuda-sm90": _rules("cuda-sm90", MACHETE, MARLIN_INT4, MARLIN_INT8, CUTLASS_INT8, CUTLASS_FP8, MARLIN_FP8,
                        experts=(MARLIN_MOE_INT4, MARLIN_MOE_INT8, TRITON_MOE_WNA16_INT4, TRITON_MOE_WNA16_INT8, TRITON_MOE_INT8,
                                 CUTLASS_MOE_FP8)),
    "cpu-avx2": _rules("cpu-avx2", CPU_INT8),
    "cpu-avx512": _rules("cpu-avx512", CPU_WNA16, CPU_INT8, CPU_FP8),
}
