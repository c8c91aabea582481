"""The shipped broker configuration (dashboard/mosquitto/) starts, and its ACL holds:
the dashboard user reads every workstation's topics and cannot write any of them."""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

import paho.mqtt.client as paho
from mqtt.broker import MOSQUITTO, free_port, make_password_file

from .browser import DASHBOARD

SHIPPED = DASHBOARD / "mosquitto"


def shipped_config(directory: Path, port: int, ws_port: int) -> Path:
    """pbm.conf as shipped, on free loopback ports and with the test's files."""
    text = (SHIPPED / "pbm.conf").read_text(encoding="utf-8")
    text = text.replace("listener 1883", f"listener {port} 127.0.0.1")
    text = text.replace("listener 9001", f"listener {ws_port} 127.0.0.1")
    text = text.replace("/etc/mosquitto/pbm.passwd", str(directory / "pbm.passwd"))
    text = text.replace("/etc/mosquitto/pbm.acl", str(SHIPPED / "pbm.acl"))
    text += "log_dest stderr\n" + ("user root\n" if os.geteuid() == 0 else "")
    path = directory / "pbm.conf"
    path.write_text(text, encoding="utf-8")
    return path


class Client:
    """paho (MQTT 5) with waits on its callbacks, each bounded by a timeout."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.c = paho.Client(paho.CallbackAPIVersion.VERSION2, f"t-{user}", protocol=paho.MQTTv5)
        self.c.username_pw_set(user, password)
        self.connected, self.subscribed = threading.Event(), threading.Event()
        self.acks: dict[int, int] = {}
        self.acked = threading.Condition()
        self.messages: dict[str, bytes] = {}
        self.got = threading.Event()
        self.c.on_connect = lambda *_: self.connected.set()
        self.c.on_subscribe = lambda *_: self.subscribed.set()
        self.c.on_publish = self._on_publish
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        assert self.connected.wait(10)

    def _on_publish(
        self, _c: object, _u: object, mid: int, reason: paho.ReasonCode, _p: object
    ) -> None:
        with self.acked:
            self.acks[mid] = reason.value
            self.acked.notify_all()

    def _on_message(self, _c: object, _u: object, m: paho.MQTTMessage) -> None:
        self.messages[m.topic] = m.payload
        self.got.set()

    def publish(self, topic: str, payload: str) -> int:
        """QoS 1, retained; the broker's PUBACK reason code (below 128 accepted: 0, or
        16 "no matching subscribers"; 135 not authorized)."""
        mid = self.c.publish(topic, payload, qos=1, retain=True).mid
        with self.acked:
            assert self.acked.wait_for(lambda: mid in self.acks, 10)
            return self.acks[mid]

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()


def test_shipped_config_and_acl(tmp_path: Path) -> None:
    users = {"dashboard": "read-only", "ws-01": "s1", "ws-02": "s2"}
    make_password_file(tmp_path / "pbm.passwd", users)
    port = free_port()
    conf = shipped_config(tmp_path, port, free_port())
    broker = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL
    )
    clients: list[Client] = []
    try:
        assert broker.stderr is not None
        for line in iter(broker.stderr.readline, b""):
            if b" running" in line:
                break
        ws1 = Client(port, "ws-01", "s1")
        dash = Client(port, "dashboard", "read-only")
        clients += [ws1, dash]
        assert ws1.publish("pbm/v1/ws-01/status", "online") < 128
        assert ws1.publish("pbm/v1/ws-02/status", "forged") == 135  # not its own
        assert dash.publish("pbm/v1/ws-01/status", "forged") == 135  # read-only
        dash.c.subscribe("pbm/v1/#", qos=1)
        assert dash.subscribed.wait(10) and dash.got.wait(10)
        assert dash.messages == {"pbm/v1/ws-01/status": b"online"}
    finally:
        for c in clients:
            c.close()
        broker.terminate()
        broker.wait(10)
