"""Folding smoothing scales keeps the model's function: every fold path on a small Llama block.

SmolLM2 uses grouped-query attention, so its v_proj -> o_proj fold is never taken; this block has
as many kv heads as heads, so AWQ on o_proj folds into v_proj's rows, AWQ on down_proj into
up_proj's rows (which SmoothQuant then smooths again from the norm), and q/k/v into the norm.
At 8 bits the quantization error is small, so a wrong fold (scales applied on one side only)
shows as a large change in the logits.
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bitplan.methods.block import quantize_block
from bitplan.methods.scheme import QuantizedWeight, Scheme
from bitplan.models.spec import spec_from_config
from bitplan.planner.quality import QualityMeter

CONFIG = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
              num_key_value_heads=4, vocab_size=97, max_position_embeddings=64, rms_norm_eps=1e-5, tie_word_embeddings=True,
              torch_dtype="float32")
SCHEMES = {"q": "awq-w8gcs", "k": "awq-w8gcs", "v": "awq-w8gcs", "o": "awq-w8gcs",
           "gate": "smoothquant-w8gcsa8", "up": "smoothquant-w8gcsa8", "down": "awq-w8gcs"}


def tiny_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"}))
    with torch.no_grad():  # outlier input channels, as real activations have, so the scales matter
        model.model.layers[0].input_layernorm.weight.mul_(torch.linspace(0.2, 5.0, 64)[torch.randperm(64)])
        model.model.layers[0].post_attention_layernorm.weight.mul_(torch.linspace(0.2, 5.0, 64)[torch.randperm(64)])
    return model.eval().requires_grad_(False)


def test_every_fold_path_keeps_the_logits():
    model = tiny_model()
    spec = spec_from_config(CONFIG)
    assert spec.layer("model.layers.0.self_attn.o_proj").smoothed_by == "self_attn.v_proj"
    assignments = {layer.name: Scheme.parse(SCHEMES[layer.kind]) for layer in spec.layers}
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    meter = QualityMeter(model, spec, batch_size=4)
    meter.calibrate(ids)
    block = quantize_block(list(spec.layers), assignments, meter.read, meter.stats, torch.float32)
    assert set(block.replaced) == {"model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"}
    assert set(block.smoothing) == {"model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
                                    "model.layers.0.self_attn.v_proj", "model.layers.0.mlp.up_proj"}
    assert block.activations == {"model.layers.0.mlp.gate_proj": "int8", "model.layers.0.mlp.up_proj": "int8"}
    # v_proj's stored rows carry o_proj's scales: far from the original rows, yet the block computes the same
    v = block.linears["model.layers.0.self_attn.v_proj"]
    assert isinstance(v, QuantizedWeight)
    original_v = meter.read("model.layers.0.self_attn.v_proj.weight")
    assert (v.dequantize() - original_v).norm() > 0.2 * original_v.norm()
    meter.apply(assignments)
    with torch.no_grad():
        reference, quantized = model(ids).logits, meter.working(ids).logits
    assert ((quantized - reference).norm() / reference.norm()) < 0.02


def test_a_fold_on_one_side_only_would_be_caught():
    """The check above can fail: dropping the norm fold alone breaks the logits."""
    model = tiny_model()
    spec = spec_from_config(CONFIG)
    assignments = {layer.name: Scheme.parse(SCHEMES[layer.kind]) for layer in spec.layers}
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    meter = QualityMeter(model, spec, batch_size=4)
    meter.calibrate(ids)
    meter.apply(assignments)
    meter.set_tensor("model.layers.0.input_layernorm.weight", meter.params["model.layers.0.input_layernorm.weight"])
    with torch.no_grad():
        reference, broken = model(ids).logits, meter.working(ids).logits
    assert ((broken - reference).norm() / reference.norm()) > 0.05


def test_a_block_reads_each_linear_when_its_turn_comes():
    """Emit and refinement quantize a block through ``quantize_block``: without smoothing, a Linear's
    float32 weight is read when it is quantized and dropped after, so an 8B block's 0.81 GB of float32
    weights is never held at once (only a smoothing group's members are read together); the result is
    the same as reading them all first."""
    import weakref

    model = tiny_model()
    spec = spec_from_config(CONFIG)
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(1))
    meter = QualityMeter(model, spec, batch_size=4)
    meter.calibrate(ids)
    for schemes, most in (({kind: "gptq-w4g32s" for kind in SCHEMES}, 1), (SCHEMES, 7)):
        assignments = {layer.name: Scheme.parse(schemes[layer.kind]) for layer in spec.layers}
        alive: list[weakref.ref] = []
        held: list[int] = []

        def read(name):
            tensor = meter.read(name)
            if tensor is not None and name.endswith("proj.weight"):
                tensor = tensor.clone()  # a fresh tensor, as a reader of safetensors gives
                held.append(sum(ref() is not None for ref in alive) + 1)
                alive.append(weakref.ref(tensor))
            return tensor

        block = quantize_block(list(spec.layers), assignments, read, meter.stats, torch.float32)
        assert max(held) == most, held
        eager = quantize_block(list(spec.layers), assignments, meter.read, meter.stats, torch.float32)
        assert all(torch.equal(block.linears[name].dequantize(), eager.linears[name].dequantize()) for name in eager.linears)
