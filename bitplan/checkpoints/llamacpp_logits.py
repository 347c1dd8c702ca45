"""llama.cpp's logits for given token ids, through ctypes on ``libllama`` (no retokenisation): what
the engine itself computes from a GGUF file, to compare with bitplan's own dequantized model.
``exact_attention`` keeps an F32 KV cache and flash attention off (an F32 GGUF then matches
transformers in float32 to 1e-4)."""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch

from bitplan.checkpoints.llamacpp import LlamaCppBuild, default_threads, find_llama_cpp
from bitplan.errors import BitplanError


class _Batch(ctypes.Structure):
    """``struct llama_batch`` (include/llama.h, b11434)."""

    _fields_ = [("n_tokens", ctypes.c_int32), ("token", ctypes.POINTER(ctypes.c_int32)), ("embd", ctypes.c_void_p),
                ("pos", ctypes.POINTER(ctypes.c_int32)), ("n_seq_id", ctypes.POINTER(ctypes.c_int32)),
                ("seq_id", ctypes.POINTER(ctypes.POINTER(ctypes.c_int32))), ("logits", ctypes.POINTER(ctypes.c_int8))]


class _ModelParams(ctypes.Structure):
    """``struct llama_model_params`` (include/llama.h, b11434)."""

    _fields_ = [("devices", ctypes.c_void_p), ("tensor_buft_overrides", ctypes.c_void_p), ("n_gpu_layers", ctypes.c_int32),
                ("split_mode", ctypes.c_int), ("load_mode", ctypes.c_int), ("lazy_mode", ctypes.c_int), ("main_gpu", ctypes.c_int32),
                ("tensor_split", ctypes.c_void_p), ("progress_callback", ctypes.c_void_p), ("progress_callback_user_data", ctypes.c_void_p),
                ("kv_overrides", ctypes.c_void_p), ("vocab_only", ctypes.c_bool), ("check_tensors", ctypes.c_bool),
                ("use_extra_bufts", ctypes.c_bool), ("no_host", ctypes.c_bool), ("no_alloc", ctypes.c_bool), ("load_mtp", ctypes.c_bool)]


class _ContextParams(ctypes.Structure):
    """``struct llama_context_params`` (include/llama.h, b11434)."""

    _fields_ = [*[(n, ctypes.c_uint32) for n in ("n_ctx", "n_batch", "n_ubatch", "n_seq_max", "n_rs_seq", "n_outputs_max", "n_outputs_max_per_seq")],
                ("n_threads", ctypes.c_int32), ("n_threads_batch", ctypes.c_int32),
                *[(n, ctypes.c_int) for n in ("ctx_type", "rope_scaling_type", "pooling_type", "attention_type", "flash_attn_type")],
                *[(n, ctypes.c_float) for n in ("rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow")],
                ("yarn_orig_ctx", ctypes.c_uint32), ("defrag_thold", ctypes.c_float), ("cb_eval", ctypes.c_void_p),
                ("cb_eval_user_data", ctypes.c_void_p), ("type_k", ctypes.c_int), ("type_v", ctypes.c_int),
                ("abort_callback", ctypes.c_void_p), ("abort_callback_data", ctypes.c_void_p),
                *[(n, ctypes.c_bool) for n in ("embeddings", "offload_kqv", "no_perf", "op_offload", "swa_full", "kv_unified")],
                ("samplers", ctypes.c_void_p), ("n_samplers", ctypes.c_size_t), ("ctx_other", ctypes.c_void_p)]


_LOG_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
_QUIET = _LOG_CALLBACK(lambda level, text, data: None)  # kept alive for the process: llama.cpp holds the pointer


def _libllama(build: LlamaCppBuild) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build.bin_dir / "libllama.so"))
    signatures = {
        "llama_backend_init": (None, []), "llama_log_set": (None, [_LOG_CALLBACK, ctypes.c_void_p]),
        "llama_model_default_params": (_ModelParams, []), "llama_context_default_params": (_ContextParams, []),
        "llama_model_load_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _ModelParams]),
        "llama_init_from_model": (ctypes.c_void_p, [ctypes.c_void_p, _ContextParams]),
        "llama_model_get_vocab": (ctypes.c_void_p, [ctypes.c_void_p]), "llama_vocab_n_tokens": (ctypes.c_int32, [ctypes.c_void_p]),
        "llama_get_memory": (ctypes.c_void_p, [ctypes.c_void_p]), "llama_memory_clear": (None, [ctypes.c_void_p, ctypes.c_bool]),
        "llama_batch_init": (_Batch, [ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]), "llama_batch_free": (None, [_Batch]),
        "llama_decode": (ctypes.c_int32, [ctypes.c_void_p, _Batch]),
        "llama_get_logits_ith": (ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p, ctypes.c_int32]),
        "llama_free": (None, [ctypes.c_void_p]), "llama_model_free": (None, [ctypes.c_void_p]),
    }
    for name, (restype, argtypes) in signatures.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    return lib


def _context_params(lib: ctypes.CDLL, seq_len: int, threads: int, exact_attention: bool) -> _ContextParams:
    params = lib.llama_context_default_params()
    # the defaults of llama_context_default_params (src/llama-context.cpp) confirm the struct layout
    assert (params.n_ctx, params.n_batch, params.type_k, params.offload_kqv, params.no_perf) == (512, 2048, 1, True, True)
    params.n_ctx = params.n_batch = params.n_ubatch = seq_len
    params.n_outputs_max = params.n_outputs_max_per_seq = 0  # 0 = every position may output logits
    params.n_threads = params.n_threads_batch = threads
    if exact_attention:
        params.type_k = params.type_v = 0  # GGML_TYPE_F32 cache
        params.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED: the CPU kernel rounds Q and K/V to F16
    return params


def _decode_window(lib: ctypes.CDLL, context: int, batch: _Batch, window: np.ndarray, n_vocab: int) -> np.ndarray:
    lib.llama_memory_clear(lib.llama_get_memory(context), True)
    batch.n_tokens = len(window)
    for position, token in enumerate(window.tolist()):
        batch.token[position], batch.pos[position], batch.n_seq_id[position] = token, position, 1
        batch.seq_id[position][0], batch.logits[position] = 0, 1
    status = lib.llama_decode(context, batch)
    if status != 0:
        raise BitplanError(f"llama_decode returned {status} for a window of {len(window)} tokens")
    return np.stack([np.ctypeslib.as_array(lib.llama_get_logits_ith(context, i), (n_vocab,)).copy() for i in range(len(window))])


def llama_logits(gguf_path: str | os.PathLike, tokens: torch.Tensor, threads: int | None = None,
                 exact_attention: bool = True, build: LlamaCppBuild | None = None) -> torch.Tensor:
    """llama.cpp's float32 logits ``[windows, seq, vocab]`` for int token ids ``[windows, seq]``, each
    window decoded from an empty KV cache at positions 0..seq-1 (no BOS added), CPU backend.

    Exact: ``llama_get_logits_ith`` of ``libllama.so`` (as tools/results does), no text in between.
    ``exact_attention`` (default): F32 KV cache and no flash attention. llama.cpp's defaults (F16
    cache, CPU flash attention, which rounds Q/K/V to F16) move SmolLM2's logits by up to 0.03
    against float32; with this, an F32 GGUF matches transformers float32 to 1e-4. What remains for
    quantized weights is ggml's own matmul: activations are rounded to the weight type's
    ``vec_dot_type`` (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for Q4_1/Q5_1, Q8_K for k-quants, F16/BF16)."""
    build = build or find_llama_cpp()
    tokens = torch.as_tensor(tokens).reshape(-1, tokens.shape[-1]).numpy().astype(np.int32)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read by libgomp when libggml-cpu loads it (tool_environment)
    lib = _libllama(build)
    lib.llama_log_set(_QUIET, None)
    lib.llama_backend_init()
    model = lib.llama_model_load_from_file(str(gguf_path).encode(), lib.llama_model_default_params())
    if not model:
        raise BitplanError(f"llama.cpp could not load {gguf_path}: run llama-completion -m {gguf_path} to see why")
    context = batch = None
    try:
        n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        context = lib.llama_init_from_model(model, _context_params(lib, tokens.shape[1], threads or default_threads(), exact_attention))
        if not context:
            raise BitplanError(f"llama.cpp could not create a context of {tokens.shape[1]} tokens for {gguf_path}")
        batch = lib.llama_batch_init(tokens.shape[1], 0, 1)
        logits = [_decode_window(lib, context, batch, window, n_vocab) for window in tokens]
    finally:
        if batch is not None:
            lib.llama_batch_free(batch)
        if context:
            lib.llama_free(context)
        lib.llama_model_free(model)
    return torch.from_numpy(np.stack(logits))

