"""Serving engines as data: what each one loads and runs, per platform, with sources.

``--engine`` names the engine (default ``vllm``, what most users serve with); ``--target``
names the hardware: a catalog device (its compute capability picks vLLM's rules) or a platform
name (``cpu-avx2``, ``cpu-avx512``, ``cuda-sm80``, ``cuda-sm90``). Without a target, vLLM's rules
are those of CUDA compute capability 8.0 (Ampere), which newer GPUs also run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from bitplan.engines import bitplan_loader, llamacpp, transformers, vllm
from bitplan.engines.rules import EngineRules
from bitplan.errors import BitplanError
from bitplan.models.spec import ModelSpec
from bitplan.profiles.hardware import HardwareProfile, get_device

DEFAULT_ENGINE = "vllm"
ENGINES = ("vllm", "transformers", "bitplan", "llama.cpp")
PLATFORMS = ("cuda-sm80", "cuda-sm90", "cpu-avx2", "cpu-avx512")  # --target values that name a platform, not a device
RULES: dict[tuple[str, str], EngineRules] = {
    **{("vllm", platform): rules for platform, rules in vllm.RULES.items()},
    ("transformers", "any"): transformers.RULES,
    ("bitplan", "any"): bitplan_loader.RULES,
    ("llama.cpp", "any"): llamacpp.RULES,
}


def platform_of(engine: str, target: str | None, compute_capability: str = "", arch: str = "") -> str:
    """The platform whose rules apply: from a platform name, or a catalog device's capability."""
    if engine != "vllm":
        return "any"
    if target is None:
        return "cuda-sm80"
    if target in PLATFORMS:
        return target
    try:
        major = float(compute_capability) if compute_capability else 0.0
    except ValueError:
        major = 0.0
    if 8.0 <= major < 9.0 or major >= 10.0:
        return "cuda-sm80"  # Marlin-class kernels (sm_80+) also run on Ada and Blackwell
    if 9.0 <= major < 10.0:
        return "cuda-sm90"
    what = f"compute capability {compute_capability}" if compute_capability else f"a {arch or 'non-CUDA'} device"
    raise BitplanError(f"engine vllm has no rules in bitplan for {target} ({what}): target a CUDA GPU of compute capability "
                       f"8.0 or newer, a CPU platform ({', '.join(p for p in PLATFORMS if p.startswith('cpu'))}), or use --engine bitplan")


def get_rules(engine: str, target: str | None = None, compute_capability: str = "", arch: str = "") -> EngineRules:
    """The rules of ``engine`` on the hardware ``target`` names."""
    if engine not in ENGINES:
        raise BitplanError(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
    if engine != "vllm" and target in PLATFORMS:
        raise BitplanError(f"--target {target} is a vLLM platform; engine {engine} runs anywhere: drop --target or pass a device")
    return RULES[(engine, platform_of(engine, target, compute_capability, arch))]


@dataclass(frozen=True)
class Target:
    """What a plan is for: the engine's rules on the hardware, and the catalog device when one is named."""

    name: str | None  # --target as given: a catalog device, a profile file, a platform, or None
    rules: EngineRules
    device: HardwareProfile | None


def resolve_target(engine: str, target: str | None = None) -> Target:
    """``--engine`` and ``--target`` to the rules that apply and the device (None for a platform name)."""
    device = get_device(target) if target and target not in PLATFORMS else None
    rules = get_rules(engine, target, device.compute_capability if device else "", device.arch if device else "")
    return Target(target, rules, device)


def deployed_spec(spec: ModelSpec, rules: EngineRules) -> ModelSpec:
    """``spec`` with the bytes outside the planned Linears as the engine's file holds them
    (a GGUF: token embedding in Q8_0, norms F32; other engines: the checkpoint dtype)."""
    if rules.engine == "llama.cpp":
        return replace(spec, unquantized_bytes=llamacpp.unquantized_bytes(spec))
    return spec
