"""A profile in its own process, for the resume and distribution tests: prints one line per
progress event (``stage done total``) and the saved table's path.

    python tests/profiles/profile_worker.py MODEL SAMPLES SEQ_LEN SCHEME[,SCHEME...]

With ``KILL_AFTER_BLOCK=k`` and ``KILL_SIGNAL`` (SIGKILL, SIGINT), the process sends itself that
signal right after the k-th block's scores are saved: what a ``kill -9`` or a Ctrl-C arriving at
that moment does (a timer cannot aim there: the last blocks of a tiny model take milliseconds).
"""

import os
import signal
import sys

from bitplan.methods.scheme import Scheme
from bitplan.models.source import open_model
from bitplan.profiles.calibration import CalibrationSettings
from bitplan.profiles.sensitivity import sensitivity_table


def main(model: str, samples: str, seq_len: str, schemes: str) -> None:
    kill_after = int(os.environ.get("KILL_AFTER_BLOCK", 0))
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, even when this runs in a background job
    # (whose shell starts it with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)

    def report(stage: str, done: int, total: int) -> None:
        print(stage, done, total, flush=True)
        if stage == "score" and done == kill_after:
            os.kill(os.getpid(), signal.Signals[os.environ["KILL_SIGNAL"]])

    table = sensitivity_table(open_model(model), [Scheme.parse(s) for s in schemes.split(",")],
                              CalibrationSettings((), int(samples), int(seq_len)), progress=report)
    print("layers", len(table.layers), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
