"""The clinic database: a PostgreSQL copy of every workstation's treatment records.

Each workstation's SQLite records stay the source of truth (treatment never waits
on the network). When ``[clinic_db]`` is configured, `Replicator` copies every
committed row to the clinic's server in commit order, idempotently, resuming where
it stopped; `ClinicReads` answers clinic-wide reads (a patient's sessions across
workstations); `schema` holds the server's tables, version table and migrations;
`cli` is ``pbmd clinic-db``. Set-up: docs/clinic-db.md.
"""

from pbmd.daemon.services.clinic_db.reads import ClinicReads, ClinicUnavailable
from pbmd.daemon.services.clinic_db.replicator import Replicator
from pbmd.daemon.services.clinic_db.schema import (
    SERVER_SCHEMA_VERSION,
    ClinicSchemaError,
    SchemaTooNew,
    SchemaTooOld,
)

__all__ = [
    "SERVER_SCHEMA_VERSION",
    "ClinicReads",
    "ClinicSchemaError",
    "ClinicUnavailable",
    "Replicator",
    "SchemaTooNew",
    "SchemaTooOld",
]
