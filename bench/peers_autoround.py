"""AutoRound (Intel, PyPI ``auto-round``) as a peer of bitplan: quantize SmolLM2 and write the weights it decodes to.

Runs in ``.venv-peers`` (``make bench-peers`` builds it from ``requirements/peers-lock.txt``:
auto-round cannot share bitplan's venv), not with bitplan installed: ``bench/peers.py`` calls it
as a subprocess and measures what it writes with bitplan's one evaluator.

    .venv-peers/bin/python bench/peers_autoround.py MODEL_FOLDER CALIBRATION.safetensors OUT_DIR \\
        --variant {rtn,opt-rtn,signround,autoscheme} [--bits 3] [--group 64] [--iters 50] [--avg-bits 3.6]

- ``rtn``: plain round-to-nearest (``iters=0``, ``disable_opt_rtn=True``);
- ``opt-rtn``: auto-round's default for ``iters=0`` (its optimized RTN: a scale search);
- ``signround``: SignRound (``iters`` sign-gradient steps per block, auto-round's default
  learning rate and batch size; auto-round's default is 200 iterations on 128 x 2048 tokens, too
  slow on two CPU cores: the settings used are recorded);
- ``autoscheme``: AutoScheme chooses per layer among ``--options`` bit widths (group ``--group``,
  symmetric integers) for ``--avg-bits`` average bits per weight, then the layers are quantized
  with RTN (``iters=0``, plain), or SignRound with ``--iters`` > 0.

The calibration text is bitplan's (``CALIBRATION.safetensors`` holds ``input_ids`` [n, seq_len],
the windows bitplan's plans calibrate on), so every calibrated peer sees the same tokens.
OUT_DIR gets ``weights.safetensors`` (every quantized Linear's fake-quantized weight, float32,
HF names: the values auto-round's ``fake`` format decodes to) and ``peer.json`` (per-Linear bits,
group and symmetry, the settings, the seconds it took, auto-round's version).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def scheme(bits: int, group: int):
    from auto_round import QuantizationScheme

    return QuantizationScheme(bits=bits, group_size=group, sym=True, data_type="int", act_bits=16)


def quantize(args: argparse.Namespace) -> dict:
    import auto_round
    from auto_round import AutoRound, AutoScheme
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    windows = load_file(args.calibration)["input_ids"][: args.nsamples]
    data = [w.unsqueeze(0) for w in windows]
    settings: dict = {"variant": args.variant, "nsamples": len(data), "seqlen": int(windows.shape[1]), "group_size": args.group,
                      "sym": True, "seed": 42}
    kwargs = dict(tokenizer=tokenizer, dataset=data, nsamples=len(data), seqlen=int(windows.shape[1]), device_map="cpu", seed=42)
    if args.variant == "autoscheme":
        options = [scheme(b, args.group) for b in args.options]
        chosen = AutoScheme(avg_bits=args.avg_bits, options=options, nsamples=len(data), seqlen=int(windows.shape[1]),
                            device_map="cpu", dataset=None)
        settings.update({"avg_bits": args.avg_bits, "options_bits": list(args.options), "iters": args.iters})
        extra = {"iters": args.iters} if args.iters else {"iters": 0, "disable_opt_rtn": True}
        # AutoScheme takes its text only by name or file: the same windows, decoded, one per line of a JSONL file
        texts = args.out / "calibration.jsonl"
        texts.write_text("".join(json.dumps({"text": tokenizer.decode(w)}) + "\n" for w in windows))
        kwargs["dataset"] = str(texts)
        compressor = AutoRound(model, scheme=chosen, **extra, **kwargs)
    elif args.variant in ("rtn", "opt-rtn"):
        settings.update({"bits": args.bits, "iters": 0, "disable_opt_rtn": args.variant == "rtn"})
        compressor = AutoRound(model, scheme=scheme(args.bits, args.group), iters=0, disable_opt_rtn=args.variant == "rtn", **kwargs)
    else:
        settings.update({"bits": args.bits, "iters": args.iters})
        compressor = AutoRound(model, scheme=scheme(args.bits, args.group), iters=args.iters, **kwargs)
    start = time.perf_counter()
    compressor.quantize_and_save(str(args.out / "fake"), format="fake")
    seconds = time.perf_counter() - start
    return {"settings": settings, "seconds": round(seconds, 1), "auto_round": auto_round.__version__,
            "torch": torch.__version__, "layer_config": layer_bits(compressor)}


def layer_bits(compressor) -> dict[str, dict]:
    """{HF Linear name: {bits, group_size, sym}} for every quantized Linear, as auto-round configured them."""
    config = getattr(compressor, "layer_config", None)
    if config is None:  # the orchestrator keeps the resolved config on its quantizer
        for holder in (getattr(compressor, "quantizer", None), getattr(compressor, "compressor", None)):
            config = getattr(holder, "layer_config", None) if holder is not None else None
            if config:
                break
    out = {}
    for name, item in (config or {}).items():
        get = item.get if isinstance(item, dict) else lambda key, item=item: getattr(item, key, None)
        if name.split(".")[-1] in LINEARS and get("bits") is not None and int(get("bits")) < 16:
            out[name] = {"bits": int(get("bits")), "group_size": int(get("group_size")), "sym": bool(get("sym"))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("calibration", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--variant", choices=("rtn", "opt-rtn", "signround", "autoscheme"), required=True)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=64)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--avg-bits", type=float, default=3.5)
    parser.add_argument("--options", type=lambda text: [int(b) for b in text.split(",")], default=[2, 3, 4, 8])
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report = quantize(args)
    saved = {}
    for path in sorted((args.out / "fake").rglob("*.safetensors")):
        saved.update(load_file(path))
    weights = {name: tensor.to(torch.float32).contiguous() for name, tensor in saved.items()
               if name.endswith(".weight") and name.split(".")[-2] in LINEARS}
    if not report["layer_config"]:
        raise SystemExit("auto-round's layer configuration was not found: cannot count the bytes")
    missing = sorted(f"{name}.weight" for name in report["layer_config"] if f"{name}.weight" not in weights)
    if missing:
        raise SystemExit(f"no fake-quantized weight for {missing[:3]}")
    save_file({f"{n}.weight": weights[f"{n}.weight"] for n in report["layer_config"]}, str(args.out / "weights.safetensors"))
    (args.out / "peer.json").write_text(json.dumps(report, indent=1, sort_keys=True))
    print(json.dumps({k: v for k, v in report.items() if k != "layer_config"}))


if __name__ == "__main__":
    main()
