"""bench/peers.py's table: each engine's plan is held against the best peer of at most its size."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import peers  # noqa: E402


def peer(name: str, mb: float, pydoc: float, fortunes: float, family: str = "llama.cpp", grid: int = 0) -> dict:
    return {"peer": name, "family": family, "bytes": int(mb * 1e6), "kl": {"pydoc": pydoc, "fortunes": fortunes},
            "grid_tensors": grid, "grid_bytes": grid * 1000}


def plan(family: str, mb: float, pydoc: float, fortunes: float) -> dict:
    return dict(peer(f"{family} at {mb} MB", mb, pydoc, fortunes, family), target_bytes=int(mb * 1e6))


def test_each_engine_is_held_against_the_best_peer_of_at_most_its_size():
    small = peer("small", 40, 1.0, 0.7, family="AutoRound")
    mid = peer("mid", 50, 0.5, 0.8)
    large = peer("large", 60, 0.01, 0.01, grid=5)  # larger: never the yardstick at 50 MB
    plans = [plan("bitplan-bitplan", 50, 0.3, 1.0), plan("bitplan-llama.cpp", 50, 0.2, 0.4)]

    rows, text = peers.table([small, mid, large], plans, 1_000_000, "bitplan-llama.cpp")
    at_mid = next(r for r in rows if r["peer"] == "mid")
    assert at_mid["best_peer"] == {"pydoc": "mid", "fortunes": "small"}  # the smaller peer is better out of domain
    assert abs(at_mid["ratio"]["pydoc"] - 0.2 / 0.5) < 1e-9 and abs(at_mid["ratio"]["fortunes"] - 0.4 / 0.7) < 1e-9
    assert at_mid["meets_0_7"] == {"pydoc": True, "fortunes": True}
    assert next(r for r in rows if r["peer"] == "small")["ratio"] == {"pydoc": None, "fortunes": None}  # no plan there
    assert "| 0.40 | 0.57 (best: small) |" in text

    rows, _ = peers.table([small, mid, large], plans, 1_000_000, "bitplan-bitplan")
    at_mid = next(r for r in rows if r["peer"] == "mid")
    assert at_mid["bitplan_kl"] == {"pydoc": 0.3, "fortunes": 1.0}
    assert at_mid["meets_0_7"] == {"pydoc": True, "fortunes": False}
