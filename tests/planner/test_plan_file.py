import json

import pytest

from bitplan.errors import BitplanError
from bitplan.planner.plan import Plan, load_plan


def sample_plan() -> Plan:
    return Plan(model={"source": "smollm2-135m", "hash": "ab"}, deployment={"budget_bytes": 1}, target=None,
                assignments={"model.layers.0.self_attn.q_proj": "rtn-w4g64s"}, memory={"total_bytes": 1},
                predicted={"score_kl": 0.1}, search={}, provenance={"seed": 0})


def test_round_trip_and_canonical_bytes(tmp_path):
    plan = sample_plan()
    plan.save(tmp_path / "plan.json")
    again = load_plan(tmp_path / "plan.json")
    assert again.assignments == plan.assignments
    assert again.to_json() == plan.to_json() == (tmp_path / "plan.json").read_text()


def test_a_hand_edited_plan_is_refused(tmp_path):
    path = tmp_path / "plan.json"
    sample_plan().save(path)
    data = json.loads(path.read_text())
    data["assignments"]["model.layers.0.self_attn.q_proj"] = "rtn-w2g64s"
    path.write_text(json.dumps(data))
    with pytest.raises(BitplanError, match="modified after bitplan wrote it"):
        load_plan(path)


@pytest.mark.parametrize("content,message", [("{not json", "not valid JSON"), ('{"schema_version": 99}', "schema version")])
def test_broken_plans_are_named(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(BitplanError, match=message):
        load_plan(path)
