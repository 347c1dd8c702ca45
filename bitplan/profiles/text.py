"""Calibration and evaluation text: the built-in Python documentation or the user's files.

The built-in text is the standard library's ``pydoc_data.topics``. Whole topics are assigned
to calibration or held-out (about a quarter of the text), so the two never share a topic, and
held-out paragraphs that also appear in a calibration topic (pydoc repeats some) are dropped. Each topic splits into a "prose" slice and a "code" slice: indented
blocks and interactive sessions are code, the rest is prose.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from bitplan.errors import BitplanError

HELD_OUT_EVERY = 4


@dataclass(frozen=True)
class TextSlice:
    name: str
    text: str


def is_code_line(line: str) -> bool:
    return line.startswith(("   ", "\t", ">>>", "...")) and bool(line.strip())


def split_prose_code(text: str) -> tuple[str, str]:
    """Separate a reStructuredText-like document into its prose and its code blocks."""
    prose, code = [], []
    for paragraph in text.split("\n\n"):
        lines = [line for line in paragraph.splitlines() if line.strip()]
        if not lines:
            continue
        target = code if sum(map(is_code_line, lines)) * 2 > len(lines) else prose
        target.append(paragraph.strip("\n"))
    return "\n\n".join(prose), "\n\n".join(code)


def builtin_split() -> dict[str, list[str]]:
    """Topic names per part: walking topics in sorted order, each goes to "heldout" while the
    held-out text is under a quarter of the total so far, else to "calibration"."""
    from pydoc_data.topics import topics

    parts: dict[str, list[str]] = {"calibration": [], "heldout": []}
    sizes = {"calibration": 0, "heldout": 0}
    for key in sorted(topics):
        part = "heldout" if sizes["heldout"] * HELD_OUT_EVERY < sizes["calibration"] + sizes["heldout"] else "calibration"
        parts[part].append(key)
        sizes[part] += len(topics[key])
    return parts


def builtin_slices(part: str) -> list[TextSlice]:
    """``part`` is "calibration" or "heldout"; returns the prose and code slices of that part."""
    from pydoc_data.topics import topics

    parts = builtin_split()
    documents = [topics[key] for key in parts[part]]
    if part == "heldout":  # topics repeat each other's paragraphs ("compound" holds "if", "for", ...)
        seen = {p.strip() for key in parts["calibration"] for p in topics[key].split("\n\n")}
        documents = ["\n\n".join(p for p in doc.split("\n\n") if p.strip() not in seen) for doc in documents]
    pairs = [split_prose_code(doc) for doc in documents]
    return [
        TextSlice("prose", "\n\n".join(p for p, _ in pairs if p)),
        TextSlice("code", "\n\n".join(c for _, c in pairs if c)),
    ]


def read_text_file(path: Path) -> str:
    path = Path(path)
    if path.is_dir():
        raise BitplanError(f"text file {path} is a folder: pass a .txt or .jsonl file")
    if not path.is_file():
        raise BitplanError(f"text file {path} does not exist: pass a .txt or .jsonl file")
    data = path.read_bytes()
    if not data.strip():
        raise BitplanError(f"text file {path} is empty: pass a file with calibration or evaluation text")
    if b"\x00" in data[:65536]:
        raise BitplanError(f"text file {path} looks binary (NUL bytes): pass UTF-8 text or JSONL")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BitplanError(f"text file {path} is not UTF-8 ({exc.reason} at byte {exc.start}): convert it to UTF-8") from exc


def json_kind(value) -> str:
    """How JSON names a parsed value's type, for messages."""
    kinds = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "an object", type(None): "null"}
    return kinds.get(type(value), "a string")


def user_slices(paths: list[Path]) -> list[TextSlice]:
    """Text files become one slice each (named by file stem); JSONL rows group by their "slice"."""
    grouped: dict[str, list[str]] = {}
    for path in paths:
        content = read_text_file(path)
        if Path(path).suffix == ".jsonl":
            for number, line in enumerate(content.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    text = row["text"]
                except (json.JSONDecodeError, KeyError, TypeError) as exc:
                    raise BitplanError(f"{path}:{number} is not a JSON object with a \"text\" field: fix that line") from exc
                name = row.get("slice", Path(path).stem)
                if not isinstance(text, str) or not isinstance(name, str):
                    field, value = ("text", text) if not isinstance(text, str) else ("slice", name)
                    raise BitplanError(f"{path}:{number} has {json_kind(value)} as its \"{field}\" field, not a string: "
                                       f"write it as a JSON string")
                grouped.setdefault(name, []).append(text)
        else:
            grouped.setdefault(Path(path).stem, []).append(content)
    slices = [TextSlice(name, "\n\n".join(texts)) for name, texts in grouped.items()]
    if not any(s.text.strip() for s in slices):
        raise BitplanError("the text files hold no text: pass files with calibration or evaluation text")
    return slices


def tokenize_windows(tokenizer, text: str, seq_len: int, max_windows: int) -> torch.Tensor:
    """Non-overlapping windows of ``seq_len`` tokens, at most ``max_windows``: int64 [n, seq_len]."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    count = min(len(ids) // seq_len, max_windows)
    if count == 0:
        raise BitplanError(f"the text has {len(ids)} tokens, fewer than one window of {seq_len}: pass more text or a smaller --seq-len")
    return torch.tensor(ids[: count * seq_len], dtype=torch.int64).view(count, seq_len)


def interleaved_windows(tokenizer, slices: list[TextSlice], seq_len: int, max_windows: int) -> torch.Tensor:
    """Calibration windows drawn from every slice in turn, so each slice is represented."""
    per_slice = [tokenize_windows(tokenizer, s.text, seq_len, max_windows) for s in slices if s.text.strip()]
    rows = [w[i] for i in range(max(len(w) for w in per_slice)) for w in per_slice if i < len(w)]
    return torch.stack(rows[:max_windows])


def tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
