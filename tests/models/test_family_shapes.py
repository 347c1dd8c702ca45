"""The new families at their real sizes (config.json of Gemma-2-2B, Gemma-3-1B, Phi-3-mini-4k,
Qwen3-30B-A3B and Mixtral-8x7B in tests/data/configs): capacity planning in seconds from the config alone, and, marked slow, one
real-width block of random weights through plan -> emit -> load.

The truncated models keep every block dimension (width, heads, head_dim, intermediate) and take
SmolLM2's tokenizer, so their vocabulary is its 49152 tokens; the MoE keeps 8 of its 128 experts.
"""

import json

import pytest
import torch

from family_models import CONFIGS, real_config, write_family_model

import bitplan
from bitplan.api import CalibrationSettings, Candidates
from bitplan.cli import main as cli_main
from bitplan.models.spec import spec_from_config, spec_from_folder
from bitplan.planner.deployment import Deployment, memory_breakdown
from bitplan.planner.quality import QualityMeter, load_dense_model

PARAMETERS = {"gemma-2-2b": 2_614_341_888, "gemma-3-1b": 999_885_952, "phi-3-mini-4k": 3_821_079_552,  # as their model cards count
              "qwen3-30b-a3b": 30_532_122_624, "mixtral-8x7b": 46_702_792_704}
MEASURED = {"gemma-2-2b": {}, "gemma-3-1b": {}, "phi-3-mini-4k": {},
            "qwen3-30b-a3b": {"num_experts": 8, "num_experts_per_tok": 2, "tie_word_embeddings": True}}  # 8 of its 128 experts


@pytest.mark.parametrize("name", sorted(PARAMETERS))
def test_spec_counts_every_parameter(name):
    spec = spec_from_config(real_config(name))
    assert spec.linear_weights + spec.unquantized_bytes // spec.dtype_bytes == PARAMETERS[name]


def test_compare_plans_the_real_configs(tmp_path, capsys):
    for name in sorted(PARAMETERS):
        out = tmp_path / f"{name}.json"
        assert cli_main(["compare", str(CONFIGS / f"{name}.json"), "--targets", "l40s,l4", "--context", "4096", "--json", str(out)]) == 0
        results = json.loads(out.read_text())["results"]
        assert [r["device"] for r in results] == ["l40s", "l4"] and results[0]["fits"]


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MEASURED))
def test_one_real_width_block_plans_emits_and_loads(name, smollm_folder, private_cache, tmp_path):
    config = real_config(name, num_hidden_layers=1, vocab_size=49152, dtype="bfloat16", torch_dtype="bfloat16", **MEASURED[name])
    folder = write_family_model(tmp_path / name, smollm_folder, config)
    spec = spec_from_folder(folder)
    rest = memory_breakdown(spec, 0, Deployment(budget_bytes=10**12, context=64)).total_bytes
    plan = bitplan.plan(str(folder), budget=rest + spec.linear_weights * 6 // 8, context=64, trials=0,
                        candidates=Candidates(("rtn",), (4, 8), (128,), (True,)), calibration=CalibrationSettings((), 1, 32))
    model = bitplan.load(bitplan.emit(plan, tmp_path / "emitted"))
    meter = QualityMeter(load_dense_model(folder), spec)
    meter.apply(plan.schemes())
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(ids).logits - meter.working(ids).logits).abs().max() < 1e-3
