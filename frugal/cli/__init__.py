"""The `frugal` command line (entry point: frugal.cli.main)."""

from __future__ import annotations

import shlex
import sys


def invoked_command() -> str:
    """This process's command line as a user would type it (`frugal ...`), recorded in result files."""
    return "frugal " + " ".join(shlex.quote(a) for a in sys.argv[1:])
