"""`pbmd`: the daemon's command line (run the service, a simulated controller, tools).

Each sub-command lives with the part of pbmd it belongs to and registers itself
here, so this file only dispatches.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def build_parser() -> argparse.ArgumentParser:
    from pbmd.daemon.clients import dashboard, demo
    from pbmd.daemon.services import service
    from pbmd.daemon.services.clinic_db import cli as clinic_db_cli
    from pbmd.hw_sim import cli as sim_cli
    from pbmd.protocols import cli as protocol_cli

    parser = argparse.ArgumentParser(
        prog="pbmd", description="pbmd: control daemon of a multi-port photobiomodulation system"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    service.register(sub)
    clinic_db_cli.register(sub)
    sim_cli.register(sub)
    protocol_cli.register_pbmd(sub)
    demo.register(sub)
    dashboard.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
