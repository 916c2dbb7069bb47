// camgateway status page: polls the JSON API every 2 s and redraws.
// Everything a camera sent is inserted as text (textContent), never as HTML.
"use strict";

const POLL_MS = 2000;
const PHOTOS_PER_CAMERA = 4;

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child);
  }
  return node;
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds || 0));
  const h = Math.floor(seconds / 3600), m = Math.floor(seconds / 60) % 60, s = seconds % 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
}

function position(item) {
  const lat = item.latitude, lon = item.longitude;
  if (typeof lat !== "number" || typeof lon !== "number") return "";
  return `${lat.toFixed(5)}, ${lon.toFixed(5)}`;
}

async function api(path) {
  const response = await fetch(path, { cache: "no-store", credentials: "same-origin" });
  if (!response.ok) throw new Error(`${path}: HTTP ${response.status}`);
  return response.json();
}

function fill(tbody, rows) {
  tbody.replaceChildren(...rows);
}

function row(...cells) {
  return el("tr", {}, ...cells.map((c) => (c instanceof Node && c.tagName === "TD" ? c : el("td", { text: c }))));
}

function progressCell(t) {
  if (!t) return el("td", { class: "muted", text: "—" });
  const bar = el("progress", { max: String(Math.max(t.total, 1)), value: String(t.held) });
  const detail = `${bytes(t.held)} of ${bytes(t.total)} · ${bytes(t.rate_bps)}/s` +
    (t.resumed_from ? ` · resumed at ${bytes(t.resumed_from)}` : "") +
    (t.crc_errors ? ` · ${t.crc_errors} CRC errors` : "");
  return el("td", {}, el("div", { class: "progress", title: t.file },
    bar, el("span", { class: "pct", text: `${t.percent.toFixed(1)} %` }), el("span", { class: "detail", text: detail })));
}

function renderCounters(summary, partials) {
  const s = summary.stats;
  const counters = [
    ["files received", s.files_received], ["bytes received", bytes(s.bytes_received)],
    ["connections open", summary.connections_open], ["sessions", summary.sessions],
    ["transfers", summary.transfers], ["resumes", s.resumes],
    ["CRC errors", s.crc_errors, s.crc_errors > 0], ["protocol errors", s.protocol_errors, s.protocol_errors > 0],
    ["delivery failures", s.delivery_failures, s.delivery_failures > 0], ["outbox", summary.outbox_depth],
    ["partials", partials.length], ["spool", bytes(summary.spool_bytes)],
  ];
  document.getElementById("counters").replaceChildren(...counters.map(([label, value, alert]) =>
    el("div", { class: "counter" + (alert ? " alert" : "") },
      el("div", { class: "value", text: String(value) }), el("div", { class: "label", text: label }))));
  document.getElementById("version").textContent = `${summary.version} · up ${duration(summary.uptime_s)}`;
}

function renderSessions(sessions, transfers) {
  const byImei = new Map(transfers.map((t) => [t.imei, t]));
  fill(document.querySelector("#sessions tbody"), sessions.map((s) => row(
    el("td", { class: "mono", text: s.imei || "(no init yet)" }), s.camera, s.peer, s.state,
    duration(s.connected_s), String(s.files_done), progressCell(byImei.get(s.imei)))));
  document.getElementById("no-sessions").hidden = sessions.length > 0;
  document.getElementById("session-count").textContent = sessions.length ? `(${sessions.length})` : "";
}

// Gallery: figures are kept by file id, so an image is fetched once, not every poll.
const figures = new Map();

function caption(f) {
  const parts = [el("div", { class: "when", text: when(f.capture_time || f.received_at) })];
  parts.push(el("div", { text: [f.source, f.trigger_name].filter(Boolean).join(" · ") }));
  const pos = position(f);
  if (pos) parts.push(el("div", { class: "mono", text: pos }));
  return el("figcaption", {}, ...parts);
}

function figureFor(f) {
  let fig = figures.get(f.id);
  if (fig) return fig;
  let thumb;
  if (f.media === "photo" && f.url) {
    const img = el("img", { src: f.url, alt: `${f.source} of camera ${f.imei}`, loading: "lazy", class: "photo" });
    img.addEventListener("load", () => { img.dataset.loaded = "1"; });
    img.addEventListener("error", () => {
      img.replaceWith(el("div", { class: "nopreview", text: "no preview" }));
    });
    thumb = el("a", { class: "thumb", href: f.url, title: f.name || f.sha256 }, img);
  } else {
    // Video: a placeholder poster until sinks make real ones.
    const poster = el("div", { class: "poster" }, el("span", { class: "play", text: "▶" }),
      el("span", { text: `${f.media} · ${bytes(f.size)}` }));
    thumb = f.url ? el("a", { class: "thumb", href: f.url, title: f.name || f.sha256 }, poster)
                  : el("div", { class: "thumb" }, poster);
  }
  fig = el("figure", { "data-id": f.id, "data-media": f.media }, thumb, caption(f));
  figures.set(f.id, fig);
  return fig;
}

function renderGallery(files) {
  const cameras = new Map(); // imei -> {camera, photos: [], video}
  for (const f of files) { // newest first
    let c = cameras.get(f.imei);
    if (!c) { c = { imei: f.imei, camera: f.camera, latest: f.received_at, photos: [], video: null }; cameras.set(f.imei, c); }
    if (f.media === "photo") { if (c.photos.length < PHOTOS_PER_CAMERA) c.photos.push(f); }
    else if (!c.video) c.video = f;
  }
  const keep = new Set();
  const blocks = [...cameras.values()].map((c) => {
    const shots = [...c.photos, c.video].filter(Boolean).map((f) => { keep.add(f.id); return figureFor(f); });
    return el("div", { class: "camera", "data-imei": c.imei },
      el("h3", {}, c.imei + " ", el("span", { class: "muted", text: `${c.camera} · last file ${when(c.latest)}` })),
      el("div", { class: "shots" }, ...shots));
  });
  for (const id of [...figures.keys()]) if (!keep.has(id)) figures.delete(id);
  document.getElementById("gallery").replaceChildren(...blocks);
  document.getElementById("no-files").hidden = files.length > 0;
}

function renderFiles(files) {
  fill(document.querySelector("#files tbody"), files.slice(0, 20).map((f) => row(
    when(f.received_at), el("td", { class: "mono", text: f.imei }), f.source, f.media,
    el("td", { class: "num", text: bytes(f.size) }), f.trigger_name || "", position(f),
    el("td", { class: "mono" }, f.url ? el("a", { href: f.url, text: f.name }) : (f.places[0] || "")))));
}

function renderPartials(partials) {
  const waiting = partials.filter((p) => !p.receiving); // the others show under live sessions
  fill(document.querySelector("#partials tbody"), waiting.slice(0, 50).map((p) => row(
    el("td", { class: "mono", text: p.imei }), el("td", { class: "mono", text: p.file }),
    progressCell({ held: p.held, total: p.total, percent: p.percent, rate_bps: 0, file: p.file }),
    when(p.last_seen))));
  document.getElementById("partial-count").textContent = waiting.length ? `(${waiting.length})` : "";
  document.getElementById("no-partials").hidden = waiting.length > 0;
}

function renderOutbox(entries) {
  fill(document.querySelector("#outbox tbody"), entries.slice(0, 50).map((e) => row(
    el("td", { class: "mono", text: e.imei || "" }), e.source || "", el("td", { class: "num", text: bytes(e.size) }),
    String(e.sink ?? ""), String(e.attempts ?? ""), e.last_error || "")));
  document.getElementById("outbox-count").textContent = entries.length ? `(${entries.length})` : "";
  document.getElementById("no-outbox").hidden = entries.length > 0;
}

function renderFailures(failures) {
  fill(document.querySelector("#failures tbody"), failures.slice(0, 50).map((f) => row(
    when(f.time), el("td", { class: "mono", text: f.imei || "?" }), f.peer || "", f.what || "", f.why || "")));
  document.getElementById("no-failures").hidden = failures.length > 0;
}

function setHealth(ok, text) {
  const badge = document.getElementById("health");
  badge.textContent = text;
  badge.className = "badge " + (ok ? "ok" : "bad");
}

async function refresh() {
  try {
    const [summary, sessions, transfers, files, partials, outbox, failures] = await Promise.all(
      ["api/summary", "api/sessions", "api/transfers", "api/files?limit=200", "api/partials", "api/outbox",
       "api/failures"].map(api));
    renderCounters(summary, partials);
    renderSessions(sessions, transfers);
    renderGallery(files);
    renderFiles(files);
    renderPartials(partials);
    renderOutbox(outbox);
    renderFailures(failures);
    setHealth(summary.accepting, summary.accepting ? "accepting cameras" : "not accepting");
    document.getElementById("updated").textContent = "updated " + new Date().toLocaleTimeString();
  } catch (error) {
    setHealth(false, "unreachable: " + error.message);
  }
}

refresh();
setInterval(refresh, POLL_MS);
