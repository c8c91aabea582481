"""The registry of stop causes: one code each, and the document people read matches it."""

from __future__ import annotations

from pathlib import Path

from pbmd.daemon.core.safety import EndCause, TripCause

DOC = Path(__file__).resolve().parents[2] / "docs" / "stop-causes.md"


def test_every_code_is_distinct_across_trips_and_ends() -> None:
    codes = [c.code for c in TripCause] + [c.code for c in EndCause]
    assert len(codes) == len(set(codes)), codes
    assert all(c.message.endswith(".") for c in [*TripCause, *EndCause])


def test_the_document_lists_every_cause_with_its_message() -> None:
    rows = {
        cells[0]: cells
        for line in DOC.read_text(encoding="utf-8").splitlines()
        if line.startswith("| ") and not line.startswith("| code")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    for trip in TripCause:
        assert trip.code in rows, f"{trip.code} missing from {DOC.name}"
        row = rows[trip.code]
        no_session = trip is TripCause.IDLE_EMISSION
        assert row[1] == ("— (no session runs)" if no_session else "faulted")
        assert row[-1] == trip.message
        assert (row[2] == "yes") == trip.value.needs_service
    for end in EndCause:
        assert end.code in rows, f"{end.code} missing from {DOC.name}"
        assert rows[end.code][-1] == end.message
    assert set(rows) == {c.code for c in [*TripCause, *EndCause]}, "codes no longer in the registry"
