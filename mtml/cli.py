"""How every command-line tool of the kit ends: anticipated errors in one line, exit code 2.

`run_main(main)` calls `main()` and turns the errors a user can cause and fix (a missing or
wrong folder, a bad file, a checksum mismatch, no network, a bad value) into one line on stderr,
`<prog>: error: <what is wrong and the fix>`, with exit code 2 (argparse's code for a usage
error), and no traceback. Set MTML_DEBUG=1 to see the traceback. Anything else is a bug and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# OSError covers FileNotFoundError, ConnectionError and MissingDatasetError
USER_ERRORS = (OSError, ValueError)
USAGE_ERROR = 2


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error in one line too (argparse prints the usage first)."""

    def error(self, message: str):
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see --help)\n")


def one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


def run_main(main, argv=None, prog: str | None = None) -> int:
    """`sys.exit(run_main(main))` in a tool's `__main__` block; returns main's exit code."""
    prog = prog or Path(sys.argv[0]).name
    try:
        return main(argv) or 0
    except USER_ERRORS as err:
        if os.environ.get("MTML_DEBUG") == "1":
            raise
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
