import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.methods.calibration_stats import InputStats
from bitplan.methods.registry import candidate_schemes, needs_calibration, quantize
from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import Scheme


def test_default_candidates_cover_bits_groups_and_symmetry():
    schemes = candidate_schemes()
    assert len(schemes) == 6 * 4 * 2 + 1 and schemes[-1].is_dense
    assert {s.bits for s in schemes if not s.is_dense} == {2, 3, 4, 5, 6, 8}


def test_unknown_method_and_bits_are_named():
    with pytest.raises(BitplanError, match="unknown method 'awq4'"):
        candidate_schemes(methods=("awq4",))
    with pytest.raises(BitplanError, match="unsupported bit widths"):
        candidate_schemes(bits=(7,))


def test_gptq_needs_statistics_and_uses_them():
    weight = torch.randn(32, 64)
    scheme = Scheme("gptq", 4, 32, True)
    assert needs_calibration([scheme]) and not needs_calibration([Scheme("rtn", 4, 32, True)])
    with pytest.raises(BitplanError, match="calibration statistics"):
        quantize(weight, scheme, torch.float32)
    stats = InputStats(64, max_samples=0)
    stats.add(torch.randn(256, 64) * torch.linspace(0.1, 3, 64))
    gptq = quantize(weight, scheme, torch.float32, {"input": stats})
    rtn = quantize_rtn(weight, Scheme("rtn", 4, 32, True), torch.float32)
    second = stats.second_moment()

    def output_error(q):
        delta = weight - q.dequantize()
        return float(((delta @ second) * delta).sum())

    assert output_error(gptq) < output_error(rtn)


def test_default_candidates_cover_every_method_with_costly_ones_at_low_bits():
    from bitplan.api import Candidates

    schemes = Candidates().schemes()
    methods = {str(s.method) for s in schemes}
    assert methods == {"rtn", "imatrix", "awqimatrix", "hqq", "nf4", "fp8", "smoothquant", "none"}
    costly = [s for s in schemes if str(s.method) in ("awqimatrix", "hqq")]
    assert costly and all(s.bits <= 4 and s.symmetric for s in costly)
    assert {s.name for s in schemes} >= {"smoothquant-w8gcsa8", "fp8-w8gcsa8", "fp8-w8gcs", "nf4-w4g64s", "rtn-w8g32a", "imatrix-w6g128s"}
    assert not any(str(s.method) in ("imatrix", "awqimatrix") and not s.symmetric for s in schemes)
    full = Candidates(("gptq",), costly_bits=None).schemes()
    assert any(s.bits == 8 and not s.symmetric for s in full)


def test_w8a8_candidates_follow_the_targets_native_formats():
    from bitplan.api import Candidates
    from bitplan.profiles.hardware import get_device

    def names(device):
        return {s.name for s in Candidates().for_device(get_device(device)).schemes()}

    assert {"fp8-w8gcsa8", "smoothquant-w8gcsa8"} <= names("h100-sxm")
    assert "fp8-w8gcsa8" not in names("a100-sxm-80gb") and "smoothquant-w8gcsa8" in names("a100-sxm-80gb")
    assert "fp8-w8gcs" in names("a100-sxm-80gb")  # weight-only FP8 runs anywhere


@pytest.mark.parametrize("name, expected", [
    ("nf4-w4g64s", lambda o, i: o * i // 2 + o * (i // 64) * 4),
    ("fp8-w8gcs", lambda o, i: o * i + o * 4),
    ("fp8-w8g64s", lambda o, i: o * i + o * (i // 64) * 4),
    ("smoothquant-w8gcsa8", lambda o, i: o * i + o * 2),
])
def test_weight_bytes_of_non_packed_formats(name, expected):
    assert Scheme.parse(name).weight_bytes(1536, 576, 2) == expected(1536, 576)


@pytest.mark.parametrize("name", ["nf4-w3g64s", "nf4-w4gcs", "fp8-w8g64sa8", "smoothquant-w4gcs", "rtn-w4g64sa8", "awq-w7g64s"])
def test_invalid_schemes_are_refused_with_the_rule(name):
    with pytest.raises(BitplanError, match="is not valid"):
        Scheme.parse(name).check()


def test_nf4_and_fp8_dequantize_through_their_code_books():
    weight = torch.randn(8, 128, generator=torch.Generator().manual_seed(0))
    nf4 = quantize(weight, Scheme.parse("nf4-w4g64s"), torch.bfloat16)
    assert nf4.codes.min() >= -8 and nf4.codes.max() <= 7
    assert (nf4.dequantize() - weight).abs().max() < 0.35 * weight.abs().max()
    fp8 = quantize(weight, Scheme.parse("fp8-w8gcs"), torch.bfloat16)
    relative = ((fp8.dequantize() - weight).norm() / weight.norm()).item()
    assert relative < 0.04  # E4M3 keeps 3 mantissa bits: ~2-3% error


@pytest.mark.parametrize("name", ["rtn-w4g32a", "gptq-w3g32s", "hqq-w4g32a", "nf4-w4g32s", "fp8-w8gcs"])
def test_a_large_weight_quantized_by_rows_is_the_whole_weight_quantized(name, monkeypatch):
    """quantize_by_rows (what emit and the quality meter use) quantizes a weight above ROW_CHUNK a
    row range at a time; the codes, scales and zero points are exactly those of one call."""
    import bitplan.methods.registry as registry
    from bitplan.methods.calibration_stats import planner_stats

    torch.manual_seed(0)
    weight = torch.randn(300, 64)
    stats = planner_stats(64)
    stats.add(torch.randn(256, 64))
    scheme = Scheme.parse(name)
    whole = registry.quantize(weight, scheme, torch.bfloat16, {"input": stats})
    monkeypatch.setattr(registry, "ROW_CHUNK", 64 * 70)  # 5 ranges, the last one short
    assert len(registry.row_chunks(300, 64)) == 5
    rows = registry.quantize_by_rows(weight, scheme, torch.bfloat16, {"input": stats})
    assert torch.equal(rows.codes, whole.codes) and torch.equal(rows.scale, whole.scale)
    assert (rows.zero is None) == (whole.zero is None) and (rows.zero is None or torch.equal(rows.zero, whole.zero))


@pytest.mark.parametrize("name", ["rtn-w4g32a", "gptq-w3g32s", "none"])
def test_a_large_linear_read_a_row_range_at_a_time_is_the_whole_linear(name, monkeypatch):
    """Emit reads a head above ROW_CHUNK a row range at a time (quantize_block's read_rows): the
    result is exactly that of the whole weight read at once."""
    import bitplan.methods.registry as registry
    from bitplan.methods.block import quantize_block
    from bitplan.methods.calibration_stats import planner_stats
    from bitplan.models.spec import LayerSpec

    torch.manual_seed(0)
    weight = torch.randn(300, 64)
    stats = planner_stats(64)
    stats.add(torch.randn(256, 64))
    layer = LayerSpec("lm_head", "lm_head", -1, 64, 300, "")
    scheme = Scheme.parse(name)
    read = lambda tensor: weight if tensor == "lm_head.weight" else None  # noqa: E731
    reads = []

    def read_rows(tensor, start, stop):
        reads.append((start, stop))
        return weight[start:stop]

    whole = quantize_block([layer], {"lm_head": scheme}, read, {"lm_head": {"input": stats}}, torch.bfloat16).linears["lm_head"]
    monkeypatch.setattr(registry, "ROW_CHUNK", 64 * 70)
    rows = quantize_block([layer], {"lm_head": scheme}, read, {"lm_head": {"input": stats}}, torch.bfloat16,
                          read_rows=read_rows).linears["lm_head"]
    assert len(reads) == 5
    if scheme.is_dense:
        assert torch.equal(rows, whole)
        return
    assert torch.equal(rows.codes, whole.codes) and torch.equal(rows.scale, whole.scale)
    assert (rows.zero is None) == (whole.zero is None) and (rows.zero is None or torch.equal(rows.zero, whole.zero))


def test_a_large_quantized_linear_runs_a_row_range_at_a_time(monkeypatch):
    """The reference kernel dequantizes a weight above DEQUANT_ROWS_ELEMENTS a row range at a time
    (evaluation's 128k-vocabulary head): the outputs are the whole weight's."""
    import bitplan.kernels.reference as reference

    torch.manual_seed(0)
    quantized = registry_quantize(torch.randn(300, 64), "rtn-w4g32a")
    x, bias = torch.randn(3, 64), torch.randn(300)
    whole = reference.linear_reference(x, quantized.codes, quantized.scale, quantized.zero, 32, bias)
    monkeypatch.setattr(reference, "DEQUANT_ROWS_ELEMENTS", 64 * 70)
    rows = reference.linear_reference(x, quantized.codes, quantized.scale, quantized.zero, 32, bias)
    assert torch.allclose(rows, whole, rtol=1e-6, atol=1e-6) and rows.shape == (3, 300)


def registry_quantize(weight, name):
    from bitplan.methods.registry import quantize

    return quantize(weight, Scheme.parse(name), torch.bfloat16, {})
