"""bitplan's GGUF quantizers against llama.cpp's own tools, end to end.

1. ``llama-imatrix`` on Python's documentation (``pydoc_data.topics``) -> ``imatrix.gguf``;
2. ``llama-quantize --allow-requantize --pure [--imatrix imatrix.gguf] SmolLM2.Q4_1.gguf out.gguf TYPE``;
3. every compared tensor of ``out.gguf``: our ``quantize_ggml_bytes`` on the dequantized source tensor,
   with the imatrix as llama-quantize loads it (``in_sum2 / counts`` per column; 1 where counts == 0),
   must give the same bytes.

    make llama-cpp; BITPLAN_LLAMA_CPP=~/.cache/bitplan-tools/llama.cpp-11434.0.0 .venv/bin/python bench/ggml_vs_llama_quantize.py [--all-tensors]

Writes bench/results/ggml_vs_llama_quantize.json (``--all-tensors``: ..._all_tensors.json).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import gguf
import numpy as np
from common import save

from bitplan.models.source import builtin_gguf
from bitplan.methods.ggml import GGML_TYPES, GGMLType, dequantize_ggml, quantize_ggml_bytes

FTYPES = ["Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K"]
BLOCKS = ("blk.0.", "blk.15.", "blk.29.")


def tool(prefix: Path, name: str) -> Path:
    path = prefix / "build" / "bin" / name
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run scripts/build_llama_cpp.sh {prefix}")
    return path


def make_imatrix(prefix: Path, model: Path, work: Path) -> Path:
    from pydoc_data.topics import topics

    text = work / "calibration.txt"
    text.write_text("\n\n".join(topics[k] for k in sorted(topics)[:200]))
    out = work / "imatrix.gguf"
    subprocess.run([tool(prefix, "llama-imatrix"), "-m", model, "-f", text, "-o", out, "-c", "128", "--chunks", "8",
                    "-t", "2"], check=True, capture_output=True)
    return out


def load_imatrix(path: Path) -> dict[str, np.ndarray]:
    """``load_imatrix`` of tools/quantize/quantize.cpp (GGUF format, one expert): sums / count, or 1."""
    reader = gguf.GGUFReader(path)
    tensors = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
    result = {}
    for name, sums in tensors.items():
        if name.endswith(".in_sum2"):
            base = name.removesuffix(".in_sum2")
            count = tensors[base + ".counts"][0]
            result[base] = sums / np.float32(count) if count > 0 else np.ones_like(sums)
    return result


def compare(out: Path, source: gguf.GGUFReader, imatrix: dict[str, np.ndarray] | None, all_tensors: bool) -> dict:
    sources = {t.name: t for t in source.tensors}
    rows, seconds = [], 0.0
    for tensor in gguf.GGUFReader(out).tensors:
        ggml_type = GGMLType(tensor.tensor_type.name) if tensor.tensor_type.name in GGMLType.__members__ else None
        if ggml_type is None or len(tensor.shape) != 2 or ggml_type == GGMLType.F32:
            continue
        if not all_tensors and not tensor.name.startswith(BLOCKS):
            continue
        src = sources[tensor.name]
        n_per_row = int(src.shape[0])
        weight = dequantize_ggml(np.array(src.data), GGMLType(src.tensor_type.name), n_per_row)
        qw = None if imatrix is None else imatrix.get(tensor.name)
        start = time.perf_counter()
        ours = quantize_ggml_bytes(weight, ggml_type, qw).numpy().reshape(-1)
        seconds += time.perf_counter() - start
        theirs = np.array(tensor.data).view(np.uint8).reshape(-1)
        rows.append({"tensor": tensor.name, "type": ggml_type.value, "imatrix": qw is not None,
                     "equal": bool(np.array_equal(ours, theirs))})
    return {"tensors": rows, "ours_s": round(seconds, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all-tensors", action="store_true", help="compare every tensor, not blocks 0/15/29")
    parser.add_argument("--ftypes", default=",".join(FTYPES))
    args = parser.parse_args()
    prefix = Path(os.environ.get("BITPLAN_LLAMA_CPP", str(Path.home() / ".cache/bitplan-tools/llama.cpp-11434.0.0")))
    model = builtin_gguf()
    source = gguf.GGUFReader(model)
    summary = []
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        start = time.perf_counter()
        imatrix_file = make_imatrix(prefix, model, work)
        imatrix_s = time.perf_counter() - start
        imatrix = load_imatrix(imatrix_file)
        for ftype in args.ftypes.split(","):
            for use_imatrix in (False, True):
                out = work / f"{ftype}.gguf"
                command = [tool(prefix, "llama-quantize"), "--allow-requantize", "--pure"]
                command += ["--imatrix", imatrix_file] if use_imatrix else []
                start = time.perf_counter()
                subprocess.run(command + [model, out, ftype, "2"], check=True, capture_output=True)
                llama_s = time.perf_counter() - start
                result = compare(out, source, imatrix if use_imatrix else None, args.all_tensors)
                equal = sum(r["equal"] for r in result["tensors"])
                types = sorted({r["type"] for r in result["tensors"]})
                print(f"{ftype:7s} imatrix={use_imatrix!s:5s} {equal}/{len(result['tensors'])} tensors byte-equal "
                      f"(types {','.join(types)}); llama-quantize {llama_s:.1f} s (whole model), ours {result['ours_s']} s")
                summary.append({"ftype": ftype, "imatrix": use_imatrix, "llama_quantize_s": round(llama_s, 2), **result})
    name = "ggml_vs_llama_quantize" + ("_all_tensors" if args.all_tensors else "")
    path = save(name, {"llama_cpp": str(prefix), "imatrix_s": round(imatrix_s, 1),
                                           "types": {t.value: GGML_TYPES[t].type_id for t in GGMLType}, "runs": summary})
    print(f"imatrix {imatrix_s:.1f} s; wrote {path}")


if __name__ == "__main__":
    main()
