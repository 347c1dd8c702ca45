import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize
from compressed_tensors.quantization.utils import calculate_qparams

from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import DENSE, Scheme


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_scales_and_codes_are_compressed_tensors_own(bits):
    # calculate_qparams spreads absmax over all 2**bits codes; the checkpoint decodes the same in engines
    weight = torch.randn(16, 128)
    q = quantize_rtn(weight, Scheme("rtn", bits, 64, True), scale_dtype=torch.float32)
    args = QuantizationArgs(num_bits=bits, symmetric=True, strategy="group", group_size=64)
    groups = weight.reshape(16, 2, 64)
    scale, zero = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    assert torch.allclose(q.scale, scale, rtol=1e-6)
    codes = quantize(weight, scale, zero, args=args, dtype=torch.int8)
    assert torch.equal(q.codes, codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_symmetric_step_spreads_the_range_over_every_code(bits):
    # step 2·absmax/(2**bits - 1): a 2-bit group has four levels, so no weight is further than absmax/3
    # from one (with absmax/qmax, three levels, it would be absmax/2)
    weight = torch.linspace(-1.0, 1.0, 4096).reshape(1, 4096)
    q = quantize_rtn(weight, Scheme("rtn", bits, 0, True), scale_dtype=torch.float32)
    step = 2.0 / ((1 << bits) - 1)
    assert float(q.scale) == pytest.approx(step)
    assert float((q.dequantize() - weight).abs().max()) <= step / 2 + 1e-6
    assert int(q.codes.min()) >= -(1 << (bits - 1)) and int(q.codes.max()) == (1 << (bits - 1)) - 1


def test_asymmetric_grid_reaches_both_ends():
    weight = torch.linspace(-1.0, 3.0, 64).reshape(1, 64)
    q = quantize_rtn(weight, Scheme("rtn", 4, 64, False), scale_dtype=torch.float32)
    assert int(q.codes.min()) == -8 and int(q.codes.max()) == 7
    assert (q.dequantize() - weight).abs().max() <= float(q.scale.max()) / 2 + 1e-6


@pytest.mark.parametrize("symmetric", [True, False])
def test_error_falls_as_bits_rise(symmetric):
    weight = torch.randn(64, 256)
    errors = [float((quantize_rtn(weight, Scheme("rtn", b, 64, symmetric)).dequantize() - weight).norm()) for b in (2, 3, 4, 5, 6, 8)]
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.01 * float(weight.norm())


@pytest.mark.parametrize("symmetric", [True, False])
def test_zero_point_convention_matches_compressed_tensors(symmetric):
    weight = torch.randn(16, 128) + 0.3
    q = quantize_rtn(weight, Scheme("rtn", 4, 64, symmetric), scale_dtype=torch.float32)
    args = QuantizationArgs(num_bits=4, symmetric=symmetric, strategy="group", group_size=64)
    theirs = dequantize(q.codes, q.scale, q.zero, args=args, dtype=torch.float32)
    assert torch.allclose(theirs, q.dequantize(), atol=1e-6)


def test_scheme_names_round_trip():
    for name in ("rtn-w4g128s", "rtn-w3g64a", "rtn-w8gcs", "none"):
        assert Scheme.parse(name).name == name
    assert Scheme.parse("none") == DENSE
