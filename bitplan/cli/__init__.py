"""The ``bitplan`` command: plan, profile, emit, eval, check, engines, and the hardware commands.

Each group of commands lives in its own module (``planning``, ``checkpoints``, ``hardware``) with
an ``add_commands(subparsers)``. User errors (``BitplanError``) print one line to stderr and exit
with status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from bitplan.cli import checkpoints, hardware, planning
from bitplan.errors import BitplanError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitplan", description="Fit an LLM into a memory budget with the least quality loss.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (planning, checkpoints, hardware):
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except BitplanError as error:
        print(f"bitplan: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
