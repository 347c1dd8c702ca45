"""A mixture-of-experts block's experts as one ``nn.Linear`` per expert and projection.

transformers keeps a block's experts fused, as 3D parameters (``gate_up_proj`` [experts,
2 x width, hidden], ``down_proj`` [experts, hidden, width]) and merges the checkpoint's per-expert
tensors into them on load. bitplan quantizes each expert Linear on its own, gathers each one's
input statistics and swaps in a ``QuantLinear`` per expert, so it runs the experts unfused, under
the checkpoint's own names (``{expert}.{suffix}``), with transformers' routing loop.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from bitplan.models.architectures import Experts, Family


class UnfusedExperts(nn.Module):
    """Drop-in for transformers' fused experts module: ``forward(hidden [tokens, hidden],
    top_k_index [tokens, k], top_k_weights [tokens, k])`` computes the same sum."""

    def __init__(self, experts: Experts, num_experts: int, hidden: int, width: int, act_fn):
        super().__init__()
        self.num_experts = num_experts
        self.act_fn = act_fn
        self.roles = {role: suffix for suffix, role, _, _ in experts.projections}
        for index in range(num_experts):
            expert = nn.Module()
            for suffix, _, in_dim, _ in experts.projections:
                shape = (hidden, width) if in_dim == "hidden" else (width, hidden)
                expert.add_module(suffix, nn.Linear(*shape, bias=False))
            self.add_module(str(index), expert)

    @classmethod
    def like(cls, fused: nn.Module, experts: Experts) -> "UnfusedExperts":
        """The unfused twin of a transformers experts module (same shapes and activation, no weights copied)."""
        num_experts, hidden, width = fused.down_proj.shape
        return cls(experts, num_experts, hidden, width, fused.act_fn)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        for index in range(self.num_experts):
            top_k_pos, token_idx = torch.where((top_k_index == index).T)  # transformers' order: by slot, then token
            if token_idx.numel() == 0:
                continue
            expert = getattr(self, str(index))
            current = hidden_states[token_idx]
            gate = getattr(expert, self.roles["gate"])(current)
            up = getattr(expert, self.roles["up"])(current)
            out = getattr(expert, self.roles["down"])(self.act_fn(gate) * up)
            final.index_add_(0, token_idx, (out * top_k_weights[token_idx, top_k_pos, None]).to(final.dtype))
        return final


def unfuse_experts(model: nn.Module, experts: Experts, block_prefix: str) -> None:
    """Replace every block's fused experts module (at ``experts.path``) by an :class:`UnfusedExperts`, in place."""
    blocks = model.get_submodule(block_prefix)
    for block in blocks:
        block.set_submodule(experts.path, UnfusedExperts.like(block.get_submodule(experts.path), experts))


def rename_modules(model: nn.Module, family: Family) -> None:
    """Give every block's submodules the checkpoint's names where transformers renames them
    (``Family.module_renames``, e.g. Mixtral's ``block_sparse_moe`` for transformers' ``mlp``), in
    place: the module moves to the checkpoint's name, and the block's own code still reaches it
    under transformers' name through a property of a per-family subclass."""
    if not family.module_renames:
        return
    for block in model.get_submodule(family.block_prefix):
        for checkpoint_name, module_name in family.module_renames:
            module = block.get_submodule(module_name)
            delattr(block, module_name)
            block.add_module(checkpoint_name, module)
        block.__class__ = _renamed_class(type(block), family.module_renames)


@functools.cache
def _renamed_class(cls: type, renames: tuple[tuple[str, str], ...]) -> type:
    """``cls`` with each transformers module name a read-only alias of the checkpoint's name (one class per pair)."""
    aliases = {module_name: property(lambda self, name=checkpoint_name: getattr(self, name)) for checkpoint_name, module_name in renames}
    return type(cls.__name__, (cls,), {**aliases, "__module__": cls.__module__})
