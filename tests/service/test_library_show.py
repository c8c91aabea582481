"""The shipped library as a clinician meets it: every program is installed by the daemon,
and `pbmctl protocol show` lists its phases, the source and the assumption of every dose,
and the totals the sources state, before a session is started."""

from __future__ import annotations

from pbmd.protocols import library
from pbmd.protocols.loader import load_protocol
from pbmd.protocols.model import Step, Total

from .harness import Daemon, pbmctl, pbmctl_json


def provenance(item: Step | Total) -> str:
    """What the view prints for a dose or a total: its sources and their basis, then the
    assumption, both wherever the file states both."""
    parts = []
    if item.sources:
        parts.append(f"{', '.join(item.sources)}: {' '.join((item.basis or '').split())}")
    if item.assumption:
        parts.append(f"assumption: {' '.join(item.assumption.split())}")
    assert parts, "every dose and total says where it comes from"
    return " · ".join(parts)


def test_every_shipped_program_is_installed_and_shows_its_sources(daemon: Daemon) -> None:
    listed = pbmctl_json(daemon.socket_path, "protocol", "list")["protocols"]
    shipped = {p.stem: load_protocol(p) for p in library.protocol_files()}
    assert {p["id"] for p in listed} == set(shipped)
    for protocol_id, loaded in shipped.items():
        shown = pbmctl(daemon.socket_path, "protocol", "show", protocol_id)
        assert shown.returncode == 0, shown.stderr
        text = " ".join(shown.stdout.split())  # the console wraps long lines
        assert "sources" in text, protocol_id
        for evidence in loaded.protocol.evidence:
            assert f"{evidence.ref}: {' '.join(evidence.relevance.split())}" in text
        for number, port in loaded.protocol.ports.items():
            for index, step in enumerate(port.steps, 1):
                said = f"port {number} step {index} dose — {provenance(step)}"
                assert said in text, (protocol_id, said)
        for total in loaded.protocol.totals:
            assert f"total {total.label}: " in text and provenance(total) in text, protocol_id
        for number, phase in enumerate(loaded.protocol.phases, 1):
            assert f"phase {number} {phase.id!r}" in text, (protocol_id, phase.id)
