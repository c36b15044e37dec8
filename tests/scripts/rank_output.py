"""One line of a rank's output, written in one ``write()``.

Ranks share torchrun's stdout, and ``print`` under ``python -u`` writes the text and the newline
separately, so two ranks' lines could run together ("resume from Xresume from X")."""

from __future__ import annotations

import os
import sys


def say(msg: str) -> None:
    """Write ``msg`` and a newline to stdout in one ``os.write``."""
    sys.stdout.flush()
    os.write(1, (msg + "\n").encode())
