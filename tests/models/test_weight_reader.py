import pytest
import torch
from safetensors.torch import save_file

from bitplan.errors import BitplanError
from bitplan.models.source import WeightReader


def test_float8_weights_are_read_and_checked_for_nan(tmp_path):
    # emitted FP8 checkpoints are read back by bitplan.load; float8 has no isfinite kernel of its own
    values = torch.tensor([[0.5, -2.0], [448.0, 0.0]])
    save_file({"w": values.to(torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    assert torch.equal(WeightReader(tmp_path).tensor("w"), values)
    save_file({"w": torch.tensor([[float("nan"), 1.0]]).to(torch.float8_e4m3fn)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(BitplanError, match="holds NaN or Inf"):
        WeightReader(tmp_path).tensor("w")
