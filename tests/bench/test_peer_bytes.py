"""bench/peers.py counts every peer's bytes of the quantized Linears the same way (bench/peer_bytes.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import numpy as np

from bitplan.methods.scheme import Scheme
from bitplan.models.spec import spec_from_config
from bitplan.planner.baselines import uniform_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import peer_bytes as pb  # noqa: E402

CONFIG = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 128,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 256,
          "tie_word_embeddings": True, "dtype": "bfloat16"}
# (out, in) of each block's q, k, v, o, gate, up, down
SHAPES = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]


def test_gguf_counts_only_the_block_linears_in_ggml_block_bytes(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "m.gguf", "llama")
    raw = {  # name: (type, rows, columns, bytes per block, weights per block)
        "blk.0.attn_q.weight": (gguf.GGMLQuantizationType.Q8_0, 64, 64, 34, 32),
        "blk.0.ffn_down.weight": (gguf.GGMLQuantizationType.Q4_K, 64, 256, 144, 256),
        "blk.1.attn_v.weight": (gguf.GGMLQuantizationType.Q4_1, 32, 64, 20, 32),
        "token_embd.weight": (gguf.GGMLQuantizationType.Q8_0, 256, 64, 34, 32),
    }
    for name, (kind, rows, cols, block_bytes, block_weights) in raw.items():
        data = np.zeros((rows, cols // block_weights * block_bytes), np.uint8)
        writer.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)  # raw_shape: bytes
    writer.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    types = pb.gguf_linear_types(tmp_path / "m.gguf")
    assert set(types) == {"blk.0.attn_q.weight", "blk.0.ffn_down.weight", "blk.1.attn_v.weight"}  # no embedding, no norm
    assert pb.gguf_linear_bytes(tmp_path / "m.gguf") == 64 * 2 * 34 + 64 * 144 + 32 * 2 * 20
    assert pb.grid_share(types) == (2, 64 * 144 + 32 * 2 * 20)  # the Q4_K and Q4_1 tensors are flagged (bench/grid_ride.py)


def test_uniform_and_autoround_bytes_are_codes_plus_one_scale_per_group():
    spec = spec_from_config(CONFIG)
    assert [(layer.out_features, layer.in_features) for layer in spec.layers[:7]] == SHAPES
    shape_tensor = 16  # compressed-tensors' weight_shape (two int64) per Linear
    # 4-bit symmetric, groups of 64: in/2 bytes of codes per row and one bf16 scale per group of 64
    expected = 2 * sum(out * inp // 2 + out * (inp // 64) * 2 + shape_tensor for out, inp in SHAPES)
    assert pb.scheme_linear_bytes(spec, uniform_assignment(spec, Scheme.parse("gptq-w4g64s"))) == expected
    # group 128 does not divide 64 inputs: the uniform baseline falls back to 64 there, and keeps 128 on down_proj
    g128 = pb.scheme_linear_bytes(spec, uniform_assignment(spec, Scheme.parse("awq-w4g128s")))
    assert g128 == expected - 2 * 64 * 2  # down_proj: one scale per row fewer
    # auto-round's per-layer configuration counts as the same integer scheme; a Linear it left out stays bf16
    config = {layer.name: {"bits": 4, "group_size": 64, "sym": True} for layer in spec.layers}
    assert pb.autoround_linear_bytes(spec, config) == expected
    del config[spec.layers[0].name]
    assert pb.autoround_linear_bytes(spec, config) == expected - (64 * 32 + 64 * 2 + shape_tensor) + 64 * 64 * 2
    assert pb.linear_weights(spec) == 2 * sum(out * inp for out, inp in SHAPES)


def test_near_grid_schemes_are_flagged():
    assert pb.scheme_near_grid(Scheme.parse("rtn-w4g32a"))
    assert pb.scheme_near_grid(Scheme.ggml("Q5_1"))
    assert not pb.scheme_near_grid(Scheme.parse("rtn-w4g32s"))
    assert not pb.scheme_near_grid(Scheme.parse("gptq-w4g64a"))
    assert pb.scheme_near_grid(Scheme.ggml("Q4_K")) and pb.scheme_near_grid(Scheme.ggml("Q5_K"))  # bench/grid_ride.py
    assert not pb.scheme_near_grid(Scheme.ggml("Q4_0")) and not pb.scheme_near_grid(Scheme.ggml("Q6_K"))


def test_a_rerun_reuses_only_the_external_peers_of_the_same_evaluator(tmp_path):
    """``peers.py --reuse``: llama.cpp and AutoRound rows come from a saved peers.json measured on the same windows;
    bitplan's own rows (uniform GPTQ/AWQ, plans) are measured again; another evaluator's file is refused."""
    import json

    import peers
    import pytest

    evaluator = {"model": "smollm2-135m", "heldout": 2, "seq_len": 512, "tokens": {"pydoc": [4, 512]}}
    saved = {"evaluator": evaluator, "when": "2026-12-05 08:37", "peers": [
        {"peer": "llama.cpp Q3_K_S (imatrix)", "family": "llama.cpp", "preset": "Q3_K_S", "settings": {"imatrix_chunks": 16},
         "bytes": 1, "kl": {"pydoc": 0.29}},
        {"peer": "AutoRound signround-w3g64-i10n8", "family": "AutoRound", "bytes": 2, "kl": {"pydoc": 0.62}},
        {"peer": "uniform gptq-w3g64s (bitplan's GPTQ)", "family": "uniform", "bytes": 3, "kl": {"pydoc": 1.37}},
        {"peer": "AutoRound rtn-w3g64", "family": "AutoRound", "skipped": "no venv"}]}
    path = tmp_path / "peers.json"
    path.write_text(json.dumps(saved))
    rows = peers.Rows(tmp_path / "rows.json", evaluator)
    assert rows.reuse(path, ("llama.cpp", "AutoRound")) == 2
    assert rows.get("gguf:Q3_K_S:imatrix16")["kl"] == {"pydoc": 0.29}
    assert rows.get("autoround:signround-w3g64-i10n8")["reused_from"] == "peers.json of 2026-12-05 08:37"
    assert rows.get("uniform:gptq-w3g64s:cal16") is None and rows.get("autoround:rtn-w3g64") is None
    with pytest.raises(SystemExit, match="another evaluator"):
        peers.Rows(tmp_path / "rows.json", dict(evaluator, heldout=4)).reuse(path, ("llama.cpp",))
