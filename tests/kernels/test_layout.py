import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

from bitplan.kernels import layout


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("cols", [32, 96, 100, 576])
def test_packing_matches_compressed_tensors_bit_for_bit(bits, cols):
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(low, high + 1, (7, cols), dtype=torch.int8)
    packed = layout.pack_codes(codes, bits)
    assert torch.equal(packed, pack_to_int32(codes, bits))
    assert torch.equal(layout.unpack_codes(packed, bits, cols), codes)
    assert torch.equal(unpack_from_int32(packed, bits, torch.Size(codes.shape)), codes)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_zero_point_packing_along_rows_matches_compressed_tensors(bits):
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    zeros = torch.randint(low, high + 1, (45, 9), dtype=torch.int8)
    packed = layout.pack_codes(zeros, bits, dim=0)
    assert torch.equal(packed, pack_to_int32(zeros, bits, packed_dim=0))
    assert torch.equal(layout.unpack_codes(packed, bits, 45, dim=0), zeros)


def test_out_of_range_codes_are_refused():
    with pytest.raises(AssertionError):
        layout.pack_codes(torch.full((2, 8), 8, dtype=torch.int8), 4)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 64, True), (3, 64, False), (8, 0, True), (2, 32, False), (5, 128, True)])
def test_byte_count_equals_the_packed_tensors(bits, group, symmetric):
    out_features, in_features = 192, 640 if group != 128 else 1536
    codes = torch.zeros(out_features, in_features, dtype=torch.int8)
    groups = layout.num_groups(in_features, group)
    tensors = [layout.pack_codes(codes, bits), torch.zeros(out_features, groups, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.int64)]
    if not symmetric:
        tensors.append(layout.pack_codes(torch.zeros(out_features, groups, dtype=torch.int8), bits, dim=0))
    actual = sum(t.numel() * t.element_size() for t in tensors)
    assert layout.packed_weight_bytes(out_features, in_features, bits, group, symmetric, 2) == actual


def test_short_groups_do_not_fit():
    assert not layout.group_fits(576, 128)
    assert layout.group_fits(576, 64) and layout.group_fits(576, 0)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("dim", [0, 1])
def test_packing_a_few_rows_at_a_time_gives_the_same_words(monkeypatch, bits, dim):
    """A 128k-row head is packed and unpacked in row ranges (its int64 work arrays took 14 GB
    whole): every range size gives the words and codes of one pass over the whole tensor."""
    from bitplan.kernels import layout as packing

    generator = torch.Generator().manual_seed(bits * 10 + dim)
    codes = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (37, 45), generator=generator).to(torch.int8)
    monkeypatch.setattr(packing, "PACK_ELEMENTS", 1 << 30)
    whole = packing.pack_codes(codes, bits, dim=dim)
    for elements in (1, 45, 100, 45 * 7):
        monkeypatch.setattr(packing, "PACK_ELEMENTS", elements)
        packed = packing.pack_codes(codes, bits, dim=dim)
        assert torch.equal(packed, whole)
        assert torch.equal(packing.unpack_codes(packed, bits, codes.shape[dim], dim=dim), codes)
