"""Does the fisher-kl score rank the methods as measured? Predicted vs measured KL, uniform models.

For each uniform scheme of ``bench/method_perplexity.py`` (run it first), the predicted KL is the
sum of the default candidate set's profile scores over the layers (the cached table; profiling it
takes minutes the first time); the measured KL is the held-out KL that bench saved.

    .venv/bin/python bench/method_scores.py
"""

from __future__ import annotations

import json

from common import RESULTS, save
from scipy.stats import spearmanr

import bitplan
from bitplan.api import CalibrationSettings, Candidates
from bitplan.methods.scheme import Scheme
from bitplan.models.source import resolve_model
from bitplan.models.spec import spec_from_folder
from bitplan.planner.baselines import uniform_assignment


def main() -> None:
    measured = json.loads((RESULTS / "method_perplexity.json").read_text())["rows"]
    spec = spec_from_folder(resolve_model("smollm2-135m"))
    table = bitplan.profile("smollm2-135m", Candidates(), CalibrationSettings(), seed=0)
    rows = []
    for row in measured:
        if row["method"] == "none":
            continue
        assignment = uniform_assignment(spec, Scheme.parse(row["scheme"]))
        predicted = sum(float(table.scores[table.layers.index(name), table.schemes.index(s.name)]) for name, s in assignment.items())
        rows.append({"scheme": row["scheme"], "predicted_kl": predicted, "measured_kl": row["kl"]})
        print(f"{row['scheme']:24s} predicted {predicted:8.4f}   measured {row['kl']:8.4f}")
    rho = spearmanr([r["predicted_kl"] for r in rows], [r["measured_kl"] for r in rows]).statistic
    print(f"Spearman rank correlation over {len(rows)} uniform models: {rho:.3f}")
    save("method_scores", {"rows": rows, "spearman": float(rho)})


if __name__ == "__main__":
    main()
