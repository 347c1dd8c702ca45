"""Shared set-up of the domain benches (``domain_calibration.py``, ``slice_limits.py``): the texts,
the budget, and held-out KL per slice of a plan, measured by bitplan's QualityMeter.

Texts: the built-in Python documentation (calibration part written to a JSONL file with its
``prose`` and ``code`` slices, so it can be mixed with others by ``--text`` weights) and English
prose from Debian's fortunes (``make text-fortunes``). Held-out: the built-in held-out ``prose``
and ``code`` slices and ``fortunes-heldout.txt`` (never calibrated on), and a third domain for plans
calibrated on both: the Jargon File (``jargon-heldout.txt``, ``make text-jargon``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch

from bitplan.api import CalibrationSettings, Candidates
from bitplan.methods.scheme import Scheme
from bitplan.models.spec import ModelSpec
from bitplan.planner.baselines import assignment_bytes, uniform_assignment
from bitplan.planner.deployment import Deployment, memory_breakdown
from bitplan.planner.quality import QualityMeter
from bitplan.profiles.calibration import calibration_windows
from bitplan.profiles.text import builtin_slices, tokenize_windows

FORTUNES = Path(os.environ.get("BITPLAN_FORTUNES", Path.home() / ".cache/bitplan-tools/fortunes-1.99.1-7.3"))
JARGON = Path(os.environ.get("BITPLAN_JARGON", Path.home() / ".cache/bitplan-tools/jargon-4.4.7-4.1"))
ENGINE = "bitplan"  # vLLM has no 3-bit kernel: at 4 bits/weight its plans could only trade group sizes and 8 bits
CANDIDATES = Candidates(("rtn", "gptq"), (3, 4, 8), (64,), (True,), costly_bits=None)
CONTEXT = 512


def texts(work: Path) -> dict[str, Path]:
    """The calibration files: ``pydoc.jsonl`` (slices prose, code) and ``fortunes.txt`` (slice fortunes)."""
    if not (FORTUNES / "fortunes-calibration.txt").is_file():
        subprocess.run(["bash", str(Path(__file__).parent.parent / "scripts/fetch_fortunes.sh"), str(FORTUNES)], check=True)
    work.mkdir(parents=True, exist_ok=True)
    pydoc = work / "pydoc.jsonl"
    pydoc.write_text("".join(json.dumps({"slice": s.name, "text": s.text}) + "\n" for s in builtin_slices("calibration")))
    fortunes = work / "fortunes.txt"
    fortunes.write_text((FORTUNES / "fortunes-calibration.txt").read_text())
    return {"pydoc": pydoc, "fortunes": fortunes}


def heldout(tokenizer, windows: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Held-out windows per slice: pydoc's prose and code, and the fortunes."""
    slices = {s.name: s.text for s in builtin_slices("heldout")}
    slices["fortunes"] = (FORTUNES / "fortunes-heldout.txt").read_text()
    return {name: tokenize_windows(tokenizer, text, seq_len, windows) for name, text in slices.items()}


def jargon_heldout(tokenizer, windows: int, seq_len: int) -> torch.Tensor:
    """Held-out windows of a third domain, never calibrated on: the Jargon File's prose (``make text-jargon``)."""
    if not (JARGON / "jargon-heldout.txt").is_file():
        subprocess.run(["bash", str(Path(__file__).parent.parent / "scripts/fetch_jargon.sh"), str(JARGON)], check=True)
    return tokenize_windows(tokenizer, (JARGON / "jargon-heldout.txt").read_text(), seq_len, windows)


def budget_at(spec: ModelSpec, scheme: str = "rtn-w4g64s") -> tuple[int, int]:
    """(total budget, weight budget): the deployment of ``scheme`` everywhere at context ``CONTEXT``."""
    weight_bytes = assignment_bytes(spec, uniform_assignment(spec, Scheme.parse(scheme)))
    return memory_breakdown(spec, weight_bytes, Deployment(budget_bytes=0, context=CONTEXT)).total_bytes, weight_bytes


def calibrate(meter: QualityMeter, folder: Path, calibration: CalibrationSettings) -> None:
    """GPTQ's statistics from ``calibration``'s windows, as emit would gather them."""
    meter.calibrate(calibration_windows(folder, calibration)[: calibration.samples])


def measure(meter: QualityMeter, assignments: dict[str, Scheme], windows: dict[str, torch.Tensor]) -> dict[str, float]:
    """Held-out KL per slice of ``assignments`` (calibrated by the last :func:`calibrate`)."""
    meter.apply(assignments)
    return {name: meter.measure(w).kl for name, w in windows.items()}
