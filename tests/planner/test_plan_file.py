import json

import pytest
from sample_plans import sample_plan as make_plan

from bitplan.errors import BitplanError
from bitplan.planner.plan import Plan, load_plan


def sample_plan() -> Plan:
    return make_plan({"model.layers.0.self_attn.q_proj": "rtn-w4g64s"})


def test_round_trip_and_canonical_bytes(tmp_path):
    plan = sample_plan()
    plan.save(tmp_path / "plan.json")
    again = load_plan(tmp_path / "plan.json")
    assert again == plan and again.assignments == plan.assignments
    assert again.to_json() == plan.to_json() == (tmp_path / "plan.json").read_text()


def test_a_hand_edited_plan_is_refused(tmp_path):
    path = tmp_path / "plan.json"
    sample_plan().save(path)
    data = json.loads(path.read_text())
    data["assignments"]["model.layers.0.self_attn.q_proj"] = "rtn-w2g64s"
    path.write_text(json.dumps(data))
    with pytest.raises(BitplanError, match="modified after bitplan wrote it"):
        load_plan(path)


@pytest.mark.parametrize("content,message", [("{not json", "not valid JSON"), ('{"schema_version": 99}', "schema version 99"),
                                             ('{"schema_version": 1, "assignments": {}}', "schema version 1, this bitplan reads version 2"),
                                             ('{"assignments": {}}', "no schema_version")])
def test_broken_plans_are_named(tmp_path, content, message):
    path = tmp_path / "plan.json"
    path.write_text(content)
    with pytest.raises(BitplanError, match=message):
        load_plan(path)


def test_a_plan_with_an_unknown_part_is_refused(tmp_path):
    import hashlib

    body = json.loads(sample_plan().to_json())
    body.pop("integrity")
    body["predicted"]["mood"] = "good"
    body["integrity"] = hashlib.sha256(json.dumps({k: v for k, v in body.items() if k != "integrity"}, sort_keys=True).encode()).hexdigest()
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(body))
    with pytest.raises(BitplanError, match="unexpected or missing fields .*mood"):
        load_plan(path)
