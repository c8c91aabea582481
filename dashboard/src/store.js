// What the page knows of each workstation, built only from what pbmd publishes
// under pbm/v1/<device>/… (docs/mqtt.md). No DOM here.

const MAX_EVENTS = 8;
const MAX_POINTS = 600;

/** "E303 The emergency stop was pressed." (pbmd's messages may already start with the code). */
export function causeText(code, message) {
  const m = (message || "").trim();
  if (!code) return m;
  return m.startsWith(code) ? m : `${code} ${m}`.trim();
}

export class Fleet {
  constructor(root = "pbm/v1") {
    this.root = root;
    this.devices = new Map();
    this.listeners = [];
  }

  device(id) {
    let d = this.devices.get(id);
    if (!d) {
      d = { id, status: null, state: null, session: null, ports: new Map(), events: [], seen: new Set(), announced: new Set() };
      this.devices.set(id, d);
    }
    return d;
  }

  port(d, n) {
    let p = d.ports.get(n);
    if (!p) {
      p = { port: n, dose: null, series: [], seriesKey: null };
      d.ports.set(n, p);
    }
    return p;
  }

  /** One MQTT message; returns a trip to announce ({device, text}) or null. */
  handle(topic, text) {
    if (!topic.startsWith(this.root + "/")) return null;
    const parts = topic.slice(this.root.length + 1).split("/");
    const d = this.device(parts[0]);
    const kind = parts[1];
    if (kind === "status") {
      d.status = text.trim() || null;
      return null;
    }
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      return null;
    }
    if (kind === "state") d.state = body;
    else if (kind === "session") return this.onSession(d, body);
    else if (kind === "events") return this.onEvent(d, body);
    else if (kind === "port" && parts[3] === "dose") this.onDose(d, Number(parts[2]), body);
    return null;
  }

  onSession(d, s) {
    d.session = s;
    if (s.state === "faulted") return this.announce(d, s.session_id, s.cause_code, s.cause_message || s.trip);
    return null;
  }

  /** A trip is announced once per session, whichever of its messages comes first. */
  announce(d, sessionId, code, message) {
    const key = sessionId || "none";
    if (d.announced.has(key)) return null;
    d.announced.add(key);
    return { device: d.id, text: `${d.id}: treatment stopped, ${causeText(code, message)}` };
  }

  onEvent(d, e) {
    if (d.seen.has(e.id)) return null; // published at least once: de-duplicate by id
    d.seen.add(e.id);
    d.events.unshift(e);
    d.events.length = Math.min(d.events.length, MAX_EVENTS);
    if (e.kind === "trip") return this.announce(d, e.session_id, e.code, e.message);
    return null;
  }

  onDose(d, n, s) {
    const p = this.port(d, n);
    p.dose = s;
    const key = `${s.session_id}/${s.step}`;
    if (p.seriesKey !== key) {
      p.seriesKey = key;
      p.series = [];
    }
    p.series.push([Number(s.elapsed_s) || 0, Number(s.energy_j) || 0]);
    if (p.series.length > MAX_POINTS) p.series.splice(0, p.series.length - MAX_POINTS);
  }

  /** The ports to show: the session's, or the controller's when there is no session. */
  portsOf(d) {
    const numbers = new Set();
    for (const p of d.session?.ports || []) numbers.add(p.port);
    if (numbers.size === 0) for (const p of d.state?.ports || []) numbers.add(p.port);
    for (const n of d.ports.keys()) if (d.session?.session_id && d.ports.get(n).dose?.session_id === d.session.session_id) numbers.add(n);
    return [...numbers].sort((a, b) => a - b).map((n) => {
      const live = this.port(d, n);
      const planned = (d.session?.ports || []).find((p) => p.port === n) || null;
      const hw = (d.state?.ports || []).find((p) => p.port === n) || null;
      const sameSession = live.dose && d.session && live.dose.session_id === d.session.session_id;
      return { port: n, planned, hw, dose: sameSession ? live.dose : null, series: sameSession ? live.series : [] };
    });
  }
}
