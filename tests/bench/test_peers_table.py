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


def test_rows_measured_before_the_k_quants_were_found_on_the_grid_are_flagged_from_their_counts(smollm_folder):
    """Q4_K and Q5_K ride SmolLM2's published grid (bench/grid_ride.py); a saved Q4_K_M row that counted only
    Q4_1/Q5_1 gains its 16 Q4_K down_projs (576 x 1536, 864 bytes a row), and the off-grid yardstick moves."""
    from bitplan.models.spec import spec_from_folder

    spec = spec_from_folder(smollm_folder)
    q4_k_m = dict(peer("llama.cpp Q4_K_M (imatrix)", 73.45, 0.026, 0.032), types={"Q4_K": 16, "Q5_0": 166, "Q6_K": 14, "Q8_0": 14})
    q3_k_s = dict(peer("llama.cpp Q3_K_S (imatrix)", 56.19, 0.29, 0.30), types={"Q3_K": 30, "Q4_0": 180})
    ours = dict(plan("bitplan-llama.cpp", 73.45, 0.02, 0.03), types={"ggml-q4_k": 29, "ggml-q5_0": 130}, grid_tensors=0, grid_bytes=0)
    peers.refresh_grid([q4_k_m, q3_k_s, ours], spec)
    assert (q4_k_m["grid_tensors"], q4_k_m["grid_bytes"]) == (16, 16 * 576 * 864)
    assert (q3_k_s["grid_tensors"], q3_k_s["grid_bytes"]) == (0, 0)
    assert ours["grid_tensors"] == 29
    peers.refresh_grid([q4_k_m], spec)  # once only
    assert q4_k_m["grid_tensors"] == 16
    rows, text = peers.table([q3_k_s, q4_k_m], [plan("bitplan-bitplan", 73.45, 0.02, 0.03)], 106_168_320)
    at = next(r for r in rows if r["peer"].startswith("llama.cpp Q4_K_M"))
    assert at["grid_flagged"] and abs(at["ratio_off_grid"]["pydoc"] - 0.02 / 0.29) < 1e-9
