"""GGUF checkpoints: bitplan's writer (bitplan.checkpoints.gguf) judged by llama.cpp itself.

Tests that need llama.cpp find the build through ``BITPLAN_LLAMA_CPP`` (``make llama-cpp`` or
``scripts/build_llama_cpp.sh PREFIX``) and skip without it. On SmolLM2 they check that a mixed
assignment written by bitplan is byte for byte what ``llama-quantize --tensor-type-file`` writes
(with and without an imatrix from ``llama-imatrix``), that every tensor takes exactly the predicted
bytes, and that llama.cpp's logits on bitplan's file agree with transformers running the weights
bitplan decodes from it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from bitplan.checkpoints import gguf as bg
from bitplan.checkpoints import llamacpp
from bitplan.checkpoints.gguf_file import read_gguf, tensor_bytes
from bitplan.checkpoints.llamacpp_logits import llama_logits
from bitplan.errors import BitplanError
from bitplan.kernels.layout import tensor_size_bytes

BLOCKS = 30
KINDS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
         "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
# (block, type of q/k/v/o/gate/up, type of down): down_proj has 1536 inputs and takes k-quants
MIX = [(0, "Q8_0", "Q8_0"), (1, "Q8_0", "Q8_0"), (2, "Q4_0", "Q4_K"), (3, "Q4_0", "Q4_K"), (4, "Q5_1", "Q6_K"),
       (5, "Q5_1", "Q6_K"), (6, "Q5_0", "Q5_K"), (7, "Q4_1", "Q3_K"), (8, "BF16", "Q2_K"), (9, "F32", "Q4_0")]
# k-quants asked for on 576-wide rows: llama-quantize falls back (Q4_K -> Q5_0, Q6_K -> Q8_0, ...)
FALLBACK_BLOCK = {"q": "Q4_K", "k": "Q6_K", "v": "Q2_K", "o": "Q5_K", "gate": "Q3_K", "up": "F16", "down": "Q8_0"}


def linear(block: int, kind: str) -> str:
    return f"model.layers.{block}.{KINDS[kind]}.weight"


def mixed_assignment() -> dict[str, str]:
    """HF weight name -> requested type: F16 everywhere, the MIX blocks, block 10 asking for
    k-quants its rows cannot take, the (tied) embedding in Q8_0."""
    assignment = {linear(b, k): "F16" for b in range(BLOCKS) for k in KINDS}
    for block, attention, down in MIX:
        assignment.update({linear(block, k): attention for k in KINDS if k != "down"})
        assignment[linear(block, "down")] = down
    assignment.update({linear(10, k): t for k, t in FALLBACK_BLOCK.items()})
    assignment["model.embed_tokens.weight"] = "Q8_0"
    return assignment


# ------------------------------------------------------------------------------ without llama.cpp


def test_hf_names_map_to_llama_cpp_names():
    names = llamacpp.gguf_tensor_names(
        ["model.embed_tokens.weight", "model.layers.3.self_attn.q_proj.weight", "model.layers.29.mlp.down_proj.weight",
         "model.layers.0.input_layernorm.weight", "model.norm.weight"], BLOCKS)
    assert list(names.values()) == ["token_embd.weight", "blk.3.attn_q.weight", "blk.29.ffn_down.weight",
                                    "blk.0.attn_norm.weight", "output_norm.weight"]
    with pytest.raises(BitplanError, match="no llama.cpp tensor name"):
        llamacpp.gguf_tensor_names(["model.layers.0.mlp.shared_expert.weight"], BLOCKS)


def test_tensor_type_file_anchors_every_name():
    text = llamacpp.tensor_type_file_text({"blk.1.attn_q.weight": "Q4_0", "token_embd.weight": "Q8_0"})
    assert text.split() == [r"^blk\.1\.attn_q\.weight$=Q4_0", r"^token_embd\.weight$=Q8_0"]  # blk.1 never matches blk.11


def test_base_type_is_the_quantized_type_with_most_weights():
    elements = {"a": 100, "b": 10, "c": 1000}
    assert llamacpp.recipe_base_type({"a": "Q4_0", "b": "Q6_K", "c": "F16"}, elements) == "Q4_0"
    assert llamacpp.recipe_base_type({"c": "F16"}, elements) == "Q8_0"  # never an F16 ftype: it would ignore the recipe


def test_row_sizes_a_type_cannot_store_are_refused():
    shapes = {"blk.0.attn_q.weight": (576, 576), "blk.0.ffn_down.weight": (576, 1536)}
    bg.check_row_sizes({"blk.0.ffn_down.weight": "Q4_K", "blk.0.attn_q.weight": "Q4_0"}, shapes)
    with pytest.raises(BitplanError, match=r"Q4_K on 576 columns \(llama-quantize would write Q5_0\)"):
        bg.check_row_sizes({"blk.0.attn_q.weight": "Q4_K"}, shapes)
    assert bg.with_llama_quantize_fallback({"blk.0.attn_q.weight": "Q6_K", "blk.0.ffn_down.weight": "Q6_K"}, shapes) == {
        "blk.0.attn_q.weight": "Q8_0", "blk.0.ffn_down.weight": "Q6_K"}


def test_unpermute_inverts_convert_hf_to_gguf_permute():
    def permute(weights, n_head):  # LlamaModel.permute, conversion/llama.py
        return weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)

    weight = torch.randn(192, 8)
    assert torch.equal(bg.unpermute_rope_rows(permute(weight, 3), 3), weight)


def test_imatrix_is_read_as_llama_quantize_reads_it(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "imatrix.gguf", "imatrix")
    writer.add_tensor("blk.0.ffn_down.weight.in_sum2", np.array([[2.0, 3.0, 5.0, 7.0]], np.float32))
    writer.add_tensor("blk.0.ffn_down.weight.counts", np.array([[4.0]], np.float32))
    writer.add_tensor("blk.0.ffn_up.weight.in_sum2", np.array([[2.0, 3.0]], np.float32))
    writer.add_tensor("blk.0.ffn_up.weight.counts", np.array([[0.0]], np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    values = llamacpp.read_imatrix(tmp_path / "imatrix.gguf")
    np.testing.assert_array_equal(values["blk.0.ffn_down.weight"], np.float32([2, 3, 5, 7]) / np.float32(4))
    np.testing.assert_array_equal(values["blk.0.ffn_up.weight"], [1, 1])  # no count: ones, as load_imatrix


KLD_OUTPUT = """
====== Perplexity statistics ======
Mean PPL(Q)                   :  16.381220 ±   1.101872
Mean PPL(base)                :  15.612345 ±   1.050000
====== KL divergence statistics ======
Mean    KLD:   0.031234 ±   0.001200
Maximum KLD:   1.234567
Median  KLD:   0.012345
====== Token probability statistics ======
RMS Δp    :  4.321 ± 0.123 %
Same top p: 91.250 ± 0.876 %
"""


def test_kl_divergence_summary_is_parsed():
    result = llamacpp.parse_kl_divergence(KLD_OUTPUT, ctx=128)
    assert (result.mean_kld, result.median_kld, result.ppl, result.ppl_base) == (0.031234, 0.012345, 16.38122, 15.612345)
    assert math.isclose(result.same_top_p, 0.9125) and math.isclose(result.rms_delta_p, 0.04321)
    with pytest.raises(BitplanError, match="at least 100 scored tokens"):
        llamacpp.parse_kl_divergence("perplexity: 12.3", ctx=128)


def test_a_missing_build_says_how_to_make_one(tmp_path):
    with pytest.raises(BitplanError, match="make llama-cpp"):
        llamacpp.find_llama_cpp(tmp_path)


# ------------------------------------------------------------------------------ with llama.cpp


@pytest.fixture(scope="module")
def build():
    if not os.environ.get(llamacpp.PREFIX_ENV):
        pytest.skip("no llama.cpp build: set BITPLAN_LLAMA_CPP to a build prefix (make llama-cpp / scripts/build_llama_cpp.sh)")
    return llamacpp.find_llama_cpp()


@pytest.fixture(scope="module")
def source(build, smollm_folder):
    """SmolLM2 as llama.cpp's convert_hf_to_gguf.py writes it in F32 (cached after the first run)."""
    return bg.source_gguf(smollm_folder, build=build)


@pytest.fixture(scope="module")
def files(build, smollm_folder, source, tmp_path_factory):
    """The mixed assignment written by bitplan and by llama-quantize, each with and without an
    imatrix from llama-imatrix (8 chunks of 128 tokens of the calibration text)."""
    folder = tmp_path_factory.mktemp("gguf")
    text = llamacpp.write_text_file(llamacpp.builtin_text("calibration"), folder / "calibration.txt")
    imatrix = llamacpp.compute_imatrix(source, text, folder / "imatrix.gguf", ctx=128, chunks=8, build=build)
    requested = mixed_assignment()
    tensors = read_gguf(source).tensors
    hf_to_gguf = llamacpp.gguf_tensor_names(list(requested), BLOCKS)
    shapes = {name: tensors[hf_to_gguf[name]].shape for name in requested}
    effective = bg.with_llama_quantize_fallback(requested, shapes)
    recipe = bg.gguf_recipe(smollm_folder, requested, tensors)  # llama-quantize gets the raw requests
    paths = {}
    for tag, weights in (("plain", None), ("imatrix", imatrix)):
        paths[f"bitplan-{tag}"] = Path(bg.write_gguf(smollm_folder, folder / f"bitplan-{tag}.gguf", effective, weights, source).path)
        paths[f"llama-{tag}"] = llamacpp.quantize_with_recipe(
            source, folder / f"llama-{tag}.gguf", recipe, imatrix=folder / "imatrix.gguf" if weights else None, build=build)
    yield {"paths": paths, "effective": {hf_to_gguf[n]: t for n, t in effective.items()}}
    for path in paths.values():  # 4 x 208 MB that pytest would otherwise keep for three sessions
        path.unlink(missing_ok=True)


@pytest.mark.parametrize("tag", ["plain", "imatrix"])
def test_bitplan_writes_the_bytes_llama_quantize_writes(files, tag):
    ours_path, theirs_path = files["paths"][f"bitplan-{tag}"], files["paths"][f"llama-{tag}"]
    ours, theirs = read_gguf(ours_path).tensors, read_gguf(theirs_path).tensors
    assert set(ours) == set(theirs) and len(ours) == 272
    for name, tensor in ours.items():
        assert tensor.ggml_type == theirs[name].ggml_type, name
        assert np.array_equal(tensor_bytes(ours_path, tensor), tensor_bytes(theirs_path, theirs[name])), f"{name} ({tensor.ggml_type}) differs"
    for name, ggml_type in files["effective"].items():
        assert ours[name].ggml_type == ggml_type  # incl. llama-quantize's fallback on block 10
    assert ours["blk.10.attn_q.weight"].ggml_type == "Q5_0" and ours["blk.2.ffn_down.weight"].ggml_type == "Q4_K"


def test_every_tensor_takes_the_predicted_bytes(files):
    """The file's layout itself: each tensor's data runs to the next one's offset (after alignment
    padding) and the last one to the end of the file."""
    for path in files["paths"].values():
        contents = read_gguf(path)
        tensors = sorted(contents.tensors.values(), key=lambda t: t.offset)
        ends = [t.offset for t in tensors[1:]] + [os.path.getsize(path)]
        for tensor, end in zip(tensors, ends):
            predicted = tensor_size_bytes(tensor.ggml_type, tensor.shape)
            assert end - tensor.offset == -(-predicted // contents.alignment) * contents.alignment, (path.name, tensor.name)


def test_general_file_type_matches_llama_quantize(files):
    for tag in ("plain", "imatrix"):
        ours = read_gguf(files["paths"][f"bitplan-{tag}"]).metadata["general.file_type"][1]
        theirs = read_gguf(files["paths"][f"llama-{tag}"]).metadata["general.file_type"][1]
        assert ours == theirs == 7  # Q8_0 holds the most weights (the tied embedding)


def test_write_refuses_a_k_quant_on_576_columns(smollm_folder, source, tmp_path):
    with pytest.raises(BitplanError, match=r"blk\.0\.attn_q\.weight: Q4_K on 576 columns"):
        bg.write_gguf(smollm_folder, tmp_path / "bad.gguf", {linear(0, "q"): "Q4_K"}, source=source)
    assert not (tmp_path / "bad.gguf").exists()


def kl_and_top1(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    log_p, log_q = torch.log_softmax(reference, -1), torch.log_softmax(other, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean().item()
    return kl, (reference.argmax(-1) == other.argmax(-1)).float().mean().item()


@pytest.fixture(scope="module")
def judge(smollm_folder):
    """transformers' float32 SmolLM2 and 2 windows of 128 held-out tokens; ``logits(weights)``
    runs it with some weights replaced."""
    from transformers import AutoModelForCausalLM

    from bitplan.checkpoints.verify import heldout_tokens

    model = AutoModelForCausalLM.from_pretrained(smollm_folder, dtype=torch.float32).eval()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    tokens = heldout_tokens(smollm_folder, windows=2, seq_len=128)

    def logits(weights: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        model.load_state_dict(original)
        model.load_state_dict(weights or {}, strict=False)
        with torch.no_grad():
            return model(tokens).logits

    return tokens, logits


def test_llama_cpp_logits_are_float32_exact_on_an_f32_gguf(build, source, judge):
    tokens, logits = judge
    difference = (llama_logits(source, tokens, build=build) - logits()).abs().max().item()
    assert difference < 1e-3  # measured 1e-4: float32 summation order only


@pytest.fixture(scope="module")
def bitplan_logits(smollm_folder, files, judge):
    """transformers float32 with the weights bitplan decodes from each written file."""
    _, logits = judge
    return {tag: logits(bg.dequantized_hf_weights(files["paths"][f"bitplan-{tag}"], smollm_folder)) for tag in ("plain", "imatrix")}


@pytest.mark.parametrize("tag", ["imatrix", "plain"])
def test_llama_cpp_logits_agree_with_bitplan_dequantized(build, files, judge, bitplan_logits, tag):
    """Tolerance (measured, bench/gguf_llama_cpp.py): llama.cpp rounds every matmul input to the
    weight's vec_dot_type (8 bits: Q8_0/Q8_1/Q8_K; F16 for F16), which a float32 model does not, and
    that 8-bit requantization amplifies any small upstream difference: llama.cpp's own switch from
    F32 to F16 attention moves this file's logits by KL 0.002 (mean |d| 0.10), against 0.0018 mean
    on the F32 model. bitplan vs llama.cpp measures KL 0.003, top-1 97 %. So the bound is absolute
    (KL < 0.01, top-1 >= 92 %) and relative: llama.cpp must be 5x closer to the weights bitplan
    wrote than to the same recipe with (or without) the imatrix (KL 0.048), and than those weights
    are to the unquantized model (KL 0.03 / 0.05)."""
    tokens, logits = judge
    ours, alternative = bitplan_logits[tag], bitplan_logits["plain" if tag == "imatrix" else "imatrix"]
    theirs = llama_logits(files["paths"][f"bitplan-{tag}"], tokens, build=build)
    kl, top1 = kl_and_top1(ours, theirs)
    kl_alternative, _ = kl_and_top1(alternative, theirs)
    kl_quantization, _ = kl_and_top1(logits(), ours)
    assert kl < 0.01 and top1 >= 0.92, (kl, top1)
    assert 5 * kl < kl_alternative and 5 * kl < kl_quantization, (kl, kl_alternative, kl_quantization)


@pytest.mark.slow
def test_llama_perplexity_kl_divergence(build, source, files, tmp_path):
    """llama.cpp's own KL measurement runs and parses; its saved base log-probs decode to
    llama.cpp's logits (same defaults: F16 KV cache, flash attention) to within the 16-bit code step."""
    text = llamacpp.write_text_file(llamacpp.builtin_text("heldout"), tmp_path / "heldout.txt")
    saved = tmp_path / "base.kld"
    result = llamacpp.kl_divergence(source, files["paths"]["bitplan-imatrix"], text, ctx=128, chunks=4, base_logprobs=saved, build=build)
    assert result.chunks == 4 and result.tokens == 4 * 63
    assert 0 < result.mean_kld < 0.2 and 0.7 < result.same_top_p <= 1 and result.ppl > result.ppl_base * 0.9
    tokens, logprobs = llamacpp.read_kld_base(saved)
    assert tokens.shape == (4, 128) and logprobs.shape == (4, 63, 49152)
    logits = llama_logits(source, torch.from_numpy(tokens[:1].astype(np.int64)), exact_attention=False, build=build)
    expected = torch.log_softmax(logits[0, 64:127].double(), -1).numpy()
    kept = expected > expected.max(-1, keepdims=True) - 15.9  # the file floors everything 16 nats below the top
    assert np.abs(logprobs[0][kept] - expected[kept]).max() < 2e-4
