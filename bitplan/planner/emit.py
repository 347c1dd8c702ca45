"""Emit: a plan becomes a deployable checkpoint folder.

Layout (compressed-tensors, as vLLM loads it): quantized Linears as ``pack-quantized`` tensors
(``weight_packed``, ``weight_scale``, ``weight_zero_point`` when asymmetric, ``weight_shape``;
see ``kernels.layout``), everything else as in the source checkpoint; ``config.json`` with a
``quantization_config`` holding one config group per scheme whose targets are exact module
names; tokenizer files; and ``plan.json``. Written to a temporary folder beside the target,
then renamed into place, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import save_file

from bitplan.errors import BitplanError
from bitplan.kernels import layout
from bitplan.methods.registry import quantize
from bitplan.methods.scheme import QuantizedWeight, Scheme
from bitplan.planner.plan import Plan, load_plan
from bitplan.profiles.model_source import TOKENIZER_FILES, WeightReader, folder_hash, resolve_model
from bitplan.profiles.model_spec import ModelSpec, read_config, spec_from_config
from bitplan.profiles.sensitivity import SCALE_DTYPES

log = logging.getLogger(__name__)
SHARD_BYTES = 2 * 10**9
CHECKPOINT_FORMAT = "pack-quantized"


def packed_tensors(quantized: QuantizedWeight) -> dict[str, torch.Tensor]:
    """One Linear's pack-quantized tensors, names without the module prefix."""
    scheme = quantized.scheme
    tensors = {
        "weight_packed": layout.pack_codes(quantized.codes, scheme.bits),
        "weight_scale": quantized.scale.contiguous(),
        "weight_shape": torch.tensor(quantized.shape, dtype=torch.int64),
    }
    if quantized.zero is not None:
        tensors["weight_zero_point"] = layout.pack_codes(quantized.zero, scheme.bits, dim=0)
    return tensors


def weight_args(scheme: Scheme) -> dict:
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "strategy": "group" if scheme.group_size else "channel",
        "group_size": scheme.group_size or None,
        "dynamic": False,
        "observer": "minmax",
        "actorder": None,
        "block_structure": None,
    }


def quantization_config(assignments: dict[str, Scheme]) -> dict:
    """compressed-tensors ``quantization_config``: one group per scheme, exact module names as targets."""
    by_scheme: dict[Scheme, list[str]] = {}
    for name, scheme in assignments.items():
        if not scheme.is_dense:
            by_scheme.setdefault(scheme, []).append(name)
    groups = {
        f"group_{index}": {
            "targets": sorted(names),
            "weights": weight_args(scheme),
            "input_activations": None,
            "output_activations": None,
            "format": CHECKPOINT_FORMAT,
        }
        for index, (scheme, names) in enumerate(sorted(by_scheme.items()))
    }
    dense = sorted(name for name, scheme in assignments.items() if scheme.is_dense)
    return {
        "quant_method": "compressed-tensors",
        "format": "mixed-precision" if len(groups) > 1 else CHECKPOINT_FORMAT,
        "quantization_status": "compressed",
        "config_groups": groups,
        "ignore": ["lm_head", *dense],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "version": metadata.version("compressed-tensors"),
    }


def check_plan_against_model(plan: Plan, spec: ModelSpec) -> dict[str, Scheme]:
    assignments = plan.schemes()
    names = {layer.name for layer in spec.layers}
    unknown = sorted(set(assignments) - names)
    missing = sorted(names - set(assignments))
    if unknown or missing:
        raise BitplanError(f"the plan does not match the model ({len(unknown)} unknown, {len(missing)} missing layers): re-run `bitplan plan`")
    for layer in spec.layers:
        if not assignments[layer.name].fits(layer.in_features):
            raise BitplanError(f"the plan gives {layer.name} the scheme {assignments[layer.name]}, whose group does not divide {layer.in_features}: re-run `bitplan plan`")
    return assignments


class ShardWriter:
    """Collects tensors and writes ``model-XXXXX.safetensors`` shards of at most ``SHARD_BYTES``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.files: list[tuple[str, list[str]]] = []

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += tensor.numel() * tensor.element_size()
        if self.pending_bytes >= SHARD_BYTES:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            filename = f"model-{len(self.files) + 1:05d}.safetensors"
            save_file(self.pending, self.folder / filename, metadata={"format": "pt"})
            self.files.append((filename, sorted(self.pending)))
            self.pending, self.pending_bytes = {}, 0

    def finish(self) -> None:
        self.flush()
        if len(self.files) == 1:
            os.replace(self.folder / self.files[0][0], self.folder / "model.safetensors")
            return
        weight_map = {name: filename for filename, names in self.files for name in names}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=2, sort_keys=True))


def emit(plan: Plan | str | os.PathLike, out: str | os.PathLike, progress: Callable[[str, int, int], None] | None = None) -> Path:
    """Write the checkpoint for ``plan`` (a Plan or a plan.json path) into the new folder ``out``."""
    plan = plan if isinstance(plan, Plan) else load_plan(Path(plan))
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BitplanError(f"{out} already exists and is not empty: choose another --out or remove it")
    folder = resolve_model(plan.model["source"])
    if folder_hash(folder) != plan.model["hash"]:
        raise BitplanError(f"the weights in {folder} differ from those the plan was made for: re-run `bitplan plan` on this model")
    config = read_config(folder)
    spec = spec_from_config(config)
    assignments = check_plan_against_model(plan, spec)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        written = write_checkpoint(folder, config, spec, assignments, plan, staging, progress)
        expected = plan.memory["quantized_weights_bytes"] * plan.deployment.get("tensor_parallel", 1)
        if written != expected:
            raise AssertionError(f"emitted {written} bytes of Linear weights, the plan predicted {expected}")
        make_readable(staging)
        if out.exists():
            out.rmdir()
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def make_readable(folder: Path) -> None:
    """A temporary folder is private (0700); the checkpoint gets ordinary permissions."""
    folder.chmod(0o755)
    for path in folder.iterdir():
        path.chmod(0o644)


def write_checkpoint(folder: Path, config: dict, spec: ModelSpec, assignments: dict[str, Scheme], plan: Plan,
                     staging: Path, progress) -> int:
    """Quantize and write every tensor; returns the bytes of the Linear weights as written."""
    reader = WeightReader(folder)
    scale_dtype = SCALE_DTYPES[spec.dtype]
    writer = ShardWriter(staging)
    linear_bytes = 0
    report = progress or (lambda stage, done, total: None)
    names = sorted(reader.location)
    for done, name in enumerate(names, 1):
        module = name.removesuffix(".weight")
        scheme = assignments.get(module) if name.endswith(".weight") else None
        if scheme is None:
            writer.add(name, reader.tensor(name, dtype=None))
        elif scheme.is_dense:
            tensor = reader.tensor(name, dtype=None).to(scale_dtype)
            linear_bytes += tensor.numel() * tensor.element_size()
            writer.add(name, tensor)
        else:
            tensors = packed_tensors(quantize(reader.tensor(name), scheme, scale_dtype))
            for suffix, tensor in tensors.items():
                linear_bytes += tensor.numel() * tensor.element_size()
                writer.add(f"{module}.{suffix}", tensor)
        report("emit", done, len(names))
    writer.finish()
    config = {**config, "quantization_config": quantization_config(assignments)}
    (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    for filename in TOKENIZER_FILES:
        if (folder / filename).is_file():
            shutil.copy2(folder / filename, staging / filename)
    (staging / "plan.json").write_text(plan.to_json())
    return linear_bytes
