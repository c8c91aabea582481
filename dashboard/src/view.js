// The page: one section per workstation, one card per port, updated in place so
// that keyboard focus and screen-reader position survive live updates.

import { causeText } from "./store.js";

const SVG = "http://www.w3.org/2000/svg";

// Every state has words and an icon; the tone only adds colour.
const PORT_STATES = {
  emitting: ["▶", "Emitting", "run"],
  paused: ["‖", "Paused", "wait"],
  gated: ["✋", "Waiting", "wait"],
  waiting: ["⏳", "Waiting", "wait"],
  done: ["✓", "Done", "ok"],
  skipped: ["⤼", "Skipped", "off"],
  stopped: ["■", "Stopped", "bad"],
  idle: ["–", "Idle", "off"],
};
const SESSION_STATES = {
  idle: ["–", "No session", "off"],
  ready: ["…", "Ready", "wait"],
  armed: ["…", "Arming", "wait"],
  running: ["▶", "Running", "run"],
  completed: ["✓", "Completed", "ok"],
  aborted: ["■", "Aborted", "bad"],
  faulted: ["⚠", "Tripped", "bad"],
  interrupted: ["■", "Interrupted", "bad"],
};
const STOPPED_SESSIONS = new Set(["aborted", "faulted", "interrupted"]);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  for (const c of children) node.append(c);
  return node;
}

function setBadge(node, [icon, words, tone], detail = "") {
  const text = detail ? `${words}: ${detail}` : words;
  node.dataset.tone = tone;
  node.dataset.value = words.toLowerCase();
  node.textContent = "";
  node.append(el("span", { "aria-hidden": "true" }, icon + " "), text);
}

const num = (v, digits = 3) => (v === null || v === undefined || Number.isNaN(Number(v)) ? "—" : Number(v).toPrecision(digits));
function duration(s) {
  if (s === null || s === undefined) return "—";
  const t = Math.max(0, Math.round(Number(s)));
  const h = Math.floor(t / 3600), m = Math.floor((t % 3600) / 60), sec = t % 60;
  const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(sec).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}
// Event times in the clinic's own time zone (pbmd sends UTC).
const localTime = (ts) => (ts ? new Date(ts).toLocaleTimeString([], { hour12: false }) : "");
const slug = (s) => String(s).replace(/[^A-Za-z0-9_-]/g, "_");

export class View {
  constructor(doc) {
    this.main = doc.getElementById("workstations");
    this.nav = doc.getElementById("ws-nav");
    this.empty = doc.getElementById("empty");
    this.alerts = doc.getElementById("alerts");
    this.conn = doc.getElementById("conn");
    this.sections = new Map();
    this.linkUp = false;
    this.main.addEventListener("keydown", (e) => this.onKey(e));
  }

  connection(state, words) {
    this.linkUp = state === "connected";
    const icons = { connected: "●", reconnecting: "↻", connecting: "…", offline: "○" };
    this.conn.dataset.state = state;
    this.conn.querySelector(".icon").textContent = icons[state] || "…";
    this.conn.querySelector(".text").textContent = words;
  }

  alert(text) {
    const p = el("p", {}, el("span", { "aria-hidden": "true" }, "⚠ "), text);
    this.alerts.prepend(p);
    while (this.alerts.childElementCount > 5) this.alerts.lastElementChild.remove();
  }

  /** Arrow keys move between port cards; Home/End to the first/last. */
  onKey(e) {
    const cards = [...this.main.querySelectorAll(".port")];
    const i = cards.indexOf(document.activeElement);
    if (i < 0) return;
    const to = { ArrowRight: i + 1, ArrowDown: i + 1, ArrowLeft: i - 1, ArrowUp: i - 1, Home: 0, End: cards.length - 1 }[e.key];
    if (to === undefined) return;
    e.preventDefault();
    cards[Math.max(0, Math.min(cards.length - 1, to))].focus();
  }

  render(fleet) {
    const ids = [...fleet.devices.keys()].sort();
    this.empty.hidden = ids.length > 0;
    for (const id of ids) this.renderDevice(fleet, fleet.devices.get(id));
  }

  section(id) {
    let s = this.sections.get(id);
    if (s) return s;
    const hid = `ws-${slug(id)}`;
    const name = el("span", {}, id);
    const status = el("span", { class: "badge status" });
    const session = el("span", { class: "badge session" });
    const heading = el("h2", { id: `${hid}-h` }, name, status, session);
    const meta = el("p", { class: "meta" });
    // Shown, not announced: the page's one alert region (#alerts) announces trips.
    const trip = el("p", { class: "trip" });
    const ports = el("div", { class: "ports" });
    const events = el("ol", { class: "events", "aria-label": `Latest events on ${id}` });
    const node = el("section", { class: "ws", id: hid, "data-device": id, "aria-labelledby": `${hid}-h`, tabindex: "0" },
      heading, meta, trip, ports, el("h4", {}, "Latest events"), events);
    const sorted = [...this.sections.keys(), id].sort();
    const after = sorted.indexOf(id) + 1 < sorted.length ? this.sections.get(sorted[sorted.indexOf(id) + 1]) : null;
    this.main.insertBefore(node, after ? after.node : null);
    const link = el("li", {}, el("a", { href: `#${hid}` }, id));
    this.nav.insertBefore(link, after ? after.link : null);
    s = { node, link, status, session, meta, trip, ports, events, cards: new Map(), eventIds: "" };
    this.sections.set(id, s);
    return s;
  }

  renderDevice(fleet, d) {
    const s = this.section(d.id);
    const online = d.status === "online";
    // With the broker out of reach, what a workstation last said is not its present.
    if (!this.linkUp) setBadge(s.status, ["?", "Not known", "off"], "broker unreachable");
    else setBadge(s.status, online ? ["●", "Online", "ok"] : d.status === "offline" ? ["○", "Offline", "off"] : ["?", "Unknown", "off"]);
    const sess = d.session;
    const sstate = sess?.state || "idle";
    setBadge(s.session, SESSION_STATES[sstate] || ["?", sstate, "off"]);
    const ctl = d.state?.controllers?.[0];
    const bits = [];
    if (sess?.protocol_id) bits.push(`Protocol ${sess.protocol_id} v${sess.protocol_version}`);
    if (ctl) bits.push(`Controller ${ctl.name}: ${ctl.state ?? "unknown"}${ctl.fault && ctl.fault !== "none" ? `, fault ${ctl.fault}` : ""}`);
    if (d.state?.service_required) bits.push(`Service required: ${d.state.service_required}`);
    s.meta.textContent = bits.join(" · ");
    let tripText = "";
    if (STOPPED_SESSIONS.has(sstate)) {
      const cause = causeText(sess.cause_code, sess.cause_message);
      const trip = sess.trip && !cause.includes(sess.trip) ? ` (${sess.trip})` : "";
      tripText = `⚠ ${SESSION_STATES[sstate][1]}: ${cause}${trip}`;
    }
    if (s.trip.textContent !== tripText) s.trip.textContent = tripText;
    const seen = new Set();
    for (const info of fleet.portsOf(d)) {
      seen.add(info.port);
      this.renderPort(s, d, info, sstate);
    }
    for (const [n, card] of s.cards) if (!seen.has(n)) { card.node.remove(); s.cards.delete(n); }
    const ids = d.events.map((e) => e.id).join();
    if (ids !== s.eventIds) {
      s.eventIds = ids;
      s.events.replaceChildren(...d.events.map((e) => el("li", { "data-severity": e.severity || "info", "data-kind": e.kind },
        `${localTime(e.ts)} ${e.port ? `port ${e.port} ` : ""}${e.kind}${e.code ? ` ${e.code}` : ""}: ${e.message || ""}`)));
    }
  }

  card(s, d, n) {
    let c = s.cards.get(n);
    if (c) return c;
    const hid = `ws-${slug(d.id)}-p${n}`;
    const state = el("span", { class: "badge port-state" });
    const fields = {};
    const dl = el("dl");
    for (const [key, label] of [["step", "Step"], ["site", "Site"], ["wavelength", "Wavelength"], ["progress", "Progress"],
      ["irradiance", "Irradiance"], ["fluence", "Fluence"], ["energy", "Energy"], ["remaining", "Time left"]]) {
      fields[key] = el("dd", { "data-field": key });
      dl.append(el("dt", {}, label), fields[key]);
    }
    const fill = el("span");
    const bar = el("div", { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": "0", "aria-labelledby": `${hid}-h` }, fill);
    const chart = document.createElementNS(SVG, "svg");
    chart.setAttribute("class", "chart");
    chart.setAttribute("viewBox", "0 0 240 80");
    chart.setAttribute("preserveAspectRatio", "none");
    chart.setAttribute("role", "img");
    const node = el("article", { class: "port", "data-port": String(n), tabindex: "0", "aria-labelledby": `${hid}-h` },
      el("h3", { id: `${hid}-h` }, el("span", {}, `Port ${n}`), state), bar, dl, chart);
    const after = [...s.cards.keys()].filter((k) => k > n).sort((a, b) => a - b)[0];
    s.ports.insertBefore(node, after !== undefined ? s.cards.get(after).node : null);
    c = { node, state, fields, bar, fill, chart };
    s.cards.set(n, c);
    return c;
  }

  renderPort(s, d, { port, planned, hw, dose }, sstate) {
    const c = this.card(s, d, port);
    const pstate = planned?.state || "idle";
    const words = PORT_STATES[pstate] || ["?", pstate, "off"];
    const tone = pstate === "stopped" && !STOPPED_SESSIONS.has(sstate) ? ["■", "Stopped", "off"] : words;
    setBadge(c.state, tone, planned?.wait_reason && pstate !== "emitting" ? planned.wait_reason : "");
    c.node.dataset.state = pstate;
    const live = dose && planned && dose.step === planned.step ? dose : pstate === "done" ? dose : null;
    const f = c.fields;
    f.step.textContent = planned ? `${planned.step + 1} of ${planned.steps}` : "—";
    f.site.textContent = planned?.label || planned?.site || hw?.applicator?.kind || "—";
    f.wavelength.textContent = planned?.wavelength_nm ? `${planned.wavelength_nm} nm` : "—";
    // Dose samples are not retained: a page opened while a port waits or is paused
    // does not know its progress until the port emits again, and says so.
    const fraction = live ? Math.max(0, Math.min(1, Number(live.fraction) || 0)) : pstate === "done" ? 1 : null;
    const pct = fraction === null ? 0 : Math.round(fraction * 100);
    f.progress.textContent = fraction === null ? "—" : `${pct} %`;
    c.bar.setAttribute("aria-valuenow", String(pct));
    c.bar.setAttribute("aria-valuetext", fraction === null ? "not known until the port emits" : `${pct} % of the step's dose`);
    c.fill.style.width = `${pct}%`;
    f.irradiance.textContent = live && live.emitting ? `${num(live.irradiance_mw_cm2)} mW/cm²` : "—";
    f.fluence.textContent = live ? `${num(live.fluence_j_cm2)} of ${num(live.target_fluence_j_cm2)} J/cm²` : "—";
    f.energy.textContent = live ? `${num(live.energy_j)} of ${num(live.target_energy_j)} J` : "—";
    f.remaining.textContent = live && live.emitting ? duration(live.remaining_s) : pstate === "done" ? "0:00" : "—";
    this.drawChart(c.chart, port, d, live);
  }

  drawChart(svg, port, d, live) {
    const series = live ? d.ports.get(port)?.series || [] : [];
    const target = live ? Number(live.target_energy_j) || 0 : 0;
    const last = series[series.length - 1];
    const xMax = Math.max(1, live ? Number(live.elapsed_s) + Number(live.remaining_s || 0) : 1, last ? last[0] : 0);
    const yMax = Math.max(target, ...series.map((p) => p[1]), 1e-9) * 1.08;
    const x = (v) => 4 + (v / xMax) * 232, y = (v) => 74 - (v / yMax) * 68;
    const parts = [`<line class="axis" x1="4" y1="74" x2="236" y2="74"/>`, `<line class="axis" x1="4" y1="6" x2="4" y2="74"/>`];
    if (target) parts.push(`<line class="target" x1="4" x2="236" y1="${y(target).toFixed(1)}" y2="${y(target).toFixed(1)}"/>`, `<text x="200" y="${(y(target) - 2).toFixed(1)}">target</text>`);
    if (series.length) parts.push(`<polyline class="dose" points="${series.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")}"/>`);
    svg.innerHTML = parts.join("");
    svg.setAttribute("aria-label", live
      ? `Dose over time, port ${port}: ${num(live.energy_j)} of ${num(target)} J after ${duration(live.elapsed_s)}`
      : `Dose over time, port ${port}: no dose yet in this step`);
  }
}
