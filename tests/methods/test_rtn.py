import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import dequantize

from bitplan.methods.rtn import quantize_rtn
from bitplan.methods.scheme import DENSE, Scheme


def test_weights_on_the_grid_come_back_exactly():
    scale = torch.tensor([[0.5], [0.25]])
    codes = torch.tensor([[-7, -3, 0, 7], [7, 1, -2, -7]], dtype=torch.float32)
    weight = codes * scale
    q = quantize_rtn(weight, Scheme("rtn", 4, 0, True), scale_dtype=torch.float32)
    assert torch.equal(q.dequantize(), weight)
    assert torch.equal(q.codes.float(), codes)


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
