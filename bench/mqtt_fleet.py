"""Many workstations on one broker: live-dose lag and CPU for N = 1, 10, 50, 100.

One mosquitto (its own instance on a free loopback port, anonymous, no
persistence). Workstations 1..--real-max (5 by default: what two cores carry)
are real `pbmd run` daemons, each with its embedded simulator at the real
device clock (×1) and a session emitting on three pad ports. The rest are a
**load generator**, not pbmd: it records, from the first real workstation,
every message pbmd published (topics, payloads, QoS, retain flags, MQTT 5
properties, the retained set published on connect, the will) and replays that
recording per generated device (`gen-001`, …) on its own MQTT connection, with
the device id, session id, `ts`, `seq` and event ids rewritten. So the broker
sees what N pbmd daemons would send it; only the CPU of a daemon is not
reproduced for the generated ones (it is measured on the real ones).

A subscriber (this process, paho-mqtt) takes `pbm/v1/+/port/+/dose` and
measures the lag of each live dose sample: its receive time minus the `ts`
pbmd put in the payload (the same machine's clock). CPU is read from
/proc/<pid>/stat over the measurement window.

    .venv/bin/python bench/mqtt_fleet.py                  # N = 1, 10, 50, 100, 10 s each
    .venv/bin/python bench/mqtt_fleet.py --sizes 1,10 --window-s 5
"""

from __future__ import annotations

import argparse
import datetime as dt
import heapq
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
from benchlib import percentile  # noqa: E402
from fixtures.protocols import SHORT_SCREENING, header, pad_step, port, site  # noqa: E402
from mqtt.broker import MOSQUITTO, MOSQUITTO_PASSWD, free_port  # noqa: E402
from service.harness import Daemon, RawClient, pbmctl_json, toml_config, write_protocol  # noqa: E402

RECORDED = "ws-01"
PROTOCOL = (
    header("fleet-bench", "Three pads emitting for 20 minutes (fleet benchmark)")
    + "".join(site(f"pad{n}", f"Pad {n}", "lumbar", 180.0) for n in (1, 2, 3))
    + "".join(
        port(n, "pad", [pad_step(site=f"pad{n}", irradiance=5.0, fluence=6.0)]) for n in (1, 2, 3)
    )
)
TICK = os.sysconf("SC_CLK_TCK")
MOSQUITTO_SUB = str(Path(MOSQUITTO_PASSWD).with_name("mosquitto_sub"))
SYS_RECEIVED = "$SYS/broker/publish/messages/received"


# ---------------------------------------------------------------- measuring


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and its live children."""
    total = 0.0
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                pids.append(int(entry.name))
    for p in pids:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / TICK
    return total


@dataclass
class LagMeter:
    """Subscribed to every dose topic; lags are kept only while `measuring`."""

    port: int
    measuring: bool = False
    lags_real: list[float] = field(default_factory=list)
    lags_generated: list[float] = field(default_factory=list)
    received: list[tuple[float, int]] = field(default_factory=list)
    client: paho.Client = field(init=False)

    def broker_rate(self, t0: float, t1: float) -> float:
        """PUBLISH packets the broker received per second between t0 and t1 ($SYS)."""
        inside = [(t, v) for t, v in self.received if t0 <= t <= t1 + 1.0]
        if len(inside) < 2:
            return float("nan")
        (ta, va), (tb, vb) = inside[0], inside[-1]
        return (vb - va) / (tb - ta)

    def __post_init__(self) -> None:
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, "fleet-bench-lag", protocol=paho.MQTTv5
        )
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *_: subscribed.set()
        self.client.on_connect = lambda c, *_: c.subscribe(
            [("pbm/v1/+/port/+/dose", 0), (SYS_RECEIVED, 0)]
        )
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("lag subscriber did not subscribe")

    def _on_message(self, _c: Any, _u: Any, message: paho.MQTTMessage) -> None:
        if message.topic == SYS_RECEIVED:  # the broker's own count, once a second
            self.received.append((time.monotonic(), int(message.payload)))
            return
        if not self.measuring:
            return
        now = time.time()
        sent = dt.datetime.fromisoformat(json.loads(message.payload)["ts"]).timestamp()
        generated = message.topic.split("/")[2].startswith("gen-")
        (self.lags_generated if generated else self.lags_real).append(now - sent)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


# ---------------------------------------------------------------- recording pbmd


def record(port: int, device: str, seconds: float) -> dict[str, Any]:
    """What pbmd publishes for `device`: the retained set, the will, and `seconds` of live
    traffic (every message, with its QoS, retain flag, properties and time offset)."""
    retained: list[dict[str, Any]] = []
    live: list[dict[str, Any]] = []
    start = [0.0]

    def keep(_c: Any, _u: Any, m: paho.MQTTMessage) -> None:
        props = m.properties
        item = {
            "topic": m.topic,
            "payload": m.payload.decode(),
            "qos": m.qos,
            "retain": bool(m.retain),
            "expiry": getattr(props, "MessageExpiryInterval", None),
            "content_type": getattr(props, "ContentType", None),
            "format": getattr(props, "PayloadFormatIndicator", None),
            "user": list(getattr(props, "UserProperty", []) or []),
            "t": time.monotonic() - start[0],
        }
        if m.retain:
            retained.append(item)
        elif start[0]:
            live.append(item)

    client = paho.Client(paho.CallbackAPIVersion.VERSION2, "fleet-bench-rec", protocol=paho.MQTTv5)
    client.on_message = keep
    client.on_connect = lambda c, *_: c.subscribe(
        [(f"pbm/v1/{device}/#", 1), (f"homeassistant/+/pbmd_{device}/#", 1)]
    )
    client.connect("127.0.0.1", port)
    client.loop_start()
    time.sleep(1.0)  # the retained set arrives first
    start[0] = time.monotonic()
    time.sleep(seconds)
    client.loop_stop()
    client.disconnect()
    return {"device": device, "retained": retained, "live": live, "period_s": seconds}


# ---------------------------------------------------------------- the load generator


@dataclass
class Prepared:
    """One recorded message, rewritten for one generated device once."""

    topic: str
    body: str | dict[str, Any]
    qos: int
    retain: bool
    props: Properties
    event: bool


class Replayer:
    """Publishes, as device `name`, what the recorded pbmd published."""

    def __init__(self, rec: dict[str, Any], name: str, port: int) -> None:
        session_ids = {
            json.loads(m["payload"]).get("session_id")
            for m in rec["retained"] + rec["live"]
            if m["payload"].startswith("{")
        } - {None}
        new_session = str(uuid.uuid4())
        # A retained topic's later updates reach a live subscriber without the flag.
        retained_topics = {m["topic"] for m in rec["retained"]}

        def prepare(m: dict[str, Any]) -> Prepared:
            text = m["payload"].replace(rec["device"], name)
            for sid in session_ids:
                text = text.replace(sid, new_session)
            topic = m["topic"].replace(rec["device"], name)
            props = Properties(PacketTypes.PUBLISH)
            if m["expiry"] is not None:
                props.MessageExpiryInterval = m["expiry"]
            if m["content_type"] is not None:
                props.ContentType = m["content_type"]
            if m["format"] is not None:
                props.PayloadFormatIndicator = m["format"]
            if m["user"] and not topic.endswith("/events"):
                props.UserProperty = [tuple(u) for u in m["user"]]
            body: str | dict[str, Any] = text
            if text.startswith("{") and not topic.startswith("homeassistant/"):
                body = json.loads(text)
            retain = m["retain"] or m["topic"] in retained_topics
            return Prepared(topic, body, m["qos"], retain, props, topic.endswith("/events"))

        self.retained = [prepare(m) for m in rec["retained"]]
        self.live = [prepare(m) for m in rec["live"]]
        self.seq: dict[str, int] = {}
        self.client = paho.Client(
            paho.CallbackAPIVersion.VERSION2, f"pbmd-{name}", protocol=paho.MQTTv5
        )
        will = Properties(PacketTypes.WILLMESSAGE)
        will.UserProperty = ("reason", "connection lost")
        self.client.will_set(
            f"pbm/v1/{name}/status", "offline", qos=1, retain=True, properties=will
        )
        self.client.on_connect = lambda *_: [self.publish(m) for m in self.retained]
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()

    def publish(self, m: Prepared) -> None:
        """With a fresh `ts`, the topic's next `seq` and, for an event, a new id."""
        body: str = m.body if isinstance(m.body, str) else ""
        props = m.props
        if isinstance(m.body, dict):
            payload = dict(m.body)
            if "ts" in payload:
                payload["ts"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            if "seq" in payload:
                payload["seq"] = self.seq[m.topic] = self.seq.get(m.topic, 0) + 1
            if m.event:
                payload["id"] = str(uuid.uuid4())
                props = Properties(PacketTypes.PUBLISH)
                props.ContentType, props.PayloadFormatIndicator = "application/json", 1
                props.UserProperty = [("event_id", payload["id"])]
                props.CorrelationData = payload["id"].encode()
            body = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
        self.client.publish(m.topic, body, qos=m.qos, retain=m.retain, properties=props)


def generate(recording: Path, port: int, names: list[str], seconds: float) -> None:
    """The generator process: every device replays the recording in a loop, phases random.
    Prints how far behind its schedule it published (p99, ms) when done."""
    rec = json.loads(recording.read_text())
    replayers = [Replayer(rec, n, port) for n in names]
    period, times = rec["period_s"], [m["t"] for m in rec["live"]]
    start = time.monotonic() + 1.0
    phases = [random.uniform(0, 0.1) for _ in names]  # real daemons are not in step

    def due(i: int, k: int, cycle: int) -> tuple[float, int, int, int]:
        return (start + phases[i] + cycle * period + times[k], i, k, cycle)

    queue = [due(i, 0, 0) for i in range(len(names))]
    heapq.heapify(queue)
    end = start + seconds
    behind: list[float] = []
    while queue and (now := time.monotonic()) < end:
        at, i, k, cycle = heapq.heappop(queue)
        if at > now:
            time.sleep(at - now)
        elif now > start + 2.0:  # past the connect burst
            behind.append(now - at)
        replayers[i].publish(replayers[i].live[k])
        heapq.heappush(queue, due(i, k + 1, cycle) if k + 1 < len(times) else due(i, 0, cycle + 1))
    print(json.dumps({"behind_p99_ms": 1000 * percentile(behind, 0.99) if behind else 0.0}))
    for r in replayers:
        r.client.disconnect()
        r.client.loop_stop()


# ---------------------------------------------------------------- the run


class Fleet:
    def __init__(self, workdir: Path, window_s: float, real_max: int) -> None:
        self.workdir, self.window_s, self.real_max = workdir, window_s, real_max
        self.port = free_port()
        conf = workdir / "mosquitto.conf"
        lines = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false"]
        lines += ["max_queued_messages 10000", "sys_interval 1"] + (
            ["user root"] if os.geteuid() == 0 else []
        )
        conf.write_text("\n".join(lines) + "\n")
        self.broker = subprocess.Popen([MOSQUITTO, "-c", str(conf)], stderr=subprocess.DEVNULL)
        time.sleep(0.5)
        self.daemons: dict[str, Daemon] = {}
        self.protocol = write_protocol(workdir, PROTOCOL, name="fleet.toml")
        self.recording = workdir / "recording.json"

    def add_real(self, count: int) -> None:
        names = [f"ws-{i:02d}" for i in range(len(self.daemons) + 1, count + 1)]
        for name in names:
            home = self.workdir / name
            home.mkdir()
            mqtt = f'\n[mqtt]\nhost = "127.0.0.1"\nport = {self.port}\ndevice_id = "{name}"\n'
            config = home / "pbmd.toml"
            state, sock = home / "state", home / "control.sock"
            config.write_text(toml_config(state, sock, time_scale=1.0, extra=mqtt))
            self.daemons[name] = Daemon(config, sock, state)
        with ThreadPoolExecutor(max(1, len(names))) as pool:
            list(pool.map(self._start_treating, [self.daemons[n] for n in names]))

    def _start_treating(self, d: Daemon) -> None:
        """Start the daemon and a session on ports 1-3; return once all three emit."""
        d.start()
        pbmctl_json(d.socket_path, "protocol", "install", str(self.protocol))
        with RawClient(d.socket_path) as c:
            c.call(
                "session.start",
                {"protocol": "fleet-bench", "patient_ref": "BENCH", "ports": [1, 2, 3],
                 "contraindications": SHORT_SCREENING, "watch": True},
            )  # fmt: skip
            emitting: set[int] = set()
            while len(emitting) < 3:
                msg = c.next_notification()
                if msg["method"] == "session.ended":
                    raise RuntimeError(f"{d.config_path.parent.name}: {msg['params']}")
                event = (msg.get("params") or {}).get("event") or {}
                if event.get("kind") == "emission_started":
                    emitting.add(int(event["port"]))

    def measure(self, n: int) -> dict[str, Any]:
        self.add_real(min(n, self.real_max))
        if not self.recording.exists():
            time.sleep(1.0)
            rec = record(self.port, RECORDED, 4.0)
            doses = sum("/dose" in m["topic"] for m in rec["live"])
            if doses < 3 * 10 * 4 * 0.9 or self.sessions_ended():
                raise RuntimeError(f"recording: {doses} dose samples; {self.sessions_ended()}")
            self.recording.write_text(json.dumps(rec))
        synthetic = [f"gen-{i:03d}" for i in range(1, n - len(self.daemons) + 1)]
        groups = [synthetic[i : i + 25] for i in range(0, len(synthetic), 25)]
        generators = [self._generator(g) for g in groups]
        meter = LagMeter(self.port)
        try:
            time.sleep(4.0)  # generators connected and publishing
            procs = {"broker": self.broker.pid, "meter": os.getpid()}
            procs |= {name: d.proc.pid for name, d in self.daemons.items() if d.proc}
            procs |= {f"gen{i}": g.pid for i, g in enumerate(generators)}
            before = {k: cpu_s(p) for k, p in procs.items()}
            counted = self.workdir / f"sub-{n}.txt"
            with counted.open("wb") as out:
                c_sub = subprocess.Popen(  # a C subscriber, as a check on this one's count
                    [MOSQUITTO_SUB, "-p", str(self.port), "-t", "pbm/v1/+/port/+/dose", "-F", "%t"],
                    stdout=out,
                )
                meter.measuring = True
                t0 = time.monotonic()
                time.sleep(self.window_s)
                meter.measuring = False
                t1 = time.monotonic()
                c_sub.terminate()
                c_sub.wait(10)
            c_count = len(counted.read_bytes().splitlines())
            wall = t1 - t0
            cpu = {k: 100 * (cpu_s(p) - before[k]) / wall for k, p in procs.items()}
        finally:
            meter.close()
            behind = [json.loads(g.communicate(timeout=60)[0] or "{}") for g in generators]
        real = [v for k, v in cpu.items() if k.startswith("ws-")]
        lags = meter.lags_real + meter.lags_generated
        return {
            "n": n, "real": len(self.daemons), "generated": len(synthetic),
            "rate": len(lags) / wall,
            "broker_in": meter.broker_rate(t0, t1),
            "c_rate": c_count / wall,
            "rate_real": len(meter.lags_real) / wall / len(self.daemons),
            "rate_generated": len(meter.lags_generated) / wall / max(1, len(synthetic)),
            "p50": 1000 * percentile(lags, 0.5), "p99": 1000 * percentile(lags, 0.99),
            "p99_real": 1000 * percentile(meter.lags_real, 0.99),
            "broker": cpu["broker"], "pbmd_mean": sum(real) / len(real), "pbmd_max": max(real),
            "generator": sum(v for k, v in cpu.items() if k.startswith("gen")),
            "ended": self.sessions_ended(),
            "behind": max((b.get("behind_p99_ms", 0.0) for b in behind), default=0.0),
        }  # fmt: skip

    def sessions_ended(self) -> list[str]:
        """Real workstations whose session is no longer running, with the cause."""
        ended = []
        for name, d in self.daemons.items():
            with RawClient(d.socket_path) as c:
                status = c.call("session.watch")["status"] or {}
            if status.get("state") != "running":
                ended.append(f"{name}: {status.get('state')} {status.get('cause_code')}")
        return ended

    def _generator(self, names: list[str]) -> subprocess.Popen[bytes]:
        argv = [sys.executable, __file__, "--generate", str(self.recording)]
        argv += ["--port", str(self.port), "--devices", ",".join(names)]
        return subprocess.Popen(
            [*argv, "--seconds", str(self.window_s + 6)], stdout=subprocess.PIPE, text=True
        )

    def retained_volume(self) -> str:
        """Retained messages and bytes per device, as a new subscriber receives them."""
        rec = record(self.port, RECORDED, 0.0)["retained"]
        pbm = [m for m in rec if m["topic"].startswith("pbm/")]

        def size(ms: list[dict[str, Any]]) -> int:
            return sum(len(m["payload"].encode()) + len(m["topic"]) for m in ms)

        return (
            f"retained per device: {len(pbm)} messages, {size(pbm)} bytes under pbm/v1/; "
            f"{len(rec)} messages, {size(rec)} bytes with Home Assistant discovery "
            "(topics + payloads)"
        )

    def close(self) -> None:
        with ThreadPoolExecutor(max(1, len(self.daemons))) as pool:
            list(pool.map(lambda d: d.stop(), self.daemons.values()))
        self.broker.send_signal(signal.SIGTERM)
        self.broker.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1,10,50,100", help="fleet sizes (1,10,50,100)")
    parser.add_argument("--window-s", type=float, default=10.0, help="measurement per size (10)")
    parser.add_argument("--real-max", type=int, default=5, help="real pbmd daemons at most (5)")
    parser.add_argument("--generate", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--devices", help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(args.generate, args.port, args.devices.split(","), args.seconds)
        return
    with ExitStack() as stack:
        workdir = Path(tempfile.mkdtemp(prefix="pbm-fleet-"))
        workdir.chmod(0o755)
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        fleet = Fleet(workdir, args.window_s, args.real_max)
        stack.callback(fleet.close)
        rows = []
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(fleet.measure(n))
            print(f"N={n}: measured", file=sys.stderr, flush=True)
        retained = fleet.retained_volume()
    print(
        "| N | pbmd daemons | generated (replayed pbmd traffic) | broker in msg/s "
        "| dose msg/s at mosquitto_sub | dose msg/s at this subscriber (per pbmd / per generated) "
        "| lag p50 ms | lag p99 ms | lag p99 ms, real pbmd only | broker CPU % "
        "| pbmd CPU % (mean / max) | generator CPU % (behind schedule p99 ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['n']} | {r['real']} | {r['generated']} "
            f"| {r['broker_in']:.0f} | {r['c_rate']:.0f} "
            f"| {r['rate']:.0f} ({r['rate_real']:.1f} / {r['rate_generated']:.1f}) "
            f"| {r['p50']:.1f} | {r['p99']:.1f} | {r['p99_real']:.1f} | {r['broker']:.1f} "
            f"| {r['pbmd_mean']:.1f} / {r['pbmd_max']:.1f} "
            f"| {r['generator']:.1f} ({r['behind']:.0f}) |"
        )
    print(f"\n{retained}")
    for r in rows:
        if r["ended"]:
            print(f"N={r['n']}: sessions not running after the window: {', '.join(r['ended'])}")


if __name__ == "__main__":
    main()
