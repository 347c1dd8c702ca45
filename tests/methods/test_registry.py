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
