"""Does the score predict reality? Random mixed plans: summed predicted score vs measured KL.

Each plan draws, per layer, a random RTN scheme from a random bit range (e.g. 3..6 bits), so
the plans spread from near-lossless to badly broken. Spearman correlation between the summed
Fisher-KL score and the KL measured on held-out text.

    .venv/bin/python bench/score_correlation.py [--plans 20]
"""

from __future__ import annotations

import argparse
import random

import torch
from common import heldout_windows, save
from scipy.stats import pearsonr, spearmanr

import bitplan
from bitplan.methods.scheme import Scheme
from bitplan.models.source import resolve_model
from bitplan.models.spec import spec_from_folder
from bitplan.planner.quality import QualityMeter, load_dense_model
from bitplan.profiles.calibration import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--plans", type=int, default=20)
    parser.add_argument("--heldout", type=int, default=4, help="windows of 512 tokens per slice")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    folder = resolve_model("smollm2-135m")
    spec = spec_from_folder(folder)
    table = bitplan.profile("smollm2-135m")
    windows = torch.cat(list(heldout_windows(load_tokenizer(folder), args.heldout).values()))
    meter = QualityMeter(load_dense_model(folder), spec)
    rng = random.Random(args.seed)
    rows = []
    for index in range(args.plans):
        low, high = rng.choice([2, 3, 4]), rng.choice([4, 5, 6, 8])
        assignment, score = {}, 0.0
        for row, name in enumerate(table.layers):
            options = [c for c, s in enumerate(table.schemes)
                       if s != "none" and table.bytes[row, c] >= 0 and low <= Scheme.parse(s).bits <= high]
            column = rng.choice(options)
            assignment[name] = Scheme.parse(table.schemes[column])
            score += float(table.scores[row, column])
        meter.apply(assignment)
        quality = meter.measure(windows)
        rows.append({"plan": index, "bits": [low, high], "predicted_kl": score, "measured_kl": quality.kl, "perplexity": quality.perplexity})
        print(f"plan {index:2d} bits {low}-{high}: predicted {score:.4f}  measured {quality.kl:.4f}  ppl {quality.perplexity:.2f}", flush=True)
    predicted = [r["predicted_kl"] for r in rows]
    measured = [r["measured_kl"] for r in rows]
    rho = float(spearmanr(predicted, measured).statistic)
    pearson_log = float(pearsonr(torch.tensor(predicted).log(), torch.tensor(measured).log()).statistic)
    print(f"\nSpearman(predicted, measured) over {len(rows)} plans: {rho:.3f}; Pearson of logs: {pearson_log:.3f}")
    print("saved", save("score_correlation", {"rows": rows, "spearman": rho, "pearson_log": pearson_log, "heldout_tokens": windows.numel()}))


if __name__ == "__main__":
    main()
