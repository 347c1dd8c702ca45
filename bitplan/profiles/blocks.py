"""Run a model one decoder block at a time, holding only that block's weights.

transformers supplies the block modules (built on the meta device, then filled from
safetensors); bitplan supplies the order. Peak memory is one block's weights plus the hidden
states of the tokens in flight, whatever the model's depth.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from bitplan.models.architectures import Family
from bitplan.models.source import WeightReader
from bitplan.models.spec import family_for


def hf_config(config: dict):
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config", "architectures")}
    hf = AutoConfig.for_model(config["model_type"], **fields)
    hf._attn_implementation = "sdpa"
    return hf


def skeleton_model(config: dict) -> nn.Module:
    """The model's modules on the meta device: shapes and code, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.float32)


class BlockRunner:
    """Embedding, decoder blocks and head of a model, loaded on demand from safetensors."""

    def __init__(self, config: dict, reader: WeightReader):
        self.config = config
        self.family: Family = family_for(config)
        self.reader = reader
        self.skeleton = skeleton_model(config)
        rotary = self.skeleton.model.rotary_emb
        self.rotary = type(rotary)(config=hf_config(config))
        self.num_blocks = int(config["num_hidden_layers"])

    def block_prefix(self, index: int) -> str:
        return f"{self.family.block_prefix}.{index}."

    def load_block(self, index: int, overrides: dict[str, torch.Tensor] | None = None) -> nn.Module:
        """Decoder block ``index`` with its weights (float32); ``overrides`` replaces some by suffix."""
        block = copy.deepcopy(self.skeleton.model.layers[index]).to_empty(device="cpu")
        state = self.reader.tensors(self.block_prefix(index))
        state.update(overrides or {})
        block.load_state_dict(state, strict=True)
        block.eval().requires_grad_(False)
        return block

    def embedding_weight(self) -> torch.Tensor:
        return self.reader.tensor(f"{self.family.embedding}.weight")

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(input_ids, self.embedding_weight())

    def position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        return self.rotary(hidden, positions)

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(final norm weight, lm_head weight); a tied head reuses the embedding."""
        norm = self.reader.tensor(f"{self.family.final_norm}.weight")
        name = f"{self.family.lm_head}.weight"
        head = self.reader.tensor(name) if self.reader.has(name) else self.embedding_weight()
        return norm, head

    def final_norm(self, hidden: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
        eps = float(self.config.get("rms_norm_eps", 1e-6))
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return hidden * torch.rsqrt(variance + eps) * norm_weight


def run_block(block: nn.Module, hidden: torch.Tensor, position_embeddings, batch_size: int = 4) -> torch.Tensor:
    """One block over ``hidden`` [sequences, tokens, width], a few sequences at a time."""
    outputs = [
        block(hidden[start : start + batch_size], position_embeddings=position_embeddings)
        for start in range(0, hidden.shape[0], batch_size)
    ]
    return torch.cat(outputs)


def block_input_stats(
    block: nn.Module, prefix: str, names: list[str], hidden: torch.Tensor, position_embeddings, batch_size: int = 4
) -> tuple[dict, torch.Tensor]:
    """Run one block over ``hidden`` while gathering each named Linear's ``InputStats``.

    Returns ({full Linear name: {"input": InputStats}}, the block's output). Linears that share
    an input tensor (q/k/v, gate/up) share one accumulator.
    """
    from bitplan.methods.calibration_stats import planner_stats

    stats: dict[str, dict] = {}
    seen: dict[int, object] = {}
    keep: list[torch.Tensor] = []

    def hook_for(name: str):
        def hook(module, args):
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = stats[name]["input"] if name in stats else planner_stats(x.shape[-1])
                seen[id(x)].add(x)
                keep.append(x)
            stats.setdefault(name, {"input": seen[id(x)]})

        return hook

    handles = [block.get_submodule(name[len(prefix):]).register_forward_pre_hook(hook_for(name)) for name in names]
    try:
        with torch.no_grad():
            outputs = []
            for start in range(0, hidden.shape[0], batch_size):
                seen.clear()
                keep.clear()
                outputs.append(block(hidden[start : start + batch_size], position_embeddings=position_embeddings))
    finally:
        for handle in handles:
            handle.remove()
    return stats, torch.cat(outputs)
