"""The README's by-hand session: the commands it shows are the commands that exist."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from pbmd.daemon import cli
from pbmd.daemon.clients import pbmctl

README = Path(__file__).resolve().parents[2] / "README.md"


def _shown_commands() -> list[list[str]]:
    """Each `.venv/bin/...` line of the README's sh blocks, without its comment."""
    blocks = re.findall(r"```sh\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    lines = [line for block in blocks for line in block.splitlines()]
    return [shlex.split(line, comments=True) for line in lines if line.startswith(".venv/bin/")]


def test_readme_shows_a_sped_up_session_that_the_parsers_accept() -> None:
    commands = _shown_commands()
    run = [c for c in commands if c[:2] == [".venv/bin/pbmd", "run"]]
    assert run, "the README shows no `pbmd run` to try by hand"
    args = cli.build_parser().parse_args(run[0][1:])
    assert args.sim_time_scale == 30.0  # a newcomer sees a session in minutes, not at x1
    start = [c for c in commands if c[:3] == [".venv/bin/pbmctl", "session", "start"]]
    assert start, "the README shows no session to start"
    parsed = pbmctl.build_parser().parse_args(start[0][1:])
    assert parsed.auto_confirm is True
