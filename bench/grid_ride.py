"""Which quantizers ride SmolLM2's published grid: weight error on the published weights against the
same weights moved off the grid, per GGUF type and bitplan scheme, side by side in one run.

SmolLM2-135M-Instruct was published as Q4_1 (4-bit, groups of 32, a float scale and minimum per
group), so its weights take at most 16 values per group of 32. A quantizer whose grid contains
(or nearly contains) those values reproduces them almost exactly and looks far better here than it
would on a model trained in 16 bits. Each quantizer's relative weight error ‖W − Q(W)‖/‖W‖ is
measured on the published weights and on the same weights plus Gaussian noise of 1/4 of each
group's published step (which moves every weight off the grid while changing the matrix by about
7% of a step's RMS); the ratio (published / off-grid) is near 1 for a quantizer that does not ride
the grid and far below 1 for one that does. GGUF types plain and with ggml's importance-weighted search
(``+imatrix``: a flat importance vector, which switches ggml to its ``_impl`` quantizers, as llama-quantize
with ``--imatrix`` does).

    .venv/bin/python bench/grid_ride.py [--layers 4]
"""

from __future__ import annotations

import argparse

import torch
from common import save

from bitplan.kernels.numerics import grouped
from bitplan.methods.ggml import quantize_ggml
from bitplan.methods.registry import quantize
from bitplan.methods.scheme import Scheme

GGML = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SCHEMES = ("rtn-w4g32s", "rtn-w4g32a", "rtn-w4g64s", "rtn-w4g64a", "rtn-w5g32s", "rtn-w5g64s", "rtn-w3g32s")


def published_weights(count: int) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from bitplan.models.source import builtin_gguf

    path = builtin_gguf()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    names = [f"model.layers.{b}.{s}" for b in (3, 15, 27)[:max(1, count)] for s in ("self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj")]
    modules = dict(model.named_modules())
    return {n: modules[n].weight.detach().clone() for n in names}


def off_grid(weight: torch.Tensor, seed: int) -> torch.Tensor:
    """The weight plus noise of 1/4 of each group-of-32's published step (range / 15)."""
    groups = grouped(weight, 32)
    step = (groups.amax(-1, keepdim=True) - groups.amin(-1, keepdim=True)) / 15
    noise = torch.randn(groups.shape, generator=torch.Generator().manual_seed(seed)) * step / 4
    return (groups + noise).reshape(weight.shape)


def error(weight: torch.Tensor, name: str) -> float:
    if name.endswith("+imatrix"):  # ggml's importance-weighted search (its _impl path), with a flat importance
        approx = quantize_ggml(weight, name.split("+")[0], torch.ones(weight.shape[1])).dequantize()
    elif name.startswith("Q"):
        approx = quantize_ggml(weight, name).dequantize()
    else:
        approx = quantize(weight, Scheme.parse(name), torch.float16).dequantize()
    return float((weight - approx).norm() / weight.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3, help="blocks sampled (3, 15, 27), four Linears each")
    args = parser.parse_args()
    weights = published_weights(args.layers)
    rows = []
    for quantizer in GGML + tuple(f"{t}+imatrix" for t in GGML) + SCHEMES:
        # K-quants store rows in blocks of 256: only down_proj (1536 inputs) takes them; SmolLM2's 576-wide inputs
        # fall back in llama-quantize (Q3_K -> IQ4_NL, Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0)
        chosen = [(i, w) for i, w in enumerate(weights.values()) if "_K" not in quantizer or w.shape[1] % 256 == 0]
        on = [error(w, quantizer) for _, w in chosen]
        off = [error(off_grid(w, i), quantizer) for i, w in chosen]
        ratio = sum(on) / sum(off)
        rows.append({"quantizer": quantizer, "tensors": len(chosen), "published": sum(on) / len(on), "off_grid": sum(off) / len(off), "ratio": ratio})
        print(f"{quantizer:12s} published {rows[-1]['published']:.4f}  off-grid {rows[-1]['off_grid']:.4f}  ratio {ratio:.2f}", flush=True)
    path = save("grid_ride", {"layers": list(weights), "rows": rows, "noise": "N(0, (step/4)^2), step = group-of-32 range / 15"})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
