import itertools

import pytest
import torch

from bitplan.errors import BitplanError
from bitplan.methods.scheme import Scheme
from bitplan.models.spec import LayerSpec, ModelSpec
from bitplan.planner.search import allocate, check_feasible, smallest_plan_bytes
from bitplan.profiles.tables import SensitivityTable


def tiny_spec(kinds=("q", "k", "v", "down")) -> ModelSpec:
    layers = tuple(
        LayerSpec(f"model.layers.0.{kind}", kind, 0, 64, 64, "qkv" if kind in "qkv" else "") for kind in kinds
    )
    return ModelSpec("llama", "llama", layers, 64, 128, 1, 4, 4, 16, 100, True, "bfloat16", 0)


def table_for(spec, scores, sizes, schemes=("a", "b", "c")) -> SensitivityTable:
    return SensitivityTable([layer.name for layer in spec.layers], list(schemes),
                            torch.tensor(scores, dtype=torch.float64), torch.tensor(sizes, dtype=torch.int64))


def brute_force(scores, sizes, budget):
    best = None
    for pick in itertools.product(range(len(scores[0])), repeat=len(scores)):
        size = sum(sizes[i][j] for i, j in enumerate(pick))
        score = sum(scores[i][j] for i, j in enumerate(pick))
        if size <= budget and (best is None or score < best[0]):
            best = (score, pick)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_allocation_matches_brute_force_on_random_tables(seed):
    generator = torch.Generator().manual_seed(seed)
    spec = tiny_spec()
    sizes = torch.randint(10, 100, (4, 3), generator=generator).tolist()
    scores = torch.rand(4, 3, generator=generator).tolist()
    budget = int(sum(min(row) for row in sizes) + torch.randint(0, 120, (1,), generator=generator))
    allocation = allocate(table_for(spec, scores, sizes), spec, budget)
    expected_score, _ = brute_force(scores, sizes, budget)
    assert allocation.score == pytest.approx(expected_score)
    assert allocation.weight_bytes <= budget and allocation.status == "optimal"


def test_a_bigger_budget_never_scores_worse():
    spec = tiny_spec()
    scores = [[4.0, 1.0, 0.0], [3.0, 2.0, 0.0], [9.0, 1.0, 0.0], [1.0, 0.5, 0.0]]
    sizes = [[10, 20, 40]] * 4
    results = [allocate(table_for(spec, scores, sizes), spec, budget).score for budget in range(40, 170, 10)]
    assert results == sorted(results, reverse=True) and results[-1] == 0.0


def test_tied_fused_layers_share_a_scheme():
    spec = tiny_spec()
    # q wants "c", k and v are happy with "a": untied they split, tied they must agree
    scores = [[10.0, 5.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    sizes = [[10, 20, 30]] * 4
    table = table_for(spec, scores, sizes)
    untied = allocate(table, spec, 70)
    assert untied.choice["model.layers.0.q"] == "c" and untied.choice["model.layers.0.k"] == "a"
    tied = allocate(table, spec, 130, tie_fused=True)
    assert len({tied.choice[f"model.layers.0.{k}"] for k in "qkv"}) == 1


def test_infeasible_budget_states_the_smallest_plan():
    spec = tiny_spec()
    table = table_for(spec, [[1.0, 0.0, 0.0]] * 4, [[10, 20, 30]] * 4)
    with pytest.raises(BitplanError, match="smallest plan needs 40 B"):
        allocate(table, spec, 39)


def test_feasibility_is_checked_from_the_spec_alone():
    spec = tiny_spec()
    schemes = [Scheme.parse("rtn-w2gcs"), Scheme.parse("rtn-w4g32s")]
    floor = smallest_plan_bytes(spec, schemes)
    assert floor == 4 * schemes[0].weight_bytes(64, 64, 2)
    check_feasible(spec, schemes, floor, 10**6)
    with pytest.raises(BitplanError, match="raise --budget to at least"):
        check_feasible(spec, schemes, floor - 1, 10**6)


def smoothing_spec() -> ModelSpec:
    """q/k/v fed by one norm (a smoothing group) and o with nothing to fold into."""
    layers = tuple(
        LayerSpec(f"model.layers.0.self_attn.{kind}_proj", kind, 0, 64, 64, "qkv" if kind in "qkv" else "",
                  "input_layernorm" if kind in "qkv" else "")
        for kind in ("q", "k", "v", "o")
    )
    return ModelSpec("llama", "llama", layers, 64, 128, 1, 4, 2, 16, 100, True, "bfloat16", 0)


SMOOTHING_SCHEMES = ("rtn-w4g64s", "awq-w4g64s", "rtn-w8gcs", "none")


def consistent(pick, smoothing_columns=(1,)) -> bool:
    """q/k/v (rows 0-2) take one smoothing scheme together or none; o (row 3) is free."""
    group = [pick[0], pick[1], pick[2]]
    return not any(c in smoothing_columns for c in group) or len(set(group)) == 1


@pytest.mark.parametrize("seed", range(8))
def test_smoothing_groups_take_one_smoothing_scheme_or_none(seed):
    """The exact allocation equals brute force over the plans a smoothing fold allows."""
    generator = torch.Generator().manual_seed(seed)
    spec = smoothing_spec()
    sizes = [[30, 30, 60, 120]] * 4
    scores = torch.rand(4, 4, generator=generator).tolist()
    for row in scores:
        row[3] = 0.0
    budget = int(120 + torch.randint(0, 240, (1,), generator=generator))
    allocation = allocate(table_for(spec, scores, sizes, SMOOTHING_SCHEMES), spec, budget)
    best = None
    for pick in itertools.product(range(4), repeat=4):
        size = sum(sizes[i][j] for i, j in enumerate(pick))
        score = sum(scores[i][j] for i, j in enumerate(pick))
        if size <= budget and consistent(pick) and (best is None or score < best):
            best = score
    assert allocation.score == pytest.approx(best)
    chosen = [allocation.choice[layer.name] for layer in spec.layers]
    assert consistent([SMOOTHING_SCHEMES.index(name) for name in chosen])


def test_awq_wins_a_group_only_when_all_members_gain():
    spec = smoothing_spec()
    # AWQ is much better for q, slightly worse for k and v: together it still wins the group
    scores = [[1.0, 0.1, 0.5, 0.0], [0.20, 0.25, 0.1, 0.0], [0.20, 0.25, 0.1, 0.0], [0.3, 0.2, 0.1, 0.0]]
    sizes = [[30, 30, 60, 120]] * 4
    allocation = allocate(table_for(spec, scores, sizes, SMOOTHING_SCHEMES), spec, 120)
    names = [layer.name for layer in spec.layers]
    assert [allocation.choice[n] for n in names[:3]] == ["awq-w4g64s"] * 3
    assert allocation.choice[names[3]] == "awq-w4g64s"  # o has no fold: AWQ (s = 1) is its own choice
    scores[0][1] = 0.9  # now AWQ no longer pays for the group
    allocation = allocate(table_for(spec, scores, sizes, SMOOTHING_SCHEMES), spec, 120)
    assert [allocation.choice[n] for n in names[:3]] == ["rtn-w4g64s"] * 3
