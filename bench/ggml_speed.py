"""Speed of bitplan's GGUF quantizers on one SmolLM2 Linear (down_proj, 576 x 1536), next to ggml's C.

    BITPLAN_LLAMA_CPP=~/.cache/bitplan-tools/llama.cpp-11434.0.0 .venv/bin/python bench/ggml_speed.py

Best of ``--repeats`` wall times per type, without and with an importance matrix; ggml's time is
``ggml_quantize_chunk`` on one thread through ctypes (skipped without BITPLAN_LLAMA_CPP).
Writes bench/results/ggml_speed.json.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import time
from pathlib import Path

import numpy as np
from common import save

from bitplan.methods.ggml import GGML_TYPES, GGMLType, quantize_ggml, row_size_bytes
from bitplan.models.source import WeightReader, ensure_builtin


def best_time(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def ggml_quantizer(prefix: str | None):
    path = Path(prefix or "") / "build" / "bin" / "libggml-base.so"
    if not prefix or not path.is_file():
        return None
    lib = ctypes.CDLL(str(path))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_void_p]

    def run(weight: np.ndarray, ggml_type: GGMLType, qw: np.ndarray | None) -> None:
        out = np.empty((weight.shape[0], row_size_bytes(ggml_type, weight.shape[1])), np.uint8)
        lib.ggml_quantize_chunk(GGML_TYPES[ggml_type].type_id, weight.ctypes.data, out.ctypes.data, 0, weight.shape[0],
                                weight.shape[1], None if qw is None else qw.ctypes.data)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    weight = WeightReader(ensure_builtin("smollm2-135m")).tensor("model.layers.3.mlp.down_proj.weight").numpy()
    qw = np.random.default_rng(7).lognormal(size=weight.shape[1]).astype(np.float32)
    ggml = ggml_quantizer(os.environ.get("BITPLAN_LLAMA_CPP"))
    rows = []
    for ggml_type in GGMLType:
        for imatrix in (None, qw):
            ours = best_time(lambda: quantize_ggml(weight, ggml_type, imatrix), args.repeats)
            theirs = None if ggml is None else best_time(lambda: ggml(weight, ggml_type, imatrix), args.repeats)
            rows.append({"type": ggml_type.value, "imatrix": imatrix is not None, "bitplan_s": round(ours, 4),
                         "ggml_s": None if theirs is None else round(theirs, 4)})
            print(f"{ggml_type.value:5s} imatrix={imatrix is not None!s:5s} bitplan {ours * 1000:7.1f} ms"
                  + ("" if theirs is None else f"   ggml (C, 1 thread) {theirs * 1000:6.1f} ms"))
    path = save("ggml_speed", {"shape": list(weight.shape), "load_1min": os.getloadavg()[0], "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
