"""`pbmctl`: the clinician's and technician's command line.

Each command group lives with the part of pbmd it belongs to and registers
itself here (`protocol` from pbmd.protocols; the daemon's status, sessions
and records join beside it), so this file only builds the parser and
dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from pbmd.protocols import cli as protocol_cli

    parser = argparse.ArgumentParser(
        prog="pbmctl", description="pbmctl: control and inspect a pbmd photobiomodulation daemon"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    protocol_cli.register_pbmctl(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
