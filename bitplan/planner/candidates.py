"""The candidate set: which schemes the profile scores and the search may choose from."""

from __future__ import annotations

from dataclasses import dataclass, replace

from bitplan.engines.rules import EngineRules
from bitplan.errors import BitplanError
from bitplan.methods.registry import COSTLY_DEFAULT_BITS, DEFAULT_METHODS, candidate_schemes
from bitplan.methods.scheme import GROUP_SIZES, INTEGER_BITS, Method, Scheme
from bitplan.profiles.hardware import HardwareProfile


@dataclass(frozen=True)
class Candidates:
    """The schemes to profile. The default is the methods of ``DEFAULT_METHODS`` on the whole
    grid, except the costly ones (``COSTLY``: AWQ + imatrix and HQQ among the defaults), which are
    offered at 2-4 bits, symmetric (``costly_bits``; None gives them the whole grid).
    ``act_formats``: W8A8 activation formats the target runs natively (``for_device`` narrows it
    to a device's)."""

    methods: tuple[str, ...] = DEFAULT_METHODS
    bits: tuple[int, ...] = INTEGER_BITS
    group_sizes: tuple[int, ...] = GROUP_SIZES
    symmetric: tuple[bool, ...] = (True, False)
    act_formats: tuple[str, ...] = ("int8", "fp8")
    costly_bits: tuple[int, ...] | None = COSTLY_DEFAULT_BITS
    ggml_types: tuple[str, ...] | None = None  # the GGUF types ggml schemes may take (None: every one)

    def schemes(self, rules: EngineRules | None = None) -> list[Scheme]:
        """The candidate schemes; with ``rules``, only those some kernel of that engine runs (the
        default methods become the engine's own, :meth:`for_engine`)."""
        if rules is not None and rules.methods and self.methods == DEFAULT_METHODS:
            return self.for_engine(rules).schemes(rules)
        schemes = candidate_schemes(self.methods, self.bits, self.group_sizes, self.symmetric,
                                    act_formats=self.act_formats, costly_bits=self.costly_bits)
        if self.ggml_types is not None:
            wanted = {Scheme.ggml(t).ggml_type for t in self.ggml_types}
            schemes = [s for s in schemes if s.method != Method.GGML or s.ggml_type in wanted]
        if rules is not None:
            schemes = [s for s in schemes if rules.takes(s)]
            if all(s.is_dense for s in schemes):
                raise BitplanError(f"no candidate scheme is left for {rules.key}: it runs "
                                   f"{'; '.join(rules.summary()[1:1 + len(rules.kernels)])}. Widen --methods/--bits/--groups, or pick another --engine")
        return schemes

    def for_engine(self, rules: EngineRules) -> "Candidates":
        """The engine's own methods (``rules.methods``: ggml for llama.cpp) when the methods are the default set."""
        if rules.methods and self.methods == DEFAULT_METHODS:
            return replace(self, methods=rules.methods)
        return self

    def for_device(self, device: HardwareProfile | None) -> "Candidates":
        """Only the W8A8 formats ``device`` runs natively (int8 or fp8 tensor cores); all without a device."""
        if device is None:
            return self
        return replace(self, act_formats=tuple(f for f in self.act_formats if device.supports(f)))
