"""Line numbers of TOML keys, for findings that point at the right line."""

from __future__ import annotations

from pbmd.protocols.locate import key_lines, line_of

DOC = '''\
# comment with [brackets] and key = "value"
title = "a [not a table]"
text = """
[not.a.table]
key = 1
"""
literal = \'\'\'x = 1\'\'\'
dotted.key = 2
"quoted key" = 3
inline = { a = 1, b = { c = [1, 2] } }
list = [
  { ref = "x" },  # trailing comment
  { ref = "y" },
]

[course]
sessions = 1

[ports.1.applicator]
kind = "pad"

[[ports.1.steps]]
site = "a"

[[ports.1.steps]]
site = "b"
gating = { confirm_placement = true }

[ports.1.steps.extra]
note = "belongs to the second step"

[[evidence]]
ref = "r"
'''


def test_key_lines() -> None:
    lines = key_lines(DOC)
    assert lines[("title",)] == 2
    assert lines[("text",)] == 3
    assert ("not", "a", "table") not in lines
    assert lines[("literal",)] == 7
    assert lines[("dotted", "key")] == 8
    assert lines[("quoted key",)] == 9
    assert lines[("inline", "b", "c")] == 10
    assert lines[("list", 0)] == 12
    assert lines[("list", 1, "ref")] == 13
    assert lines[("course", "sessions")] == 17
    assert lines[("ports", "1", "applicator", "kind")] == 20
    assert lines[("ports", "1", "steps", 0)] == 22
    assert lines[("ports", "1", "steps", 1, "site")] == 26
    assert lines[("ports", "1", "steps", 1, "gating", "confirm_placement")] == 27
    assert lines[("ports", "1", "steps", 1, "extra", "note")] == 30
    assert lines[("evidence", 0, "ref")] == 33


def test_line_of_falls_back_to_the_enclosing_table() -> None:
    lines = key_lines(DOC)
    assert line_of(lines, ("ports", "1", "steps", 0, "max_time_s")) == 22
    assert line_of(lines, ("nothing",)) is None


def test_garbage_never_raises() -> None:
    for text in ("[", "a = [1, 2", 'a = "x', "= 1", "[[a]]\n[[a.b", "a = {", "\x00"):
        key_lines(text)
