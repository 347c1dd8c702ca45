"""Run a model one decoder block at a time, holding only that block's weights.

transformers supplies the block modules (built on the meta device, then filled from
safetensors); bitplan supplies the order. Peak memory is one block's weights plus the hidden
states of the tokens in flight, whatever the model's depth.

What the whole model does around its blocks comes from the family's data and the transformers
config, so the blocks see exactly what they see inside the model: the embedding scale (Gemma's
sqrt(hidden)), rotary embeddings per layer type (Gemma 3's local and global), the attention mask
of each block's layer type (causal or sliding window, built by transformers' own mask functions),
the final norm's offset (Gemma's ``1 + w``) and the final logit soft-capping (Gemma 2).
"""

from __future__ import annotations

import copy
import inspect

import torch
from torch import nn

from bitplan.errors import BitplanError
from bitplan.memory import release_freed_memory
from bitplan.methods.scheme import QuantizedWeight
from bitplan.models.architectures import Family
from bitplan.models.experts import rename_modules, unfuse_experts
from bitplan.models.source import READ_ROWS, WeightReader
from bitplan.models.spec import family_for


def hf_config(config: dict):
    from transformers import AutoConfig

    if family_for(config).measured:
        raise BitplanError(f"{config['model_type']}: {family_for(config).measured}")
    fields = {k: v for k, v in config.items() if k not in ("model_type", "quantization_config", "architectures")}
    hf = AutoConfig.for_model(config["model_type"], **fields)
    hf._attn_implementation = family_for(config).attention
    return hf


def skeleton_model(config: dict) -> nn.Module:
    """The model's modules on the meta device: shapes and code, no memory. A family bitplan plans
    but cannot run (``Family.measured``) is refused here."""
    from transformers import AutoModelForCausalLM

    family = family_for(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.float32)
        rename_modules(model, family)  # under the checkpoint's names (Mixtral's block_sparse_moe)
        if family.experts is not None:  # one Linear per expert, under the checkpoint's names
            unfuse_experts(model, family.experts, family.block_prefix)
    return model


def restore_buffers(model: nn.Module) -> None:
    """Recompute the buffers no checkpoint holds (rotary frequencies, Gemma's embedding scale),
    left as garbage by ``to_empty``: transformers' own initialiser, on the modules that own them."""
    for module in model.modules():
        if module._non_persistent_buffers_set:
            model._init_weights(module)


def unfused_dense_model(config: dict, reader: WeightReader, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The whole unquantized model as bitplan runs it (a MoE family's experts unfused, see
    ``models.experts``), filled from safetensors under the checkpoint's names."""
    model = skeleton_model(config).to_empty(device="cpu").to(dtype)
    restore_buffers(model)
    state = {name: reader.tensor(name).to(dtype) for name in reader.location}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    if unexpected or [name for name in missing if not (tied and name.startswith("lm_head"))]:
        raise BitplanError(f"{reader.folder} does not match its config.json ({len(missing)} missing, {len(unexpected)} unexpected tensors)")
    if tied:
        model.tie_weights()
    return model.eval().requires_grad_(False)


HEAD_ROWS = 16384  # rows of a 16-bit head widened to float32 at a time (128 MiB at width 2048)


class BlockRunner:
    """Embedding, decoder blocks and head of a model, loaded on demand from safetensors."""

    def __init__(self, config: dict, reader: WeightReader):
        self.config = config
        self.family: Family = family_for(config)
        self.reader = reader
        self.skeleton = skeleton_model(config)
        self.hf = hf_config(config)
        rotary = self.skeleton.model.rotary_emb
        self.rotary = type(rotary)(config=self.hf)
        self.num_blocks = int(config["num_hidden_layers"])

    def block_prefix(self, index: int) -> str:
        return f"{self.family.block_prefix}.{index}."

    def layer_type(self, index: int) -> str:
        """"full_attention" or "sliding_attention", as the whole model picks the block's mask."""
        layer_types = getattr(self.hf, "layer_types", None)
        if layer_types:
            return layer_types[index]
        return "sliding_attention" if getattr(self.hf, "sliding_window", None) else "full_attention"

    def attention_mask(self, layer_type: str, hidden: torch.Tensor):
        """The mask transformers builds for ``layer_type`` over ``hidden`` [sequences, tokens, width] (None: causal)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        make = create_sliding_window_causal_mask if layer_type == "sliding_attention" else create_causal_mask
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        return make(config=self.hf, inputs_embeds=hidden, attention_mask=None, cache=None, position_ids=positions)

    def load_block(self, index: int, overrides: dict[str, torch.Tensor | QuantizedWeight] | None = None) -> nn.Module:
        """Decoder block ``index`` with its weights (float32); ``overrides`` replaces some by suffix.

        Called as ``block(hidden, position_embeddings=...)`` with what :meth:`position_embeddings`
        returns; a pre-hook picks the block's layer type's rotary and gives it its attention mask.
        """
        release_freed_memory()  # what the previous block freed, before this one is allocated
        block = copy.deepcopy(self.skeleton.model.layers[index]).to_empty(device="cpu")
        self.fill_block(block, index, overrides)
        block.eval().requires_grad_(False)
        layer_type = self.layer_type(index)

        def as_in_model(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            positions = kwargs.get("position_embeddings")
            if isinstance(positions, dict):
                positions = positions[layer_type]
            return args, {**kwargs, "position_embeddings": positions, "attention_mask": self.attention_mask(layer_type, hidden)}

        block.register_forward_pre_hook(as_in_model, with_kwargs=True)
        return block

    def fill_block(self, block: nn.Module, index: int, overrides: dict[str, torch.Tensor | QuantizedWeight] | None = None) -> None:
        """Load block ``index``'s weights (float32) into ``block``, ``overrides`` replacing some by suffix
        (a quantized Linear's codes and scales are dequantized as they are copied in)."""
        prefix, overrides = self.block_prefix(index), overrides or {}
        names = {name[len(prefix):] for name in self.reader.location if name.startswith(prefix)} | set(overrides)
        targets = block.state_dict(keep_vars=True)
        if names != set(targets):
            missing, unexpected = sorted(set(targets) - names), sorted(names - set(targets))
            raise BitplanError(f"{self.reader.folder}: block {index} does not match its config.json (missing {missing[:3]}, "
                               f"unexpected {unexpected[:3]})")
        with torch.no_grad():  # one tensor at a time: the block plus one tensor, never a second copy of the block
            for name in sorted(names):
                value = overrides[name] if name in overrides else self.reader.tensor(prefix + name)
                targets[name].copy_(value.dequantize() if isinstance(value, QuantizedWeight) else value)

    def embedding_weight(self) -> torch.Tensor:
        return self.reader.tensor(f"{self.family.embedding}.weight")

    def embedding_rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The embedding's rows of ``input_ids`` in float32, the table read ``READ_ROWS`` rows at a
        time (a 128k-vocabulary table is never held whole) and only the rows looked up widened."""
        name = f"{self.family.embedding}.weight"
        vocab, width = self.reader.shapes[name]
        ids = input_ids.reshape(-1)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            raise IndexError(f"token ids must lie in [0, {vocab}): the tokenizer does not match the model's embedding")
        hidden = torch.empty(ids.numel(), width, dtype=torch.float32)
        for start in range(0, vocab, READ_ROWS):
            wanted = (ids >= start) & (ids < start + READ_ROWS)
            if bool(wanted.any()):
                rows = self.reader.rows(name, start, min(start + READ_ROWS, vocab), dtype=None)
                hidden[wanted] = rows[ids[wanted] - start].float()
        return hidden.reshape(*input_ids.shape, width)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embedding_rows(input_ids)
        if self.family.embedding_scale == "sqrt_hidden":
            hidden = hidden * torch.tensor(self.hf.hidden_size**0.5, dtype=hidden.dtype)
        return hidden

    def position_embeddings(self, hidden: torch.Tensor):
        """(cos, sin) for the whole model, or {layer type: (cos, sin)} when they differ by layer type (Gemma 3)."""
        positions = torch.arange(hidden.shape[1]).unsqueeze(0)
        if "layer_type" in inspect.signature(self.rotary.forward).parameters:
            return {kind: self.rotary(hidden, positions, kind) for kind in sorted(set(self.hf.layer_types))}
        return self.rotary(hidden, positions)

    def final_norm_weight(self) -> torch.Tensor:
        """The final norm's weight (float32), without reading the head."""
        return self.reader.tensor(f"{self.family.final_norm}.weight")

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(final norm weight (float32), lm_head weight in its stored dtype: :meth:`logits` widens
        it a slice at a time, so a 128k-vocabulary head is never held whole in float32); a tied
        head reuses the embedding."""
        norm = self.reader.tensor(f"{self.family.final_norm}.weight")
        name = f"{self.family.lm_head}.weight" if self.reader.has(f"{self.family.lm_head}.weight") else f"{self.family.embedding}.weight"
        return norm, self.reader.tensor(name, dtype=None)

    def final_norm(self, hidden: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
        eps = float(getattr(self.hf, "rms_norm_eps", None) or 1e-6)
        variance = hidden.pow(2).mean(-1, keepdim=True)
        return hidden * torch.rsqrt(variance + eps) * (self.family.norm_offset + norm_weight)

    def logits(self, normed: torch.Tensor, head_weight: torch.Tensor | QuantizedWeight | nn.Module) -> torch.Tensor:
        """The head's logits from final-normed hidden states, soft-capped where the family caps them (Gemma 2);
        ``head_weight`` is the head's weight or the head itself (a checkpoint's quantized head)."""
        if isinstance(head_weight, nn.Module):
            logits = head_weight(normed)
        elif isinstance(head_weight, QuantizedWeight):  # a head kept as codes and scales: dequantized HEAD_ROWS rows at a time
            logits = torch.cat([normed @ head_weight.rows(start, start + HEAD_ROWS).dequantize().T
                                for start in range(0, head_weight.shape[0], HEAD_ROWS)], dim=-1)
        elif head_weight.dtype == torch.float32:
            logits = normed @ head_weight.T
        else:  # a stored 16-bit head: widened to float32 HEAD_ROWS rows at a time
            logits = torch.cat([normed @ head_weight[start : start + HEAD_ROWS].float().T
                                for start in range(0, head_weight.shape[0], HEAD_ROWS)], dim=-1)
        cap = getattr(self.hf, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


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
    an input tensor (q/k/v, gate/up) share one accumulator; one that no token reached (an expert
    the router never chose) gets an empty one.
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
    for name in names:  # a Linear no token reached (an expert the router never chose): empty statistics
        stats.setdefault(name, {"input": planner_stats(block.get_submodule(name[len(prefix):]).in_features)})
    return stats, torch.cat(outputs)
