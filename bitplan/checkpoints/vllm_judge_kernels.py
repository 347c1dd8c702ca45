"""The ``kernels`` command of :mod:`vllm_judge` (run in vLLM's own venv, never bitplan's): vLLM's
scheme and kernel selection asked about every Linear of a checkpoint. See vllm_judge.py's usage."""

from __future__ import annotations

import copy
import importlib
import re
import sys
import time
import traceback
import types

import torch
import vllm
import vllm.distributed.parallel_state as ps
from vllm.config import VllmConfig, set_current_vllm_config
from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
    CompressedTensorsConfig,
    CompressedTensorsKVCacheMethod,
)
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models import llama as vllm_llama
from vllm.model_executor.models.interfaces import SupportsQuant
from vllm_judge import LLAMA_FAMILY, _err, _read_config


def _host_info() -> dict:
    import torch

    info: dict = {}
    try:
        flags = open("/proc/cpuinfo").read()
        info["cpu_avx512f"] = " avx512f" in flags
        info["cpu_avx512_bf16"] = "avx512_bf16" in flags
        info["cpu_amx_tile"] = "amx_tile" in flags
        info["cpu_vendor_amd"] = "AuthenticAMD" in flags
    except OSError:
        pass
    info["torch_avx512"] = bool(torch.cpu._is_avx512_supported())
    info["torch_avx512_bf16"] = bool(torch.cpu._is_avx512_bf16_supported())
    info["torch_amx"] = bool(torch.cpu._is_amx_tile_supported())
    return info


def _install_fake_cuda(capability: int) -> list[str]:
    """Make vLLM believe it runs on a CUDA device of the given capability.

    vLLM's modules were imported under the real (CPU) platform, which they bound with
    `from vllm.platforms import current_platform`; rebind that name everywhere.
    """
    import vllm.platforms as P

    cpu_platform = P.current_platform
    # vllm/platforms/cuda.py imports a CUDA-only extension at import time.
    sys.modules.setdefault("vllm._C_stable_libtorch", types.ModuleType("vllm._C_stable_libtorch"))
    from vllm.platforms.cuda import CudaPlatformBase
    from vllm.platforms.interface import DeviceCapability

    major, minor = divmod(capability, 10)

    class JudgeCudaPlatform(CudaPlatformBase):
        @classmethod
        def get_device_capability(cls, device_id: int = 0):
            return DeviceCapability(major=major, minor=minor)

        @classmethod
        def get_device_name(cls, device_id: int = 0) -> str:
            return f"judge-sm{capability}"

        @classmethod
        def get_device_total_memory(cls, device_id: int = 0) -> int:
            return 80 << 30

    fake = JudgeCudaPlatform()
    P._current_platform = fake
    for name, mod in list(sys.modules.items()):
        if name.startswith("vllm") and getattr(mod, "current_platform", None) is cpu_platform:
            mod.current_platform = fake

    # Capability probes compiled into the CUDA _C extension (absent from a CPU wheel).
    # Answers follow csrc/quantization/w8a8/cutlass/scaled_mm_entry.cu for a CUDA>=12.8 build.
    import vllm._custom_ops as ops

    ops.cutlass_scaled_mm_supports_fp8 = lambda cc: cc >= 89
    ops.cutlass_scaled_mm_supports_block_fp8 = lambda cc: cc >= 90
    ops.cutlass_group_gemm_supported = lambda cc: cc >= 90
    ops.cutlass_scaled_mm_supports_fp4 = lambda cc: cc >= 100
    from vllm.model_executor.layers.quantization.utils import w8a8_utils

    w8a8_utils.CUTLASS_BLOCK_FP8_SUPPORTED = w8a8_utils.cutlass_block_fp8_supported()
    return [
        f"platform: vllm CudaPlatformBase with capability {major}.{minor} (no GPU present)",
        "compiled probes: cutlass_scaled_mm_supports_fp8 = cc>=89, "
        "cutlass_scaled_mm_supports_block_fp8 = cc>=90, cutlass_group_gemm_supported = cc>=90, "
        "cutlass_scaled_mm_supports_fp4 = cc>=100 (csrc scaled_mm_entry.cu, CUDA>=12.8 build)",
        "optional packages as importable in this venv (humming, flashinfer, conch, deep_gemm): "
        "a deployment that installs them may get a different kernel",
    ]


class _FakeTPGroup:
    def __init__(self, world_size: int):
        self.world_size = world_size
        self.rank_in_group = 0
        self.rank = 0
        self.ranks = list(range(world_size))
        self.local_rank = 0
        self.is_first_rank = True
        self.is_last_rank = True


def _kernel_of(scheme) -> object | None:
    for attr in ("kernel", "fp8_linear", "linear_kernel"):
        k = getattr(scheme, attr, None)
        if k is not None:
            return k
    return None


def _scheme_fingerprint(d) -> str | None:
    if not d:
        return None
    parts = []
    for key in ("weights", "input_activations", "output_activations"):
        v = d.get(key)
        parts.append(v.model_dump_json() if v is not None else "null")
    parts.append(str(d.get("format")))
    return "|".join(parts)


def _setup(capability: str) -> tuple[dict, list[str]]:
    """Install the platform for ``capability``; return what the host is and what was assumed."""
    host = _host_info()
    assumptions: list[str] = []
    if capability == "cpu":
        from vllm.platforms import current_platform

        assumptions.append(f"platform: this host ({type(current_platform).__name__})")
        host["vllm_C_library"] = (
            "_C (AVX512+BF16/AMX build)" if host["torch_avx512_bf16"]
            else "_C_AVX512" if host["torch_avx512"] else "_C_AVX2"
        )
        host["op_cpu_gemm_wna16"] = hasattr(torch.ops._C, "cpu_gemm_wna16")
        host["op_int8_scaled_mm_with_quant"] = hasattr(torch.ops._C, "int8_scaled_mm_with_quant")
        host["op_fp8_scaled_mm_cpu"] = hasattr(torch.ops._C, "fp8_scaled_mm_cpu")
    else:
        assumptions += _install_fake_cuda(int(capability))
    return host, assumptions


def cmd_kernels(args) -> dict:
    host, assumptions = _setup(args.capability)
    tps = [int(x) for x in str(args.tp).split(",")]
    runs = []
    for path in args.path:
        path, _, own_tp = path.partition("@")  # PATH@TP judges that path at that tp only
        for tp in ([int(own_tp)] if own_tp else tps):
            runs.append(judge(path, args.capability, tp, args.dtype, args.layers, args.traceback))
    if len(runs) == 1:
        out = runs[0]
        out["host"] = host
        out["assumptions"] = assumptions
        return out
    return {"vllm_version": vllm.__version__, "capability": args.capability, "host": host, "assumptions": assumptions, "runs": runs}


def judge(path: str, capability: str, tp: int, dtype_arg: str,
          layers: int | None, want_tb: bool) -> dict:
    t0 = time.time()

    hf, cfg_path = _read_config(path)
    qcfg = hf.get("quantization_config")
    out: dict = {"config": cfg_path, "capability": capability, "tp": tp,
                 "vllm_version": vllm.__version__}
    if qcfg is None:
        raise SystemExit(f"{cfg_path} has no quantization_config")
    # bitplan's converted SmolLM2 has "architectures": null; vLLM then goes by model_type.
    arch = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in LLAMA_FAMILY:
        raise SystemExit(f"architecture {arch} is not llama-family; supported: {sorted(LLAMA_FAMILY)}")
    module_name, qkv_bias = LLAMA_FAMILY[arch]
    vllm_models = importlib.import_module(f"vllm.model_executor.models.{module_name}")
    model_cls = getattr(vllm_models, arch, None) or vllm_llama.LlamaForCausalLM

    if dtype_arg == "auto":
        # vLLM's dtype="auto": the checkpoint's dtype (x86 CPUs list bf16, fp16 and fp32).
        dt = hf.get("torch_dtype") or hf.get("dtype") or "bfloat16"
    else:
        dt = dtype_arg
    dtype = getattr(torch, dt)
    out["dtype"] = dt

    # Model-derived shapes (llama family).
    hidden = hf["hidden_size"]
    inter = hf["intermediate_size"]
    n_heads = hf["num_attention_heads"]
    n_kv = hf.get("num_key_value_heads") or n_heads
    head_dim = hf.get("head_dim") or hidden // n_heads
    n_layers = hf["num_hidden_layers"]
    vocab = hf["vocab_size"]
    tied = bool(hf.get("tie_word_embeddings", False))
    attn_bias = bool(hf.get("attention_bias", False)) if qkv_bias is None else qkv_bias
    mlp_bias = bool(hf.get("mlp_bias", False))
    n_blocks = n_layers if layers is None else min(layers, n_layers)

    vc = VllmConfig()
    vc.model_config = types.SimpleNamespace(dtype=dtype, hf_config=None)

    modules: list[dict] = []
    out["modules"] = modules
    try:
        qc = CompressedTensorsConfig.from_config(copy.deepcopy(qcfg))
        # What SupportsQuant.__new__ does when vLLM instantiates the model class.
        SupportsQuant._maybe_apply_model_mapping(
            types.SimpleNamespace(
                quant_config=qc,
                hf_to_vllm_mapper=getattr(model_cls, "hf_to_vllm_mapper", None),
                packed_modules_mapping=getattr(model_cls, "packed_modules_mapping", {}),
            )
        )
        out["config_ok"] = True
    except Exception as e:  # vLLM refuses the quantization_config itself
        out["config_ok"] = False
        out["config_error"] = _err(e)
        out["elapsed_s"] = round(time.time() - t0, 2)
        return out
    packed = dict(qc.packed_modules_mapping)
    out["packed_modules_mapping"] = packed
    try:
        CompressedTensorsKVCacheMethod.validate_kv_cache_scheme(qc.kv_cache_scheme)
        out["kv_cache"] = {"scheme": qc.kv_cache_scheme, "ok": True}
    except Exception as e:
        out["kv_cache"] = {"scheme": qc.kv_cache_scheme, "ok": False, "error": _err(e)}

    old_tp = ps._TP
    ps._TP = _FakeTPGroup(tp)
    old_default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)

    def build(name: str, members: list[str], ctor) -> None:
        rec: dict = {"module": name, "hf_members": members}
        try:
            with torch.device("meta"):
                layer = ctor()
            rec["vllm_layer"] = type(layer).__name__
            in_pp = getattr(layer, "input_size_per_partition", None)
            outs = getattr(layer, "output_partition_sizes", None)
            rec["partition"] = {"in_features": in_pp, "out_features": outs}
            scheme = getattr(layer, "scheme", None)
            rec["quant_method"] = type(layer.quant_method).__name__
            rec["scheme"] = type(scheme).__name__ if scheme is not None else None
            k = _kernel_of(scheme) if scheme is not None else None
            rec["kernel"] = type(k).__name__ if k is not None else None
            rec["ok"] = True
            rec["error"] = None
            # Fused layers: vLLM matches the fused name to the FIRST shard's target when every
            # shard matches some target (compressed_tensors/utils.py _match_fused_layer); it
            # raises only when some shards are ignored.  Ask vLLM's own matcher for each shard
            # and flag shards whose scheme differs from the one vLLM applied to the fused layer.
            if len(members) > 1:
                fused = _scheme_fingerprint(qc.get_scheme_dict(layer, name))
                shard_fps = {}
                for m in members:
                    shard_fps[m] = _scheme_fingerprint(qc.get_scheme_dict(layer, m))
                differing = [m for m, fp in shard_fps.items() if fp != fused]
                if differing:
                    rec["ok"] = False
                    rec["error"] = (
                        "judge: shards resolve to different compressed-tensors schemes; vLLM 0.32 "
                        "builds the fused layer with the first shard's scheme, so weight loading "
                        "fails (bare AssertionError in parameter.py load_qkv_weight / "
                        "load_merged_column_weight) or, where tensor shapes agree, runs the other "
                        f"shards with the wrong scheme (differing: {differing})"
                    )
        except BaseException as e:  # noqa: BLE001 - vLLM's refusal is the answer
            if isinstance(e, KeyboardInterrupt):
                raise
            rec["ok"] = False
            rec["error"] = _err(e)
            if want_tb:
                rec["traceback"] = traceback.format_exc()
        modules.append(rec)

    try:
        with set_current_vllm_config(vc):
            pre = "model.embed_tokens"
            # LlamaModel builds VocabParallelEmbedding without a prefix (layer_name "").
            build(pre, [pre], lambda: VocabParallelEmbedding(vocab, hidden, quant_config=qc))
            modules[-1]["note"] = "vLLM's LlamaModel passes no prefix: matched as layer_name ''"
            for i in range(n_blocks):
                p = f"model.layers.{i}"
                build(
                    f"{p}.self_attn.qkv_proj",
                    [f"{p}.self_attn.{s}" for s in packed.get("qkv_proj", ["q_proj", "k_proj", "v_proj"])],
                    lambda: QKVParallelLinear(
                        hidden_size=hidden,
                        head_size=head_dim,
                        total_num_heads=n_heads,
                        total_num_kv_heads=n_kv,
                        bias=attn_bias,
                        quant_config=qc,
                        prefix=f"{p}.self_attn.qkv_proj",
                    ),
                )
                build(
                    f"{p}.self_attn.o_proj",
                    [f"{p}.self_attn.o_proj"],
                    lambda: RowParallelLinear(
                        input_size=n_heads * head_dim,
                        output_size=hidden,
                        bias=bool(hf.get("bias_o_proj", attn_bias if qkv_bias is None else False)),
                        quant_config=qc,
                        prefix=f"{p}.self_attn.o_proj",
                    ),
                )
                # Same arguments LlamaMLP passes; judged one by one so one refusal hides nothing.
                build(
                    f"{p}.mlp.gate_up_proj",
                    [f"{p}.mlp.{s}" for s in packed.get("gate_up_proj", ["gate_proj", "up_proj"])],
                    lambda: MergedColumnParallelLinear(
                        input_size=hidden,
                        output_sizes=[inter] * 2,
                        bias=mlp_bias,
                        quant_config=qc,
                        prefix=f"{p}.mlp.gate_up_proj",
                    ),
                )
                build(
                    f"{p}.mlp.down_proj",
                    [f"{p}.mlp.down_proj"],
                    lambda: RowParallelLinear(
                        input_size=inter,
                        output_size=hidden,
                        bias=mlp_bias,
                        quant_config=qc,
                        prefix=f"{p}.mlp.down_proj",
                    ),
                )
            build("lm_head", ["lm_head"], lambda: ParallelLMHead(vocab, hidden, quant_config=qc, prefix="lm_head"))
            lm = modules[-1]
            if tied:
                lm["note"] = (
                    "tie_word_embeddings: LlamaForCausalLM still builds ParallelLMHead with "
                    "quant_config, then calls lm_head.quant_method.tie_weights(embed_tokens)"
                )
    finally:
        ps._TP = old_tp
        torch.set_default_dtype(old_default)

    n_ok = sum(1 for m in modules if m["ok"])
    kernels: dict[str, int] = {}
    errors: dict[str, int] = {}
    for m in modules:
        key = f"{m.get('scheme')}/{m.get('kernel')}"
        kernels[key] = kernels.get(key, 0) + 1
        if not m["ok"]:
            first = re.sub(r"layers\.\d+\.", "layers.N.", (m["error"] or "").splitlines()[0])[:300]
            errors[first] = errors.get(first, 0) + 1
    out["summary"] = {
        "modules": len(modules),
        "ok": n_ok,
        "refused": len(modules) - n_ok,
        "all_ok": n_ok == len(modules) and out.get("kv_cache", {}).get("ok", True),
        "scheme_kernel_counts": kernels,
        "distinct_errors": errors,
    }
    out["elapsed_s"] = round(time.time() - t0, 2)
    return out
