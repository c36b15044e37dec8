"""``python -m btckpt.cli``: the same as the ``btckpt`` command."""

import sys

from . import main

sys.exit(main())
