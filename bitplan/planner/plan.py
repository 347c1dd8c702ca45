"""Plan: the product of the search, saved as plan.json.

The file is canonical JSON (sorted keys, no timestamps), so the same inputs and seed give the
same bytes. ``integrity`` is the sha256 of everything else: a plan edited by hand is refused
by ``emit`` with a message saying so.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bitplan.errors import BitplanError
from bitplan.methods.scheme import Scheme

SCHEMA_VERSION = 2  # 2: the engine the plan was made for (name, platform, rules enforced)


@dataclass(frozen=True)
class Plan:
    """Every layer's scheme, what the deployment costs, and where the plan came from."""

    model: dict  # source (built-in name or folder), hash, model_type
    deployment: dict  # Deployment.to_dict()
    target: str | None  # catalog device key, or None for a bare byte budget
    assignments: dict[str, str]  # layer name -> scheme name
    memory: dict  # MemoryBreakdown.to_dict()
    predicted: dict  # predicted KL (summed score), measured calibration KL where refined
    search: dict  # solver, status, refinement trials and knobs
    provenance: dict  # model_hash, calibration_hash, bitplan_version, seed, metric, candidates
    formats: dict = field(default_factory=dict)  # scheme -> checkpoint format and layer count
    engine: dict = field(default_factory=dict)  # name, platform, loader, the rules the search enforced
    schema_version: int = SCHEMA_VERSION
    integrity: str = field(default="", compare=False)

    def schemes(self) -> dict[str, Scheme]:
        return {name: Scheme.parse(scheme).check() for name, scheme in self.assignments.items()}

    def body(self) -> dict:
        data = asdict(self)
        data.pop("integrity")
        return data

    def to_json(self) -> str:
        body = self.body()
        digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
        return json.dumps({**body, "integrity": digest}, indent=2, sort_keys=True) + "\n"

    def save(self, path: Path) -> None:
        write_text_atomic(Path(path), self.to_json())


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_plan(path: Path) -> Plan:
    """Read and check a plan.json: valid JSON, known schema, untampered, every scheme known."""
    path = Path(path)
    if not path.is_file():
        raise BitplanError(f"plan file {path} does not exist: write one with `bitplan plan MODEL --budget ... --out {path}`")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BitplanError(f"{path} is not valid JSON ({exc}): re-create it with `bitplan plan`") from exc
    if not isinstance(data, dict) or "schema_version" not in data:
        raise BitplanError(f"{path} is not a bitplan plan (no schema_version): re-create it with `bitplan plan`")
    if data["schema_version"] != SCHEMA_VERSION:
        raise BitplanError(f"{path} has plan schema version {data['schema_version']}, this bitplan reads version {SCHEMA_VERSION} "
                           f"(version 2 records the engine the plan was made for): re-create it with `bitplan plan`")
    stored = data.pop("integrity", "")
    if hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest() != stored:
        raise BitplanError(f"{path} was modified after bitplan wrote it (integrity hash mismatch): re-run `bitplan plan` rather than editing the plan")
    try:
        plan = Plan(**data, integrity=stored)
        plan.schemes()
    except TypeError as exc:
        raise BitplanError(f"{path} has unexpected fields ({exc}): re-create it with `bitplan plan`") from exc
    return plan
