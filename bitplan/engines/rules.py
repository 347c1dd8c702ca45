"""What an engine can load and run, as data, and the checks the search and emit apply.

An engine on a platform (``EngineRules``) is a list of ``Kernel`` entries, each saying which
schemes one of its kernels runs and which shapes it needs, plus model-wide rules: which Linears
it fuses (so they must share one scheme), whether ``lm_head`` may be quantized, and whether it
shards across devices. Every entry names where it comes from in the engine's code or in a
measurement of ours. The search reads these rules as constraints (cells of the sensitivity
table a layer may not take are removed before the exact allocation and the refinement); emit
re-checks a plan against them and refuses one that breaks them.

Shapes are per tensor-parallel partition, as the engine's kernels see them:

- column-parallel Linears (q, k, v, gate, up, lm_head) split ``out_features``; a fused group's
  kernel sees the sum of its members' partitions (vLLM's ``QKVParallelLinear`` and
  ``MergedColumnParallelLinear``); k and v are replicated when ``tp`` exceeds the KV heads;
- row-parallel Linears (o, down) split ``in_features``; a group may not straddle two
  partitions, so the group size must divide ``in_features / tp``.

Mixture-of-experts Linears (kind ``expert``) run in the engine's fused-MoE kernel, not its Linear
kernels: ``expert_kernels`` lists those (None: the same as ``kernels``). A fused-MoE kernel holds
every expert of a block in one tensor, so the experts of a block are one fused group there
(``ModelSpec`` gives them the group ``experts``); its partition is one expert's width split over
``tp`` and the full hidden size.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from bitplan.engines.formats import Format, activation_type, checkpoint_format, weight_type
from bitplan.errors import BitplanError
from bitplan.methods.scheme import Scheme
from bitplan.models.moe import expert_role
from bitplan.models.spec import EXPERT_GROUP, EXPERT_KIND, LayerSpec, ModelSpec
from bitplan.profiles.tables import SensitivityTable

ROW_PARALLEL_KINDS = frozenset({"o", "down"})  # vLLM llama.py: o_proj and down_proj are RowParallelLinear


@dataclass(frozen=True)
class Kernel:
    """One of an engine's kernels: the schemes it runs and the partition shapes it needs.

    ``group_sizes`` holds 0 for per channel. ``k_multiple``/``n_multiple``: the partition's
    in/out features must be multiples of these. ``activations``: "16" (weight-only), "int8",
    "fp8" (dynamic per token).
    """

    name: str
    source: str
    formats: frozenset[Format]
    bits: frozenset[int]
    group_sizes: frozenset[int]
    symmetric: frozenset[bool]
    activations: frozenset[str] = frozenset({"16"})
    k_multiple: int = 1
    n_multiple: int = 1
    hidden_multiple: int = 1  # fused-MoE kernels: the hidden size must be a multiple of this

    def takes(self, scheme: Scheme) -> bool:
        """Whether this kernel runs the scheme's storage at all, whatever the shape."""
        return (checkpoint_format(scheme) in self.formats and scheme.bits in self.bits and scheme.group_size in self.group_sizes
                and scheme.symmetric in self.symmetric and activation_type(scheme) in self.activations)

    def shape_refusal(self, scheme: Scheme, k: int, n: int) -> str | None:
        """Why this kernel cannot run the scheme on a ``[n, k]`` partition, or None."""
        if scheme.group_size and k % scheme.group_size:
            return f"group {scheme.group_size} does not divide the {k} inputs per partition"
        if k % self.k_multiple:
            return f"{self.name} needs in_features per partition to be a multiple of {self.k_multiple}, got {k}"
        if n % self.n_multiple:
            return f"{self.name} needs out_features per partition to be a multiple of {self.n_multiple}, got {n}"
        return None

    def expert_shape_refusal(self, scheme: Scheme, hidden: int, width: int) -> str | None:
        """Why this fused-MoE kernel cannot run the scheme on experts of ``hidden`` x ``width`` (per partition), or None."""
        if hidden % self.hidden_multiple:
            return f"{self.name} needs the hidden size to be a multiple of {self.hidden_multiple}, got {hidden}"
        for dim, size in (("hidden size", hidden), ("expert width per partition", width)):
            if scheme.group_size and size % scheme.group_size:
                return f"group {scheme.group_size} does not divide the {dim} {size}"
        return None


@dataclass(frozen=True)
class EngineRules:
    """One engine on one platform: its kernels, in the order it tries them, and model-wide rules."""

    engine: str
    platform: str
    loader: str  # what reads the checkpoint: "compressed-tensors" or "bitplan"
    kernels: tuple[Kernel, ...]
    fused_share_scheme: bool
    quantized_lm_head: bool
    tensor_parallel: bool
    sources: dict[str, str] = field(default_factory=dict)  # model-wide rule -> where it comes from
    methods: tuple[str, ...] = ()  # when set, the only methods whose formats it loads: its default candidates
    # KV cache formats it runs (methods.kv_cache names); the 16-bit ones mean "the checkpoint's dtype"
    kv_cache_dtypes: tuple[str, ...] = ("float16", "bfloat16")
    kv_cache_source: str = "the KV cache is kept in the checkpoint's dtype"
    expert_kernels: tuple[Kernel, ...] | None = None  # fused-MoE kernels; None: experts run on ``kernels``

    @property
    def key(self) -> str:
        return f"{self.engine}@{self.platform}"

    def takes(self, scheme: Scheme) -> bool:
        """Whether some kernel runs the scheme's storage (dense always loads)."""
        return scheme.is_dense or any(kernel.takes(scheme) for kernel in self.kernels)

    def layer_refusal(self, layer: LayerSpec, scheme: Scheme, spec: ModelSpec, tp: int = 1) -> str | None:
        """Why this engine cannot run ``layer`` under ``scheme`` at ``tp``, or None when it can."""
        if scheme.is_dense:
            return None
        if layer.kind == "lm_head" and not self.quantized_lm_head:
            return f"lm_head stays unquantized in {self.engine} ({self.sources.get('lm_head', '')})"
        if layer.kind == EXPERT_KIND and self.expert_kernels is not None:
            return self._expert_refusal(layer, scheme, tp)
        takers = [kernel for kernel in self.kernels if kernel.takes(scheme)]
        if not takers:
            return f"no kernel of {self.engine} on {self.platform} runs {describe(scheme)}"
        k, n = partition_shape(layer, spec, tp)
        reasons = [kernel.shape_refusal(scheme, k, n) for kernel in takers]
        if any(reason is None for reason in reasons):
            return None
        return reasons[0]

    def _expert_refusal(self, layer: LayerSpec, scheme: Scheme, tp: int) -> str | None:
        takers = [kernel for kernel in self.expert_kernels or () if kernel.takes(scheme)]
        if not takers:
            return (f"no fused-MoE kernel of {self.engine} on {self.platform} runs {describe(scheme)}: experts stay dense there "
                    f"or take a scheme its MoE kernels run ({self.sources.get('experts', '')})")
        hidden, width = _expert_dims(layer)
        reasons = [kernel.expert_shape_refusal(scheme, hidden, width // tp) for kernel in takers]
        return None if any(reason is None for reason in reasons) else reasons[0]

    def summary(self) -> list[str]:
        """The rules in words, for the plan file and the plan printout."""
        lines = [f"engine {self.engine} on {self.platform}, read by {self.loader}"]
        for kernel in self.kernels:
            groups = ",".join("channel" if g == 0 else str(g) for g in sorted(kernel.group_sizes))
            sym = "/".join(sorted("sym" if s else "asym" for s in kernel.symmetric))
            shape = "".join([f", K%{kernel.k_multiple}" if kernel.k_multiple > 1 else "",
                             f", N%{kernel.n_multiple}" if kernel.n_multiple > 1 else ""])
            lines.append(f"{kernel.name}: {'/'.join(sorted(kernel.formats))} {','.join(map(str, sorted(kernel.bits)))}-bit "
                         f"{sym}, groups {groups}, activations {'/'.join(sorted(kernel.activations))}{shape} [{kernel.source}]")
        for kernel in self.expert_kernels or ():
            groups = ",".join("channel" if g == 0 else str(g) for g in sorted(kernel.group_sizes))
            sym = "/".join(sorted("sym" if s else "asym" for s in kernel.symmetric))
            lines.append(f"experts (fused MoE) {kernel.name}: {'/'.join(sorted(kernel.formats))} {','.join(map(str, sorted(kernel.bits)))}-bit "
                         f"{sym}, groups {groups}, activations {'/'.join(sorted(kernel.activations))}, hidden%{kernel.hidden_multiple} "
                         f"[{kernel.source}]")
        if self.expert_kernels == ():
            lines.append(f"experts (fused MoE) stay dense: {self.sources.get('experts', '')}")
        lines.append("fused q/k/v and gate/up share one scheme" if self.fused_share_scheme else "no fused groups")
        if self.fused_share_scheme and self.expert_kernels is not None:
            lines.append(f"all experts of a block share one scheme [{self.sources.get('experts_share', '')}]")
        lines.append("lm_head may be quantized" if self.quantized_lm_head else "lm_head stays unquantized")
        lines.append("tensor parallel: group sizes divide each partition" if self.tensor_parallel else "one device only (no tensor parallel)")
        lines.append(f"KV cache: {', '.join(self.kv_cache_dtypes)} [{self.kv_cache_source}]")
        if "token_embd" in self.sources:
            lines.append(f"token embedding: {self.sources['token_embd']}")
        return lines


def _expert_dims(layer: LayerSpec) -> tuple[int, int]:
    """(hidden size, expert width) of an expert Linear: gate/up map hidden -> width, down width -> hidden."""
    if expert_role(layer) == "down":
        return layer.out_features, layer.in_features
    return layer.in_features, layer.out_features


def check_kv_dtype(rules: EngineRules, kv_dtype: str) -> str:
    """The canonical name of ``kv_dtype`` when ``rules``' engine runs it; one line naming what it runs otherwise."""
    from bitplan.methods.kv_cache import canonical_kv_dtype

    name = canonical_kv_dtype(kv_dtype)
    if name not in rules.kv_cache_dtypes:
        raise BitplanError(f"{rules.engine} on {rules.platform} cannot keep the KV cache in {kv_dtype}: choose auto or one of "
                           f"{', '.join(rules.kv_cache_dtypes)} ({rules.kv_cache_source})")
    return name


KV_ENGINE_FLAGS = {  # how each engine is told to keep its cache in a format the checkpoint cannot carry
    "vllm": {"fp8_e5m2": "--kv-cache-dtype fp8_e5m2"},
    "llama.cpp": {"q8_0": "-ctk q8_0 -ctv q8_0", "q4_0": "-fa on -ctk q4_0 -ctv q4_0"},
}


def kv_engine_flags(engine: str, kv_dtype: str) -> str:
    """The run-time flags serving ``kv_dtype`` needs ("" when the checkpoint says it or it is the default).

    vLLM reads fp8_e4m3 from the compressed-tensors ``kv_cache_scheme`` emit writes."""
    return KV_ENGINE_FLAGS.get(engine, {}).get(kv_dtype, "")


def describe(scheme: Scheme) -> str:
    groups = "per channel" if scheme.group_size == 0 else f"group {scheme.group_size}"
    act = "" if not scheme.act_quantized else f", {activation_type(scheme)} activations"
    sym = "symmetric" if scheme.symmetric else "asymmetric"
    return f"{checkpoint_format(scheme)}, {weight_type(scheme)} {scheme.bits}-bit {sym}, {groups}{act}"


def partition_shape(layer: LayerSpec, spec: ModelSpec, tp: int) -> tuple[int, int]:
    """(in_features, out_features) of the kernel that runs ``layer`` on one of ``tp`` devices.

    A fused group's members run as one kernel whose output is the sum of theirs. With ``tp`` above
    the KV heads, vLLM replicates k and v: each device holds one KV head.
    """
    members = spec.fused_members(layer)
    if layer.kind in ROW_PARALLEL_KINDS:
        return layer.in_features // tp, layer.out_features
    out = 0
    for member in members:
        if member.kind in ("k", "v"):
            out += max(1, spec.num_kv_heads // tp) * spec.head_dim
        else:
            out += member.out_features // tp
    return layer.in_features, out


def model_refusal(spec: ModelSpec, rules: EngineRules, tp: int) -> str | None:
    """Why the model cannot be sharded over ``tp`` devices by this engine, or None."""
    if tp == 1:
        return None
    if tp < 1:
        return f"--tp must be at least 1, got {tp}"
    if not rules.tensor_parallel:
        return f"{rules.key} runs on one device: use --tp 1, or --engine vllm for tensor parallelism"
    if spec.num_heads % tp:
        return f"--tp {tp} does not divide the model's {spec.num_heads} attention heads: choose a divisor of {spec.num_heads}"
    if spec.num_kv_heads % tp and tp % spec.num_kv_heads:
        return (f"--tp {tp} neither divides nor is a multiple of the model's {spec.num_kv_heads} KV heads "
                f"(vLLM shards or replicates whole KV heads): choose a divisor of {spec.num_heads} that is")
    if spec.intermediate_size % tp:
        return f"--tp {tp} does not divide the MLP width {spec.intermediate_size}"
    return None


def check_tensor_parallel(spec: ModelSpec, rules: EngineRules, tp: int) -> None:
    reason = model_refusal(spec, rules, tp)
    if reason:
        raise BitplanError(reason)


def assignment_violations(rules: EngineRules, spec: ModelSpec, assignments: dict[str, Scheme], tp: int = 1) -> list[str]:
    """Every rule an assignment breaks, one line each naming the layer and the rule."""
    problems = []
    for layer in spec.layers:
        reason = rules.layer_refusal(layer, assignments[layer.name], spec, tp)
        if reason:
            problems.append(f"{layer.name} ({assignments[layer.name].name}): {reason}")
    if rules.fused_share_scheme:
        groups: dict[str, set[str]] = {}
        for layer in spec.layers:
            if layer.fused_group:
                groups.setdefault(layer.fused_key, set()).add(assignments[layer.name].name)
        for key, names in sorted(groups.items()):
            if len(names) > 1:
                block, group = key.split(".", 1)
                what = "a fused-MoE layer holding every expert" if group == EXPERT_GROUP else "one fused Linear"
                source = rules.sources.get("experts_share" if group == EXPERT_GROUP else "fused", rules.sources.get("fused", ""))
                problems.append(f"block {block} {group}: {rules.engine} runs {group} as {what}, which needs one scheme, "
                                f"got {', '.join(sorted(names))} ({source})")
    return problems


def allowed(rules: EngineRules, spec: ModelSpec, tp: int = 1):
    """``allowed(layer, scheme)``: the predicate the search uses (storable and run by the engine)."""
    return lambda layer, scheme: scheme.fits(layer.in_features) and rules.layer_refusal(layer, scheme, spec, tp) is None


def restrict_table(table: SensitivityTable, spec: ModelSpec, rules: EngineRules, tp: int = 1) -> SensitivityTable:
    """The sensitivity table with every cell the engine refuses removed (bytes -1, score NaN), so
    the exact allocation and the refinement can only choose what the engine runs."""
    scores, sizes = table.scores.clone(), table.bytes.clone()
    schemes = [Scheme.parse(name) for name in table.schemes]
    for row, name in enumerate(table.layers):
        layer = spec.layer(name)
        for column, scheme in enumerate(schemes):
            if sizes[row, column] >= 0 and rules.layer_refusal(layer, scheme, spec, tp) is not None:
                sizes[row, column] = -1
                scores[row, column] = torch.nan
    return replace(table, scores=scores, bytes=sizes, provenance=dict(table.provenance))
