#!/usr/bin/env bash
# A second calibration domain of real English text that is not Python documentation: the prose
# categories of Debian's `fortunes` package (pinned version, checked sha256).
#
#   scripts/fetch_fortunes.sh DEST    # `make text-fortunes`: DEST=~/.cache/bitplan-tools/fortunes-1.99.1-7.3
#
# Writes DEST/fortunes-calibration.txt and DEST/fortunes-heldout.txt, the same bytes on every run.
# Each category's fortunes (separated by lines holding `%`) stay in file order; the first three
# quarters of each category go to calibration, the last quarter (a contiguous block) to held-out,
# and a held-out fortune whose text also appears in calibration is dropped. Fortunes are joined by
# blank lines; backspace overstriking is removed. Needs apt-get (no root), dpkg-deb, sha256sum, python3.
set -euo pipefail

DEST=${1:?usage: scripts/fetch_fortunes.sh DEST}
VERSION=1:1.99.1-7.3
DEB='fortunes_1%3a1.99.1-7.3_all.deb'
SHA256=41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5
CATEGORIES="education humorists law love medicine miscellaneous people politics science songs-poems wisdom work"

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
source "$(dirname "$0")/debian_package.sh"
cd "$WORK"
fetch_package fortunes "$VERSION" "$DEB" "$SHA256"
mkdir -p "$DEST"
python3 - "$WORK/extracted/usr/share/games/fortunes" "$DEST" $CATEGORIES <<'PY'
import re
import sys
from pathlib import Path

source, dest, categories = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
HELD_OUT_SHARE = 4  # the last quarter of each category is held out


def clean(fortune: str) -> str:
    while "\b" in fortune:  # overstriking: "x\bx" prints one x
        fortune = re.sub(".\b", "", fortune, count=1) if re.search(".\b", fortune) else fortune.replace("\b", "")
    return fortune.strip("\n").rstrip()


calibration, heldout = [], []
for category in categories:
    text = (source / category).read_text(encoding="utf-8", errors="replace")
    fortunes = [clean(f) for f in re.split(r"^%$", text, flags=re.M)]
    fortunes = [f for f in fortunes if f.strip()]
    cut = len(fortunes) - len(fortunes) // HELD_OUT_SHARE
    calibration += fortunes[:cut]
    heldout += fortunes[cut:]
seen = {" ".join(f.split()) for f in calibration}
heldout = [f for f in heldout if " ".join(f.split()) not in seen]
for name, part in (("fortunes-calibration.txt", calibration), ("fortunes-heldout.txt", heldout)):
    path = Path(dest) / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n\n".join(part) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"{path}: {len(part)} fortunes, {path.stat().st_size} bytes")
PY
