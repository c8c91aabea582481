// Connects straight to the broker over MQTT over WebSockets (read-only credentials),
// subscribes to every workstation under pbm/v1/#, and redraws at most ten times a
// second. mqtt.js reconnects by itself; retained status/state/session come back on
// every (re)subscription, and pbmd re-publishes them when the broker restarts.
import mqtt from "mqtt";
import { Fleet } from "./store.js";
import { View } from "./view.js";

function settings() {
  const base = window.PBM_DASHBOARD || {};
  const q = new URLSearchParams(location.search);
  const host = location.hostname || "localhost";
  return {
    url: q.get("broker") || base.url || `ws://${host}:9001`,
    username: q.get("username") || base.username || undefined,
    password: q.get("password") || base.password || undefined,
    root: q.get("root") || base.topicRoot || "pbm/v1",
  };
}

const cfg = settings();
const fleet = new Fleet(cfg.root);
const view = new View(document);
let pending = null;
const redraw = () => {
  if (pending === null) pending = setTimeout(() => { pending = null; view.render(fleet); }, 100);
};

const client = mqtt.connect(cfg.url, {
  protocolVersion: 5,
  clientId: `pbm-dashboard-${Math.random().toString(16).slice(2, 10)}`,
  username: cfg.username,
  password: cfg.password,
  clean: true,
  reconnectPeriod: 1000,
  connectTimeout: 5000,
  keepalive: 20,
});
client.on("connect", () => {
  view.connection("connected", `Connected to ${cfg.url}`);
  redraw();
  client.subscribe(`${cfg.root}/#`, { qos: 1 }, (err) => {
    if (err) view.connection("offline", `Not allowed to read ${cfg.root}/#: ${err.message}`);
  });
});
const down = (words) => {
  view.connection("reconnecting", words);
  redraw();
};
client.on("reconnect", () => down(`Reconnecting to ${cfg.url}…`));
client.on("offline", () => down("Broker unreachable, retrying…"));
client.on("error", (err) => down(`Broker error: ${err.message}; retrying…`));
client.on("message", (topic, payload) => {
  const trip = fleet.handle(topic, new TextDecoder().decode(payload));
  if (trip) view.alert(trip.text);
  redraw();
});
window.pbmDashboard = { client, fleet };
