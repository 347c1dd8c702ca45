"""A profile in its own process, for the resume and distribution tests: prints one line per
progress event (``stage done total``) and the saved table's path.

    python tests/profiles/profile_worker.py MODEL SAMPLES SEQ_LEN SCHEME[,SCHEME...]
"""

import sys

from bitplan.methods.scheme import Scheme
from bitplan.models.source import open_model
from bitplan.profiles.calibration import CalibrationSettings
from bitplan.profiles.sensitivity import sensitivity_table


def main(model: str, samples: str, seq_len: str, schemes: str) -> None:
    def report(stage: str, done: int, total: int) -> None:
        print(stage, done, total, flush=True)

    table = sensitivity_table(open_model(model), [Scheme.parse(s) for s in schemes.split(",")],
                              CalibrationSettings((), int(samples), int(seq_len)), progress=report)
    print("layers", len(table.layers), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
