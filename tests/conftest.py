"""Fixtures of the whole suite: every async test fails if it leaves a task running, and
a work directory other users can reach (`workdir`).

Shared test material that is not a pytest fixture (protocol texts, signing,
simulators) is in tests/fixtures/.
"""

from __future__ import annotations

import asyncio
import inspect
import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from fixtures.paths import public_dir


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        func = getattr(item, "function", None)
        if func is not None and inspect.iscoroutinefunction(func):
            item.add_marker(pytest.mark.usefixtures("no_leaked_tasks"))


@pytest.fixture
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves tasks behind (ophyd-async's rule).

    Torn down after the test's own fixtures, so servers and clients that the
    test opened must have been closed by then.
    """
    before = asyncio.all_tasks()
    yield
    current = asyncio.current_task()
    # One turn of the loop lets tasks that were cancelled finish unwinding.
    await asyncio.sleep(0)
    leaked = [
        t for t in asyncio.all_tasks() if t not in before and t is not current and not t.done()
    ]
    for task in leaked:
        task.cancel()
    if leaked:
        await asyncio.gather(*leaked, return_exceptions=True)
        names = ", ".join(sorted(t.get_name() + ":" + repr(t.get_coro()) for t in leaked))
        pytest.fail(f"test leaked {len(leaked)} asyncio task(s): {names}")


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory every uid can traverse, removed after the test."""
    path = public_dir()
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
