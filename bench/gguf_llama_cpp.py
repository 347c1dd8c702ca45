"""llama.cpp as bitplan's deployment target, measured end to end on SmolLM2-135M.

1. ``convert_hf_to_gguf.py`` (F32 and BF16) from the HF folder;
2. ``llama-imatrix`` on the calibration part of Python's documentation (8 chunks of 128 tokens, and
   with ``--full-imatrix`` every 512-token chunk);
3. a mixed assignment written by bitplan (``write_gguf``) and by ``llama-quantize --tensor-type-file``,
   with and without the imatrix: time, and how many tensors differ (should be 0);
4. logits: llama.cpp (``llama_logits``) against transformers float32 with the weights bitplan decodes;
5. ``llama-perplexity --kl-divergence`` of the mixed file against the F32 GGUF on held-out text.

    make llama-cpp; BITPLAN_LLAMA_CPP=~/.cache/bitplan-tools/llama.cpp-11434.0.0 .venv/bin/python bench/gguf_llama_cpp.py [--full-imatrix]

Writes bench/results/gguf_llama_cpp.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import save

from bitplan.checkpoints import gguf as bg
from bitplan.checkpoints import llamacpp
from bitplan.checkpoints.gguf_file import read_gguf, tensor_bytes
from bitplan.checkpoints.llamacpp_logits import llama_logits
from bitplan.models.source import resolve_model
from bitplan.models.spec import read_config

KINDS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")
MIX = [(0, "Q8_0", "Q8_0"), (1, "Q8_0", "Q8_0"), (2, "Q4_0", "Q4_K"), (3, "Q4_0", "Q4_K"), (4, "Q5_1", "Q6_K"),
       (5, "Q5_1", "Q6_K"), (6, "Q5_0", "Q5_K"), (7, "Q4_1", "Q3_K"), (8, "BF16", "Q2_K"), (9, "F32", "Q4_0")]


def mixed_assignment(blocks: int) -> dict[str, str]:
    """F16 everywhere, MIX on blocks 0-9 (k-quants only on the 1536-wide down_proj), Q8_0 embedding."""
    assignment = {f"model.layers.{b}.{k}.weight": "F16" for b in range(blocks) for k in (*KINDS, "mlp.down_proj")}
    for block, attention, down in MIX:
        assignment.update({f"model.layers.{block}.{k}.weight": attention for k in KINDS})
        assignment[f"model.layers.{block}.mlp.down_proj.weight"] = down
    assignment["model.embed_tokens.weight"] = "Q8_0"
    return assignment


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, round(time.perf_counter() - start, 2)


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict:
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(other, -1)
    return {"kl": float(f"{(log_p.exp() * (log_p - log_q)).sum(-1).mean().item():.3g}"),
            "top1": round((reference.argmax(-1) == other.argmax(-1)).float().mean().item(), 4),
            "mean_abs": round((reference - other).abs().mean().item(), 5), "max_abs": round((reference - other).abs().max().item(), 4)}


def logits_agreement(hf: Path, files: dict[str, Path], source: Path) -> dict:
    from transformers import AutoModelForCausalLM

    from bitplan.checkpoints.verify import heldout_tokens

    tokens = heldout_tokens(hf, windows=2, seq_len=128)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}

    def run(weights=None):
        model.load_state_dict(original)
        model.load_state_dict(weights or {}, strict=False)
        with torch.no_grad():
            return model(tokens).logits

    reference = run()
    result = {"tokens": list(tokens.shape), "f32_gguf_vs_transformers": compare(reference, llama_logits(source, tokens))}
    ours = {tag: run(bg.dequantized_hf_weights(files[f"bitplan-{tag}"], hf)) for tag in ("plain", "imatrix")}
    for tag in ("plain", "imatrix"):
        theirs, seconds = timed(llamacpp.llama_logits, files[f"bitplan-{tag}"], tokens)
        default = llama_logits(files[f"bitplan-{tag}"], tokens, exact_attention=False)
        other = "imatrix" if tag == "plain" else "plain"
        result[tag] = {"llama_vs_bitplan": compare(ours[tag], theirs), "llama_default_attention_vs_bitplan": compare(ours[tag], default),
                       "llama_vs_bitplan_other_imatrix_choice": compare(ours[other], theirs),
                       "bitplan_vs_unquantized": compare(reference, ours[tag]), "llama_logits_s": seconds}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full-imatrix", action="store_true", help="also run llama-imatrix over all calibration text (minutes)")
    parser.add_argument("--kld-chunks", type=int, default=16)
    args = parser.parse_args()
    build = llamacpp.find_llama_cpp()
    hf = resolve_model("smollm2-135m")
    blocks = int(read_config(hf)["num_hidden_layers"])
    report: dict = {"llama_cpp": str(build.prefix), "threads": llamacpp.default_threads(), "load_before": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as scratch:
        folder = Path(scratch)
        for outtype in ("f32", "bf16"):
            _, report[f"convert_{outtype}_s"] = timed(llamacpp.convert_to_gguf, hf, folder / f"source-{outtype}.gguf", outtype)
        source = folder / "source-f32.gguf"
        calibration = llamacpp.write_text_file(llamacpp.builtin_text("calibration"), folder / "calibration.txt")
        heldout = llamacpp.write_text_file(llamacpp.builtin_text("heldout"), folder / "heldout.txt")
        imatrix, report["imatrix_8x128_s"] = timed(llamacpp.compute_imatrix, source, calibration, folder / "imatrix.gguf", ctx=128, chunks=8)
        if args.full_imatrix:
            _, report["imatrix_full_512_s"] = timed(llamacpp.compute_imatrix, source, calibration, folder / "imatrix-full.gguf", ctx=512)
            report["imatrix_full_chunks"] = read_gguf(folder / "imatrix-full.gguf").metadata["imatrix.chunk_count"][1]
        assignment = mixed_assignment(blocks)
        recipe = bg.gguf_recipe(hf, assignment, read_gguf(source).tensors)
        files = {}
        for tag, weights in (("plain", None), ("imatrix", imatrix)):
            written, report[f"write_{tag}_s"] = timed(bg.write_gguf, hf, folder / f"bitplan-{tag}.gguf", assignment, weights, source)
            files[f"bitplan-{tag}"] = Path(written.path)
            files[f"llama-{tag}"], report[f"quantize_{tag}_s"] = timed(
                llamacpp.quantize_with_recipe, source, folder / f"llama-{tag}.gguf", recipe, folder / "imatrix.gguf" if weights else None)
            ours, theirs = read_gguf(files[f"bitplan-{tag}"]).tensors, read_gguf(files[f"llama-{tag}"]).tensors
            report[f"tensors_differing_{tag}"] = sum(
                t.ggml_type != theirs[n].ggml_type
                or not np.array_equal(tensor_bytes(files[f"bitplan-{tag}"], t), tensor_bytes(files[f"llama-{tag}"], theirs[n]))
                for n, t in ours.items())
            report[f"tensor_bytes_{tag}"] = written.tensor_bytes
        report["logits"] = logits_agreement(hf, files, source)
        kld, report["kl_divergence_s"] = timed(llamacpp.kl_divergence, source, files["bitplan-imatrix"], heldout, ctx=512, chunks=args.kld_chunks)
        report["kl_divergence"] = kld.to_dict()
    report["load_after"] = os.getloadavg()
    print(save("gguf_llama_cpp", report))
    print({k: v for k, v in report.items() if k != "logits"})
    print(report["logits"])


if __name__ == "__main__":
    main()
