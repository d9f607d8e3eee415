"""The `frugal` command line (entry point: frugal.cli.main)."""

from __future__ import annotations

import argparse
import shlex
import sys


def invoked_command() -> str:
    """This process's command line as a user would type it (`frugal ...`), recorded in result files."""
    return "frugal " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def add_native_decode_option(group) -> None:
    """`--native-decode/--no-native-decode` (ModelConfig.native_decode) on a parser or argument group."""
    group.add_argument("--native-decode", action=argparse.BooleanOptionalAction, default=True,
                       help="run CPU decode steps of Llama-family models as one C++ call (same output as eager, "
                            "less Python per token; default on, --compile takes precedence)")
