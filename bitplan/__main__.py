"""``python -m bitplan``: the same as the ``bitplan`` command."""

import sys

from bitplan.cli import main

sys.exit(main())
