"""Finding sessions as people name them: a unique prefix of an id (as git takes a
commit's), and dates without a zone (the workstation's local day)."""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Iterator

import pytest

from pbmd.daemon.services.api.records import RecordsListParams, resolve_session_id
from pbmd.daemon.services.api.registry import NOT_FOUND, REFUSED, RpcError
from pbmd.daemon.services.records import RecordStore

from . import synthetic as syn


async def test_unique_prefix_ambiguous_prefix_and_exact_id(store: RecordStore) -> None:
    for sid in ("b655ee5b-0001", "b655ee5b-0002", "b655ff00-0003", "c0ffee00-0004"):
        syn.write_completed(store, sid)
    await store.sync()
    where = "the records"
    assert await resolve_session_id("b655ff", store.match_session_ids, where) == "b655ff00-0003"
    assert await resolve_session_id("c0ff", store.match_session_ids, where) == "c0ffee00-0004"
    exact = await resolve_session_id("b655ee5b-0001", store.match_session_ids, where)
    assert exact == "b655ee5b-0001"

    with pytest.raises(RpcError) as ambiguous:
        await resolve_session_id("b655ee", store.match_session_ids, where)
    assert ambiguous.value.code == REFUSED
    assert "ambiguous" in ambiguous.value.message
    assert ambiguous.value.data == {"candidates": ["b655ee5b-0001", "b655ee5b-0002"]}
    with pytest.raises(RpcError) as short:
        await resolve_session_id("c0f", store.match_session_ids, where)
    assert short.value.code == REFUSED and "at least 4 characters" in short.value.message
    with pytest.raises(RpcError) as missing:
        await resolve_session_id("d00d", store.match_session_ids, where)
    assert missing.value.code == NOT_FOUND


@pytest.fixture
def far_east() -> Iterator[None]:
    """The workstation's zone is UTC+14 (Kiribati) for the test."""
    saved = os.environ.get("TZ")
    os.environ["TZ"] = "Pacific/Kiritimati"
    time.tzset()
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = saved
        time.tzset()


def test_a_date_without_a_zone_is_the_local_day(far_east: None) -> None:
    since = RecordsListParams.model_validate({"since_utc": "2025-01-31"}).since_utc
    assert since is not None
    assert since.astimezone(dt.UTC) == dt.datetime(2025, 1, 30, 10, 0, tzinfo=dt.UTC)
    given = RecordsListParams.model_validate({"since_utc": "2025-01-31T00:00:00Z"}).since_utc
    assert given == dt.datetime(2025, 1, 31, tzinfo=dt.UTC)
