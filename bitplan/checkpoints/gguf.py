"""Write a GGUF that llama.cpp loads, one GGML type per tensor, with bitplan's own quantizers.

The path: convert the HF folder once with llama.cpp's ``convert_hf_to_gguf.py --outtype f32``
(:func:`source_gguf`, cached: it brings llama.cpp's metadata, tokenizer and tensor names, and q/k
rows in ggml's RoPE order), then rewrite every tensor with :func:`bitplan.methods.ggml.quantize_ggml`
into its assigned type (:func:`write_gguf`), copying all KV metadata (read by :func:`read_gguf`,
written by gguf-py's GGUFWriter). The bytes are those ``llama-quantize`` writes for the same recipe
(``ggml_quantize_chunk`` per tensor, the importance vector per tensor as ``load_imatrix`` makes it):
``tests/checkpoints/test_gguf.py`` checks them byte for byte.

Row lengths a type cannot store (k-quants need multiples of 256: SmolLM2's 576-wide rows) are
refused by :func:`check_row_sizes`; llama-quantize would silently write its fallback type
(``tensor_type_fallback``), which :func:`with_llama_quantize_fallback` applies when asked.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from bitplan.checkpoints.gguf_file import GGUFContents, TensorInfo, read_gguf, tensor_bytes, tensor_float32
from bitplan.checkpoints.llamacpp import (
    LLAMA_CPP_VERSION,
    LlamaCppBuild,
    convert_to_gguf,
    gguf_tensor_names,
    hf_tensor_names,
    recipe_base_type,
)
from bitplan.errors import BitplanError
from bitplan.kernels.layout import GGMLType, is_valid_row_size, llama_quantize_type, row_size_bytes, tensor_size_bytes
from bitplan.methods.ggml import quantize_ggml_bytes
from bitplan.models.spec import read_config

# general.file_type (enum llama_ftype) that llama-quantize writes when given the type's name as its
# ftype (QUANT_OPTIONS in tools/quantize/quantize.cpp: "Q4_K" is an alias of Q4_K_M, ...).
FILE_TYPES: dict[GGMLType, int] = {
    GGMLType.F32: 0, GGMLType.F16: 1, GGMLType.Q4_0: 2, GGMLType.Q4_1: 3, GGMLType.Q8_0: 7, GGMLType.Q5_0: 8,
    GGMLType.Q5_1: 9, GGMLType.Q2_K: 10, GGMLType.Q3_K: 12, GGMLType.Q4_K: 15, GGMLType.Q5_K: 17,
    GGMLType.Q6_K: 18, GGMLType.BF16: 32,
}
DTYPE_TYPES = {"bfloat16": GGMLType.BF16, "float16": GGMLType.F16, "float32": GGMLType.F32}
QUANTIZATION_VERSION = 2  # GGML_QNT_VERSION
SKIPPED_KEYS = ("GGUF.", "general.architecture", "general.alignment")  # the writer writes these itself


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor as written: ``shape`` in numpy order ``[rows, n_per_row]``, ``nbytes`` of data."""

    name: str
    hf_name: str | None
    ggml_type: str
    shape: tuple[int, ...]
    nbytes: int
    imatrix: bool


@dataclass(frozen=True)
class GGUFWritten:
    path: str
    file_type: int
    tensors: tuple[GGUFTensor, ...]

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_dict(self) -> dict:
        return {"path": self.path, "file_type": self.file_type, "tensor_bytes": self.tensor_bytes,
                "tensors": [asdict(t) for t in self.tensors]}


# ---------------------------------------------------------------------------------- the source GGUF


def source_gguf(hf_folder: str | os.PathLike, cache: str | os.PathLike | None = None,
                build: LlamaCppBuild | None = None) -> Path:
    """The F32 GGUF of ``hf_folder`` made by :func:`convert_to_gguf`, converted once and cached under
    ``cache`` (default ``<bitplan cache>/gguf``), keyed by the folder's hash. F32 holds any
    bf16/f16/f32 checkpoint exactly, so every type is quantized from the checkpoint's own values."""
    from bitplan.models.source import cache_dir, folder_hash

    folder = Path(hf_folder)
    cache = Path(cache) if cache else cache_dir() / "gguf"
    path = cache / f"{folder.name}-{folder_hash(folder)[:16]}-llama.cpp-{LLAMA_CPP_VERSION}-f32.gguf"
    if not path.is_file():
        convert_to_gguf(folder, path, "f32", build=build)
    return path


def to_gguf_names(mapping: dict[str, object], hf_folder: str | os.PathLike, gguf_names: set[str]) -> dict[str, object]:
    """Re-key ``mapping`` by GGUF tensor name; keys may be HF weight names or GGUF names already."""
    n_blocks = int(read_config(hf_folder)["num_hidden_layers"])
    hf_keys = [key for key in mapping if key not in gguf_names]
    names = gguf_tensor_names(hf_keys, n_blocks)
    result = {names.get(key, key): value for key, value in mapping.items()}
    missing = sorted(set(result) - gguf_names)
    if missing:
        raise BitplanError(f"the GGUF has no tensors {missing[:5]}: name weights as in the HF checkpoint or the GGUF")
    return result


def imatrix_for_tensors(imatrix: dict[str, np.ndarray], hf_folder: str | os.PathLike,
                        tensors: dict[str, TensorInfo]) -> dict[str, np.ndarray]:
    """The importance vectors by GGUF name, as llama-quantize uses them: entries for tensors the file
    lacks are ignored, and a token_embd vector of the wrong length is dropped (llama-quant.cpp warns
    and quantizes token_embd without one; any other wrong length is an error, raised when used)."""
    import gguf

    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(read_config(hf_folder)["num_hidden_layers"]))
    result = {}
    for key, values in imatrix.items():
        name = key if key in tensors else name_map.get_name(key, try_suffixes=(".weight", ".bias"))
        if name in tensors and not (name == "token_embd.weight" and np.size(values) != tensors[name].shape[-1]):
            result[name] = values
    return result


def check_row_sizes(tensor_types: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    """Refuse any tensor whose rows are not whole blocks of its type, naming llama-quantize's
    fallback (``tensor_type_fallback`` in src/llama-quant.cpp) as the way out."""
    bad = [(name, t, shapes[name][-1]) for name, t in tensor_types.items() if not is_valid_row_size(t, shapes[name][-1])]
    if bad:
        listed = "; ".join(f"{n}: {t} on {cols} columns (llama-quantize would write {llama_quantize_type(t, cols)})"
                           for n, t, cols in bad[:6])
        raise BitplanError(
            f"{len(bad)} tensors have rows their type cannot store (k-quants need multiples of 256, others of 32): {listed}"
            " -- choose a type that fits, or apply with_llama_quantize_fallback() to take llama-quantize's choice"
        )


def with_llama_quantize_fallback(tensor_types: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> dict[str, str]:
    """The types llama-quantize actually writes for this recipe (its shape fallback applied)."""
    return {name: str(llama_quantize_type(t, shapes[name][-1])) for name, t in tensor_types.items()}


def default_type(hf_folder: str | os.PathLike) -> GGMLType:
    """The type of weights the assignment leaves out: the checkpoint's own dtype (lossless)."""
    config = read_config(hf_folder)
    return DTYPE_TYPES.get(str(config.get("dtype") or config.get("torch_dtype") or "float32"), GGMLType.F32)


def gguf_recipe(hf_folder: str | os.PathLike, assignment: dict[str, str], tensors: dict[str, TensorInfo]) -> dict[str, str]:
    """{GGUF name: type} for every 2-D tensor: the assignment (HF or GGUF names), the rest at
    :func:`default_type`. 1-D tensors (norms) are copied as they are, as llama-quantize does."""
    recipe = {name: str(GGMLType(t)) for name, t in to_gguf_names(assignment, hf_folder, set(tensors)).items()}
    fill = str(default_type(hf_folder))
    return {name: recipe.get(name, fill) for name, t in tensors.items() if len(t.shape) >= 2}


# ---------------------------------------------------------------------------------- writing


def _copy_metadata(source: GGUFContents, writer, file_type: int) -> None:
    """Copy every KV pair in order (as gguf-py's gguf_new_metadata.py does), with ``general.file_type``
    and ``general.quantization_version`` set for the new tensors."""
    import gguf

    new = {"general.file_type": file_type, "general.quantization_version": QUANTIZATION_VERSION}
    for key, (value_type, value, item_type) in source.metadata.items():
        if key in new:
            writer.add_key_value(key, new.pop(key), gguf.GGUFValueType.UINT32)
        elif not key.startswith(SKIPPED_KEYS):
            sub_type = gguf.GGUFValueType(item_type) if item_type is not None else None
            writer.add_key_value(key, value, gguf.GGUFValueType(value_type), sub_type=sub_type)
    for key, value in new.items():
        writer.add_key_value(key, value, gguf.GGUFValueType.UINT32)


def _tensor_data(source: GGUFContents, tensor: TensorInfo, ggml_type: str, quant_weights: np.ndarray | None) -> np.ndarray:
    if tensor.ggml_type == ggml_type:  # llama-quantize copies a tensor already in its type (and every 1-D one)
        return np.ascontiguousarray(tensor_bytes(source.path, tensor)).reshape(-1)
    return quantize_ggml_bytes(tensor_float32(source.path, tensor), ggml_type, quant_weights).numpy().reshape(-1)


def write_gguf(hf_folder: str | os.PathLike, out: str | os.PathLike, assignment: dict[str, str],
               imatrix: dict[str, np.ndarray] | None = None, source: str | os.PathLike | None = None,
               build: LlamaCppBuild | None = None) -> GGUFWritten:
    """Write ``out``: the model of ``hf_folder`` with each weight in its assigned GGML type.

    ``assignment``: {weight name (HF, e.g. ``model.layers.0.mlp.down_proj.weight``, or GGUF) -> type};
    weights left out keep the checkpoint's dtype (:func:`default_type`). ``imatrix``: {weight name ->
    per-column importance} (:func:`bitplan.checkpoints.llamacpp.read_imatrix` gives GGUF-named ones),
    used where the type uses one, as ``llama-quantize --imatrix`` does. ``source``: a converted GGUF
    to start from (default :func:`source_gguf`). Every tensor's bytes equal ``tensor_size_bytes``.
    """
    import gguf

    contents = read_gguf(source if source else source_gguf(hf_folder, build=build))
    tensors = contents.tensors
    recipe = gguf_recipe(hf_folder, assignment, tensors)
    check_row_sizes(recipe, {name: t.shape for name, t in tensors.items()})
    weights = imatrix_for_tensors(imatrix or {}, hf_folder, tensors)
    elements = {name: int(np.prod(t.shape, dtype=np.int64)) for name, t in tensors.items()}
    file_type = FILE_TYPES[GGMLType(recipe_base_type(recipe, elements))]
    hf_names = hf_tensor_names(_hf_weight_names(hf_folder), int(read_config(hf_folder)["num_hidden_layers"]))

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(partial, str(contents.metadata["general.architecture"][1]))
    writer.data_alignment = contents.alignment
    _copy_metadata(contents, writer, file_type)
    written = []
    for name, tensor in tensors.items():
        ggml_type = recipe.get(name, tensor.ggml_type)
        nbytes = tensor_size_bytes(ggml_type, tensor.shape)
        byte_shape = (*tensor.shape[:-1], row_size_bytes(ggml_type, tensor.shape[-1]))  # gguf turns it into elements
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=gguf.GGMLQuantizationType[ggml_type])
        written.append(GGUFTensor(name, hf_names.get(name), ggml_type, tensor.shape, nbytes, name in weights and name in recipe))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for entry in written:
            quant_weights = weights.get(entry.name) if entry.imatrix else None
            writer.write_tensor_data(_tensor_data(contents, tensors[entry.name], entry.ggml_type, quant_weights))
        writer.close()
        os.replace(partial, out)
    finally:
        writer.close()
        partial.unlink(missing_ok=True)
    return GGUFWritten(str(out), file_type, tuple(written))


def _hf_weight_names(hf_folder: str | os.PathLike) -> list[str]:
    from bitplan.models.source import WeightReader

    return sorted(WeightReader(Path(hf_folder)).location)


# ---------------------------------------------------------------------------------- reading back


def gguf_tensor_types(gguf_path: str | os.PathLike) -> dict[str, str]:
    return {name: t.ggml_type for name, t in read_gguf(gguf_path).tensors.items()}


def unpermute_rope_rows(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of ``LlamaModel.permute`` (conversion/llama.py): ggml's q/k row order back to HF's."""
    rows = weight.shape[0]
    return weight.reshape(n_head, rows // n_head // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def dequantized_hf_weights(gguf_path: str | os.PathLike, hf_folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """{HF weight name: float32} decoded from a llama GGUF as llama.cpp decodes it, in HF layout
    (q/k rows un-permuted), ready for ``model.load_state_dict(..., strict=False)``."""
    config = read_config(hf_folder)
    contents = read_gguf(gguf_path)
    names = gguf_tensor_names(_hf_weight_names(hf_folder), int(config["num_hidden_layers"]))
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config.get("num_key_value_heads") or config["num_attention_heads"]}
    weights = {}
    for hf_name, gguf_name in names.items():
        tensor = contents.tensors[gguf_name]
        value = torch.from_numpy(tensor_float32(gguf_path, tensor).reshape(tensor.shape))
        kind = hf_name.split(".")[-2]
        weights[hf_name] = unpermute_rope_rows(value, heads[kind]) if kind in heads and value.ndim == 2 else value
    return weights
