"""The CSV export: safe to open in a spreadsheet, RFC 4180 line ends."""

from __future__ import annotations

import csv
import io

from pbmd.daemon.services.records import RecordStore
from pbmd.daemon.services.records.reads import csv_cell

from . import synthetic as syn


def test_cells_a_spreadsheet_would_run_are_neutralised() -> None:
    for text in ("=cmd|' /C calc'!A0", "+1+1", "-2+3", "@SUM(A1)", "\tx", "\rx"):
        assert csv_cell(text) == "'" + text
    assert csv_cell(-0.05) == -0.05  # numbers stay numbers
    assert csv_cell("PAT-0042") == "PAT-0042" and csv_cell(None) == ""


async def test_export_uses_crlf_and_neutralises(store: RecordStore) -> None:
    syn.write_completed(store, '=HYPERLINK("http://x")')
    await store.sync()
    text = await store.export("csv")
    assert text.count("\r\n") == 4 and "\n" not in text.replace("\r\n", "")
    rows = list(csv.DictReader(io.StringIO(text, newline="")))
    assert {r["session_id"] for r in rows} == {'\'=HYPERLINK("http://x")'}
