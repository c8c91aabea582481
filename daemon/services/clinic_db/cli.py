"""`pbmd clinic-db`: create or upgrade the clinic database's schema, and check it."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import psycopg

from pbmd.daemon.services import config as cfg
from pbmd.daemon.services.clinic_db import schema
from pbmd.daemon.services.clinic_db.connection import connect, describe, server_text

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 78


async def _migrate(config: cfg.ClinicDbConfig, check_only: bool) -> tuple[int, str]:
    where = server_text(config)
    try:
        async with await connect(config) as conn:
            if check_only:
                version = await schema.check(conn)
                return EXIT_OK, f"{where}: clinic schema version {version}, as this pbmd needs"
            applied = await schema.migrate(conn)
    except (psycopg.Error, OSError, ValueError, schema.ClinicSchemaError) as exc:
        return EXIT_FAILED, describe(exc, config)
    if not applied:
        return EXIT_OK, f"{where}: clinic schema already at version {schema.SERVER_SCHEMA_VERSION}"
    return EXIT_OK, f"{where}: clinic schema migrated to version {applied[-1]}"


def _cmd(args: argparse.Namespace) -> int:
    try:
        config, _source = cfg.load(args.config)
    except cfg.ConfigError as exc:
        print(f"pbmd: {exc.render()}", file=sys.stderr)
        return EXIT_CONFIG
    if config.clinic_db is None:
        print(f"pbmd: {_source} has no [clinic_db] table (docs/clinic-db.md)", file=sys.stderr)
        return EXIT_CONFIG
    code, text = asyncio.run(_migrate(config.clinic_db, args.clinic_command == "check"))
    print(f"pbmd: {text}", file=sys.stderr if code else sys.stdout)
    return code


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pbmd clinic-db migrate|check`."""
    p = subparsers.add_parser("clinic-db", help="the clinic's PostgreSQL copy of the records")
    sub = p.add_subparsers(dest="clinic_command", required=True, metavar="COMMAND")
    for name, text in (
        ("migrate", "create or upgrade the clinic database's schema"),
        ("check", "check that the clinic database has the schema this pbmd needs"),
    ):
        q = sub.add_parser(name, help=text)
        q.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration file")
        q.set_defaults(func=_cmd)
