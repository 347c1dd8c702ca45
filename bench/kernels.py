"""Kernel benchmark: bitplan's Triton kernels beside torch's fp16 ``F.linear`` in the same run.

Decode (M = 1, 4, 8, 16): achieved bandwidth (bytes the kernel must move: packed weight, scales,
activations, output) in GB/s and % of the device's data-sheet peak, and speed-up over fp16.
Prefill (M = 512 .. 4096): TFLOP/s and the ratio to fp16, for the fused GEMM and, beside it, for
dequantizing the weight to fp16 and calling torch's matmul (``configs.PREFILL_DEQUANT_MIN_M``). Shapes: Llama-3-8B and Llama-3-70B
Linears. Timings: medians of CUDA-graph replays (no Python launch overhead, as in serving
engines) over enough weight copies that every read comes from DRAM, not L2.

    python bench/kernels.py                 # full tables, JSON under bench/results/
    python bench/kernels.py --sweep         # first time candidate launch configs and knobs per path
                                            # (SWEEP), then measure the tables with the fastest of each
    python bench/kernels.py --quick         # fewer shapes (a smoke run)

Needs a CUDA GPU. Prints the table last; every number is also saved in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import tomllib
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bitplan.kernels import configs, launch  # noqa: E402
from bitplan.kernels.launch import KernelConfig, WeightFormat  # noqa: E402
from bitplan.kernels.numerics import NF4_CODE_BOOK  # noqa: E402

# (model, layer, out_features N, in_features K); q/o share a shape, as do gate/up.
SHAPES = [
    ("llama3-8b", "qo", 4096, 4096), ("llama3-8b", "kv", 1024, 4096),
    ("llama3-8b", "gate/up", 14336, 4096), ("llama3-8b", "down", 4096, 14336),
    ("llama3-70b", "qo", 8192, 8192), ("llama3-70b", "kv", 1024, 8192),
    ("llama3-70b", "gate/up", 28672, 8192), ("llama3-70b", "down", 8192, 28672),
]
DECODE_M = (1, 4, 8, 16)
PREFILL_M = (512, 1024, 2048, 4096)
PREFILL_SHAPES = [("llama3-8b", "gate/up", 14336, 4096), ("llama3-70b", "qo", 8192, 8192)]
DEVICE = "cuda"  # "cpu" with --smoke: tiny shapes in the Triton interpreter, to check this script
CATALOG_ALIASES = [("H100", "NVL", "h100-nvl"), ("H100", "PCIe", "h100-pcie"), ("H100", "", "h100-sxm"),
                   ("H200", "", "h200-sxm"), ("A100", "PCIe", "a100-pcie-80gb"), ("A100", "", "a100-sxm-80gb"),
                   ("L40S", "", "l40s"), ("L4", "", "l4"), ("B200", "", "b200")]


L2_BYTES = 50 * 2**20


def graph_us(calls: list, replays: int = 15) -> float:
    """Median microseconds per call of ``calls`` captured in one CUDA graph.

    A graph removes Python launch overhead (as serving engines do), and each call reads its own
    copy of the weights, enough copies to exceed twice the L2 cache, so every weight read comes
    from DRAM. The first calls compile the kernels.
    """
    if DEVICE == "cpu":
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) * 1e6 / len(calls)
    for call in calls:
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    times = []
    for _ in range(replays):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end))
    del graph
    return sorted(times)[len(times) // 2] * 1e3 / len(calls)


def copies_for(nbytes: int) -> int:
    """Weight copies so that one pass over all of them is more than twice the L2 cache."""
    return 1 if DEVICE == "cpu" else max(1, min(64, math.ceil(2 * L2_BYTES / nbytes)))


def median_ms(fn) -> float:
    """Median milliseconds of ``fn`` (``do_bench``: CUDA events, L2 flushed before each run)."""
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def datasheet_bandwidth(name: str) -> tuple[str, float | None]:
    """(catalog key, bytes/s) of the device from ``accelerators.toml``, or (``?``, None)."""
    catalog = tomllib.loads((ROOT / "bitplan/profiles/data/accelerators.toml").read_text())
    for model, variant, key in CATALOG_ALIASES:
        if model in name and variant in name and key in catalog:
            return key, float(catalog[key]["bandwidth_bytes_per_s"])
    return "?", None


def copy_bandwidth() -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written per second."""
    src = torch.empty(2**29 if DEVICE == "cuda" else 2**16, dtype=torch.float16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    return 2 * src.numel() * 2 / (median_ms(lambda: dst.copy_(src)) * 1e-3)


def int_weight(n: int, k: int, bits: int, group: int, symmetric: bool) -> dict:
    """Random pack-quantized tensors (random words are valid codes) on the GPU."""
    words = math.ceil(k * bits / 32)
    groups = 1 if group == 0 else k // group
    packed = torch.randint(-2**31, 2**31 - 1, (n, words), dtype=torch.int32, device=DEVICE)
    scale = (torch.rand(n, groups, device=DEVICE) * 0.01 + 0.001).to(torch.float16)
    zero = None
    if not symmetric:
        zero = torch.randint(-2**31, 2**31 - 1, (math.ceil(n * bits / 32), groups), dtype=torch.int32, device=DEVICE)
    return dict(weight=packed, scale=scale, zero=zero, fmt=WeightFormat.INT, bits=bits, group_size=group)


def format_weight(name: str, n: int, k: int) -> dict:
    """Tensors for one named format at shape [n, k]."""
    if name == "nf4":
        spec = int_weight(n, k, 4, 64, True)
        codebook = torch.tensor(NF4_CODE_BOOK, device=DEVICE)  # made outside any graph capture
        return dict(spec, fmt=WeightFormat.NF4, codebook=codebook)
    if name == "fp8":
        w8 = (torch.randn(n, k, device=DEVICE) * 2).to(torch.float8_e4m3fn)
        scale = (torch.rand(n, 1, device=DEVICE) * 0.01).to(torch.float16)
        return dict(weight=w8, scale=scale, zero=None, fmt=WeightFormat.FP8, bits=8, group_size=0)
    bits, group, symmetric = {"w4g128s": (4, 128, True), "w4g128a": (4, 128, False), "w8gcs": (8, 0, True),
                              "w3g128s": (3, 128, True), "w2g64a": (2, 64, False), "w4g32s": (4, 32, True)}[name]
    return int_weight(n, k, bits, group, symmetric)


def weight_bytes(spec: dict) -> int:
    total = spec["weight"].numel() * spec["weight"].element_size() + spec["scale"].numel() * 2
    return total + (0 if spec["zero"] is None else spec["zero"].numel() * 4)


def run_quant(x: torch.Tensor, spec: dict, n: int, config: KernelConfig | None = None, out=None):
    return lambda: launch.weight_only_linear(x, spec["weight"], spec["scale"], spec["zero"], fmt=spec["fmt"],
                                             bits=spec["bits"], group_size=spec["group_size"], out_features=n,
                                             codebook=spec.get("codebook"), config=config, out=out)


def checked_error(x: torch.Tensor, spec: dict, n: int, weight16: torch.Tensor, config) -> float:
    """Relative error against fp16 ``F.linear`` of the dequantized weight, output poisoned first."""
    ref = F.linear(x, weight16).float()
    out = torch.full((x.shape[0], n), float("nan"), device=DEVICE, dtype=x.dtype)
    run_quant(x, spec, n, config, out)()
    return float((out.float() - ref).norm() / ref.norm())


def dequant_w4_sym(spec: dict, n: int, k: int) -> torch.Tensor:
    """fp16 weight of a 4-bit symmetric pack-quantized tensor, with torch ops (for the error column)."""
    shifts = torch.arange(0, 32, 4, device=DEVICE, dtype=torch.int32)
    codes = ((spec["weight"].unsqueeze(-1) >> shifts) & 15).reshape(n, -1)[:, :k].float() - 8
    group = spec["group_size"] or k
    return (codes.view(n, -1, group) * spec["scale"].float().unsqueeze(-1)).reshape(n, k).half()


def time_pair(m: int, n: int, k: int, specs: list[dict], tuned: dict | None) -> tuple[float, float]:
    """(quantized us, fp16 us) per call, each over enough weight copies to defeat the L2 cache."""
    x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
    config = None if tuned is None else tuned.get(launch.path_for(m))
    t_q = graph_us([run_quant(x, spec, n, config) for spec in specs])
    weights16 = [torch.randn(n, k, device=DEVICE, dtype=torch.float16) for _ in range(copies_for(2 * n * k))]
    t_16 = graph_us([lambda w=w: F.linear(x, w) for w in weights16])
    return t_q, t_16


def decode_rows(shapes, bandwidth: float | None, tuned: dict | None = None) -> list[dict]:
    rows = []
    for model, layer, n, k in shapes:
        spec = int_weight(n, k, 4, 128, True)
        specs = [spec] + [int_weight(n, k, 4, 128, True) for _ in range(copies_for(weight_bytes(spec)) - 1)]
        for m in DECODE_M:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
            config = None if tuned is None else tuned.get(launch.path_for(m))
            err = checked_error(x, spec, n, dequant_w4_sym(spec, n, k), config)
            t_q, t_16 = time_pair(m, n, k, specs, tuned)
            t_q, t_16 = t_q * 1e-3, t_16 * 1e-3
            moved = weight_bytes(spec) + 2 * m * (k + n)
            gbs = moved / (t_q * 1e-3) / 1e9
            rows.append(progress(dict(model=model, layer=layer, n=n, k=k, m=m, scheme="w4g128s", us=t_q * 1e3,
                             fp16_us=t_16 * 1e3, gb_per_s=gbs, fp16_gb_per_s=(2 * n * k + 2 * m * (k + n)) / (t_16 * 1e-3) / 1e9,
                             pct_peak=None if not bandwidth else 100 * gbs * 1e9 / bandwidth,
                             speedup=t_16 / t_q, rel_err=err)))
    return rows


def prefill_rows(shapes, tuned: dict | None = None) -> list[dict]:
    rows = []
    for model, layer, n, k in shapes:
        specs = [int_weight(n, k, 4, 128, True) for _ in range(2 if DEVICE == "cuda" else 1)]
        weight16 = dequant_w4_sym(specs[0], n, k)
        for m in PREFILL_M:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
            config = None if tuned is None else tuned.get(launch.path_for(m))
            err = checked_error(x, specs[0], n, weight16, config)
            t_q, t_16 = time_pair(m, n, k, specs, tuned)
            t_q, t_16 = t_q * 1e-3, t_16 * 1e-3
            flop = 2 * m * n * k
            row = dict(model=model, layer=layer, n=n, k=k, m=m, scheme="w4g128s", us=t_q * 1e3, fp16_us=t_16 * 1e3,
                       tflops=flop / (t_q * 1e-3) / 1e12, fp16_tflops=flop / (t_16 * 1e-3) / 1e12,
                       ratio=t_16 / t_q, rel_err=err, prefill_dequant_min_m=configs.PREFILL_DEQUANT_MIN_M)
            if configs.PREFILL_DEQUANT_MIN_M == 0:  # the alternative: dequantize to fp16, then torch's matmul
                configs.PREFILL_DEQUANT_MIN_M = 1
                try:
                    config = None if tuned is None else tuned.get(launch.path_for(m))
                    row["dequant_rel_err"] = checked_error(x, specs[0], n, weight16, config)
                    t_d = graph_us([run_quant(x, spec, n, config) for spec in specs]) * 1e-3
                    row.update(dequant_us=t_d * 1e3, dequant_tflops=flop / (t_d * 1e-3) / 1e12, dequant_ratio=t_16 / t_d)
                finally:
                    configs.PREFILL_DEQUANT_MIN_M = 0
            rows.append(progress(row))
    return rows


def format_rows(n: int, k: int, bandwidth: float | None, tuned: dict | None = None) -> list[dict]:
    rows = []
    weights16 = [torch.randn(n, k, device=DEVICE, dtype=torch.float16) for _ in range(copies_for(2 * n * k))]
    for m in (1, 16, 2048):
        x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
        config = None if tuned is None else tuned.get(launch.path_for(m))
        t_16 = graph_us([lambda w=w: F.linear(x, w) for w in weights16]) * 1e-3
        for name in ("w4g128s", "w4g128a", "w4g32s", "w3g128s", "w2g64a", "w8gcs", "nf4", "fp8", "w8a8"):
            if name == "w8a8":
                w8 = [torch.randint(-127, 128, (n, k), dtype=torch.int8, device=DEVICE) for _ in range(copies_for(n * k))]
                ws = torch.rand(n, 1, device=DEVICE) * 0.01
                t_q = graph_us([lambda w=w: launch.w8a8_linear(x, w, ws) for w in w8]) * 1e-3
                moved = n * k + 4 * n
            else:
                spec = format_weight(name, n, k)
                specs = [spec] + [format_weight(name, n, k) for _ in range(copies_for(weight_bytes(spec)) - 1)]
                config_here = config if name in ("w4g128s", "w4g128a", "w4g32s", "w8gcs", "w2g64a") else None
                t_q = graph_us([run_quant(x, sp, n, config_here) for sp in specs]) * 1e-3
                moved = weight_bytes(spec)
            moved += 2 * m * (k + n)
            gbs = moved / (t_q * 1e-3) / 1e9
            rows.append(progress(dict(n=n, k=k, m=m, scheme=name, us=t_q * 1e3, fp16_us=t_16 * 1e3, speedup=t_16 / t_q,
                             gb_per_s=gbs, pct_peak=None if not bandwidth else 100 * gbs * 1e9 / bandwidth,
                             tflops=2 * m * n * k / (t_q * 1e-3) / 1e12)))
    return rows


# Candidates of the fast integer kernels (W4 g128 here): (config, split-K programs per
# multiprocessor, 4-bit GEMV nibbles in place); see the knobs in ``bitplan.kernels.launch``.
SWEEP = {
    "gemv": [(KernelConfig(1, bn, bk, w, st), per_sm, in_place) for bn, bk, w, st, per_sm, in_place in (
        (128, 128, 4, 1, 4, True), (128, 128, 4, 1, 4, False), (256, 128, 4, 1, 4, False), (256, 128, 4, 2, 4, False),
        (128, 128, 4, 2, 4, False), (128, 128, 4, 1, 6, False), (128, 128, 4, 2, 4, True), (64, 128, 4, 1, 8, False))],
    "small": [(KernelConfig(16, bn, bk, w, st, 0, swap), per_sm, True) for bn, bk, w, st, swap, per_sm in (
        (128, 128, 8, 3, True, 2), (64, 128, 4, 3, True, 4), (128, 128, 8, 3, True, 3))],
    "gemm": [(KernelConfig(bm, bn, bk, w, st, 1, swap), 2, True) for bm, bn, bk, w, st, swap in (
        (256, 128, 64, 8, 4, True), (256, 128, 64, 8, 3, True))],
}
SWEEP_CASES = {"gemv": [(1, 8192, 8192), (1, 28672, 8192), (1, 8192, 28672), (1, 4096, 4096), (1, 1024, 8192)],
               "small": [(16, 8192, 8192), (4, 8192, 8192), (16, 28672, 8192), (8, 8192, 28672)],
               "gemm": [(2048, 8192, 8192), (512, 14336, 4096)]}


def set_knobs(path: str, per_sm: int, in_place: bool) -> None:
    """Apply a candidate's launch knobs (module state of ``bitplan.kernels.launch``)."""
    if path in configs.FAST_SPLIT_PER_SM:
        configs.FAST_SPLIT_PER_SM[path] = per_sm
    if path == "gemv":
        configs.GEMV_NIBBLES_IN_PLACE = in_place


def sweep_rows() -> list[dict]:
    """Time every candidate of each path on its shapes; rows sorted best first per path (all kept)."""
    rows = []
    saved = dict(configs.FAST_SPLIT_PER_SM), configs.GEMV_NIBBLES_IN_PLACE
    for path, cases in SWEEP_CASES.items():
        totals: dict[tuple, float] = {}
        per_case: dict[tuple, list] = {}
        for m, n, k in cases:
            spec = int_weight(n, k, 4, 128, True)
            specs = [spec] + [int_weight(n, k, 4, 128, True) for _ in range(copies_for(weight_bytes(spec)) - 1)]
            x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
            for candidate in SWEEP[path]:
                config, per_sm, in_place = candidate
                set_knobs(path, per_sm, in_place)
                try:
                    t = graph_us([run_quant(x, sp, n, config) for sp in specs]) * 1e-3
                except Exception as error:  # a config that does not fit (shared memory, registers)
                    print(f"  sweep {path} {config}: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
                    t = math.inf
                finally:
                    configs.FAST_SPLIT_PER_SM.update(saved[0])
                    configs.GEMV_NIBBLES_IN_PLACE = saved[1]
                totals[candidate] = totals.get(candidate, 0.0) + t
                per_case.setdefault(candidate, []).append(round(t * 1e3, 2))
        for (config, per_sm, in_place), total in sorted(totals.items(), key=lambda item: item[1]):
            rows.append(progress(dict(path=path, config=config.to_dict(), split_programs_per_sm=per_sm,
                                      nibbles_in_place=in_place, total_us=total * 1e3,
                                      case_us=per_case[(config, per_sm, in_place)], cases=[list(c) for c in cases])))
    return rows


def best_configs(sweep: list[dict]) -> dict[str, KernelConfig]:
    """The fastest swept config of each path (rows are sorted best first per path)."""
    best: dict[str, KernelConfig] = {}
    for row in sweep:
        if row["path"] not in best:
            best[row["path"]] = KernelConfig.from_dict(row["config"])
            set_knobs(row["path"], row["split_programs_per_sm"], row["nibbles_in_place"])
    return best


def profile_once() -> None:
    """Launch the default GEMV (70B up, M=1) and GEMM (M=2048) a few times, for ``ncu``."""
    n, k = 28672, 8192
    spec = int_weight(n, k, 4, 128, True)
    for m in (1, 2048):
        x = torch.randn(m, k, device=DEVICE, dtype=torch.float16)
        for _ in range(2):
            run_quant(x, spec, n)()
    torch.cuda.synchronize()


def progress(row: dict) -> dict:
    """Echo a finished row to stderr (a run cut short still shows what it measured)."""
    print(json.dumps(row), file=sys.stderr, flush=True)
    return row


def fmt(value, digits=1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def print_tables(result: dict) -> None:
    info = result["device"]
    print(f"\n# {info['name']} ({info['catalog_key']}): data-sheet {fmt(info['datasheet_gb_per_s'], 0)} GB/s, "
          f"measured copy {info['copy_gb_per_s']:.0f} GB/s; triton {info['triton']}, torch {info['torch']}")
    print("\n## Decode, W4A16 g128 symmetric vs fp16 F.linear")
    print("| model | layer | N x K | M | us | fp16 us | GB/s | % peak | x fp16 | rel err |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["decode"]:
        print(f"| {r['model']} | {r['layer']} | {r['n']}x{r['k']} | {r['m']} | {r['us']:.1f} | {r['fp16_us']:.1f} | "
              f"{r['gb_per_s']:.0f} | {fmt(r['pct_peak'])} | {r['speedup']:.2f} | {r['rel_err']:.1e} |")
    print("\n## Prefill, W4A16 g128 symmetric vs fp16 F.linear")
    print("| model | layer | N x K | M | TFLOP/s | fp16 TFLOP/s | x fp16 | rel err | dequant+matmul TFLOP/s | x fp16 |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["prefill"]:
        print(f"| {r['model']} | {r['layer']} | {r['n']}x{r['k']} | {r['m']} | {r['tflops']:.0f} | "
              f"{r['fp16_tflops']:.0f} | {r['ratio']:.2f} | {r.get('rel_err', float('nan')):.1e} | "
              f"{fmt(r.get('dequant_tflops'), 0)} | {fmt(r.get('dequant_ratio'), 2)} |")
    print("\n## Formats at one 70B shape")
    print("| N x K | M | scheme | us | x fp16 | GB/s | % peak | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["formats"]:
        print(f"| {r['n']}x{r['k']} | {r['m']} | {r['scheme']} | {r['us']:.1f} | {r['speedup']:.2f} | "
              f"{r['gb_per_s']:.0f} | {fmt(r['pct_peak'])} | {r['tflops']:.1f} |")
    for r in result.get("sweep", []):
        print(f"sweep {r['path']}: {r['config']} per_sm {r.get('split_programs_per_sm')} in_place {r.get('nibbles_in_place')} "
              f"total {r['total_us']:.1f} us {r.get('case_us')}")
    for path, config in result.get("configs_used", {}).items():
        print(f"tables measured with {path}: {config}")
    if "knobs" in result:
        print(f"launch knobs: {result['knobs']}")


def smoke(args) -> None:
    """Every table on tiny shapes in the interpreter: catches errors before a GPU is rented."""
    global DEVICE, DECODE_M, PREFILL_M, SWEEP_CASES
    DEVICE, DECODE_M, PREFILL_M = "cpu", (1, 3), (32,)
    SWEEP_CASES = {path: [(m if m < 32 else 32, 128, 256)] for path, m in (("gemv", 1), ("small", 16), ("gemm", 64))}
    for path in SWEEP:
        SWEEP[path] = [(KernelConfig(*(16 if path == "small" else 1 if path == "gemv" else 32, 32, 64, 4, 1)), 2, True)]
    tiny = [("tiny", "a", 96, 256)]
    result = {"device": dict(name="cpu-interpreter", catalog_key="?", datasheet_gb_per_s=None, copy_gb_per_s=copy_bandwidth() / 1e9,
                             triton="interpreter", torch=torch.__version__)}
    result.update(decode=decode_rows(tiny, None), prefill=prefill_rows(tiny), formats=format_rows(64, 256, None),
                  sweep=sweep_rows())
    print_tables(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one shape per model")
    parser.add_argument("--sweep", action="store_true", help="also time candidate launch configs")
    parser.add_argument("--profile", action="store_true", help="only launch the default kernels, for ncu")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU interpreter (checks the script)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default bench/results/kernels-<gpu>.json)")
    args = parser.parse_args()
    if args.smoke:
        return smoke(args)
    if args.profile:
        return profile_once()
    if not torch.cuda.is_available():
        sys.exit("bench/kernels.py needs a CUDA GPU (or --smoke with TRITON_INTERPRET=1)")
    import triton

    name = torch.cuda.get_device_name()
    key, peak = datasheet_bandwidth(name)
    started = time.time()
    shapes = [s for s in SHAPES if s[2] != 1024] if args.quick else SHAPES
    result = {"device": dict(name=name, catalog_key=key, datasheet_gb_per_s=None if peak is None else peak / 1e9,
                             copy_gb_per_s=copy_bandwidth() / 1e9, sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
                             triton=triton.__version__, torch=torch.__version__)}
    tuned = None
    if args.sweep:
        result["sweep"] = sweep_rows()
        tuned = best_configs(result["sweep"])
        result["configs_used"] = {path: config.to_dict() for path, config in tuned.items()}
    result["knobs"] = dict(fast_split_per_sm=dict(configs.FAST_SPLIT_PER_SM), gemv_nibbles_in_place=configs.GEMV_NIBBLES_IN_PLACE,
                           prefill_dequant_min_m=configs.PREFILL_DEQUANT_MIN_M)
    result["decode"] = decode_rows(shapes, peak, tuned)
    result["prefill"] = prefill_rows(PREFILL_SHAPES[:1] if args.quick else PREFILL_SHAPES, tuned)
    result["formats"] = format_rows(8192, 8192, peak, tuned)
    result["seconds"] = round(time.time() - started, 1)
    out = args.out or ROOT / "bench" / "results" / f"kernels-{key}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print_tables(result)
    print(f"\nsaved {out} ({result['seconds']} s)")


if __name__ == "__main__":
    main()
