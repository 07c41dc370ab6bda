// The operator's console: the fleet and each camera, from the relay's operator API
// (docs/api.yaml), kept live by its event stream (GET /events, docs/events.md).
// Plain JavaScript, no build step: the relay serves this file as it is.

const TOKEN_KEY = "camera-relay.admin-token";
const PAGE_SIZE = 50;
// /streams and /traffic (one request each for the whole fleet) refresh media health,
// RTT and the sparklines; cameras' comings and goings arrive as events.
const REFRESH_MS = 10_000;
const EVENTS_SHOWN = 200;
// In a cluster, other relays' cameras change without an event here: the fleet is read
// again this often (one request).
const CLUSTER_REFRESH_MS = 60_000;

const $ = (selector) => document.querySelector(selector);

const state = {
  cameras: new Map(), // id → the camera as GET /agents shows it, plus `since` (ms)
  ids: [], // sorted
  streams: new Map(), // connection id → a Watcher session as GET /streams shows it
  traffic: new Map(), // id → { bytes_per_sec, data_link, quic_rtt_ms }
  trafficEvery: 10,
  matches: [],
  page: 0,
  running: null, // AbortController of what runs while signed in
  camera: null, // { id, abort } of the camera page shown
  renderQueued: false,
  timings: { cameras: 0, filter_ms: 0, render_ms: 0 },
};
// Read by the tests and the bench (how long a search takes at 10,000 cameras).
window.consoleTimings = state.timings;

// ---------------------------------------------------------------- the API

class SignedOut extends Error {}

function authHeaders(token = sessionStorage.getItem(TOKEN_KEY)) {
  const headers = new Headers();
  if (token) headers.set("Authorization", `Bearer ${token}`);
  return headers;
}

async function api(path, { method = "GET", json, signal } = {}) {
  const headers = authHeaders();
  let body;
  if (json !== undefined) {
    headers.set("Content-Type", "application/json");
    body = JSON.stringify(json);
  }
  const response = await fetch(path, { method, headers, body, signal, cache: "no-store" });
  if (response.status === 401) {
    signOut("The relay no longer accepts this token. Sign in again.");
    throw new SignedOut();
  }
  const answer = await response.json().catch(() => null);
  if (!response.ok) {
    throw new Error(answer?.error ?? `${response.status} ${response.statusText}`);
  }
  return answer;
}

// Follows an event stream (server-sent events read with fetch(), which can send the
// token; EventSource cannot), resuming after a cut from the last id seen.
async function follow(path, onEvent, signal, onLive = () => {}) {
  let last = null;
  let backoff = 1_000;
  while (!signal.aborted) {
    try {
      const headers = authHeaders();
      if (last !== null) headers.set("Last-Event-ID", last);
      const response = await fetch(path, { headers, signal, cache: "no-store" });
      if (response.status === 401) {
        signOut("The relay no longer accepts this token. Sign in again.");
        return;
      }
      if (!response.ok) throw new Error(`${response.status}`);
      onLive(true);
      backoff = 1_000;
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value.replace(/\r\n?/g, "\n");
        let end;
        while ((end = buffer.indexOf("\n\n")) >= 0) {
          const event = parseEvent(buffer.slice(0, end));
          buffer = buffer.slice(end + 2);
          if (!event) continue;
          if (event.id !== null) last = event.id;
          onEvent(event.data);
        }
      }
    } catch (error) {
      if (signal.aborted) return;
    }
    onLive(false);
    await sleep(backoff, signal);
    backoff = Math.min(backoff * 2, 15_000);
  }
}

function parseEvent(block) {
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith(":")) continue; // keep-alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (data.length === 0) return null;
  try {
    return { id, data: JSON.parse(data.join("\n")) };
  } catch {
    return null;
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal?.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

// ---------------------------------------------------------------- signing in

function showOnly(section) {
  for (const id of ["login", "fleet", "camera"]) $(`#${id}`).hidden = id !== section;
}

async function signIn(event) {
  event.preventDefault();
  const token = $("#token").value.trim();
  const error = $("#login-error");
  error.textContent = "";
  let response;
  try {
    // A small answer: /agents of a big fleet is read once, after this.
    response = await fetch("/streams", { headers: authHeaders(token), cache: "no-store" });
  } catch {
    error.textContent = "Cannot reach the relay. Is it running, and is this its control address?";
    return;
  }
  if (response.status === 401) {
    error.textContent = token
      ? "The relay refused this token. Check admin_token in relay.toml (or --admin-token)."
      : "This relay has an admin token: type it in.";
    return;
  }
  if (!response.ok) {
    const answer = await response.json().catch(() => null);
    error.textContent = answer?.error ?? `The relay answered ${response.status}.`;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#token").value = "";
  start();
}

function signOut(why = "") {
  sessionStorage.removeItem(TOKEN_KEY);
  state.running?.abort();
  state.running = null;
  leaveCamera();
  state.cameras.clear();
  state.streams.clear();
  state.traffic.clear();
  $("#logout").hidden = true;
  setLive(null);
  showOnly("login");
  $("#login-error").textContent = why;
  $("#token").focus();
}

// ---------------------------------------------------------------- the fleet's data

function start() {
  state.running?.abort();
  const running = new AbortController();
  state.running = running;
  $("#logout").hidden = false;
  // Events that arrive while the first listing loads are applied after it.
  let held = [];
  follow("/events", (event) => (held ? held.push(event) : applyEvent(event)), running.signal, setLive);
  loadAll(running.signal)
    .then(() => {
      for (const event of held) applyEvent(event);
      route();
    })
    .catch(failed)
    .finally(() => (held = null));
  refreshLoop(running.signal);
  loadRelayName(running.signal);
}

async function loadAll(signal) {
  const [{ agents }] = await Promise.all([api("/agents", { signal }), refreshLive(signal)]);
  // Built aside: withSince keeps what the page learnt (an offline camera's since).
  state.cameras = new Map(agents.map((agent) => [agent.id, withSince(agent)]));
  sortIds();
  queueRender();
}

async function loadRelayName(signal) {
  const health = await fetch("/health", { cache: "no-store" }).then((r) => r.json()).catch(() => null);
  if (!health) return;
  const relay = health.cluster ? `relay ${health.cluster.relay} of ${health.cluster.relays.length}` : "one relay";
  $("#relay-name").textContent = `${relay} · v${health.version}`;
  while (health.cluster && !signal.aborted) {
    await sleep(CLUSTER_REFRESH_MS, signal);
    if (!signal.aborted) await loadAll(signal).catch(failed);
  }
}

async function refreshLive(signal) {
  const [{ streams }, traffic] = await Promise.all([
    api("/streams", { signal }),
    api("/traffic", { signal }),
  ]);
  const now = Date.now();
  // A stall is known from the events only.
  state.streams = new Map(streams.map((s) => [s.id, {
    ...s, opened: now - s.age_secs * 1000, stalled: state.streams.get(s.id)?.stalled ?? false,
  }]));
  state.traffic = new Map(traffic.cameras.map((t) => [t.id, t]));
  state.trafficEvery = traffic.every_secs;
  queueRender();
}

async function refreshLoop(signal) {
  while (!signal.aborted) {
    await sleep(REFRESH_MS, signal);
    if (signal.aborted) return;
    await refreshLive(signal).catch(() => {});
  }
}

async function refreshCamera(id) {
  try {
    const agent = await api(`/agents/${encodeURIComponent(id)}`);
    state.cameras.set(id, withSince(agent));
    sortIds();
    queueRender();
  } catch (error) {
    if (!(error instanceof SignedOut)) console.warn(`camera ${id}: ${error.message}`);
  }
}

// When the camera came online, or went offline, as far as the relay knows.
function withSince(agent) {
  const secs = agent.online ? agent.registered_secs_ago : agent.offline_secs;
  const since = secs !== undefined && secs !== null
    ? Date.now() - secs * 1000
    : state.cameras.get(agent.id)?.since ?? null;
  // Offline and not seen since the relay started: that long at least.
  const unseenSince = !agent.online && agent.relay_uptime_secs !== undefined
    ? Date.now() - agent.relay_uptime_secs * 1000
    : null;
  return { ...agent, since, unseenSince, search: searchText(agent) };
}

function searchText(agent) {
  return [
    agent.id, agent.relay, agent.remote_addr, agent.agent_version, agent.target,
    agent.camera?.model, ...(agent.labels ?? []), ...(agent.ports ?? []),
  ].filter((part) => part !== null && part !== undefined).join(" ").toLowerCase();
}

function sortIds() {
  state.ids = [...state.cameras.keys()].sort();
}

function updateCamera(id, change) {
  const camera = state.cameras.get(id);
  if (!camera) return refreshCamera(id);
  change(camera);
  camera.search = searchText(camera);
}

// Applies one event to what the page shows.
function applyEvent(event) {
  const id = event.camera;
  const data = event.data ?? {};
  switch (event.type) {
    case "camera.online":
      refreshCamera(id);
      break;
    case "camera.offline":
      updateCamera(id, (camera) => {
        Object.assign(camera, { online: false, data_link: null, quic_rtt_ms: null });
        camera.since = Date.parse(event.time);
        camera.offline_reason = data.detail || data.reason;
      });
      for (const [key, stream] of state.streams) if (stream.camera === id) state.streams.delete(key);
      // Sent to another relay of the cluster: online there, once it has registered.
      if (data.reason === "moved") setTimeout(() => refreshCamera(id), 3_000);
      break;
    case "camera.link":
      updateCamera(id, (camera) => (camera.data_link = data.link));
      break;
    case "camera.port_assigned":
      updateCamera(id, (camera) => (camera.ports = [data.port]));
      break;
    case "watcher.started":
      state.streams.set(data.connection_id, {
        id: data.connection_id, camera: id, watcher: data.watcher,
        opened: Date.now(), media: null,
      });
      break;
    case "watcher.ended":
      state.streams.delete(data.connection_id);
      break;
    case "watcher.stalled":
    case "watcher.resumed": {
      const stream = state.streams.get(data.connection_id);
      if (stream) stream.stalled = event.type === "watcher.stalled";
      break;
    }
    case "events.lost":
      // Too far behind to patch: read everything again.
      if (state.running) loadAll(state.running.signal).catch(failed);
      break;
  }
  queueRender();
}

function failed(error) {
  if (error instanceof SignedOut || error?.name === "AbortError") return;
  $("#summary").textContent = `Could not load the fleet: ${error.message}`;
}

function setLive(live) {
  const badge = $("#live");
  badge.className = live === null ? "live" : live ? "live on" : "live off";
  badge.textContent = live === null ? "" : live ? "Live" : "Reconnecting…";
}

// ---------------------------------------------------------------- the fleet page

function sessionsOf(id) {
  return [...state.streams.values()].filter((s) => s.camera === id);
}

// Each camera's Watcher sessions, grouped once per render.
function sessionsByCamera() {
  const by = new Map();
  for (const stream of state.streams.values()) {
    const list = by.get(stream.camera);
    if (list) list.push(stream);
    else by.set(stream.camera, [stream]);
  }
  return by;
}

function health(sessions) {
  const media = sessions.map((s) => s.media).filter(Boolean);
  return {
    bitrate: media.reduce((sum, m) => sum + (m.bitrate ?? 0), 0),
    fps: media.length ? Math.min(...media.map((m) => m.fps ?? 0)) : null,
    lost: media.reduce((sum, m) => sum + m.lost, 0),
    stalls: media.reduce((sum, m) => sum + m.stalls, 0),
    stalled: sessions.some((s) => s.stalled),
  };
}

// Online without a data link, or a Watcher that lost packets or stalled.
function inTrouble(camera, sessions) {
  if (!camera.online) return false;
  if (!camera.data_link) return true;
  const h = health(sessions);
  return h.stalled || h.lost > 0 || h.stalls > 0;
}

function matches(camera, query, show, sessions) {
  if (query && !camera.search.includes(query)) return false;
  switch (show) {
    case "online": return camera.online;
    case "offline": return !camera.online;
    case "watched": return sessions.length > 0;
    case "trouble": return inTrouble(camera, sessions);
    default: return true;
  }
}

function queueRender() {
  if (state.renderQueued) return;
  state.renderQueued = true;
  requestAnimationFrame(() => {
    state.renderQueued = false;
    render();
  });
}

function render() {
  if (!$("#fleet").hidden) renderFleet();
  if (state.camera && !$("#camera").hidden) renderCamera();
}

function renderFleet() {
  const t0 = performance.now();
  const query = $("#search").value.trim().toLowerCase();
  const show = $("#show").value;
  const sessions = sessionsByCamera();
  state.matches = state.ids.filter((id) =>
    matches(state.cameras.get(id), query, show, sessions.get(id) ?? []));
  const t1 = performance.now();
  const pages = Math.max(1, Math.ceil(state.matches.length / PAGE_SIZE));
  state.page = Math.min(state.page, pages - 1);
  const shown = state.matches.slice(state.page * PAGE_SIZE, (state.page + 1) * PAGE_SIZE);
  $("#cameras tbody").replaceChildren(...shown.map((id) => cameraRow(state.cameras.get(id), sessions.get(id) ?? [])));
  $("#empty").hidden = state.matches.length > 0;
  $("#page").textContent = `Page ${state.page + 1} of ${pages}`;
  $("#prev").disabled = state.page === 0;
  $("#next").disabled = state.page >= pages - 1;

  const online = state.ids.filter((id) => state.cameras.get(id).online).length;
  const filtered = state.matches.length === state.ids.length ? "" : `, ${state.matches.length} shown`;
  $("#summary").textContent =
    `${online} of ${state.ids.length} online · ${state.streams.size} Watcher sessions${filtered}`;
  Object.assign(state.timings, {
    cameras: state.ids.length,
    filter_ms: t1 - t0,
    render_ms: performance.now() - t0,
  });
}

function cameraRow(camera, sessions) {
  const traffic = state.traffic.get(camera.id);
  const link = camera.data_link ?? traffic?.data_link;
  const rtt = traffic?.quic_rtt_ms ?? camera.quic_rtt_ms;
  const row = h("tr", { "data-camera": camera.id });
  row.append(
    h("td", { "data-label": "State" }, stateBadge(camera)),
    h("td", { "data-label": "Camera" },
      h("a", { href: `#/camera/${encodeURIComponent(camera.id)}` }, camera.id)),
    h("td", { "data-label": "Relay" }, camera.relay ?? "this relay"),
    h("td", { "data-label": "Data link" }, linkText(camera.online, link, rtt)),
    h("td", { "data-label": "Port", class: "num" }, (camera.ports ?? []).join(", ") || "—"),
    h("td", { "data-label": "URL" }, urlCell(camera)),
    h("td", { "data-label": "Watchers" }, watchersText(sessions)),
    h("td", { "data-label": "Traffic" }, sparkline(traffic?.bytes_per_sec ?? [], camera.id)),
  );
  return row;
}

function stateBadge(camera) {
  const word = camera.online ? "online" : "offline";
  const badge = h("span", { class: `state ${word}` }, word);
  if (camera.since) {
    badge.append(" ", h("span", { class: "since" }, `for ${ago(camera.since)}`));
  } else if (!camera.online && camera.unseenSince) {
    badge.append(" ", h("span", { class: "since" }, `not seen in ${ago(camera.unseenSince)}`));
  }
  return badge;
}

function linkText(online, link, rtt) {
  if (!online) return "—";
  if (!link) return h("span", { class: "trouble" }, "none yet");
  const name = link === "quic" ? "QUIC" : link === "tcp" ? "TCP (fallback)" : link;
  return rtt === null || rtt === undefined ? name : `${name}, ${rtt.toFixed(1)} ms`;
}

function watchersText(sessions) {
  if (sessions.length === 0) return "—";
  const m = health(sessions);
  const parts = [`${sessions.length} live`];
  if (m.bitrate) parts.push(bits(m.bitrate));
  if (m.fps) parts.push(`${m.fps.toFixed(0)} fps`);
  const trouble = [];
  if (m.stalled) trouble.push("stalled");
  if (m.lost) trouble.push(`${m.lost} lost`);
  if (m.stalls) trouble.push(`${m.stalls} stalls`);
  const text = h("span", {}, parts.join(" · "));
  if (trouble.length) text.append(" · ", h("span", { class: "trouble" }, trouble.join(", ")));
  return text;
}

function urlCell(camera) {
  const url = camera.urls?.[0];
  if (!url) return camera.online ? "—" : h("span", { class: "muted" }, "when online");
  const field = h("input", {
    type: "text", readonly: "", value: url, "aria-label": `URL of ${camera.id} for the VMS`,
  });
  const button = h("button", { type: "button", class: "small", "aria-label": `Copy the URL of ${camera.id}` }, "Copy");
  button.addEventListener("click", () => copy(field, button));
  return h("div", { class: "url" }, field, button);
}

async function copy(field, button) {
  let done = false;
  try {
    await navigator.clipboard.writeText(field.value);
    done = true;
  } catch {
    // Not a secure context (plain http to another host): the old way.
    field.select();
    done = document.execCommand("copy");
  }
  button.textContent = done ? "Copied" : "Select and copy";
  setTimeout(() => (button.textContent = "Copy"), 2_000);
}

function sparkline(rates, id) {
  const width = 120;
  const height = 26;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("width", width);
  svg.setAttribute("height", height);
  svg.setAttribute("viewBox", `0 0 ${width} ${height}`);
  svg.setAttribute("role", "img");
  const now = rates.at(-1) ?? 0;
  const peak = Math.max(0, ...rates);
  svg.setAttribute("aria-label", rates.length
    ? `${id}: ${bits(now * 8)} now, peak ${bits(peak * 8)} in the last ${Math.round(rates.length * state.trafficEvery / 60)} min`
    : `${id}: no traffic sampled yet`);
  const base = document.createElementNS(svg.namespaceURI, "line");
  Object.entries({ x1: 0, x2: width, y1: height - 1, y2: height - 1, class: "base" })
    .forEach(([k, v]) => base.setAttribute(k, v));
  svg.append(base);
  if (rates.length > 1) {
    const step = width / (60 - 1);
    const x0 = width - step * (rates.length - 1);
    const points = rates.map((r, i) =>
      `${(x0 + i * step).toFixed(1)},${(height - 2 - (peak ? (r / peak) * (height - 4) : 0)).toFixed(1)}`);
    const line = document.createElementNS(svg.namespaceURI, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.append(line);
  }
  return svg;
}

// ---------------------------------------------------------------- one camera

function route() {
  if (!state.running) return;
  const match = location.hash.match(/^#\/camera\/(.+)$/);
  if (match) {
    openCamera(decodeURIComponent(match[1]));
  } else {
    leaveCamera();
    showOnly("fleet");
    renderFleet();
  }
}

function openCamera(id) {
  if (state.camera?.id !== id) {
    leaveCamera();
    const abort = new AbortController();
    state.camera = { id, abort };
    $("#events").replaceChildren();
    $("#action-result").replaceChildren();
    // Its history first, then live.
    follow(`/events?camera=${encodeURIComponent(id)}&after=0`, showEvent, abort.signal);
    refreshCamera(id);
  }
  showOnly("camera");
  renderCamera();
  $("#camera-title").focus?.();
}

function leaveCamera() {
  state.camera?.abort.abort();
  state.camera = null;
}

function renderCamera() {
  const id = state.camera.id;
  const camera = state.cameras.get(id);
  $("#camera-title").textContent = id;
  if (!camera) {
    $("#camera-state").textContent = "Not known to this relay.";
    return;
  }
  $("#camera-state").replaceChildren(stateBadge(camera),
    camera.offline_reason && !camera.online ? ` — ${camera.offline_reason}` : "");
  const traffic = state.traffic.get(id);
  const rows = [
    ["Relay", camera.relay ?? "this relay"],
    ["Data link", linkText(camera.online, camera.data_link ?? traffic?.data_link,
      traffic?.quic_rtt_ms ?? camera.quic_rtt_ms)],
    ["Port", (camera.ports ?? []).join(", ") || "—"],
    ["URLs for the VMS", camera.urls?.length ? h("span", {}, ...camera.urls.map((u) => h("div", {}, h("code", {}, u)))) : "—"],
    ["Camera", camera.camera ? `${camera.camera.model}, RTSP port ${camera.camera.rtsp_port}` : "—"],
    ["Agent", [camera.agent_version, camera.target].filter(Boolean).join(" on ") || "—"],
    ["Labels", camera.labels?.join(", ") || "—"],
    ["Updates", camera.takes_updates === undefined ? "—" : camera.takes_updates ? "takes signed updates" : "does not take updates"],
    ["Control from", camera.remote_addr ?? "—"],
    ["QUIC from", camera.quic_remote_addr ?? "—"],
    ["Client certificate", camera.client_certificate === undefined ? "—" : camera.client_certificate ? "yes" : "no"],
    ["Last heartbeat", camera.last_heartbeat_secs_ago === undefined || camera.last_heartbeat_secs_ago === null
      ? "—" : `${camera.last_heartbeat_secs_ago.toFixed(0)} s before this page read it`],
    ["Traffic, last 10 min", sparkline(traffic?.bytes_per_sec ?? [], id)],
  ];
  $("#details").replaceChildren(...rows.flatMap(([term, value]) => [h("dt", {}, term), h("dd", {}, value)]));

  const sessions = sessionsOf(id);
  $("#sessions tbody").replaceChildren(...sessions.map((s) => {
    const m = s.media ?? {};
    return h("tr", {},
      h("td", {}, s.watcher, s.stalled ? h("span", { class: "trouble" }, " stalled") : ""),
      h("td", { class: "num" }, ago(s.opened)),
      h("td", { class: "num" }, m.bitrate ? bits(m.bitrate) : "—"),
      h("td", { class: "num" }, m.fps ? m.fps.toFixed(1) : "—"),
      h("td", { class: "num" }, m.lost ?? "—"),
      h("td", { class: "num" }, m.stalls ?? "—"));
  }));
  $("#no-sessions").hidden = sessions.length > 0;
  // On another relay of the cluster too: the API forwards the action to it.
  for (const button of document.querySelectorAll("#camera [data-action]")) {
    button.disabled = !camera.online;
  }
}

function showEvent(event) {
  if (event.type === "events.lost") return;
  const list = $("#events");
  list.prepend(h("li", {},
    h("time", { datetime: event.time }, new Date(event.time).toLocaleTimeString()),
    h("span", { class: "type" }, event.type),
    h("span", {}, describe(event))));
  while (list.children.length > EVENTS_SHOWN) list.lastElementChild.remove();
}

function describe(event) {
  const d = event.data ?? {};
  switch (event.type) {
    case "camera.online": return `from ${d.remote}, agent ${d.agent_version}, port ${d.port}`;
    case "camera.offline": return `${d.reason}: ${d.detail} (was online ${d.online_secs} s)`;
    case "camera.replaced": return `${d.old_remote} → ${d.new_remote}`;
    case "camera.port_assigned": return `port ${d.port}${d.previous ? ` (was ${d.previous})` : ""}`;
    case "camera.link": return `${d.previous ?? "none"} → ${d.link ?? "none"}`;
    case "watcher.started": return `${d.watcher} connected`;
    case "watcher.ended": {
      const media = d.media ? `, ${d.media.frames} frames, ${d.media.lost} lost, ${d.media.stalls} stalls` : "";
      return `${d.watcher} after ${d.duration_secs.toFixed(1)} s${media}${d.error ? ` — ${d.error}` : ""}`;
    }
    case "watcher.stalled": return `no media for ${d.silent_secs} s`;
    case "watcher.resumed": return `media back after ${d.gap_secs} s`;
    case "update.progress":
      return `${d.release}: ${d.state}${d.size ? ` ${Math.round((100 * d.bytes) / d.size)} %` : ""}${d.detail ? ` — ${d.detail}` : ""}`;
    default: return JSON.stringify(d);
  }
}

// What each action does, and what to warn about before it.
const ACTIONS = {
  ping: { label: "Ping" },
  stats: { label: "Stats" },
  reload_config: {
    label: "Reload config",
    warn: "The agent reads its config file again. Changes that need a restart are listed, not applied.",
  },
  tunnel_restart: {
    label: "Restart tunnel",
    warn: "The camera's QUIC connection is closed and dialled again: every Watcher of this camera loses its video and must reconnect.",
  },
  reconnect: {
    label: "Reconnect",
    warn: "The agent drops its links to the relay and dials again: video stops for every Watcher of this camera for a few seconds.",
  },
  restart: {
    label: "Restart agent",
    warn: "The agent process restarts on the camera: video stops for every Watcher of this camera until it is back.",
  },
  update: { label: "Update" },
};

async function runAction(name) {
  const id = state.camera?.id;
  if (!id) return;
  const action = ACTIONS[name];
  const result = $("#action-result");
  try {
    let answer;
    if (name === "update") {
      answer = await update(id);
      if (!answer) return;
    } else {
      if (action.warn && !(await confirmAction(`${action.label} ${id}?`, action.warn, action.label))) return;
      result.replaceChildren(`${action.label}…`);
      answer = name === "tunnel_restart"
        ? await api(`/tunnels/${encodeURIComponent(id)}/restart`, { method: "POST" })
        : await api(`/agents/${encodeURIComponent(id)}/control`, { method: "POST", json: { command: name } });
    }
    result.replaceChildren(h("strong", {}, `${action.label}: `), summarize(name, answer),
      h("details", {}, h("summary", {}, "Answer"), h("pre", {}, JSON.stringify(answer, null, 2))));
  } catch (error) {
    if (error instanceof SignedOut) return;
    result.replaceChildren(h("span", { class: "error" }, `${action.label} failed: ${error.message}`));
  }
}

function summarize(name, answer) {
  const r = answer.result ?? {};
  switch (name) {
    case "ping": {
      const rtt = r.quic_rtt_ms === null || r.quic_rtt_ms === undefined ? "" : `, QUIC RTT ${r.quic_rtt_ms.toFixed(1)} ms`;
      return `pong in ${answer.round_trip_ms.toFixed(1)} ms${rtt}, camera clock ${r.clock_offset_ms >= 0 ? "+" : ""}${r.clock_offset_ms.toFixed(0)} ms`;
    }
    case "tunnel_restart": {
      const n = answer.closed_sessions;
      return `closed, ${n} Watcher session${n === 1 ? "" : "s"} ended`;
    }
    case "reload_config": return `applied: ${r.applied?.join(", ") || "nothing"}; needs a restart: ${r.need_restart?.join(", ") || "nothing"}`;
    case "update": return `${answer.release ?? ""} ${answer.state ?? "started"}; progress follows in the events below`;
    default: return "done";
  }
}

async function update(id) {
  const camera = state.cameras.get(id);
  const { releases } = await api("/releases");
  const fitting = releases.filter((r) => !camera?.target || r.target === camera.target);
  if (fitting.length === 0) {
    throw new Error(`no release for ${camera?.target ?? "this camera's processor"} is uploaded (POST /releases)`);
  }
  const select = h("select", { id: "release", "aria-label": "Release" },
    ...fitting.map((r) => h("option", { value: r.id }, `${r.version} (${r.target}, ${Math.round(r.size / 1024)} KiB)`)));
  const force = h("input", { type: "checkbox", id: "force" });
  const extra = [h("label", { for: "release" }, "Release"), select,
    h("p", {}, force, " ", h("label", { for: "force" }, "Install even if it is not newer"))];
  const ok = await confirmAction(`Update ${id}?`,
    "The agent downloads the release, checks its signature and restarts into it: video stops for a few seconds. It goes back by itself if the new agent does not come online.",
    "Update", extra);
  if (!ok) return null;
  return api(`/agents/${encodeURIComponent(id)}/update`, {
    method: "POST", json: { release: select.value, force: force.checked },
  });
}

function confirmAction(title, text, verb, extra = []) {
  const dialog = $("#confirm");
  $("#confirm-title").textContent = title;
  $("#confirm-text").textContent = text;
  $("#confirm-extra").replaceChildren(...extra);
  $("#confirm-ok").textContent = verb;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
  });
}

// ---------------------------------------------------------------- helpers

function h(tag, attributes = {}, ...children) {
  const element = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "value") element.value = value;
    else element.setAttribute(name, value);
  }
  element.append(...children.filter((c) => c !== null && c !== undefined && c !== ""));
  return element;
}

function ago(since) {
  const secs = Math.max(0, Math.round((Date.now() - since) / 1000));
  if (secs < 60) return `${secs} s`;
  if (secs < 3600) return `${Math.floor(secs / 60)} min`;
  if (secs < 86400) return `${Math.floor(secs / 3600)} h ${Math.floor((secs % 3600) / 60)} min`;
  return `${Math.floor(secs / 86400)} d ${Math.floor((secs % 86400) / 3600)} h`;
}

function bits(perSec) {
  if (perSec >= 1e6) return `${(perSec / 1e6).toFixed(1)} Mbit/s`;
  if (perSec >= 1e3) return `${(perSec / 1e3).toFixed(0)} kbit/s`;
  return `${Math.round(perSec)} bit/s`;
}

// ---------------------------------------------------------------- wiring

function wire() {
  $("#login-form").addEventListener("submit", signIn);
  $("#logout").addEventListener("click", () => signOut());
  $("#search").addEventListener("input", () => {
    state.page = 0;
    renderFleet();
  });
  $("#show").addEventListener("change", () => {
    state.page = 0;
    renderFleet();
  });
  $("#prev").addEventListener("click", () => {
    state.page -= 1;
    renderFleet();
  });
  $("#next").addEventListener("click", () => {
    state.page += 1;
    renderFleet();
  });
  for (const button of document.querySelectorAll("#camera [data-action]")) {
    button.addEventListener("click", () => runAction(button.dataset.action));
  }
  window.addEventListener("hashchange", route);
  // "Since" columns age while nothing happens.
  setInterval(queueRender, 15_000);
  $("#camera-title").tabIndex = -1;

  if (sessionStorage.getItem(TOKEN_KEY) === null) {
    showOnly("login");
    $("#token").focus();
  } else {
    start();
  }
}

wire();
