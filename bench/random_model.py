"""Write a random-weight model of a real shape from its config.json, one tensor at a time.

The module names and shapes are the ones transformers builds from the config (taken from the
model skeleton on the meta device, so nothing is allocated), the weights are seeded normal
noise (std = the config's ``initializer_range``, norms 1) in bf16, written to safetensors shards
of about 2 GB with an index, so a 16 GB model is written in a few hundred MB of memory. The
tokenizer is SmolLM2's (its ids are a subset of any larger vocabulary): the text is real, the
weights are not. Random weights prove memory and time, never quality.

    PYTHONPATH=. .venv/bin/python bench/random_model.py tests/data/configs/llama-3-8b.json OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SHARD_BYTES = 2 * 10**9


def tensor_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, as transformers names them for this config."""
    from bitplan.profiles.blocks import skeleton_model

    model = skeleton_model(config)
    return {name: tuple(param.shape) for name, param in model.state_dict().items() if "rotary" not in name}


def write_random_model(config_path: Path, out: Path, seed: int = 0) -> Path:
    from bitplan.models.source import ensure_builtin

    if (out / "model.safetensors.index.json").is_file():
        return out
    config = json.loads(config_path.read_text())
    config["torch_dtype"] = "bfloat16"
    shapes = tensor_shapes(config)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    std = float(config.get("initializer_range", 0.02))
    shard: dict[str, torch.Tensor] = {}
    names = sorted(shapes, key=lambda name: (not name.startswith("model.embed"), name))
    weight_map: dict[str, str] = {}
    total = 0
    for name in names:
        shape = shapes[name]
        if len(shape) == 1:  # norms (and biases): ones / zeros
            tensor = (torch.zeros if name.endswith(".bias") else torch.ones)(shape, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator).to(torch.bfloat16)
        if shard and sum(t.nbytes for t in shard.values()) + tensor.nbytes > SHARD_BYTES:
            flush(shard, tmp, weight_map)  # memory stays at one shard
        shard[name] = tensor
        total += tensor.nbytes
    flush(shard, tmp, weight_map)
    files = sorted(set(weight_map.values()))
    renamed = {old: f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i, old in enumerate(files)}
    for old, new in renamed.items():
        (tmp / old).rename(tmp / new)
    index = {"metadata": {"total_size": total}, "weight_map": {k: renamed[v] for k, v in sorted(weight_map.items())}}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    smollm = ensure_builtin("smollm2-135m")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm / name, tmp / name)
    tmp.rename(out)
    return out


def flush(shard: dict, folder: Path, weight_map: dict) -> None:
    if not shard:
        return
    name = f"shard-{len(set(weight_map.values())):05d}.safetensors"
    save_file(shard, str(folder / name), metadata={"format": "pt"})
    weight_map.update({key: name for key in shard})
    shard.clear()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    path = write_random_model(args.config, args.out, args.seed)
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"{path}: {size / 1e9:.2f} GB of safetensors", file=sys.stderr)


if __name__ == "__main__":
    main()
