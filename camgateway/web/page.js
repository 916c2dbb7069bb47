// camgateway status page: views chosen by the URL's hash, each polling only the API routes it shows.
//
// Every request URL is built from location.origin + location.pathname, which never carry the
// user:password of a URL like http://camgateway:TOKEN@host/ (fetch refuses such URLs; the browser
// keeps the basic-auth credentials for the origin and sends them itself).
// Everything a camera sent is inserted as text (textContent), never as HTML.
"use strict";

const BASE = location.origin + location.pathname.replace(/[^/]*$/, "");
const PAGE_FILES = 48; // thumbnails per page in Files
const PAGE_CAMERA_FILES = 24; // thumbnails per page of one camera
const PAGE_CAMERAS = 50; // rows per page in Cameras
const LATEST = 12; // thumbnails on the overview
const MAP = document.body.dataset.map || "";

// -- small helpers

/** An absolute URL of this site for an API path, or null (a path leading elsewhere is refused). */
function abs(path) {
  if (typeof path !== "string" || !path) return null;
  let url;
  try { url = new URL(path, BASE); } catch (error) { return null; }
  return url.origin === location.origin ? url.href : null;
}

/** An element; ``text`` is set as textContent, other attributes with setAttribute. */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = String(value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : String(child));
  }
  return node;
}

function $(id) { return document.getElementById(id); }

/** A path or name as text that may break after "/", "_" and "-" (and, failing that, anywhere). */
function breakable(text, cls) {
  const node = el("span", { class: "mono path " + (cls || "") });
  for (const part of String(text).split(/(?<=[/_-])/)) node.append(part, el("wbr"));
  return node;
}

function bytes(n) {
  if (typeof n !== "number" || !isFinite(n)) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : String(n)) + " " + units[i];
}

function pad(n) { return String(n).padStart(2, "0"); }

/** "2024-10-30 11:35:05" in the browser's time zone (the ISO UTC time as a tooltip). */
function when(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  if (isNaN(d)) return String(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
    `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function timeEl(iso, cls) {
  if (!iso) return el("span", { class: "muted", text: "—" });
  return el("time", { datetime: iso, title: iso, class: cls, text: when(iso) });
}

/** "5 s ago", "3 min ago", "2 h ago", "4 d ago". */
function ago(iso) {
  const d = new Date(iso);
  if (!iso || isNaN(d)) return "never";
  const s = Math.max(0, Math.round((Date.now() - d.getTime()) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

function duration(seconds) {
  seconds = Math.max(0, Math.round(seconds || 0));
  const h = Math.floor(seconds / 3600), m = Math.floor(seconds / 60) % 60, s = seconds % 60;
  return h ? `${h} h ${m} min` : m ? `${m} min ${s} s` : `${s} s`;
}

function hasPosition(item) {
  const lat = item && item.latitude, lon = item && item.longitude;
  return typeof lat === "number" && typeof lon === "number" && isFinite(lat) && isFinite(lon) &&
    Math.abs(lat) <= 90 && Math.abs(lon) <= 180 && !(lat === 0 && lon === 0);
}

/** The position as a link to the map (opened on the map's site: nothing is loaded here). */
function positionLink(item) {
  if (!hasPosition(item)) return el("span", { class: "muted", text: "—" });
  const lat = item.latitude.toFixed(5), lon = item.longitude.toFixed(5);
  const text = `${lat}, ${lon}`;
  if (!MAP) return el("span", { class: "mono", text });
  const url = new URL(MAP);
  url.search = new URLSearchParams({ mlat: lat, mlon: lon }).toString();
  url.hash = `map=16/${lat}/${lon}`;
  return el("a", { class: "mono", href: url.href, target: "_blank", rel: "noopener noreferrer",
    title: "open on the map", text });
}

function dot(online) {
  return el("span", { class: "dot " + (online ? "on" : "off"), title: online ? "online" : "offline" });
}

function empty(text) { return el("p", { class: "empty muted", text }); }

/** A table that becomes stacked cards on a phone: ``columns`` are labels, ``rows`` arrays of cells. */
function table(columns, rows, cls) {
  const head = el("tr", {}, ...columns.map((c) => el("th", { scope: "col", text: c })));
  const body = rows.map((cells) => {
    const tr = el("tr");
    cells.forEach((cell, i) => {
      // One box per cell, so that a cell can become a "label: value" line of a card on a phone.
      let td;
      if (cell instanceof Node && cell.tagName === "TD") {
        td = cell;
        td.replaceChildren(el("div", { class: "cell" }, ...td.childNodes));
      } else if (cell === null || cell === undefined || cell === "") {
        td = el("td", { class: "none" }, el("div", { class: "cell" }, "—"));
      } else {
        td = el("td", {}, el("div", { class: "cell" }, cell));
      }
      td.dataset.label = columns[i];
      tr.append(td);
    });
    return tr;
  });
  return el("table", { class: "cards " + (cls || "") }, el("thead", {}, head), el("tbody", {}, ...body));
}

function td(cls, ...children) { return el("td", { class: cls }, ...children); }

function progress(t) {
  if (!t) return el("span", { class: "muted", text: "—" });
  const total = Math.max(t.total || 0, 1);
  const percent = typeof t.percent === "number" ? t.percent : 100 * (t.held || 0) / total;
  const detail = [`${bytes(t.held)} of ${bytes(t.total)}`];
  if (t.rate_bps) detail.push(`${bytes(t.rate_bps)}/s`);
  if (t.resumed_from) detail.push(`resumed at ${bytes(t.resumed_from)}`);
  if (t.crc_errors) detail.push(`${t.crc_errors} CRC errors`);
  return el("div", { class: "progress", title: t.file || "" },
    el("progress", { max: String(total), value: String(t.held || 0) }),
    el("span", { class: "pct", text: `${percent.toFixed(1)} %` }),
    el("span", { class: "detail", text: detail.join(" · ") }));
}

// -- the API

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

/** GET (or another method) an API path: {data, total}; ``total`` from X-Total-Count, when sent. */
async function api(path, options) {
  const url = abs(path);
  const response = await fetch(url, Object.assign({ cache: "no-store", credentials: "same-origin" }, options || {}));
  let data = null;
  const type = response.headers.get("content-type") || "";
  if (type.includes("json")) data = await response.json().catch(() => null);
  if (!response.ok) {
    const why = data && data.error ? data.error : response.statusText;
    throw new HttpError(response.status, `${path.split("?")[0]}: HTTP ${response.status} ${why}`.trim());
  }
  const header = response.headers.get("x-total-count");
  const total = header !== null && /^\d+$/.test(header) ? Number(header) : null;
  return { data, total };
}

async function get(path) { return (await api(path)).data; }

function query(params) {
  const q = new URLSearchParams();
  for (const [key, value] of Object.entries(params)) {
    if (value !== null && value !== undefined && value !== "") q.set(key, String(value));
  }
  const text = q.toString();
  return text ? "?" + text : "";
}

// -- header: health and the failures count, on every view

function setHealth(health, summary) {
  const badge = $("health");
  const status = health ? health.status : summary && summary.accepting ? "ok" : "unknown";
  const problems = health && health.problems ? Object.keys(health.problems).length : 0;
  badge.className = "badge " + (status === "ok" ? "ok" : problems || status === "stopping" ? "bad" : "warn");
  badge.textContent = status === "ok" ? "healthy" : problems ? `${status}: ${problems} problem${problems > 1 ? "s" : ""}`
    : String(status);
  badge.title = health ? JSON.stringify(health.problems || health.warnings || {}) : "";
  const dead = summary && typeof summary.dead_letters === "number" ? summary.dead_letters : 0;
  const count = $("nav-failures");
  count.hidden = !dead;
  count.textContent = String(dead);
  if (summary) {
    $("version").textContent = `camgateway ${summary.version} · up ${duration(summary.uptime_s)}`;
  }
}

function setReachable(error) {
  const banner = $("offline");
  if (error) {
    banner.hidden = false;
    banner.textContent = `Cannot reach the gateway: ${error.message}. Retrying…`;
    const badge = $("health");
    badge.className = "badge bad";
    badge.textContent = error.status === 401 ? "unauthorized" : "unreachable";
  } else {
    banner.hidden = true;
    $("updated").textContent = "updated " + new Date().toLocaleTimeString();
  }
}

/** The summary and the health it carries. */
async function summaryAndHealth() {
  const summary = await get("api/summary");
  setHealth(summary.health, summary);
  return { summary, health: summary.health };
}

function problemList(health) {
  const items = [];
  for (const [kind, cls] of [["problems", "bad"], ["warnings", "warn"]]) {
    for (const [part, why] of Object.entries((health && health[kind]) || {})) {
      items.push(el("li", { class: cls }, el("strong", { text: part }), ": ", el("span", { text: why })));
    }
  }
  return items;
}

function healthPanel(node, health, extra) {
  const status = health ? health.status : "unknown";
  const items = problemList(health);
  node.replaceChildren(
    el("div", { class: "health-line" },
      el("span", { class: "badge " + (status === "ok" ? "ok" : items.some((i) => i.className === "bad") ? "bad" : "warn"),
        text: status }),
      el("span", { text: items.length ? " " : " Accepting cameras, recording and delivering files." }),
      ...(extra || [])));
  if (items.length) node.append(el("ul", { class: "problems" }, ...items));
}

// -- thumbnails (kept by file id, so an image is fetched once, not on every poll)

const thumbs = new Map();

function fileTitle(f) {
  return [f.camera, f.source].filter(Boolean).join(" ") || f.kind || f.media || "file";
}

function kindOf(f) {
  if (f.kind) return f.kind;
  return f.media === "photo" || f.media === "video" ? f.media : "other";
}

function thumbFor(f, showImei) {
  const key = [f.id, f.thumb, f.url, f.status, showImei].join("|"); // a poster made later shows
  let fig = thumbs.get(key);
  if (fig) return fig;
  const kind = kindOf(f);
  const source = abs(f.thumb || (kind === "photo" ? f.url : null));
  let picture;
  if (source) {
    picture = el("img", { src: source, alt: `${kind} from ${f.imei}`,
      class: kind === "photo" ? "photo" : "poster" });
    picture.addEventListener("error", () => {
      picture.replaceWith(el("span", { class: "nopreview", text: kind === "video" ? "" : "no preview" }));
    });
  } else { // a video without a poster shows its play sign only
    picture = el("span", { class: "nopreview", text: kind === "video" ? "" : kind });
  }
  const badge = kind === "video" ? el("span", { class: "play", "aria-hidden": "true", text: "▶" }) : null;
  const lines = [el("span", { class: "when" }, timeEl(f.capture_time || f.received_at))];
  lines.push(el("span", { class: "what", text: [f.source, f.trigger_name].filter(Boolean).join(" · ") || kind }));
  if (showImei) lines.push(el("span", { class: "mono imei", text: f.imei }));
  fig = el("a", { class: "thumb " + kind, href: `#/files/${encodeURIComponent(f.id)}`, "data-id": f.id,
    title: fileTitle(f) }, el("span", { class: "frame" }, picture, badge),
    el("span", { class: "caption" }, ...lines));
  if (f.status === "dead-letter") fig.classList.add("dead");
  thumbs.set(key, fig);
  return fig;
}

/** Show ``files`` in ``node`` (the text ``none`` without any); the DOM is replaced only when the list changed. */
function fillGallery(node, files, showImei, byDay, none) {
  if (!files.length) {
    delete node.dataset.signature;
    node.replaceChildren(empty(none));
    return;
  }
  const signature = files.map((f) => f.id + (f.thumb || "") + (f.status || "")).join(",");
  if (node.dataset.signature === signature) return;
  node.dataset.signature = signature;
  if (thumbs.size > 2000) thumbs.clear(); // a page left open for days: forget the old ones
  if (!byDay) {
    node.replaceChildren(...files.map((f) => thumbFor(f, showImei)));
    return;
  }
  const days = [];
  for (const f of files) {
    const day = when(f.capture_time || f.received_at).slice(0, 10) || "unknown day";
    if (!days.length || days[days.length - 1].day !== day) days.push({ day, files: [] });
    days[days.length - 1].files.push(f);
  }
  node.replaceChildren(...days.map((d) => el("div", { class: "day" }, el("h3", { text: d.day }),
    el("div", { class: "gallery" }, ...d.files.map((f) => thumbFor(f, showImei))))));
}

function pager(node, offset, limit, shown, total, go) {
  if (!shown && !offset) { node.replaceChildren(); return; }
  const last = offset + shown;
  const of = total === null ? "" : ` of ${total}`;
  const prev = el("button", { type: "button", disabled: offset <= 0, text: "← newer" });
  const next = el("button", { type: "button", disabled: total === null ? shown < limit : last >= total,
    text: "older →" });
  prev.addEventListener("click", () => go(Math.max(0, offset - limit)));
  next.addEventListener("click", () => go(offset + limit));
  node.replaceChildren(prev, el("span", { class: "muted", text: shown ? `${offset + 1}–${last}${of}` : `none${of}` }),
    next);
}

// -- views: each one has show(route) once, and refresh() on every poll

const views = {};

views.overview = {
  interval: 2000,
  async refresh() {
    const [{ summary, health }, sessions, transfers, files, partials, outbox] = await Promise.all([
      summaryAndHealth(), get("api/sessions"), get("api/transfers"), get(`api/files?limit=${LATEST}`),
      get("api/partials"), get("api/outbox")]);
    const s = summary.stats || {};
    healthPanel($("health-panel"), health);
    const number = (v) => (typeof v === "number" ? v : null);
    const tiles = [
      ["cameras online", number(summary.cameras_online) === null ? null
        : `${summary.cameras_online} / ${summary.cameras ?? "?"}`, null, "#/cameras?online=true"],
      ["live sessions", summary.sessions, null, null],
      ["transfers", summary.transfers, null, null],
      ["files received", s.files_received, null, "#/files"],
      ["bytes received", bytes(s.bytes_received), null, null],
      ["resumes", s.resumes, null, null],
      ["CRC errors", s.crc_errors, s.crc_errors > 0 ? "warn" : null, null],
      ["protocol errors", s.protocol_errors, s.protocol_errors > 0 ? "warn" : null, "#/failures"],
      ["sink retries", s.delivery_failures, s.delivery_failures > 0 ? "warn" : null, null],
      ["dead letters", summary.dead_letters, summary.dead_letters > 0 ? "bad" : null, "#/failures"],
      ["refused cameras", summary.refused, summary.refused > 0 ? "warn" : null, "#/failures"],
      ["outbox", summary.outbox_depth, null, null],
      ["spool", bytes(summary.spool_bytes), null, null],
    ];
    $("counters").replaceChildren(...tiles.map(([label, value, tone, href]) => {
      const shown = value === null || value === undefined ? "—" : String(value);
      const body = [el("span", { class: "value", text: shown }), el("span", { class: "label", text: label })];
      return href ? el("a", { class: "tile " + (tone || ""), href, "data-tile": label }, ...body)
        : el("div", { class: "tile " + (tone || ""), "data-tile": label }, ...body);
    }));

    const byImei = new Map(transfers.map((t) => [t.imei, t]));
    $("session-count").textContent = sessions.length ? `(${sessions.length})` : "";
    $("sessions").replaceChildren(sessions.length ? table(
      ["Camera", "Kind", "From", "State", "Connected", "Files", "Transfer"],
      sessions.map((x) => [
        td("mono imei", x.imei ? el("a", { href: `#/cameras/${encodeURIComponent(x.imei)}`, text: x.imei })
          : "(no init yet)"),
        x.camera, td("mono", x.peer || ""), x.state, duration(x.connected_s), String(x.files_done ?? 0),
        td("wide", progress(byImei.get(x.imei)))]), "sessions")
      : empty("No camera connected."));

    fillGallery($("gallery"), files, true, false, "No file received yet.");

    const waiting = partials.filter((p) => !p.receiving); // the others show under live sessions
    $("partials-block").hidden = !waiting.length;
    $("partial-count").textContent = waiting.length ? `(${waiting.length})` : "";
    $("partials").replaceChildren(table(["Camera", "File", "Held", "Last seen"], waiting.slice(0, 20).map((p) => [
      td("mono imei", p.imei), td("path", breakable(p.file)),
      td("wide", progress({ held: p.held, total: p.total, percent: p.percent, file: p.file })),
      timeEl(p.last_seen)])));

    $("outbox-block").hidden = !outbox.length;
    $("outbox-count").textContent = outbox.length ? `(${outbox.length})` : "";
    $("outbox").replaceChildren(table(["Camera", "Source", "Size", "Next sink", "Attempts", "Last error"],
      outbox.slice(0, 20).map((e) => [td("mono imei", e.imei || ""), e.source, bytes(e.size), String(e.sink ?? ""),
        String(e.attempts ?? 0), td("why", e.last_error || "")])));
  },
};

views.cameras = {
  interval: 5000,
  show(route) {
    this.q = route.query.get("q") || "";
    this.online = route.query.get("online") || "";
    this.offset = Math.max(0, Number(route.query.get("offset")) || 0);
    const form = $("camera-filter");
    form.elements.q.value = this.q;
    form.elements.online.value = this.online;
    if (!this.bound) {
      this.bound = true;
      let typing = null;
      form.addEventListener("submit", (event) => event.preventDefault());
      form.addEventListener("input", () => {
        clearTimeout(typing);
        typing = setTimeout(() => {
          this.q = form.elements.q.value.trim();
          this.online = form.elements.online.value;
          this.offset = 0;
          this.remember();
          poll();
        }, 250);
      });
    }
  },
  remember() {
    history.replaceState(null, "", "#/cameras" + query({ q: this.q, online: this.online, offset: this.offset || "" }));
  },
  async refresh() {
    const [, cameras] = await Promise.all([summaryAndHealth(),
      get("api/cameras" + query({ q: this.q, online: this.online }))]);
    const online = cameras.filter((c) => c.online).length;
    $("camera-count").textContent = `(${cameras.length}, ${online} online)`;
    if (this.offset >= cameras.length) this.offset = 0;
    const page = cameras.slice(this.offset, this.offset + PAGE_CAMERAS);
    $("cameras").replaceChildren(cameras.length ? table(
      ["Camera", "Kind", "Last seen", "Files 24 h", "Files", "Last position", "Last error"],
      page.map((c) => [
        td("camera-cell", dot(c.online), " ",
          el("a", { class: "mono imei", href: `#/cameras/${encodeURIComponent(c.imei)}`, text: c.imei }),
          el("span", { class: "state " + (c.online ? "on" : "off"), text: c.online ? "online" : "offline" })),
        c.camera, td("", c.online ? "now" : ago(c.last_seen), el("br"), timeEl(c.last_seen, "small muted")),
        String(c.files_24h ?? 0), String(c.files_total ?? 0),
        td("", positionLink(c), c.position_at ? el("span", { class: "small muted", text: " " + ago(c.position_at) })
          : null),
        c.last_error ? td("why", el("span", { text: c.last_error }),
          c.last_error_at ? el("span", { class: "small muted", text: " · " + ago(c.last_error_at) }) : null) : "",
      ]), "camera-list")
      : empty(this.q || this.online ? "No camera matches." : "No camera has connected yet."));
    pager($("camera-pager"), this.offset, PAGE_CAMERAS, page.length, cameras.length, (offset) => {
      this.offset = offset; this.remember(); poll();
    });
  },
};

views.camera = {
  interval: 5000,
  show(route) {
    this.imei = route.parts[1];
    this.offset = Math.max(0, Number(route.query.get("offset")) || 0);
    this.kind = route.query.get("kind") || "";
    $("camera-imei").textContent = this.imei;
    $("camera-facts").replaceChildren(empty("Loading…"));
    $("camera-gallery").replaceChildren();
    delete $("camera-gallery").dataset.signature;
    for (const a of $("camera-kind").querySelectorAll("a")) {
      a.href = `#/cameras/${encodeURIComponent(this.imei)}` + query({ kind: a.dataset.kind });
      a.classList.toggle("active", a.dataset.kind === this.kind);
    }
  },
  async refresh() {
    const imei = encodeURIComponent(this.imei);
    let camera = null;
    const [, listed] = await Promise.all([
      summaryAndHealth(),
      api("api/files" + query({ imei: this.imei, kind: this.kind, limit: PAGE_CAMERA_FILES, offset: this.offset })),
      get(`api/cameras/${imei}`).then((c) => { camera = c; }, (error) => {
        if (error.status !== 404) throw error;
      })]);
    const facts = $("camera-facts");
    if (camera) {
      facts.replaceChildren(el("dl", { class: "facts" },
        ...fact("State", el("span", {}, dot(camera.online),
          camera.online ? " online" : ` offline, last seen ${ago(camera.last_seen)}`)),
        ...fact("Kind", camera.camera),
        ...fact("Address", camera.peer ? el("span", { class: "mono", text: camera.peer }) : null),
        ...fact("First seen", timeEl(camera.first_seen)),
        ...fact("Last seen", timeEl(camera.last_seen)),
        ...fact("Files", `${camera.files_total ?? 0} in all, ${camera.files_24h ?? 0} in 24 h`),
        ...fact("Last file", timeEl(camera.last_file_at)),
        ...fact("Last position", el("span", {}, positionLink(camera),
          camera.position_at ? el("span", { class: "muted", text: ` at ${when(camera.position_at)}` }) : null)),
        ...fact("Last error", camera.last_error ? el("span", { class: "why" }, el("span", { text: camera.last_error }),
          el("span", { class: "muted", text: camera.last_error_at ? ` (${when(camera.last_error_at)})` : "" })) : "none")));
    } else {
      facts.replaceChildren(empty("This gateway has not seen this camera."));
    }
    const files = listed.data;
    $("camera-files-count").textContent = listed.total !== null ? `(${listed.total})` : "";
    fillGallery($("camera-gallery"), files, false, true, "No file from this camera.");
    pager($("camera-pager-files"), this.offset, PAGE_CAMERA_FILES, files.length, listed.total, (offset) => {
      this.offset = offset;
      history.replaceState(null, "", `#/cameras/${imei}` + query({ kind: this.kind, offset: offset || "" }));
      poll();
    });
  },
};

/** A datetime-local value (local time) as ISO 8601 UTC, and back. */
function localToIso(value) {
  const d = new Date(value);
  return value && !isNaN(d) ? d.toISOString().replace(/\.000Z$/, "Z") : "";
}

function isoToLocal(iso) {
  return iso && !isNaN(new Date(iso)) ? when(iso).replace(" ", "T") : "";
}

const FILE_FILTERS = ["imei", "camera", "kind", "media", "trigger", "since", "until"];

views.files = {
  interval: 5000,
  show(route) {
    this.filters = {};
    for (const key of FILE_FILTERS) this.filters[key] = route.query.get(key) || "";
    this.offset = Math.max(0, Number(route.query.get("offset")) || 0);
    const form = $("files-filter");
    for (const key of FILE_FILTERS) {
      form.elements[key].value = key === "since" || key === "until" ? isoToLocal(this.filters[key]) : this.filters[key];
    }
    if (!this.bound) {
      this.bound = true;
      let typing = null;
      const apply = () => {
        for (const key of FILE_FILTERS) {
          const value = form.elements[key].value.trim();
          this.filters[key] = key === "since" || key === "until" ? localToIso(value) : value;
        }
        this.offset = 0;
        this.remember();
        poll();
      };
      form.addEventListener("submit", (event) => { event.preventDefault(); apply(); });
      form.addEventListener("change", apply);
      form.addEventListener("input", (event) => {
        if (event.target.tagName !== "INPUT" || event.target.type === "datetime-local") return;
        clearTimeout(typing);
        typing = setTimeout(apply, 300);
      });
      form.addEventListener("reset", () => setTimeout(apply, 0));
    }
  },
  remember() {
    history.replaceState(null, "", "#/files" + query({ ...this.filters, offset: this.offset || "" }));
  },
  async refresh() {
    const [, listed] = await Promise.all([summaryAndHealth(),
      api("api/files" + query({ ...this.filters, limit: PAGE_FILES, offset: this.offset }))]);
    const files = listed.data;
    $("files-count").textContent = listed.total !== null ? `(${listed.total})` : "";
    fillGallery($("files-gallery"), files, true, false, FILE_FILTERS.some((k) => this.filters[k])
      ? "No file matches these filters." : "No file received yet.");
    pager($("files-pager"), this.offset, PAGE_FILES, files.length, listed.total, (offset) => {
      this.offset = offset; this.remember(); poll();
    });
  },
};

function fact(label, value) {
  const shown = value === null || value === undefined || value === "" ? el("span", { class: "muted", text: "—" })
    : value instanceof Node ? value : el("span", { text: value });
  return [el("dt", { text: label }), el("dd", {}, shown)];
}

/** Metadata values as text (nested ones as JSON). */
function metaText(value) {
  if (value === null || value === undefined) return "—";
  if (Array.isArray(value)) return value.every((v) => typeof v !== "object") ? value.join(", ") : JSON.stringify(value);
  if (typeof value === "object") return JSON.stringify(value);
  return String(value);
}

views.file = {
  interval: 0, // a file does not change, unless it is still being delivered (below)
  show(route) {
    this.id = route.parts[1];
    this.shown = null;
    $("file-title").textContent = this.id;
    $("file-media").replaceChildren(empty("Loading…"));
    $("file-facts").replaceChildren();
    $("file-metadata").replaceChildren();
  },
  async refresh() {
    let f;
    try {
      [, f] = await Promise.all([summaryAndHealth(), get(`api/files/${encodeURIComponent(this.id)}`)]);
    } catch (error) {
      if (error.status !== 404) throw error;
      $("file-media").replaceChildren(empty("No such file: it may have been removed, or the link is wrong."));
      return;
    }
    this.interval = f.status === "delivering" ? 3000 : 0;
    const kind = kindOf(f);
    $("file-title").textContent = `${fileTitle(f)} · ${when(f.capture_time || f.received_at)}`;
    const media = [f.id, f.url, f.play, f.poster, f.thumb].join("|");
    if (this.shown !== media) { // redrawn only when it changed (a redraw would stop the playback)
      this.shown = media;
      $("file-media").replaceChildren(mediaFor(f, kind));
    }
    const download = abs(f.url);
    const derived = (f.derived || []).filter((d) => d && abs(d.url));
    const trigger = [f.trigger_name, f.trigger !== null && f.trigger !== undefined ? `(${f.trigger})` : null]
      .filter(Boolean).join(" ");
    const meta = f.metadata || {};
    const events = Array.isArray(meta.event_names) ? meta.event_names.join(", ") : null;
    $("file-facts").replaceChildren(el("dl", { class: "facts" },
      ...fact("Camera", el("span", {}, el("a", { class: "mono imei", href: `#/cameras/${encodeURIComponent(f.imei)}`,
        text: f.imei }), el("span", { class: "muted", text: ` ${f.camera || ""}` }))),
      ...fact("Captured", timeEl(f.capture_time)),
      ...fact("Received", timeEl(f.received_at)),
      ...fact("Stored", f.stored_at ? timeEl(f.stored_at) : null),
      ...fact("Status", f.status ? el("span", { class: "status " + f.status, text: f.status }) : null),
      ...fact("Source", [f.source, kind !== f.media && f.media ? `announced as ${f.media}` : null]
        .filter(Boolean).join(", ")),
      ...fact("Trigger", trigger),
      ...(events !== null ? fact("Events", events || "none") : []),
      ...(meta.driver_name ? fact("Driver", meta.driver_name) : []),
      ...fact("Position", positionLink(f)),
      ...fact("Size", typeof f.size === "number" ? `${bytes(f.size)} (${f.size} bytes)` : null),
      ...fact("SHA-256", f.sha256 ? el("span", { class: "mono hash", text: f.sha256 }) : null),
      ...fact("Device path", f.device_path ? breakable(f.device_path) : null),
      ...fact("From", f.peer ? el("span", { class: "mono", text: f.peer }) : null),
      ...(f.resumed_from ? fact("Resumed at", bytes(f.resumed_from)) : []),
      ...(f.crc_errors ? fact("CRC errors", String(f.crc_errors)) : []),
      ...fact("Stored in", (f.places || []).length ? el("ul", { class: "plain" },
        ...f.places.map((p) => el("li", {}, breakable(p)))) : null),
      ...fact("Made from it", derived.length ? el("ul", { class: "plain" }, ...derived.map((d) =>
        el("li", {}, el("a", { href: d.id ? `#/files/${encodeURIComponent(d.id)}` : abs(d.url), text: d.kind || "file" }),
          " ", el("a", { href: abs(d.url), download: d.name || true }, breakable(d.name || "download")))))
        : null),
      ...fact("Download", download ? el("a", { href: download, download: f.name || true },
        breakable(f.name || "the camera's file")) : "not stored on this gateway's disk")));
    const rows = Object.entries(meta).map(([key, value]) => [td("mono", key), td("mono path", metaText(value))]);
    $("file-metadata").replaceChildren(rows.length ? table(["Field", "Value"], rows, "meta") : empty("None sent."));
  },
};

function mediaFor(f, kind) {
  const poster = abs(f.poster || f.thumb);
  if (kind === "photo" && abs(f.url)) {
    return el("a", { href: abs(f.url), target: "_blank", rel: "noopener", title: "the photo at its full size" },
      el("img", { class: "full", src: abs(f.url), alt: `photo from ${f.imei}` }));
  }
  if (kind === "video") {
    const play = abs(f.play);
    if (play) {
      const video = el("video", { class: "full", controls: true, preload: "metadata", playsinline: true,
        src: play, poster });
      video.addEventListener("error", () => {
        video.after(el("p", { class: "bad", text: "The browser cannot play this video: download it below." }));
      });
      return video;
    }
    return el("div", { class: "noplay" },
      poster ? el("img", { class: "full", src: poster, alt: `first frame of a video from ${f.imei}` }) : null,
      el("p", { class: "muted", text: "No browser-playable copy of this video (the gateway needs ffmpeg to make one): " +
        "download the camera's file below." }));
  }
  return el("div", { class: "noplay" }, el("p", { class: "muted", text: "No preview for this file." }));
}

views.failures = {
  interval: 3000,
  async refresh() {
    const [{ summary, health }, dead, refused, failures] = await Promise.all([summaryAndHealth(),
      get("api/dead-letters"), get("api/refused"), get("api/failures?limit=100")]);
    healthPanel($("failure-health"), health);
    $("failure-health").append(partsList(health, summary));
    const listed = new Set(dead.map((d) => d.id));
    for (const id of [...retries.keys()]) if (!listed.has(id)) retries.delete(id);
    $("dead-count").textContent = dead.length ? `(${dead.length})` : "";
    $("dead-letters").replaceChildren(dead.length ? table(
      ["Time", "Camera", "File", "Sink", "Reason", "Attempts", "Size", ""],
      dead.map((d) => [timeEl(d.time), td("mono imei", d.imei || "?"),
        td("mono path", d.file_id ? el("a", { href: `#/files/${encodeURIComponent(d.file_id)}`, text: d.file || d.file_id })
          : d.file || ""),
        d.sink, td("why", d.reason || ""), String(d.attempts ?? ""), bytes(d.size), td("actions", retryButton(d))]),
      "dead") : empty("No dead letter: every file reached every sink."));
    $("refused-count").textContent = refused.length ? `(${refused.length})` : "";
    $("refused").replaceChildren(refused.length ? table(["Camera", "From", "Attempts", "Last"],
      refused.map((r) => [td("mono imei", r.imei || "?"), td("mono", r.peer || ""), String(r.count ?? ""),
        timeEl(r.last_at)]), "refused") : empty("No camera refused."));
    $("failure-count").textContent = failures.length ? `(${failures.length})` : "";
    $("failures").replaceChildren(failures.length ? table(["Time", "Camera", "From", "What", "Why"],
      failures.map((f) => [timeEl(f.time), td("mono imei", f.imei || "?"), td("mono", f.peer || ""), f.what,
        td("why", f.why || "")]), "failures") : empty("No failure."));
  },
};

/** Store, spool, outbox and each sink: working, or why not. */
function partsList(health, summary) {
  const problems = (health && health.problems) || {};
  const warnings = (health && health.warnings) || {};
  const state = (part, detail) => {
    const why = problems[part] || warnings[part];
    return el("span", {}, el("span", { class: problems[part] ? "bad" : warnings[part] ? "warn" : "ok-text",
      text: why ? why : "working" }), detail ? el("span", { class: "muted", text: ` · ${detail}` }) : null);
  };
  const depth = summary.outbox_depth;
  return el("dl", { class: "facts parts" },
    ...fact("Store", state("store")),
    ...fact("Spool", state("spool", `${bytes(summary.spool_bytes)} in ${summary.spool_files ?? "?"} files`)),
    ...fact("Outbox", depth === null || depth === undefined ? el("span", { class: "bad",
      text: "unknown: the store did not answer" }) : `${depth} waiting`),
    ...(summary.sinks || []).flatMap((name) => fact(`Sink ${name}`, state(`sink ${name}`))));
}

/** Retry buttons are kept by dead letter id, so a click in progress survives a redraw. */
const retries = new Map();

function retryButton(d) {
  let cell = retries.get(d.id);
  if (cell) return cell;
  const button = el("button", { type: "button", class: "retry", "data-id": d.id, text: "Retry" });
  const note = el("span", { class: "note small" });
  cell = el("span", {}, button, note);
  button.addEventListener("click", async () => {
    button.disabled = true;
    note.textContent = "sending…";
    note.className = "note small muted";
    try {
      await api(`api/dead-letters/${encodeURIComponent(d.id)}/retry`,
        { method: "POST", headers: { "X-Camgateway": "retry" } });
      note.textContent = `sent again to ${d.sink || "its sink"}`;
      const row = button.closest("tr");
      if (row) row.classList.add("retried");
      poll();
    } catch (error) {
      note.textContent = error.message;
      note.className = "note small bad";
      button.disabled = false;
    }
  });
  retries.set(d.id, cell);
  return cell;
}

views.missing = { interval: 0, async refresh() { await summaryAndHealth(); } };

// -- routing and polling

function parseRoute() {
  const raw = location.hash.replace(/^#\/?/, "");
  const cut = raw.indexOf("?");
  const path = cut < 0 ? raw : raw.slice(0, cut);
  const parts = path.split("/").filter(Boolean).map((p) => {
    try { return decodeURIComponent(p); } catch (error) { return p; } // a malformed %-escape: as written
  });
  const params = new URLSearchParams(cut < 0 ? "" : raw.slice(cut + 1));
  let name;
  if (!parts.length || parts[0] === "overview") name = "overview";
  else if (parts[0] === "cameras") name = parts.length > 1 ? "camera" : "cameras";
  else if (parts[0] === "files") name = parts.length > 1 ? "file" : "files";
  else if (parts[0] === "failures") name = "failures";
  else name = "missing";
  return { name, parts, query: params };
}

let current = null;
let timer = null;
let generation = 0;

async function poll() {
  clearTimeout(timer);
  timer = null;
  if (!current || document.hidden) return;
  const mine = ++generation;
  const view = current;
  try {
    await view.refresh();
    if (mine === generation) setReachable(null);
  } catch (error) {
    if (mine === generation) setReachable(error);
  }
  if (mine === generation && view === current && view.interval && !document.hidden) {
    timer = setTimeout(poll, view.interval);
  } else if (mine === generation && view === current && !document.hidden && $("offline").hidden === false) {
    timer = setTimeout(poll, 5000); // a view that does not poll: retry until the gateway answers
  }
}

function navigate() {
  const route = parseRoute();
  for (const section of document.querySelectorAll("main > section")) {
    section.hidden = section.dataset.view !== route.name;
  }
  const top = route.name === "camera" ? "cameras" : route.name === "file" ? "files" : route.name;
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.nav === top);
    if (a.dataset.nav === top) a.setAttribute("aria-current", "page"); else a.removeAttribute("aria-current");
  }
  const view = views[route.name];
  if (view.show) view.show(route);
  if (current !== view) window.scrollTo(0, 0);
  current = view;
  document.title = `camgateway · ${route.name === "camera" || route.name === "file" ? route.parts[1] : route.name}`;
  poll();
}

window.addEventListener("hashchange", navigate);
document.addEventListener("visibilitychange", () => {
  if (document.hidden) { clearTimeout(timer); timer = null; } else poll();
});
navigate();
