"""Five `pbmd run` workstations on one broker: each one's retained status, state and
session, and its live dose, arrive under its own device id and never mixed up.

A late subscriber (the dashboard's read-only user, as the page would connect)
gets every workstation's retained topics; then each runs its own session, and
every dose sample on a workstation's topics carries that workstation's session.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fixtures.protocols import header, pad_step, port, site
from mqtt.subscriber import Subscriber
from service.harness import SHORT_SCREENING, RawClient, pbmctl_json, write_protocol

from .broker import DASHBOARD_PASSWORD, DASHBOARD_USER
from .conftest import Workstations

NAMES = [f"ws-{i}" for i in range(1, 6)]
TIME_SCALE = 5.0
"""Slow enough that five simulators and daemons share two cores with room to spare."""

PROTOCOL = (
    header("fleet-short", "One ungated pad step (fleet test)")
    + site("back", "Left lumbar paraspinal muscles", "lumbar", 180.0)
    + port(2, "pad", [pad_step(irradiance=10.0, fluence=0.3, max_time_s=120)])
)
"""30 s of device time: 6 s at ×5, about 60 live samples."""


def run_session(socket_path: Path, patient: str) -> tuple[str, str]:
    """The session on port 2; its id and final state (with the cause if not completed)."""
    with RawClient(socket_path) as client:
        started = client.call(
            "session.start",
            {
                "protocol": "fleet-short",
                "patient_ref": patient,
                "ports": [2],
                "contraindications": SHORT_SCREENING,
                "watch": True,
            },
        )
        while (msg := client.next_notification())["method"] != "session.ended":
            pass
        ended = msg["params"]
        state = str(ended["state"])
        if state != "completed":  # say why
            status = ended.get("status") or {}
            state += f" ({status.get('cause_code')}: {status.get('cause_message')})"
        return str(started["session_id"]), state


async def test_five_workstations_apart_on_one_broker(
    start_broker,
    workstations: Workstations,
    workdir: Path,  # type: ignore[no-untyped-def]
) -> None:
    broker = start_broker(NAMES)
    daemons = await asyncio.to_thread(workstations, broker, NAMES, time_scale=TIME_SCALE)
    live = Subscriber(
        broker.port, ("pbm/v1/#",), username=DASHBOARD_USER, password=DASHBOARD_PASSWORD
    )
    sub = Subscriber(
        broker.port, ("pbm/v1/#",), username=DASHBOARD_USER, password=DASHBOARD_PASSWORD
    )
    await live.connect()
    try:
        # Every workstation has published its retained topics once...
        leaves = ("status", "state", "session")
        await live.wait_until(
            lambda: all(live.on(f"pbm/v1/{ws}/{leaf}") for ws in NAMES for leaf in leaves),
            what="every workstation's status, state and session",
        )
        await live.disconnect()
        # ...so a subscriber that comes later (the page opened) gets them from the broker.
        await sub.connect()

        def retained(ws: str, leaf: str) -> list[object]:
            return [m for m in sub.on(f"pbm/v1/{ws}/{leaf}") if m.retain]

        await sub.wait_until(
            lambda: all(retained(ws, leaf) for ws in NAMES for leaf in leaves),
            what="every workstation's retained status, state and session",
        )
        for ws in NAMES:
            assert sub.on(f"pbm/v1/{ws}/status")[-1].text == "online"
            assert sub.on(f"pbm/v1/{ws}/session")[-1].json()["state"] == "idle"
            serials = {c["serial"] for c in sub.on(f"pbm/v1/{ws}/state")[-1].json()["controllers"]}
            assert serials and None not in serials

        protocol = write_protocol(workdir, PROTOCOL, name="fleet.toml")
        for d in daemons.values():
            await asyncio.to_thread(
                pbmctl_json, d.socket_path, "protocol", "install", str(protocol)
            )
        results = await asyncio.gather(
            *(
                asyncio.to_thread(run_session, daemons[ws].socket_path, f"FLEET-{ws}")
                for ws in NAMES
            )
        )
        sessions = dict(zip(NAMES, results, strict=True))
        # What is shown apart is the subject here, not how each treatment ended: on a
        # loaded machine a starved simulator may trip E201, which is the engine's job.
        ended = {ws: state.split(" ")[0] for ws, (_, state) in sessions.items()}
        assert set(ended.values()) <= {"completed", "faulted"}, sessions
        assert len({sid for sid, _ in sessions.values()}) == len(NAMES)

        for ws in NAMES:
            sid = sessions[ws][0]
            await sub.wait_for(
                lambda m, ws=ws, sid=sid: (  # type: ignore[misc]
                    m.topic == f"pbm/v1/{ws}/session"
                    and m.json()["session_id"] == sid
                    and m.json()["state"] == ended[ws]
                ),
                what=f"{ws}'s session {ended[ws]}",
            )
            doses = [m.json() for m in sub.on(f"pbm/v1/{ws}/port/2/dose")]
            assert len(doses) >= 5, f"{ws}: {len(doses)} dose samples"
            assert {d["session_id"] for d in doses} == {sid}, ws  # its own session only
            energies = [d["energy_j"] for d in doses]
            assert energies == sorted(energies), ws  # one step's dose, rising
    finally:
        await live.disconnect()
        await sub.disconnect()
