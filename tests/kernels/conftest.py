"""Kernel tests run on CUDA when there is a GPU, else in Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` runs, so it is set here, at import,
before the test modules import the Triton kernel modules (:mod:`bitplan.kernels.triton_generic`, :mod:`bitplan.kernels.triton_int`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from bitplan.kernels.qlinear import quantize_per_token_reference  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _poisoned(shape, dtype, device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.double().cpu(), ref.double().cpu()
    return float((out64 - ref64).norm() / ref64.norm())


@pytest.fixture
def poisoned():
    """``poisoned(shape, dtype, device)``: a NaN-filled output, so an unwritten element fails."""
    return _poisoned


@pytest.fixture
def rel_err():
    """``rel_err(out, ref)``: ``||out - ref|| / ||ref||`` in float64; NaN anywhere fails any bound."""
    return _relative_error


def _away_from_ties(x: torch.Tensor) -> torch.Tensor:
    """``x`` with every element whose per-token int8 code lies within 1e-3 of a .5 tie moved a
    fifth of a step away from it: there the kernel's code may differ from the reference's by one
    (``test_quantize_per_token``), which with one token costs up to about 1e-3 relative error."""
    x = x.clone()
    for _ in range(4):
        _, scale = quantize_per_token_reference(x)
        step = torch.where(scale > 0, scale, torch.ones_like(scale))[:, None]
        scaled = x.float() / step
        near = ((scaled - scaled.floor()) - 0.5).abs() < 1e-3
        if not near.any():
            return x
        x = torch.where(near, (x.float() - 0.2 * step * scaled.sign()).to(x.dtype), x)
    raise AssertionError("could not move the activations off the rounding ties")


@pytest.fixture
def away_from_ties():
    """``away_from_ties(x)``: activations moved off per-token int8 rounding ties (see :func:`_away_from_ties`)."""
    return _away_from_ties
