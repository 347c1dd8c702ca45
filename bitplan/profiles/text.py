"""Calibration and evaluation text: the built-in Python documentation or the user's files.

The built-in text is the standard library's ``pydoc_data.topics``. Whole topics are assigned
to calibration or held-out (about a quarter of the text), so the two never share a topic, and
held-out paragraphs that also appear in a calibration topic (pydoc repeats some) are dropped. Each topic splits into a "prose" slice and a "code" slice: indented
blocks and interactive sessions are code, the rest is prose.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bitplan.errors import BitplanError

HELD_OUT_EVERY = 4


@dataclass(frozen=True)
class TextSlice:
    """A named part of the text; ``weight`` is its relative share of calibration windows and of
    the aggregate score (``--text file:weight``; a file's weight is split evenly among its slices)."""

    name: str
    text: str
    weight: float = 1.0


@dataclass(frozen=True)
class SliceWindows:
    """Calibration windows and, per window, the index of its slice in ``names``; ``weights`` are
    the slices' weights in the aggregate score (summing to 1)."""

    tokens: torch.Tensor  # int64 [windows, seq_len]
    labels: tuple[int, ...]
    names: tuple[str, ...]
    weights: tuple[float, ...]

    def digest(self) -> str:
        """What, besides the tokens, a per-slice score depends on: names, labels, weights."""
        return hashlib.sha256(json.dumps([self.names, self.labels, self.weights]).encode()).hexdigest()[:16]


def parse_text_arg(value: str) -> tuple[Path, float]:
    """``--text PATH[:WEIGHT]``: ``code.jsonl:3`` is ``(code.jsonl, 3.0)``. A path that exists as
    written, or whose last ``:`` is followed by something that is not a number, is a plain path
    (weight 1); a weight that looks numeric but is not a positive finite number is one line."""
    if Path(value).exists() or ":" not in value:
        return Path(value), 1.0
    path, _, weight = value.rpartition(":")
    if not re.fullmatch(r"[-+0-9.eE]*|nan|inf|-inf", weight.strip(), flags=re.I) or not path:
        return Path(value), 1.0
    try:
        number = float(weight)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number <= 0:
        raise BitplanError(f"malformed weight {weight!r} in --text {value}: write PATH:WEIGHT with a positive number, "
                           f"for example --text code.jsonl:3 --text chat.jsonl:1")
    return Path(path), number


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


def user_slices(paths: list[Path], weights: list[float] | tuple[float, ...] = ()) -> list[TextSlice]:
    """Text files become one slice each (named by file stem); JSONL rows group by their "slice".
    Without weights, or with all equal, every slice weighs 1. Otherwise ``weights[i]`` is file
    ``i``'s share, split evenly among its slices; a slice fed by several files adds their parts."""
    if len(set(weights)) <= 1:
        weights = ()
    grouped: dict[str, list[str]] = {}
    shares: dict[str, float] = {}
    for index, path in enumerate(paths):
        before = {name: len(texts) for name, texts in grouped.items()}
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
        mine = [name for name, texts in grouped.items() if len(texts) > before.get(name, 0)]
        for name in mine:
            shares[name] = shares.get(name, 0.0) + (weights[index] / len(mine) if weights else 1.0)
    slices = [TextSlice(name, "\n\n".join(texts), shares[name] if weights else 1.0) for name, texts in grouped.items()]
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
    return slice_windows(tokenizer, slices, seq_len, max_windows).tokens


def window_quotas(weights: list[float], available: list[int], total: int) -> list[int]:
    """Windows per slice: ``total`` shared in proportion to ``weights`` (largest remainders, ties
    to the first slice), no slice given more than it has; what a short slice cannot use goes to the others."""
    quotas = [0] * len(weights)
    open_ = [i for i in range(len(weights)) if available[i] > 0]
    left = min(total, sum(available))
    while left > 0 and open_:
        mass = sum(weights[i] for i in open_)
        exact = {i: left * weights[i] / mass for i in open_}
        share = {i: min(int(exact[i]), available[i] - quotas[i]) for i in open_}
        order = sorted(open_, key=lambda i: (-(exact[i] - int(exact[i])), i))
        spare = left - sum(share.values())
        for i in order:
            if spare and share[i] < available[i] - quotas[i]:
                share[i] += 1
                spare -= 1
        for i in open_:
            quotas[i] += share[i]
        left = min(total, sum(available)) - sum(quotas)
        open_ = [i for i in open_ if quotas[i] < available[i]]
    return quotas


def slice_windows(tokenizer, slices: list[TextSlice], seq_len: int, max_windows: int) -> SliceWindows:
    """Up to ``max_windows`` calibration windows with their slices. Equal weights: every slice in
    turn (a short slice drops out when it runs out). Otherwise each slice's share of the windows
    follows its weight (:func:`window_quotas`), spread evenly through the sequence, so any prefix
    keeps about the same shares."""
    slices = [s for s in slices if s.text.strip()]
    per_slice = [tokenize_windows(tokenizer, s.text, seq_len, max_windows) for s in slices]
    weights = [s.weight for s in slices]
    if len(set(weights)) <= 1:
        order = [(i, k) for k in range(max(len(w) for w in per_slice)) for i, w in enumerate(per_slice) if k < len(w)][:max_windows]
    else:
        quotas = window_quotas(weights, [len(w) for w in per_slice], max_windows)
        order = sorted(((i, k) for i, q in enumerate(quotas) for k in range(q)), key=lambda ik: ((ik[1] + 0.5) / quotas[ik[0]], ik[0]))
    present = sorted({i for i, _ in order})  # a slice given no window is no slice of the profile
    labels = tuple(present.index(i) for i, _ in order)
    return SliceWindows(torch.stack([per_slice[i][k] for i, k in order]), labels, tuple(slices[i].name for i in present),
                        slice_weights(labels, [weights[i] for i in present]))


def slice_weights(labels: tuple[int, ...] | list[int], weights: list[float]) -> tuple[float, ...]:
    """Each slice's weight in the aggregate score: its share of the windows when every slice has
    the same weight (the pooled score of all tokens), else the user's weights normalised."""
    if len(set(weights)) <= 1:
        return tuple(labels.count(i) / len(labels) for i in range(len(weights)))
    return tuple(w / sum(weights) for w in weights)


def tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()
