"""What ``bitplan eval`` measured before it streamed: the original and the checkpoint loaded whole,
scored by ``planner.quality.measure_pair``. The streaming evaluation must measure the same."""

from __future__ import annotations

import pytest

import bitplan
from bitplan.checkpoints.evaluate import Evaluation, PreparedEvaluation
from bitplan.planner.quality import Quality, load_dense_model, measure_pair


def whole_model_qualities(prepared: PreparedEvaluation) -> dict[str, Quality]:
    reference = load_dense_model(prepared.reference_folder)
    candidate = bitplan.load(prepared.checkpoint)
    return {name: measure_pair(reference, candidate, text.windows) for name, text in prepared.texts.items()}


def assert_measures_the_whole_model(streamed: Evaluation, prepared: PreparedEvaluation, rel: float = 1e-5) -> None:
    whole = whole_model_qualities(prepared)
    assert set(streamed.slices) == set(whole) and whole
    for name, expected in whole.items():
        measured = streamed.slices[name]
        assert measured.kl == pytest.approx(expected.kl, rel=rel, abs=1e-9), name
        assert measured.perplexity == pytest.approx(expected.perplexity, rel=rel), name
        assert measured.reference_perplexity == pytest.approx(expected.reference_perplexity, rel=rel), name
        assert measured.tokens == expected.tokens, name
