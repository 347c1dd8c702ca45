"""The ``bitplan`` command: plan, profile, emit, eval, check, engines, and the hardware commands.

Each group of commands lives in its own module (``planning``, ``checkpoints``, ``hardware``) with
an ``add_commands(subparsers)``. Every refusal is one line on stderr:

- exit 2: bad input (``BitplanError``, a malformed argument) or a full disk;
- exit 130: interrupted by Ctrl-C (SIGINT); exit 143: terminated (SIGTERM).

Nothing is left half-written in any case: bitplan writes to temporary names and renames
(``bitplan.atomic``), and a run killed outright (``kill -9``) leaves only temporary names that
the next run ignores and removes.
"""

from __future__ import annotations

import argparse
import errno
import logging
import signal
import sys

from bitplan.cli import checkpoints, hardware, planning
from bitplan.atomic import visible_path
from bitplan.errors import BitplanError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 128 + signal.SIGINT  # 130
EXIT_TERMINATED = 128 + signal.SIGTERM  # 143
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a malformed command line is one line (exit 2) like every other refusal."""

    def error(self, message: str):
        self.exit(EXIT_USER_ERROR, f"bitplan: error: {message} (see `{self.prog} --help`)\n")


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that temporary files are cleaned up on the way out."""


def raise_terminated(signum, frame):
    raise Terminated()


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="bitplan", description="Fit an LLM into a memory budget with the least quality loss.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True)
    for group in (planning, checkpoints, hardware):
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return args.func(args)
    except BitplanError as error:
        return refuse(f"bitplan: error: {error}", EXIT_USER_ERROR)
    except OSError as error:
        if error.errno not in DISK_FULL:
            raise
        where = f" under {visible_path(error.filename)}" if error.filename else ""
        return refuse(f"bitplan: error: no space left on the device{where}: free some space or write elsewhere "
                      f"(nothing half-written was kept)", EXIT_USER_ERROR)
    except KeyboardInterrupt:
        return refuse("bitplan: interrupted (Ctrl-C); nothing half-written was kept: run the same command again", EXIT_INTERRUPTED)
    except Terminated:
        return refuse("bitplan: terminated (SIGTERM); nothing half-written was kept: run the same command again", EXIT_TERMINATED)
    finally:
        signal.signal(signal.SIGTERM, previous)


def refuse(line: str, code: int) -> int:
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
