"""``python -m adapters ...``: the ``adapters`` command line (:mod:`adapters.cli`)."""

import sys

from .cli import main

sys.exit(main())
