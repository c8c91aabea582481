"""MQTT carries no patient identifier beyond the clinic's choice: with
``patient_ids = "hash"`` a keyed hash, never the identifier, on the session topic and
in a refused start's event (whose record names the patient). Real mosquitto."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mqtt.broker import Mosquitto
from mqtt.conftest import broker as broker  # the MQTT tests' fixtures
from mqtt.conftest import subscriber as subscriber
from mqtt.subscriber import Subscriber
from service.harness import RawClient

from pbmd.daemon.services.mqtt.payloads import event_payload

from .rig import (
    COURSE_SCREENING,
    ManualClock,
    error_of,
    install,
    make_home,
    run_course_session,
    run_service,
)

PATIENT = "P-secret-77"
KEY = b"clinic-secret-key-0123456789"
PREFIX = "pbm/v1/ws-course"


async def test_mqtt_publishes_a_keyed_hash_never_the_patient(
    broker: Mosquitto, subscriber: Subscriber, workdir: Path
) -> None:
    key_file = workdir / "patient.key"
    key_file.write_bytes(KEY)
    mqtt = (
        f'[mqtt]\nhost = "127.0.0.1"\nport = {broker.port}\ndevice_id = "ws-course"\n'
        f'reconnect_max_s = 1.0\npatient_ids = "hash"\npatient_hash_key_file = "{key_file}"\n'
    )
    home = make_home(workdir, extra=mqtt)
    clock = ManualClock(datetime(2026, 3, 2, 8, 0, tzinfo=UTC))

    def scenario() -> dict[str, Any]:
        with RawClient(home.socket, timeout_s=120.0) as c:
            install(c, home.protocols / "course-v1.toml")
            c.call("patient.add", {"patient_id": PATIENT, "contraindications": COURSE_SCREENING})
            course = c.call(
                "course.start",
                {
                    "patient_id": PATIENT,
                    "diagnosis": "LBP",
                    "protocol": "course-lumbar",
                    "sessions": 2,
                },
            )["course"]
            # A contraindication present: the engine refuses and records who was refused.
            err = error_of(
                c,
                "course.session_start",
                {
                    "course_id": course["id"],
                    "contraindications": {"cancer": True, "pregnancy": False},
                },
            )
            session_id, state, _ = run_course_session(
                c, {"course_id": course["id"], "contraindications": COURSE_SCREENING}
            )
            return {"refused": err, "session_id": session_id, "state": state}

    out = await run_service(home, clock, scenario)
    assert out["state"] == "completed"
    assert "contraindicated" in out["refused"]["message"]
    expected = hmac.new(KEY, PATIENT.encode(), hashlib.sha256).hexdigest()[:32]
    session = await subscriber.wait_for(
        lambda m: (
            m.topic == f"{PREFIX}/session" and m.json().get("session_id") == out["session_id"]
        ),
        what="the course session",
    )
    assert session.json()["patient_hash"] == expected
    refused = await subscriber.wait_for(
        lambda m: m.topic == f"{PREFIX}/events" and m.json().get("kind") == "start_refused",
        what="the refused start",
    )
    assert refused.json()["data"]["patient_hash"] == expected
    assert "patient_ref" not in refused.json()["data"]
    assert not [m.topic for m in subscriber.messages if PATIENT.encode() in m.payload]


def test_omitted_by_default_in_events() -> None:
    row = {
        "utc": "2026-03-02T08:00:00.000000Z",
        "outbox_seq": 1,
        "id": "e1",
        "kind": "start_refused",
        "code": None,
        "severity": "warning",
        "message": "refused",
        "session_id": None,
        "port": None,
        "device_time_us": None,
        "data": {"patient_ref": PATIENT, "protocol_id": "p"},
    }
    payload = event_payload(row)
    assert payload["data"] == {"protocol_id": "p"}
