import json
from pathlib import Path

import pytest

from bitplan.errors import BitplanError
from bitplan.models.spec import spec_from_config, spec_from_folder

CONFIGS = Path(__file__).parent.parent / "data" / "configs"


def test_smollm_has_210_linears_with_kinds_and_fused_groups(smollm_folder):
    spec = spec_from_folder(smollm_folder)
    assert len(spec.layers) == 210 and spec.num_blocks == 30
    first = {layer.kind: layer for layer in spec.layers if layer.block == 0}
    assert (first["q"].out_features, first["q"].in_features) == (576, 576)
    assert (first["k"].out_features, first["v"].out_features) == (192, 192)
    assert (first["down"].in_features, first["down"].out_features) == (1536, 576)
    assert first["q"].fused_key == first["k"].fused_key == "0.qkv"
    assert first["gate"].fused_key == first["up"].fused_key != first["down"].fused_key
    assert spec.tie_word_embeddings and not any(layer.kind == "lm_head" for layer in spec.layers)
    # tied embedding 49152 x 576, 61 norms of 576, in bf16
    assert spec.unquantized_bytes == (49152 * 576 + 61 * 576) * 2


def test_untied_llama3_8b_has_an_lm_head_candidate():
    spec = spec_from_config(json.loads((CONFIGS / "llama-3-8b.json").read_text()))
    assert len(spec.layers) == 32 * 7 + 1
    head = spec.layers[-1]
    assert head.kind == "lm_head" and (head.out_features, head.in_features) == (128256, 4096)
    assert spec.linear_weights == 32 * (4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336) + 128256 * 4096


def test_unsupported_architecture_names_the_supported_ones():
    with pytest.raises(BitplanError, match="unsupported architecture 'gpt2'.*llama"):
        spec_from_config({"model_type": "gpt2", "hidden_size": 8})


def test_incomplete_config_is_refused():
    with pytest.raises(BitplanError, match="lacks the intermediate_size field"):
        spec_from_config({"model_type": "llama", "hidden_size": 8})
