"""Memory and time per stage against model size, drawn from what ``bench/scale.py`` saved (issue 14).

Three panels, each from measured rows only:

1. SmolLM2's width at 30, 60 and 120 blocks (``bench/results/scale.json``): peak resident memory of
   the refinement's and the evaluation's meters, whole (the model and a copy in float32) against
   streaming (block by block);
2. Llama-3-8B's width at 1, 4 and 32 blocks (``scale_shape-llama-3-8b-1-blocks.json`` and
   ``scale_shape-llama-3-8b-4-blocks.json`` with RTN and GPTQ candidates, ``scale_shape-llama-3-8b.json``
   the 32-block GPTQ profile, ``scale_shape-llama-3-8b-rtn.json`` the 32-block path with RTN
   candidates, and its plan emitted with GPTQ, ``emit-gptq``): peak resident memory of each CLI
   stage with the issue's bound (2 blocks of float32 weights + activations + 2 GiB);
3. the same stages' wall time per block.

Writes ``bench/results/scale.png``.

    .venv/bin/python bench/scale_plot.py
"""

from __future__ import annotations

import json

from common import RESULTS

STAGES = ("profile", "plan", "emit", "eval", "emit-gptq")
GIB = 2**30


def depth_rows() -> dict[str, list[tuple[int, float]]]:
    """``{stage: [(blocks, peak GiB)]}`` of the SmolLM2-width depth runs."""
    out: dict[str, list[tuple[int, float]]] = {}
    for row in json.loads((RESULTS / "scale.json").read_text())["rows"]:
        blocks = int(row["model"].split("(")[1].split()[0])
        out.setdefault(row["stage"], []).append((blocks, row["peak_rss_bytes"] / GIB))
    return {stage: sorted(points) for stage, points in out.items()}


SHAPES = (  # (results file, series label, stages drawn): each stage's row as saved, "plan-exact" (--trials 0) standing in for "plan"
    ("scale_shape-llama-3-8b-1-blocks.json", "1 block, RTN + GPTQ", STAGES),
    ("scale_shape-llama-3-8b-4-blocks.json", "4 blocks, RTN + GPTQ", STAGES),
    # its emit row (817ce74, 14.1 GiB) is from before malloc_trim and the streamed shards: superseded by the RTN run's emit-gptq
    ("scale_shape-llama-3-8b.json", "32 blocks, RTN + GPTQ (profile, exact plan)", ("profile", "plan")),
    ("scale_shape-llama-3-8b-rtn.json", "32 blocks, RTN", STAGES),
)


def shape_rows() -> list[dict]:
    """One entry per saved Llama-3-8B-width run: ``{"label", "blocks", "threads", "bound": GiB, stage: row}``."""
    out = []
    for name, label, drawn in SHAPES:
        path = RESULTS / name
        if not path.is_file():
            continue
        saved = json.loads(path.read_text())
        entry = {"label": label, "blocks": int(saved["blocks"]), "threads": saved["machine"]["cpus"], "bound": saved["bound"]["total"] / GIB}
        for row in saved["rows"]:
            stage = "plan" if row["stage"] == "plan-exact" else row["stage"]
            if stage in drawn:
                entry.setdefault(stage, row)
        out.append(entry)
    return out


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(16, 6.4))
    for stage, points in depth_rows().items():
        style = "--" if stage.endswith("whole") else "-"
        axes[0].plot([b for b, _ in points], [g for _, g in points], style, marker="o", label=stage)
    axes[0].set_title("SmolLM2 width (576): peak RSS against depth")
    axes[0].set_xlabel("decoder blocks (30 = SmolLM2-135M; 60, 120 random weights)")
    axes[0].set_ylabel("peak resident memory (GiB)")
    axes[0].set_ylim(bottom=0)

    shapes = shape_rows()
    width = 0.8 / max(len(shapes), 1)
    for i, entry in enumerate(shapes):
        xs = [s + (i - (len(shapes) - 1) / 2) * width for s in range(len(STAGES))]
        peaks = [entry[s]["peak_rss_bytes"] / GIB if s in entry else 0 for s in STAGES]
        # a row whose wall time is not a timing (a process stopped while another job ran) draws no time bar
        per_block = [entry[s]["seconds_per_block"] if s in entry and "timing_note" not in entry[s] else 0 for s in STAGES]
        commits = "/".join(dict.fromkeys(entry[s]["commit"] for s in STAGES if s in entry))
        label = f"{entry['label']} ({commits})"
        bars = axes[1].bar(xs, peaks, width, label=label)
        axes[1].hlines(entry["bound"], xs[0] - width / 2, xs[-1] + width / 2, colors=bars.patches[0].get_facecolor(),
                       linestyles=":", label=f"bound at {entry['blocks']} blocks: {entry['bound']:.2f} GiB")
        axes[2].bar(xs, per_block, width, label=f"{label}, {entry['threads']} thread{'s' if entry['threads'] > 1 else ''}")
    for axis in axes[1:]:
        axis.set_xticks(range(len(STAGES)), STAGES)
    axes[1].set_title("Llama-3-8B width (4096): peak RSS per stage")
    axes[1].set_ylabel("peak resident memory (GiB)")
    axes[2].set_title("Llama-3-8B width: wall seconds per block")
    axes[2].set_ylabel("seconds per decoder block")
    for axis in axes:
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    figure.suptitle("bitplan's stages against model size on a 2-core, 24 GiB machine (bench/scale.py; random weights beyond SmolLM2)")
    figure.tight_layout()
    path = RESULTS / "scale.png"
    figure.savefig(path, dpi=110)
    print("wrote", path)


if __name__ == "__main__":
    main()
