"""Refinement's block-by-block meter measures what the whole-model meter measures.

Random-weight tiny Llamas (tied and untied head) and every kind of block rewrite: GPTQ, AWQ on
o_proj folded into v_proj's rows, SmoothQuant W8A8 folded into the norm (activation rounding),
RTN, FP8 W8A8 on an untied lm_head."""

from __future__ import annotations

import pytest
import torch

from tiny_models import write_tiny_llama

from bitplan.methods.scheme import QuantizedWeight, Scheme
from bitplan.models.source import open_model
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.planner.streaming import StreamingMeter
from bitplan.profiles.calibration import CalibrationSettings, calibration_windows

KINDS = {"q": "gptq-w4g64s", "k": "gptq-w4g64s", "v": "rtn-w8gcs", "o": "awq-w4g64s", "gate": "smoothquant-w8gcsa8",
         "up": "smoothquant-w8gcsa8", "down": "rtn-w4g64s", "lm_head": "fp8-w8gcsa8"}


@pytest.fixture(scope="module")
def untied_folder(tmp_path_factory, smollm_folder):
    return write_tiny_llama(tmp_path_factory.mktemp("tiny-untied"), smollm_folder, tie_word_embeddings=False)


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_streaming_meter_measures_the_whole_model_meters_kl(tiny_llama_folder, untied_folder, private_cache, which):
    source = open_model(tiny_llama_folder if which == "tied" else untied_folder)
    assert any(layer.block < 0 for layer in source.spec.layers) == (which == "untied")
    windows = calibration_windows(source.folder, CalibrationSettings((), 4, 32), 2)
    plans = [{layer.name: Scheme.parse(KINDS[layer.kind]) for layer in source.spec.layers},
             {layer.name: Scheme.parse("rtn-w4g64s") for layer in source.spec.layers if layer.block in (1, 4)}]
    whole = QualityMeter(load_dense_model(source.folder), source.spec)
    streaming = StreamingMeter(source.folder, source.config, source.spec)
    for meter in (whole, streaming):
        meter.calibrate(windows[:4])
    for plan in [*plans, {}]:
        whole.apply(plan)
        streaming.apply(plan)
        expected, measured = whole.measure(windows[4:]), streaming.measure(windows[4:])
        assert measured.kl == pytest.approx(expected.kl, rel=1e-5, abs=1e-9)
        assert measured.perplexity == pytest.approx(expected.perplexity, rel=1e-5)
        assert measured.reference_perplexity == pytest.approx(expected.reference_perplexity, rel=1e-5)
        assert measured.tokens == expected.tokens
        # one KL per window, in order, the same from both meters (confirmation pairs plans window by window)
        assert len(measured.window_kl) == len(expected.window_kl) == windows[4:].shape[0]
        assert measured.window_kl == pytest.approx(expected.window_kl, rel=1e-5, abs=1e-9)
        assert sum(expected.window_kl) / len(expected.window_kl) == pytest.approx(expected.kl, rel=1e-6, abs=1e-12)
    assert streaming.measure(windows[4:]).kl == 0.0  # the dense plan is the reference itself
    kept = [t for variant in streaming.cache.memory.values() for t in variant[0].values()]
    compact = [t for t in kept if isinstance(t, QuantizedWeight)]
    assert compact and all(t.codes.dtype in (torch.int8, torch.uint8) for t in compact), "quantized Linears are kept as codes and scales"
    computed = streaming.cache.computed
    streaming.cache.memory_bytes = 0  # from now on only the newest entry stays in memory, the rest go to disk
    streaming.apply(plans[0])
    again = streaming.measure(windows[4:])
    assert again.kl > 1e-4
    assert streaming.cache.computed == computed, "nothing is quantized twice"
    assert streaming.cache.spilled and len(streaming.cache.memory) == 1
    streaming.apply(plans[0])
    assert streaming.measure(windows[4:]).kl == again.kl  # read back from disk: the same numbers
    assert streaming.cache.computed == computed
    whole.apply(plans[0])
    assert again.kl == pytest.approx(whole.measure(windows[4:]).kl, rel=1e-5)
    assert len(streaming.references.rows) == len(windows[4:])  # the reference ran once per window


def test_refinement_streams_only_models_whose_two_copies_do_not_fit(tiny_llama_folder, private_cache, monkeypatch):
    from bitplan.planner import refine

    source = open_model(tiny_llama_folder)
    assert isinstance(refine.choose_meter(source), QualityMeter)  # a tiny model: the faster whole-model meter
    monkeypatch.setattr(refine, "WHOLE_MODEL_SHARE", 0.0)  # as if the machine had no room for two copies
    assert isinstance(refine.choose_meter(source), StreamingMeter)


def test_the_variant_cache_spills_to_disk_up_to_its_cap_then_drops_and_recomputes(tmp_path):
    """Evicted variants go to disk while they fit under ``disk_bytes``; beyond it they are dropped (an 8B model's
    float32 variants once filled the disk mid-plan) and computed again when asked for, with the same tensors."""
    from bitplan.planner.quality import VariantCache

    calls: list[int] = []

    def variant(i: int):
        def compute():
            calls.append(i)
            return {f"w{i}": torch.full((256,), float(i))}, {}
        return compute

    one = 256 * 4
    cache = VariantCache(memory_bytes=one, spill_dir=tmp_path, disk_bytes=int(1.5 * one) + 2048)  # room for one spilled file
    for i in range(3):
        cache.get(("linear", i), variant(i))
    assert calls == [0, 1, 2] and len(cache.spilled) == 1 and cache.dropped == 1
    assert sum(f.stat().st_size for f in tmp_path.iterdir()) == cache.spilled_bytes <= cache.disk_bytes
    assert torch.equal(cache.get(("linear", 0), variant(0))[0]["w0"], torch.zeros(256))  # read back from disk
    assert calls == [0, 1, 2]
    assert torch.equal(cache.get(("linear", 1), variant(1))[0]["w1"], torch.ones(256))  # dropped: computed again
    assert calls == [0, 1, 2, 1] and cache.computed == 4
    cache.clear()
    assert not list(tmp_path.iterdir())


def test_the_variant_cache_makes_room_before_computing_a_large_variant(tmp_path):
    """Given its size, a variant is computed only after older ones left memory: the 8B shape's 2.1 GB
    float32 head variant was computed beside a full cache (the plan stage peaked 2.7 GiB above its bound)."""
    from bitplan.planner.quality import VariantCache, variant_bytes

    one = 256 * 4
    cache = VariantCache(memory_bytes=2 * one, spill_dir=tmp_path)
    held_while_computing: list[int] = []

    def compute(i: int, n: int):
        def run():
            held_while_computing.append(cache.held)
            return {f"w{i}": torch.full((n,), float(i))}, {}
        return run

    cache.get(("linear", 0), compute(0, 256), one)
    cache.get(("linear", 1), compute(1, 256), one)
    assert cache.held == 2 * one and held_while_computing == [0, one]
    big = cache.get(("linear", 2), compute(2, 512), 2 * one)
    assert held_while_computing[-1] == 0, "the older variants stayed in memory while the large one was computed"
    assert cache.held == variant_bytes(big) == 2 * one and len(cache.spilled) == 2
    assert torch.equal(cache.get(("linear", 0), compute(0, 256), one)[0]["w0"], torch.zeros(256))  # back from disk, not recomputed
    assert cache.computed == 3
