import json

import pytest

from bitplan.errors import BitplanError
from bitplan.profiles.text import builtin_slices, builtin_split, split_prose_code, user_slices


def test_calibration_and_heldout_never_share_a_topic():
    parts = builtin_split()
    assert parts["calibration"] and parts["heldout"]
    assert not set(parts["calibration"]) & set(parts["heldout"])
    held = sum(len(s.text) for s in builtin_slices("heldout"))
    calibration = sum(len(s.text) for s in builtin_slices("calibration"))
    assert 0.1 < held / (held + calibration) < 0.3


def test_heldout_text_is_not_inside_calibration_text():
    calibration = "".join(s.text for s in builtin_slices("calibration"))
    for piece in builtin_slices("heldout"):
        paragraphs = [p for p in piece.text.split("\n\n") if len(p) > 200]
        assert paragraphs and not any(p in calibration for p in paragraphs[:20])


def test_prose_and_code_are_separated():
    prose, code = split_prose_code("A sentence about loops.\n\n   for i in range(3):\n       print(i)\n\nMore prose here.")
    assert "for i in range" in code and "for i in range" not in prose
    assert "More prose" in prose


def test_jsonl_rows_group_by_slice(tmp_path):
    path = tmp_path / "eval.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [{"text": "a", "slice": "chat"}, {"text": "b"}, {"text": "c", "slice": "chat"}]))
    slices = {s.name: s.text for s in user_slices([path])}
    assert slices == {"chat": "a\n\nc", "eval": "b"}


@pytest.mark.parametrize("content,message", [(b"", "empty"), (b"  \n", "empty"), (b"abc\x00\x01def", "binary"), (b"\xff\xfe\xfa", "UTF-8")])
def test_bad_text_files_are_named(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(BitplanError, match=message):
        user_slices([path])


def test_malformed_jsonl_line_is_named(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(BitplanError, match="x.jsonl:2"):
        user_slices([path])
