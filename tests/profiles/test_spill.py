"""Block inputs beyond the memory cap wait on disk; the profile's table does not change."""

import torch

from bitplan.methods.scheme import Scheme
from bitplan.models.spec import read_config, spec_from_config
from bitplan.profiles import spill
from bitplan.profiles.calibration import CalibrationSettings, calibration_windows
from bitplan.profiles.sensitivity import profile_sensitivity


def test_a_profile_with_its_block_inputs_on_disk_is_the_same_table(tiny_llama_folder, private_cache, monkeypatch):
    config = read_config(tiny_llama_folder)
    spec = spec_from_config(config)
    tokens = calibration_windows(tiny_llama_folder, CalibrationSettings((), 2, 16))[:2]
    schemes = [Scheme.parse(n) for n in ("rtn-w4g32s", "none")]
    stores = []
    real = spill.BlockInputs

    class Counting(real):
        def __init__(self, cap_bytes):
            super().__init__(cap_bytes)
            stores.append(self)

        def put(self, index, hidden):
            super().put(index, hidden)
            self.most_files = max(getattr(self, "most_files", 0), len(self.files))

    monkeypatch.setattr("bitplan.profiles.sensitivity.BlockInputs", Counting)
    in_memory = profile_sensitivity(tiny_llama_folder, config, spec, schemes, tokens, seed=0)
    one_input = 2 * 16 * config["hidden_size"] * 4  # bytes of one block's input
    on_disk = profile_sensitivity(tiny_llama_folder, config, spec, schemes, tokens, seed=0, activation_cap=2 * one_input)
    assert stores[0].most_files == 0 and stores[1].most_files == spec.num_blocks - 2  # two held, the rest spilled
    assert torch.equal(on_disk.scores, in_memory.scores) and torch.equal(on_disk.bytes, in_memory.bytes)
    assert not list(private_cache.glob("block-inputs-*"))  # the spill folder is removed with the store
