"""Emit for llama.cpp: a plan made with ``--engine llama.cpp`` becomes a GGUF file, or a recipe.

``--format gguf`` (:func:`emit_gguf`): every planned Linear in its GGUF type, quantized by bitplan's
port of ggml's quantizers (byte-equal to ``llama-quantize``, see :mod:`bitplan.checkpoints.gguf`),
with the importance matrix taken from the plan's own calibration tokens (the per-column mean of
x² that ``llama-imatrix`` computes), so the file holds exactly the weights the profile scored;
the token embedding in ``engines.llamacpp.TOKEN_EMBD_TYPE``; layers planned "none" and the norms
as converted (checkpoint dtype, F32). Each tensor's bytes are checked against the plan's.

``--format recipe`` (:func:`emit_recipe`): a folder for users who quantize with llama.cpp
themselves: ``tensor-types.txt`` (``--tensor-type-file``: one anchored ``^name$=TYPE`` per
tensor), ``calibration.txt`` (the plan's calibration text) and ``quantize.sh`` (convert to F32 with
llama.cpp's ``convert_hf_to_gguf.py`` through :func:`~bitplan.checkpoints.llamacpp.convert_to_gguf`,
``llama-imatrix`` on that text, ``llama-quantize --pure --tensor-type-file``). llama-imatrix
averages over its own chunks of the text rather than the plan's windows, so this file's rounding
may differ slightly from ``--format gguf``'s; the types and bytes are the same.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bitplan.atomic import staging_folder, write_atomic
from bitplan.checkpoints.emit import CalibrationPass, engine_rules_of, open_plan_model
from bitplan.checkpoints.gguf import GGUFWritten, write_gguf
from bitplan.checkpoints.llamacpp import builtin_text, find_llama_cpp, gguf_tensor_names, recipe_base_type, tensor_type_file_text
from bitplan.engines.llamacpp import TOKEN_EMBD_TYPE
from bitplan.errors import BitplanError
from bitplan.methods.registry import importance_vector
from bitplan.methods.scheme import Method, Scheme
from bitplan.models.source import WeightReader
from bitplan.models.spec import ModelSpec
from bitplan.planner.plan import Plan, load_plan

TOKEN_EMBD = "token_embd.weight"


def llama_cpp_plan(plan: Plan | str | os.PathLike, what: str) -> Plan:
    """The plan, refused in one line unless it was made for llama.cpp."""
    plan = plan if isinstance(plan, Plan) else load_plan(Path(plan))
    rules = engine_rules_of(plan)
    if rules.engine != "llama.cpp":
        raise BitplanError(f"the plan was made for {rules.key}, whose formats a GGUF does not hold: re-run `bitplan plan --engine llama.cpp` "
                           f"for {what}, or emit this plan without --format")
    return plan


def gguf_types(spec: ModelSpec, assignments: dict[str, Scheme], hf_names: list[str]) -> dict[str, str]:
    """{GGUF tensor name: type} of the planned Linears (not those left "none") and the token embedding."""
    names = gguf_tensor_names([n for n in hf_names if n.endswith(".weight")], spec.num_blocks)
    types = {names[f"{layer}.weight"]: scheme.ggml_type for layer, scheme in assignments.items() if scheme.method == Method.GGML}
    return {TOKEN_EMBD: str(TOKEN_EMBD_TYPE), **types}


def plan_imatrix(folder: Path, config: dict, spec: ModelSpec, plan: Plan, assignments: dict[str, Scheme],
                 progress: Callable[[str, int, int], None]) -> dict[str, np.ndarray]:
    """{HF weight name: importance vector} from the plan's calibration tokens run through the
    unquantized blocks (the statistics the profile quantized with)."""
    calibration = CalibrationPass(folder, config, plan, WeightReader(folder))
    blocks = sorted({layer.block for layer in spec.layers}, key=lambda b: (b < 0, b))
    imatrix = {}
    for done, block in enumerate(blocks, 1):
        stats = calibration.block_stats(block, spec)
        for layer in spec.layers:
            if layer.block == block and assignments[layer.name].method == Method.GGML:
                imatrix[f"{layer.name}.weight"] = importance_vector(stats[layer.name]["input"]).numpy()
        progress("imatrix", done, len(blocks))
    return imatrix


def emit_gguf(plan: Plan | str | os.PathLike, out: str | os.PathLike, progress: Callable[[str, int, int], None] | None = None) -> GGUFWritten:
    """Write the GGUF file ``out`` (``*.gguf``) for a llama.cpp plan; returns what was written."""
    plan = llama_cpp_plan(plan, "a GGUF file")
    out = Path(out)
    if out.suffix != ".gguf":
        raise BitplanError(f"--out {out}: name the GGUF file *.gguf")
    if out.exists():
        raise BitplanError(f"{out} already exists: choose another --out or remove it")
    folder, config, spec, assignments = open_plan_model(plan)
    report = progress or (lambda stage, done, total: None)
    imatrix = plan_imatrix(folder, config, spec, plan, assignments, report)
    hf_names = sorted(WeightReader(folder).location)
    types = gguf_types(spec, assignments, hf_names)
    build = find_llama_cpp()
    written: list[GGUFWritten] = []

    def write(temporary: Path) -> None:
        temporary.unlink()
        result = write_gguf(folder, temporary, types, imatrix, build=build)
        check_bytes(result, spec, assignments, plan)
        written.append(result)

    write_atomic(out, write)
    return GGUFWritten(str(out), written[0].file_type, written[0].tensors)


def check_bytes(result: GGUFWritten, spec: ModelSpec, assignments: dict[str, Scheme], plan: Plan) -> None:
    """Every planned Linear's bytes in the file equal the plan's prediction, and so does their sum."""
    total = 0
    for tensor in result.tensors:
        layer = (tensor.hf_name or "").removesuffix(".weight")
        if layer in assignments:
            info = spec.layer(layer)
            predicted = assignments[layer].weight_bytes(info.out_features, info.in_features, spec.dtype_bytes)
            if tensor.nbytes != predicted:
                raise AssertionError(f"{tensor.name} holds {tensor.nbytes} bytes of {tensor.ggml_type}, the plan predicted {predicted}")
            total += tensor.nbytes
    if total != plan.memory.quantized_weights_bytes:
        raise AssertionError(f"the GGUF holds {total} bytes of planned Linears, the plan predicted {plan.memory.quantized_weights_bytes}")


def emit_recipe(plan: Plan | str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write the folder ``out``: tensor-types.txt, calibration.txt and quantize.sh (see the module docstring)."""
    plan = llama_cpp_plan(plan, "a llama-quantize recipe")
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise BitplanError(f"{out} already exists and is not empty: choose another --out or remove it")
    folder, _, spec, assignments = open_plan_model(plan)
    types = gguf_types(spec, assignments, sorted(WeightReader(folder).location))
    elements = {TOKEN_EMBD: spec.vocab_size * spec.hidden_size}
    names = gguf_tensor_names([f"{layer.name}.weight" for layer in spec.layers], spec.num_blocks)
    elements.update({names[f"{layer.name}.weight"]: layer.in_features * layer.out_features for layer in spec.layers})
    base = recipe_base_type(types, elements)
    settings = plan.provenance.calibration
    text = "\n\n".join(Path(p).read_text(encoding="utf-8") for p in settings.texts) if settings.texts else builtin_text("calibration")
    chunks = settings.samples * settings.seq_len // 512 or 1
    script = "\n".join([
        "#!/bin/sh",
        f"# llama.cpp recipe for bitplan plan {plan.integrity[:16]} ({plan.model.source}): run from this folder.",
        "# LLAMA_CPP: a llama.cpp build prefix (src/ and build/bin/), e.g. the one `make llama-cpp` makes.",
        "set -e",
        f"LLAMA_CPP=${{LLAMA_CPP:-{shlex.quote(str(_default_prefix()))}}}",
        f"MODEL=${{MODEL:-{shlex.quote(str(folder))}}}",
        "# convert_hf_to_gguf.py --outtype f32, through bitplan (it stages folders whose config.json names no architecture",
        "# and runs without sentencepiece for tokenizer.json models; see bitplan.checkpoints.llamacpp.convert_to_gguf)",
        f'BITPLAN_LLAMA_CPP="$LLAMA_CPP" {shlex.quote(sys.executable)} -c "import sys; from bitplan.checkpoints.llamacpp import '
        'convert_to_gguf; convert_to_gguf(sys.argv[1], \'model-f32.gguf\', \'f32\')" "$MODEL"',
        f'"$LLAMA_CPP/build/bin/llama-imatrix" -m model-f32.gguf -f calibration.txt -o imatrix.gguf -c 512 --chunks {chunks}',
        f'"$LLAMA_CPP/build/bin/llama-quantize" --pure --tensor-type-file tensor-types.txt --imatrix imatrix.gguf model-f32.gguf model.gguf {base}',
        "",
    ])
    with staging_folder(out) as staging:
        (staging / "tensor-types.txt").write_text(tensor_type_file_text(types))
        (staging / "calibration.txt").write_text(text, encoding="utf-8")
        (staging / "quantize.sh").write_text(script)
        (staging / "plan.json").write_text(plan.to_json())
    (out / "quantize.sh").chmod(0o755)
    return out


def _default_prefix() -> Path:
    try:
        return find_llama_cpp().prefix
    except BitplanError:
        from bitplan.checkpoints.llamacpp import default_prefix

        return default_prefix()
