"""Kernel tests run on CUDA when there is a GPU, else in Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before any ``@triton.jit`` runs, so it is set here, at import,
before the test modules import the Triton kernel modules (:mod:`bitplan.kernels.triton_generic`, :mod:`bitplan.kernels.triton_int`).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


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
