"""CLI commands for hardware: ``bitplan devices``, ``bitplan probe``, ``bitplan compare``.

``add_commands(subparsers)`` registers them on the main parser's subparsers; each sets
``func(args) -> int``. User errors raise ``BitplanError`` (the main CLI prints one line, exits 2).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bitplan.atomic import write_text_atomic
from bitplan.engines import get_rules
from bitplan.engines.rules import check_tensor_parallel
from bitplan.errors import BitplanError
from bitplan.models.moe import load_spec
from bitplan.models.spec import read_config, read_config_file
from bitplan.planner.compare import DEFAULT_SCHEMES, CompareSettings, Comparison, compare, write_plot
from bitplan.planner.deployment import DEFAULT_PREFILL_CHUNK_TOKENS, KV_DTYPES
from bitplan.planner.objective import OBJECTIVES
from bitplan.profiles.hardware import get_devices, load_catalog

DEFAULT_TARGETS = "h100-sxm,a100-pcie-40gb,l40s,rtx-4090"
TABLE_WIDTH = 200


def add_commands(subparsers) -> None:
    """Register ``devices``, ``probe`` and ``compare`` on an argparse subparsers object."""
    devices = subparsers.add_parser("devices", help="list the device catalog")
    devices.add_argument("--json", action="store_true", help="print the catalog as JSON")
    devices.set_defaults(func=run_devices)

    probe = subparsers.add_parser("probe", help="measure the local GPU and write a device profile")
    probe.add_argument("--out", default="bitplan-device.toml", help="profile TOML to write")
    probe.add_argument("--index", type=int, default=0, help="GPU index (NVML order)")
    probe.add_argument("--no-benchmark", action="store_true", help="read NVML only, skip the PyTorch benchmarks")
    probe.set_defaults(func=run_probe)

    comp = subparsers.add_parser("compare", help="best plan, memory and speed of a model on several devices")
    comp.add_argument("model", help="a config.json file, or a folder holding one")
    comp.add_argument("--targets", default=DEFAULT_TARGETS, help="comma-separated device names or profile .toml paths")
    comp.add_argument("--context", type=int, default=8192, help="tokens per sequence (prompt + output)")
    comp.add_argument("--batch", type=int, default=1, help="concurrent sequences the plan must leave room for")
    comp.add_argument("--kv-dtype", default="bfloat16", choices=KV_DTYPES, help="KV cache dtype")
    comp.add_argument("--tp", type=int, default=1, help="tensor-parallel devices of each target")
    comp.add_argument("--prefill-chunk", type=int, default=DEFAULT_PREFILL_CHUNK_TOKENS, help="tokens per prefill step")
    comp.add_argument("--objective", default="quality", choices=OBJECTIVES, help="what the plan optimizes (bitplan/planner/objective.py)")
    comp.add_argument("--schemes", default=",".join(DEFAULT_SCHEMES), help="candidate schemes, comma-separated")
    comp.add_argument("--sensitivity", help="a measured sensitivity table (.safetensors) instead of the prior")
    comp.add_argument("--json", dest="json_out", help="also write the results as JSON here")
    comp.add_argument("--plot", help="draw predicted loss against weight bytes with each device's budget (PNG)")
    comp.set_defaults(func=run_compare)


def run_devices(args: argparse.Namespace) -> int:
    catalog = load_catalog()
    if args.json:
        print(json.dumps({key: profile.to_dict() for key, profile in catalog.items()}, indent=1))
        return 0
    table = Table(title=f"bitplan device catalog ({len(catalog)} devices; memory as the driver reports it)")
    for column in ("device", "name", "memory GiB", "bandwidth TB/s", "bf16 TFLOPS", "fp8 TFLOPS", "int8 TOPS", "native formats", "arch"):
        table.add_column(column, justify="right" if "TB" in column or "FLOP" in column or "TOP" in column or "GiB" in column else "left")
    for key, profile in catalog.items():
        peaks = profile.peak_flops_by_dtype

        def tera(dtype: str) -> str:
            return f"{peaks[dtype] / 1e12:.0f}" if dtype in peaks else "-"

        table.add_row(
            key, profile.name, f"{profile.usable_memory_bytes / 2**30:.1f}", f"{profile.bandwidth_bytes_per_s / 1e12:.2f}",
            tera("bf16") if "bf16" in peaks else tera("fp16"), tera("fp8"), tera("int8"),
            ",".join(profile.native_formats), profile.arch,
        )
    Console(width=TABLE_WIDTH).print(table)
    return 0


def run_probe(args: argparse.Namespace) -> int:
    from bitplan.profiles.probe import ProbeUnavailable, probe

    try:
        result = probe(Path(args.out), index=args.index, run_benchmarks=not args.no_benchmark)
    except ProbeUnavailable as exc:
        print(str(exc))
        return 0
    entry = result.entry
    kind = "measured" if entry["measured"] else "catalog figures"
    print(
        f"wrote {result.path}: {entry['name']}, {entry['memory_gib']:.2f} GiB, "
        f"{entry['bandwidth_bytes_per_s'] / 1e12:.2f} TB/s ({kind}); use it as --targets {result.path}"
    )
    return 0


def _read_model_config(model: str) -> dict:
    from bitplan.models.source import BUILTIN_MODELS, resolve_model

    if model in BUILTIN_MODELS:
        return read_config(resolve_model(model))
    path = Path(model)
    if path.is_dir():
        return read_config(path)
    if not path.is_file():
        raise BitplanError(f"{model} is neither a config.json nor a folder holding one: pass a Hugging Face config.json")
    return read_config_file(path)


def _load_table(path: str):
    try:
        from bitplan.profiles.tables import SensitivityTable
    except ImportError as exc:
        raise BitplanError(f"measured sensitivity tables are not available in this build ({exc})") from exc
    if not Path(path).is_file():
        raise BitplanError(f"sensitivity table {path} does not exist: write one with `bitplan profile`")
    return SensitivityTable.load(Path(path))


def run_compare(args: argparse.Namespace) -> int:
    config = _read_model_config(args.model)
    spec, routing = load_spec(config)
    check_tensor_parallel(spec, get_rules("vllm"), args.tp)  # the engine that shards; its rules are the model's heads and widths
    devices = get_devices(args.targets)
    settings = CompareSettings(
        context=args.context, batch=args.batch, kv_dtype=args.kv_dtype, tensor_parallel=args.tp,
        prefill_chunk_tokens=args.prefill_chunk, objective=args.objective,
        schemes=tuple(s.strip() for s in args.schemes.split(",") if s.strip()),
    )
    table = _load_table(args.sensitivity) if args.sensitivity else None
    comparison = compare(spec, routing, devices, settings, table)
    Console(width=TABLE_WIDTH).print(render_table(comparison))
    if args.json_out:
        write_text_atomic(Path(args.json_out), json.dumps(comparison.to_dict(), indent=1))
    if args.plot:
        write_plot(comparison, Path(args.plot))
    return 0


def _gb(count: float) -> str:
    return f"{count / 1e9:.2f}"


def _plan_text(shares: dict[str, float]) -> str:
    return " ".join(f"{name} {share:.0%}" for name, share in list(shares.items())[:3] if share >= 0.005)


def render_table(comparison: Comparison) -> Table:
    """The comparison as a rich table (memory in GB = 1e9 bytes, per device)."""
    s = comparison.settings
    prior = comparison.loss_metric == "prior-kl"
    quality = "loss (prior)" if prior else f"loss ({comparison.loss_metric})"
    title = (
        f"{comparison.model_type}: context {s.context}, batch {s.batch}, KV {s.kv_dtype}, TP {s.tensor_parallel}, "
        f"objective {s.objective}"
    )
    caption = "loss = predicted KL to the unquantized model, nats/token" + (
        "; from bitplan's documented PRIOR, not a measurement (pass --sensitivity for measured scores)" if prior else "")
    table = Table(title=title, caption=caption)
    columns = ("device", "fits", "plan", "bits/w", "weights GB", "KV GB", "work GB", "other GB", "total GB",
               "usable GB", quality, "decode tok/s", "prefill tok/s", "max batch")
    for column in columns:
        table.add_column(column, justify="left" if column in ("device", "fits", "plan") else "right")
    for r in comparison.results:
        m = r.memory
        table.add_row(
            r.device, "yes" if r.fits else f"no: needs {_gb(m.total_bytes)} GB", _plan_text(r.scheme_shares),
            f"{r.bits_per_weight:.2f}", _gb(m.quantized_weights_bytes + m.unquantized_bytes), _gb(m.kv_cache_bytes),
            _gb(m.workspace_bytes), _gb(m.overhead_bytes), _gb(m.total_bytes), _gb(r.usable_memory_bytes),
            f"{r.predicted_loss:.4f}", f"{r.decode_tokens_per_s:.1f}" if r.fits else "-",
            f"{r.prefill_tokens_per_s:.0f}" if r.fits else "-", str(r.max_batch),
        )
    return table
