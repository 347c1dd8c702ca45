"""A plan whose KV cache is fp8_e4m3 emits a checkpoint that declares it as its engine reads it
(compressed-tensors ``kv_cache_scheme`` and per-layer ``k_scale``/``v_scale``), compressed-tensors
and vLLM's own validators accept, and bitplan.load runs with that cache."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open

from tiny_models import CONFIG, write_tiny_model

import bitplan
from bitplan.api import CalibrationSettings, Candidates
from bitplan.cli import main
from bitplan.models.source import open_model
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.profiles.kv_cache import KVRounding

KV_CONFIG = {**CONFIG, "head_dim": 32, "num_attention_heads": 2, "num_key_value_heads": 1}
SETTINGS = dict(budget="30MB", context=4096, batch=4, engine="vllm", target="cpu-avx512",
                candidates=Candidates(("rtn",), (4, 8), (32, 0)), calibration=CalibrationSettings((), 2, 64), trials=0)


@pytest.fixture(scope="module")
def kv_folder(tmp_path_factory, smollm_folder, private_cache):
    return write_tiny_model(tmp_path_factory.mktemp("kvmodel") / "model", smollm_folder, config=KV_CONFIG)


@pytest.fixture(scope="module")
def planned(kv_folder):
    return bitplan.plan(str(kv_folder), kv_dtype="fp8_e4m3", **SETTINGS)


@pytest.fixture(scope="module")
def checkpoint(planned, tmp_path_factory):
    return bitplan.emit(planned, tmp_path_factory.mktemp("kvemit") / "ckpt")


def test_the_plan_counts_and_records_the_fp8_cache(planned, kv_folder):
    kv = planned.kv_cache
    assert planned.deployment.kv_dtype == "fp8_e4m3" and kv.dtype == "fp8_e4m3"
    assert len(kv.k_scales) == len(kv.v_scales) == 2 and all(s > 0 for s in kv.k_scales + kv.v_scales)
    assert planned.predicted.kv_cache_kl == kv.kl > 0
    values = 2 * 2 * 1 * 32 * 4096 * 4  # layers x (K, V) x kv heads x head_dim x context x batch, one byte each
    assert planned.memory.kv_cache_bytes == values


def test_auto_weighs_every_format_the_engine_runs(kv_folder):
    auto = bitplan.plan(str(kv_folder), kv_dtype="auto", **SETTINGS)
    assert [o["dtype"] for o in auto.kv_cache.options] == ["bfloat16", "fp8_e4m3", "fp8_e5m2"]
    best = min((o for o in auto.kv_cache.options if "total_kl" in o), key=lambda o: o["total_kl"])
    assert auto.kv_cache.dtype == best["dtype"]


def test_the_checkpoint_declares_the_cache_and_its_validators_accept_it(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())["quantization_config"]
    scheme = QuantizationConfig.model_validate(config).kv_cache_scheme
    assert (scheme.num_bits, str(scheme.type), str(scheme.strategy), scheme.symmetric) == (8, "float", "tensor", True)
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as tensors:
        assert {f"model.layers.{i}.self_attn.{w}_scale" for i in range(2) for w in "kv"} <= set(tensors.keys())


def test_vllm_validates_the_kv_cache_scheme(checkpoint, vllm_python):
    python = vllm_python
    code = ("import json,sys; from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import "
            "CompressedTensorsConfig, CompressedTensorsKVCacheMethod as M; q=json.load(open(sys.argv[1]))['quantization_config'];"
            "c=CompressedTensorsConfig.from_config(q); M.validate_kv_cache_scheme(c.kv_cache_scheme); print('ok', c.kv_cache_scheme['strategy'])")
    result = subprocess.run([python, "-c", code, str(checkpoint / "config.json")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok tensor"), result.stderr[-2000:]


def test_loaded_checkpoint_runs_the_planned_cache(planned, checkpoint, kv_folder):
    source = open_model(kv_folder)
    meter = QualityMeter(load_dense_model(kv_folder), source.spec)
    meter.apply(planned.schemes())
    ids = torch.randint(0, 49152, (1, 40), generator=torch.Generator().manual_seed(2))
    from bitplan.profiles.kv_cache import kv_rounding

    with torch.no_grad(), kv_rounding(KVRounding("fp8_e4m3", planned.kv_cache.k_scales, planned.kv_cache.v_scales)):
        expected = meter.working(ids).logits
    with torch.no_grad():
        loaded = bitplan.load(checkpoint)(ids).logits
    torch.testing.assert_close(loaded, expected, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--kv-dtype", "int8"], "vllm on cpu-avx512 cannot keep the KV cache in int8: choose auto or one of"),
    (["--kv-dtype", "q8_0"], "vllm on cpu-avx512 cannot keep the KV cache in q8_0"),
])
def test_a_kv_dtype_the_engine_cannot_run_is_one_line(kv_folder, tmp_path, capsys, args, message):
    out = tmp_path / "plan.json"
    code = main(["plan", str(kv_folder), "--budget", "30MB", "--engine", "vllm", "--target", "cpu-avx512", "--trials", "0",
                 "--out", str(out), *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1 and not out.exists()


def test_streaming_evaluation_measures_the_whole_loaded_checkpoint(checkpoint):
    """``bitplan eval`` runs the checkpoint block by block, its fp8 KV cache included, and measures
    what the whole loaded checkpoint measures against the whole original."""
    from whole_evaluation import assert_measures_the_whole_model

    from bitplan.checkpoints.evaluate import measure, prepare_evaluation

    prepared = prepare_evaluation(checkpoint, samples=2, seq_len=64)
    streamed = measure(prepared)
    assert all(quality.kl > 1e-6 for quality in streamed.slices.values())
    assert_measures_the_whole_model(streamed, prepared, rel=1e-5)
