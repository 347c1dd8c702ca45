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


RECEIVED: list[int] = []  # the signals that arrived during this run


def raise_terminated(signum, frame):
    RECEIVED.append(signum)
    raise Terminated()


def raise_interrupted(signum, frame):
    # recorded as well: an interrupt that lands inside a C callback (torch reading a tensor) can
    # come out as another exception type, and is still an interrupt
    RECEIVED.append(signum)
    raise KeyboardInterrupt()


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
    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, raise_terminated)}
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job keeps ignoring Ctrl-C
        previous[signal.SIGINT] = signal.signal(signal.SIGINT, raise_interrupted)
    RECEIVED.clear()
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
        return refuse(INTERRUPTED, EXIT_INTERRUPTED)
    except Terminated:
        return refuse(TERMINATED, EXIT_TERMINATED)
    except Exception:
        if signal.SIGTERM in RECEIVED:
            return refuse(TERMINATED, EXIT_TERMINATED)
        if signal.SIGINT in RECEIVED:
            return refuse(INTERRUPTED, EXIT_INTERRUPTED)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


INTERRUPTED = "bitplan: interrupted (Ctrl-C); nothing half-written was kept: run the same command again"
TERMINATED = "bitplan: terminated (SIGTERM); nothing half-written was kept: run the same command again"


def refuse(line: str, code: int) -> int:
    print(line, file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
