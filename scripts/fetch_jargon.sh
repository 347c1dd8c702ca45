#!/usr/bin/env bash
# A third domain of real English text, for evaluation only (never calibrated on): the Jargon
# File's prose, from Debian's `jargon-text` package (pinned version, checked sha256).
#
#   scripts/fetch_jargon.sh DEST    # `make text-jargon`: DEST=~/.cache/bitplan-tools/jargon-4.4.7-4.1
#
# Writes DEST/jargon-heldout.txt, the same bytes on every run: the paragraphs of jargon.txt in file
# order, each paragraph's wrapped lines joined by single spaces, paragraphs shorter than 200
# characters (headwords, index lines, cross-references) dropped, paragraphs joined by blank lines.
# Needs apt-get (no root), dpkg-deb, sha256sum, python3.
set -euo pipefail

DEST=${1:?usage: scripts/fetch_jargon.sh DEST}
VERSION=4.4.7-4.1
DEB='jargon-text_4.4.7-4.1_all.deb'
SHA256=17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
source "$(dirname "$0")/debian_package.sh"
cd "$WORK"
fetch_package jargon-text "$VERSION" "$DEB" "$SHA256"
mkdir -p "$DEST"
python3 - "$WORK/extracted/usr/share/doc/jargon-text/jargon.txt.gz" "$DEST" <<'PY'
import gzip
import os
import re
import sys
from pathlib import Path

source, dest = Path(sys.argv[1]), Path(sys.argv[2])
text = gzip.decompress(source.read_bytes()).decode("utf-8")
paragraphs = [" ".join(line.strip() for line in block.splitlines()) for block in re.split(r"\n\s*\n", text)]
kept = [p for p in paragraphs if len(p) >= 200]
temporary = dest / ".jargon-heldout.txt.tmp"
temporary.write_text("\n\n".join(kept) + "\n", encoding="utf-8")
os.replace(temporary, dest / "jargon-heldout.txt")
print(f"jargon: {len(kept)} paragraphs, {sum(map(len, kept))} characters -> {dest / 'jargon-heldout.txt'}")
PY
