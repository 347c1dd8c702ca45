"""The ``moe`` command of :mod:`vllm_judge` (run in vLLM's own venv, never bitplan's): vLLM's
fused-MoE quantization method and expert-kernel selection asked about every MoE block of a
compressed-tensors checkpoint. See vllm_judge.py's usage."""

from __future__ import annotations

import copy
import importlib
import time
import traceback
import types

import torch
import vllm
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FusedMoEConfig, FusedMoEParallelConfig, RoutingMethodType
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors_moe import CompressedTensorsMoEMethod
from vllm.model_executor.models.interfaces import SupportsQuant
from vllm_judge import _err, _read_config
from vllm_judge_kernels import _setup

# architecture -> (vLLM module, where the block's FusedMoE sits, the checkpoint names vLLM passes
# as ckpt_names (gate, down, up), config keys of experts, experts per token, expert width).
# Sources: vllm/model_executor/models/{qwen3_moe,qwen2_moe,olmoe,mixtral}.py, FusedMoEFactory(...).
MOE_FAMILY = {
    "Qwen3MoeForCausalLM": ("qwen3_moe", "mlp.experts", ("gate_proj", "down_proj", "up_proj"),
                            "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "Qwen2MoeForCausalLM": ("qwen2_moe", "mlp.experts", ("gate_proj", "down_proj", "up_proj"),
                            "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "OlmoeForCausalLM": ("olmoe", "mlp.experts", ("gate_proj", "down_proj", "up_proj"),
                         "num_experts", "num_experts_per_tok", "intermediate_size"),
    "MixtralForCausalLM": ("mixtral", "block_sparse_moe.experts", ("w1", "w2", "w3"),
                           "num_local_experts", "num_experts_per_tok", "intermediate_size"),
}


def _experts_kernel(method) -> str | None:
    """The experts class (or backend) the method's oracle picked, where it records one."""
    for attr in ("experts_cls", "fp8_backend", "int8_backend", "wna16_backend", "moe_backend", "backend"):
        value = getattr(method, attr, None)
        if value is not None:
            return getattr(value, "__name__", None) or getattr(value, "value", None) or str(value)
    return None


def cmd_moe(args) -> dict:
    host, assumptions = _setup(args.capability)
    runs = [judge_moe(path, args.capability, args.dtype, args.layers, args.traceback) for path in args.path]
    out = runs[0] if len(runs) == 1 else {"vllm_version": vllm.__version__, "capability": args.capability, "runs": runs}
    out["host"], out["assumptions"] = host, assumptions
    return out


def judge_moe(path: str, capability: str, dtype_arg: str, layers: int | None, want_tb: bool) -> dict:
    t0 = time.time()
    hf, cfg_path = _read_config(path)
    arch = (hf.get("architectures") or [""])[0]
    if arch not in MOE_FAMILY:
        raise SystemExit(f"architecture {arch!r} is not a mixture of experts the judge knows: {sorted(MOE_FAMILY)}")
    module_name, experts_path, ckpt_names, experts_key, topk_key, width_key = MOE_FAMILY[arch]
    model_cls = getattr(importlib.import_module(f"vllm.model_executor.models.{module_name}"), arch)
    dt = (hf.get("torch_dtype") or hf.get("dtype") or "bfloat16") if dtype_arg == "auto" else dtype_arg
    dtype = getattr(torch, dt)
    out: dict = {"config": cfg_path, "capability": capability, "dtype": dt, "vllm_version": vllm.__version__, "blocks": []}
    try:
        qc = CompressedTensorsConfig.from_config(copy.deepcopy(hf["quantization_config"]))
        SupportsQuant._maybe_apply_model_mapping(types.SimpleNamespace(
            quant_config=qc, hf_to_vllm_mapper=getattr(model_cls, "hf_to_vllm_mapper", None),
            packed_modules_mapping=getattr(model_cls, "packed_modules_mapping", {})))
        out["config_ok"] = True
    except Exception as e:  # noqa: BLE001 - vLLM's refusal is the answer
        out.update(config_ok=False, config_error=_err(e), elapsed_s=round(time.time() - t0, 2))
        return out
    vc = VllmConfig()
    vc.model_config = types.SimpleNamespace(dtype=dtype, hf_config=None)
    blocks = hf["num_hidden_layers"] if layers is None else min(layers, hf["num_hidden_layers"])
    with set_current_vllm_config(vc):
        for block in range(blocks):
            prefix = f"model.layers.{block}.{experts_path}"
            moe = FusedMoEConfig(
                num_experts=hf[experts_key], experts_per_token=hf[topk_key], hidden_dim=hf["hidden_size"],
                intermediate_size=hf[width_key], num_local_experts=hf[experts_key], num_logical_experts=hf[experts_key],
                activation=MoEActivation.SILU, device="cpu", routing_method=RoutingMethodType.Renormalize,
                moe_parallel_config=FusedMoEParallelConfig.make_no_parallel(), in_dtype=dtype)
            # What RoutedExperts.__init__ reaches through resolve_quant_method -> CompressedTensorsConfig.get_quant_method
            # (compressed_tensors.py:215-216) for a RoutedExperts layer; the method's __init__ runs the kernel oracle.
            layer = types.SimpleNamespace(moe_config=moe, ckpt_gate_proj_name=ckpt_names[0], ckpt_down_proj_name=ckpt_names[1],
                                          ckpt_up_proj_name=ckpt_names[2])
            record: dict = {"module": prefix}
            try:
                method = CompressedTensorsMoEMethod.get_moe_method(qc, layer, prefix)
                record.update(ok=True, method=type(method).__name__, kernel=_experts_kernel(method))
                if record["kernel"] == "NONE":  # oracle/fp8.py:529-539: no backend on this platform (left for plugins)
                    record.update(ok=False, error="no FP8 MoE backend on this platform (Fp8MoeBackend.NONE, fused_moe/oracle/fp8.py:529-539)")
            except BaseException as e:  # noqa: BLE001 - vLLM's refusal is the answer
                if isinstance(e, KeyboardInterrupt):
                    raise
                record.update(ok=False, error=_err(e))
                if want_tb:
                    record["traceback"] = traceback.format_exc()
            out["blocks"].append(record)
    out["summary"] = {"blocks": len(out["blocks"]), "ok": sum(r["ok"] for r in out["blocks"]),
                      "methods": sorted({r.get("method") or "refused" for r in out["blocks"]})}
    out["elapsed_s"] = round(time.time() - t0, 2)
    return out
