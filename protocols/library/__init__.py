"""The shipped protocol library: TOML protocol files with their minisign signatures.

They are signed with the pbmd TEST key (`test-key.pub` here): NOT FOR CLINICAL
USE. A clinic re-signs what it approves with its own key and trusts only that.
"""

from __future__ import annotations

from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent
TEST_KEY_FILE = DIRECTORY / "test-key.pub"


def protocol_files() -> list[Path]:
    """The shipped protocol files, sorted by name (each has FILE.minisig beside it)."""
    return sorted(DIRECTORY.glob("*.toml"))
