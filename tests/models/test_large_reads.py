"""Large matrices (a 128k-vocabulary embedding or head) are read a row range at a time: the same tensor."""

import pytest
import torch
from safetensors.torch import save_file

import bitplan.models.source as source
from bitplan.errors import BitplanError
from bitplan.models.source import WeightReader


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    tensors = {"big": torch.randn(1000, 8).to(torch.bfloat16), "small": torch.randn(3, 4)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def test_a_large_matrix_read_by_row_ranges_is_the_stored_matrix(folder, monkeypatch):
    path, tensors = folder
    monkeypatch.setattr(source, "READ_ROWS", 64)  # 16 ranges, the last one short
    reader = WeightReader(path)
    assert torch.equal(reader.tensor("big", dtype=None), tensors["big"])
    assert reader.tensor("big").dtype == torch.float32 and torch.equal(reader.tensor("big"), tensors["big"].float())
    assert torch.equal(reader.tensor("small"), tensors["small"])


def test_a_nan_in_any_row_range_is_refused(tmp_path, monkeypatch):
    big = torch.zeros(1000, 8)
    big[977, 3] = float("nan")
    save_file({"big": big}, str(tmp_path / "model.safetensors"))
    monkeypatch.setattr(source, "READ_ROWS", 64)
    with pytest.raises(BitplanError, match="NaN or Inf"):
        WeightReader(tmp_path).tensor("big")


def test_embedding_rows_looked_up_by_ranges_equal_the_embedding(smollm_folder, monkeypatch):
    import bitplan.profiles.blocks as blocks
    from bitplan.models.spec import read_config

    runner = blocks.BlockRunner(read_config(smollm_folder), WeightReader(smollm_folder))
    ids = torch.tensor([[0, 5, 49151, 17000], [3, 3, 40000, 1]])
    table = runner.reader.tensor("model.embed_tokens.weight")
    monkeypatch.setattr(blocks, "READ_ROWS", 7000)  # 8 ranges
    assert torch.equal(runner.embedding_rows(ids), torch.nn.functional.embedding(ids, table))
    with pytest.raises(IndexError, match="token ids"):
        runner.embedding_rows(torch.tensor([[49152]]))
