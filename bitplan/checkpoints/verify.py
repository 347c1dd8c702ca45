"""Engines as judges: open an emitted checkpoint with the engine itself and compare its numbers
with ``bitplan.load``'s on the same tokens.

- transformers: ``AutoModelForCausalLM.from_pretrained(checkpoint)`` (compressed-tensors
  decompresses the Linears), logits on held-out windows against ``bitplan.load``'s;
- vLLM: its own kernel selection for the plan's platform (``vllm_judge.py kernels``), and, on
  a CPU platform, ``vllm.LLM`` loading and greedy-decoding, scored token by token against
  ``bitplan.load`` (``vllm_judge.py generate``). vLLM cannot share bitplan's venv (it pins an
  older transformers and compressed-tensors), so the judge script runs in vLLM's own Python,
  given by ``--vllm-python`` or ``$BITPLAN_VLLM_PYTHON`` (``make engines`` creates one).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from bitplan.errors import BitplanError

JUDGE_SCRIPT = Path(__file__).with_name("vllm_judge.py")
LOGIT_TOLERANCE = 1e-3  # both sides decode the same integers with the same scales in float32


@dataclass(frozen=True)
class Agreement:
    """What an engine did with a checkpoint and how close its numbers are to ``bitplan.load``'s."""

    engine: str
    loaded_by: str
    ok: bool
    detail: str
    tokens: int = 0
    max_logit_diff: float | None = None
    top1_agreement: float | None = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def heldout_tokens(checkpoint: Path, windows: int = 2, seq_len: int = 128) -> torch.Tensor:
    """A few windows of held-out text, tokenized by the checkpoint's own tokenizer."""
    from transformers import AutoTokenizer

    from bitplan.profiles.text import builtin_slices, interleaved_windows

    tokenizer = AutoTokenizer.from_pretrained(checkpoint, trust_remote_code=False)
    return interleaved_windows(tokenizer, builtin_slices("heldout"), seq_len, windows)


def transformers_agreement(checkpoint: str | os.PathLike, tokens: torch.Tensor | None = None) -> Agreement:
    """Load ``checkpoint`` with ``AutoModelForCausalLM`` and compare logits with ``bitplan.load``."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from bitplan.checkpoints.load import load

    checkpoint = Path(checkpoint)
    kv_scheme = json.loads((checkpoint / "config.json").read_text()).get("quantization_config", {}).get("kv_cache_scheme")
    if kv_scheme:
        # measured: transformers 5.24 + compressed-tensors 0.20.1 load such a checkpoint but their logits differ from an
        # fp8 cache's by whole nats (5.99 on SmolLM2), so they are no judge of it (engines.transformers allows no such cache)
        raise BitplanError(f"{checkpoint} keeps its KV cache in fp8 (kv_cache_scheme), which transformers does not run as vLLM "
                           "does: check it with --engine vllm, or plan for transformers (--engine transformers) to judge it there")
    tokens = heldout_tokens(checkpoint) if tokens is None else tokens
    who = f"transformers {metadata.version('transformers')} AutoModelForCausalLM, compressed-tensors {metadata.version('compressed-tensors')}"
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32, trust_remote_code=False).eval()
    except Exception as error:  # the engine's refusal is the finding
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return Agreement("transformers", who, False, f"refused: {type(error).__name__}: {first[:300]}")
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    with torch.no_grad():
        theirs = model(tokens).logits
        ours = load(checkpoint)(tokens).logits
    diff = float((theirs - ours).abs().max())
    top1 = float((theirs.argmax(-1) == ours.argmax(-1)).double().mean())
    ok = diff <= LOGIT_TOLERANCE
    detail = f"logits within {diff:.3g} of bitplan.load's" + ("" if ok else f" (tolerance {LOGIT_TOLERANCE})")
    return Agreement("transformers", who, ok, detail, int(tokens.numel()), diff, top1)


def vllm_python(explicit: str | os.PathLike | None = None) -> Path:
    """The Python of vLLM's venv: the argument, or ``$BITPLAN_VLLM_PYTHON``."""
    candidate = explicit or os.environ.get("BITPLAN_VLLM_PYTHON")
    if not candidate or not Path(candidate).is_file():
        raise BitplanError("vLLM runs in its own venv: run `make engines` and pass --vllm-python .venv-vllm/bin/python "
                           "(or set BITPLAN_VLLM_PYTHON)")
    return Path(candidate)


def run_judge(python: Path, *args: str, timeout_s: float = 900, env: dict[str, str] | None = None) -> dict:
    """Run ``vllm_judge.py`` in vLLM's Python (``env``: vLLM settings on top of this environment); its JSON answer."""
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "ERROR", "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    result = subprocess.run([str(python), str(JUDGE_SCRIPT), *args], capture_output=True, text=True, timeout=timeout_s, env=env)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        raise BitplanError(f"vLLM's judge failed (exit {result.returncode}): {' | '.join(tail)}")
    return json.loads(result.stdout)


JUDGE_CAPABILITY = {"cuda-sm80": "80", "cuda-sm90": "90", "cpu-avx2": "cpu", "cpu-avx512": "cpu"}


def vllm_kernel_agreement(checkpoint: str | os.PathLike, python: Path, platform: str, tp: int = 1) -> Agreement:
    """vLLM's own scheme and kernel selection for every (fused) Linear of ``checkpoint`` on ``platform``.

    Needs only config.json: for a CUDA platform the judge stands in a CUDA platform of that compute
    capability (no GPU needed), for a CPU platform it asks this machine's vLLM build."""
    answer = run_judge(python, "kernels", str(checkpoint), "--capability", JUDGE_CAPABILITY[platform], "--tp", str(tp))
    who = f"vLLM {answer.get('vllm_version', '?')} scheme and kernel selection ({platform}, tp {tp})"
    if not answer.get("config_ok", True):
        return Agreement("vllm", who, False, f"refused the quantization_config: {answer.get('config_error')}")
    summary = answer["summary"]
    kernels = ", ".join(f"{k} x{n}" for k, n in sorted(summary["scheme_kernel_counts"].items()))
    detail = f"{summary['ok']}/{summary['modules']} modules accepted ({kernels})"
    if not summary["all_ok"]:
        first = next(m for m in answer["modules"] if not m["ok"])
        detail += f"; first refusal: {first['module']}: {(first.get('error') or '').splitlines()[0][:300]}"
    return Agreement("vllm", who, bool(summary["all_ok"]), detail, extra={"modules": summary["modules"], "refused": summary["refused"]})


def quantization_groups(checkpoint: Path) -> list[dict]:
    """The ``config_groups`` of the checkpoint's compressed-tensors ``quantization_config`` (none: [])."""
    config = json.loads((checkpoint / "config.json").read_text()).get("quantization_config", {})
    return list(config.get("config_groups", {}).values())


def int4_weights(checkpoint: Path) -> bool:
    """Whether the checkpoint's quantization_config stores some Linear as 4-bit integers."""
    return any((g.get("weights") or {}).get("num_bits") == 4 and (g.get("weights") or {}).get("type") == "int"
               for g in quantization_groups(checkpoint))


def logprob_tolerance(checkpoint: Path) -> tuple[float, float]:
    """(mean, max) |Δ log-probability| allowed between vLLM on a CPU and ``bitplan.load``.

    vLLM runs bf16 activations and its own per-token activation rounding; measured on SmolLM2
    (3 prompts x 24 tokens): int4 and W8A8 int8 mean 0.025-0.035, max 0.12-0.42 (the max of 72
    tokens is heavy-tailed: 0.24 and 0.42 for two plans of the same kind); W8A8-FP8 mean
    0.053-0.062, max 0.33-0.40, where vLLM's own bf16 and fp32 runs already differ by 0.062. The
    mean's bound is about 1.5x its largest measurement, the max's a little above its own; a layout
    error (a transposed scale, a zero point off by one) moves log-probabilities by whole nats.
    On a host with AMX tiles vLLM's CPU int8 W8A8 GEMMs take oneDNN's AMX path, which rounds
    otherwise: the same int4 + W8A8 plan measured mean 0.057, max 0.27 on such a host (Sapphire
    Rapids class, 2 cores); its mean bound there is 0.08. These bounds hold with vLLM's int4 run weight-only
    (``VLLM_CPU_INT4_W4A8=0``): by default an AMX host quantizes int4 Linears' activations to int8 as well, which is
    not the model bitplan planned (a 4-bit SmolLM2 plan: mean 0.098 that way, 0.023 weight-only)."""
    groups = quantization_groups(checkpoint)
    fp8 = any((g.get("weights") or {}).get("type") == "float" for g in groups)
    int8_activations = any((g.get("input_activations") or {}).get("type") == "int" for g in groups)
    if fp8:
        return 0.1, 0.6
    return (0.08, 0.5) if int8_activations and bool(torch.cpu._is_amx_tile_supported()) else (0.05, 0.5)


def vllm_generation_agreement(checkpoint: str | os.PathLike, python: Path, prompts: list[list[int]] | None = None,
                              max_tokens: int = 24, dtype: str = "bfloat16", int4_w4a8: bool = False) -> Agreement:
    """``vllm.LLM`` loads ``checkpoint`` on this CPU and greedy-decodes; ``bitplan.load`` scores the same
    sequences (teacher-forced) and the chosen tokens' log-probabilities are compared. vLLM runs int4 weight-only,
    as planned (``VLLM_CPU_INT4_W4A8=0``); ``int4_w4a8`` True keeps vLLM's default, under which a host with AMX
    tiles runs int4 weights with int8 activations (:data:`W4A8_NOTE`; measured on SmolLM2, a 4-bit plan: mean
    |Δ log-prob| 0.098 that way, 0.023 weight-only)."""
    import tempfile

    from bitplan.checkpoints.load import load

    checkpoint = Path(checkpoint)
    prompts = prompts or [row[:16].tolist() for row in heldout_tokens(checkpoint, windows=3, seq_len=64)]
    with tempfile.TemporaryDirectory() as scratch:
        prompt_file = Path(scratch) / "prompts.json"
        prompt_file.write_text(json.dumps(prompts))
        answer = run_judge(python, "generate", str(checkpoint), "--prompts", str(prompt_file), "--max-tokens", str(max_tokens),
                           "--dtype", dtype, env={"VLLM_CPU_INT4_W4A8": "1" if int4_w4a8 else "0"})
    model = load(checkpoint)
    deltas, greedy_equal, total = [], 0, 0
    for prompt, result in zip(prompts, answer["results"]):
        sequence = torch.tensor([prompt + result["token_ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(sequence).logits[0].double(), dim=-1)
        for step, (token, theirs) in enumerate(zip(result["token_ids"], result["logprobs"])):
            position = len(prompt) + step - 1
            deltas.append(abs(float(logprobs[position, token]) - theirs))
            greedy_equal += int(int(logprobs[position].argmax()) == token)
            total += 1
    mean_bound, max_bound = logprob_tolerance(checkpoint)
    mean_delta, max_delta = sum(deltas) / len(deltas), max(deltas)
    ok = mean_delta <= mean_bound and max_delta <= max_bound
    who = (f"vllm.LLM on this CPU ({dtype}, VLLM_CPU_INT4_W4A8={int(int4_w4a8)}), load {answer['load_s']} s, "
           f"generate {answer['generate_s']} s")
    detail = (f"{total} greedy tokens: bitplan.load picks the same token at {greedy_equal}; |Δ log-prob| mean {mean_delta:.3f} "
              f"(bound {mean_bound}), max {max_delta:.3f} (bound {max_bound})")
    if not int4_w4a8 and int4_weights(checkpoint) and bool(torch.cpu._is_amx_tile_supported()):
        detail += f". Note: {W4A8_NOTE}"
    return Agreement("vllm", who, ok, detail, total, top1_agreement=greedy_equal / total,
                     extra={"mean_abs_logprob_diff": mean_delta, "max_abs_logprob_diff": max_delta})


VLLM_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}  # vLLM's fused Linears
LINEAR_TOLERANCE = 0.02  # max |Δ| / max |y| per module: vLLM rounds its output to bf16 (measured <= 0.005 on SmolLM2)


W4A8_NOTE = ("vLLM 0.32 on a CPU with AMX tiles runs pack-quantized int4 Linears with int8 activations per token "
             "(VLLM_CPU_INT4_W4A8, default 1; kernels/linear/mixed_precision/cpu.py use_w4a8): set VLLM_CPU_INT4_W4A8=0 there "
             "to serve the weight-only int4 that bitplan planned and measured")


def vllm_linear_agreement(checkpoint: str | os.PathLike, python: Path, tokens: int = 8, int4_w4a8: bool = False) -> Agreement:
    """``vllm.LLM`` loads ``checkpoint`` on this CPU and applies every Linear it built (fused q/k/v and gate/up
    included, with the weights it loaded and repacked for its kernel) to a seeded bf16 input; ``bitplan.load``'s
    modules apply to the same input must give the same output within :data:`LINEAR_TOLERANCE` of its scale.
    This isolates decoding (codes, scales and their signs, zero points, packing) from bf16 activations,
    which move whole-model log-probabilities by a few hundredths of a nat (:func:`logprob_tolerance`). vLLM runs
    int4 weight-only here unless ``int4_w4a8`` (:data:`W4A8_NOTE`): its W4A8 path is not a decoding of the weights."""
    import tempfile

    from safetensors import safe_open

    from bitplan.checkpoints.load import load

    checkpoint = Path(checkpoint)
    model = load(checkpoint)
    ours = dict(model.named_modules())
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "linears.safetensors"
        answer = run_judge(python, "linears", str(checkpoint), "--out", str(out), "--tokens", str(tokens),
                           env={"VLLM_CPU_INT4_W4A8": "1" if int4_w4a8 else "0"})
        worst, worst_module, failures, kernels, worst_of = 0.0, None, [], {}, {}
        with safe_open(out, "pt") as f:
            for module in answer["modules"]:
                name = module["module"]
                prefix, _, leaf = name.rpartition(".")
                members = [f"{prefix}.{part}" for part in VLLM_FUSED.get(leaf, (leaf,))]
                if any(member not in ours for member in members):
                    failures.append(f"{name}: bitplan.load has no {', '.join(m for m in members if m not in ours)}")
                    continue
                x, theirs = f.get_tensor(f"{name}.x").float(), f.get_tensor(f"{name}.y").float()
                with torch.no_grad():
                    mine = torch.cat([ours[member](x) for member in members], dim=-1).float()
                if mine.shape != theirs.shape:
                    failures.append(f"{name}: vLLM gives {tuple(theirs.shape)}, bitplan {tuple(mine.shape)}")
                    continue
                error = float((mine - theirs).abs().max() / mine.abs().max().clamp_min(1e-12))
                kind = module["kernel"] or module["method"]
                kernels[kind] = kernels.get(kind, 0) + 1
                worst_of[kind] = max(worst_of.get(kind, 0.0), error)
                if error > worst:
                    worst, worst_module = error, name
                if error > LINEAR_TOLERANCE:
                    failures.append(f"{name} ({kind}): relative error {error:.3g}")
    who = f"vllm.LLM {answer['vllm_version']} on this CPU (bf16), its own Linears, load {answer['load_s']} s"
    counts = ", ".join(f"{k} x{n} (worst {worst_of[k]:.2g})" for k, n in sorted(kernels.items()))
    detail = (f"{len(answer['modules'])} Linears ({counts}): worst relative error {worst:.3g} at {worst_module}"
              + (f"; {len(failures)} over {LINEAR_TOLERANCE}: {'; '.join(failures[:3])}" if failures else ""))
    return Agreement("vllm", who, not failures and bool(answer["modules"]), detail, extra={"modules": len(answer["modules"]),
                     "worst_relative_error": worst, "kernels": kernels, "worst_by_kernel": worst_of})


def plan_of(checkpoint: Path):
    from bitplan.planner.plan import load_plan

    if not (checkpoint / "plan.json").is_file():
        raise BitplanError(f"{checkpoint} has no plan.json: pass a folder written by `bitplan emit`")
    return load_plan(checkpoint / "plan.json").engine


def check_checkpoint(checkpoint: str | os.PathLike, engine: str | None = None, python: str | os.PathLike | None = None) -> list[Agreement]:
    """Ask ``engine`` (default: the one the plan was made for) to load ``checkpoint`` and compare its numbers.

    transformers: logits against ``bitplan.load``. vLLM: its kernel selection on the plan's
    platform, and on a CPU platform real loads: every Linear vLLM built against bitplan's, and greedy generation."""
    checkpoint = Path(checkpoint)
    planned = plan_of(checkpoint)
    engine = engine or planned.name
    if engine == "transformers":
        return [transformers_agreement(checkpoint)]
    if engine == "vllm":
        platform = planned.platform if planned.name == "vllm" else "cuda-sm80"
        python = vllm_python(python)
        results = [vllm_kernel_agreement(checkpoint, python, platform)]
        if platform.startswith("cpu") and results[0].ok:
            results.append(vllm_linear_agreement(checkpoint, python))
            results.append(vllm_generation_agreement(checkpoint, python))
        return results
    raise BitplanError(f"bitplan check asks transformers or vllm, not {engine!r}: pass --engine transformers or --engine vllm")
