"""The shipped library as a clinician meets it: every program is installed by the daemon,
and `pbmctl protocol show` lists its phases and the source (or the assumption) of every
dose before a session is started."""

from __future__ import annotations

from pbmd.protocols import library
from pbmd.protocols.loader import load_protocol

from .harness import Daemon, pbmctl, pbmctl_json


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
                said = f"port {number} step {index} dose — "
                if step.sources:
                    said += f"{', '.join(step.sources)}: {' '.join((step.basis or '').split())}"
                else:
                    said += f"assumption: {' '.join((step.assumption or '').split())}"
                assert said in text, (protocol_id, said)
        for number, phase in enumerate(loaded.protocol.phases, 1):
            assert f"phase {number} {phase.id!r}" in text, (protocol_id, phase.id)
