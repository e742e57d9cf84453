// Kiln dashboard: plain JavaScript over the public API (/api/v1/...), authenticated by the session
// cookie. The API key is sent once, to sign in; the CSRF token lives in this script's memory only.
"use strict";

const STATUSES = ["pending", "processing", "success", "failed", "cancelled"];
const UNFINISHED = new Set(["pending", "processing"]);
const PAGE_SIZE = 25;
// Status events arrive in bursts (a worker finishing many jobs): re-read at most this often.
const REFRESH_AFTER_MS = 800;
const STALE_RETRY_MS = 2000;

const state = { session: null, events: null, view: null };

// --- DOM ------------------------------------------------------------------------------------------

// Builds an element; text is always set as text (prompts and errors come from users).
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

const SVG = "http://www.w3.org/2000/svg";
function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) el.setAttribute(name, String(value));
  for (const child of children.flat()) el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return el;
}

const $ = (id) => document.getElementById(id);

function notice(text) {
  $("notice").textContent = text;
}

function badge(status) {
  return h("span", { class: `badge ${status}` }, status);
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "–";
}

function debounce(fn, ms) {
  let timer = null;
  return () => {
    clearTimeout(timer);
    timer = setTimeout(fn, ms);
  };
}

// --- the API --------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(method, path, body) {
  const headers = { Accept: "application/json" };
  if (method !== "GET" && state.session) headers["X-CSRF-Token"] = state.session.csrfToken;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {
    method,
    headers,
    credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const payload = await response.json().catch(() => null);
  if (response.status === 401 && state.session) {
    signedOut("Your session has ended (signed out, expired or the key was revoked). Sign in again.");
  }
  if (!response.ok) {
    throw new ApiError(response.status, (payload && payload.error && payload.error.message) || response.statusText);
  }
  return payload;
}

// `root`: the view that asked; a view the user has left reports nothing.
function failed(error, root) {
  if (error instanceof ApiError && error.status === 401) return;
  if (root && !root.isConnected) return;
  notice(`Error: ${error.message}`);
}

// Each action is confirmed in a dialog first; resolves true when confirmed.
function confirmed(title, text) {
  const dialog = $("confirm");
  $("confirm-title").textContent = title;
  $("confirm-text").textContent = text;
  dialog.returnValue = "";
  dialog.showModal();
  return new Promise((resolve) => {
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "yes"), { once: true });
  });
}

// --- signing in and out ---------------------------------------------------------------------------

async function start() {
  $("sign-in").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", signOut);
  window.addEventListener("hashchange", route);
  try {
    const answer = await api("GET", "/dashboard/session");
    signedIn(answer.data);
  } catch {
    signedOut("");
  }
}

async function signIn(event) {
  event.preventDefault();
  const input = $("api-key");
  $("sign-in-error").textContent = "";
  const response = await fetch("/dashboard/session", {
    method: "POST",
    headers: { Accept: "application/json" },
    credentials: "same-origin",
    body: new URLSearchParams({ apiKey: input.value }),
  });
  input.value = ""; // the key leaves the page as soon as it was sent
  const payload = await response.json().catch(() => null);
  if (!response.ok) {
    $("sign-in-error").textContent = (payload && payload.error && payload.error.message) || "Sign-in failed";
    input.focus();
    return;
  }
  signedIn(payload.data);
}

async function signOut() {
  try {
    await api("DELETE", "/dashboard/session");
  } catch (error) {
    failed(error);
  }
  signedOut("Signed out.");
}

function signedIn(session) {
  state.session = session;
  $("sign-in-view").hidden = true;
  $("nav").hidden = false;
  $("who").hidden = false;
  const who = session.keyName || `key ${session.keyId}`;
  $("who-name").textContent = `${who} (${session.kind === "admin" ? "admin, every project" : "project"})`;
  notice("");
  openEvents();
  if (!location.hash || location.hash === "#") location.hash = "#/overview";
  else route();
}

function signedOut(message) {
  state.session = null;
  if (state.events) state.events.close();
  state.events = null;
  state.view = null;
  $("view").replaceChildren();
  $("nav").hidden = true;
  $("who").hidden = true;
  $("sign-in-view").hidden = false;
  notice(message);
  $("api-key").focus();
}

// --- live updates ---------------------------------------------------------------------------------

function openEvents() {
  if (state.events) state.events.close();
  const events = new EventSource("/api/v1/generations/events");
  events.addEventListener("status", (message) => {
    const event = JSON.parse(message.data);
    if (state.view && state.view.onStatus) state.view.onStatus(event);
  });
  events.addEventListener("created", (message) => {
    const event = JSON.parse(message.data);
    if (state.view && state.view.onCreated) state.view.onCreated(event);
  });
  events.addEventListener("resync", () => {
    if (state.view && state.view.refresh) state.view.refresh();
  });
  events.addEventListener("error", async () => {
    // The browser reconnects by itself; a session that ended stops it.
    try {
      await api("GET", "/dashboard/session");
    } catch {
      /* signedOut() ran on a 401 */
    }
  });
  state.events = events;
}

// --- routing --------------------------------------------------------------------------------------

function route() {
  if (!state.session) return;
  const [path, query] = location.hash.slice(1).split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean);
  for (const link of document.querySelectorAll("#nav a")) {
    const current = link.getAttribute("href").slice(2) === (parts[0] || "overview");
    if (current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  const root = h("div", {});
  $("view").replaceChildren(root);
  notice("");
  if (parts[0] === "generations" && parts[1]) state.view = detailView(root, parts[1]);
  else if (parts[0] === "generations") state.view = generationsView(root, params);
  else if (parts[0] === "webhooks") state.view = webhooksView(root);
  else state.view = overviewView(root);
  state.view.refresh();
  $("main").focus({ preventScroll: true });
}

// --- overview -------------------------------------------------------------------------------------

function overviewView(root) {
  const isAdmin = state.session.kind === "admin";
  const body = h("div", { "aria-busy": "true" });
  let projectId = ""; // admin keys: one project's figures, or every project's
  const projectSelect = h(
    "select",
    {
      name: "projectId",
      onchange: () => {
        projectId = projectSelect.value;
        refresh();
      },
    },
    h("option", { value: "" }, "Every project"),
  );
  root.append(h("h1", {}, "Overview"), isAdmin && h("p", { class: "filters" }, h("label", {}, "Project", projectSelect)), body);
  if (isAdmin) {
    api("GET", "/api/v1/admin/projects")
      .then((answer) => projectSelect.append(...answer.data.map((p) => h("option", { value: p.id }, `${p.name} (${p.slug})`))))
      .catch((error) => failed(error, root));
  }

  let newestChange = ""; // updatedAt of the newest status event seen (ISO 8601, comparable as text)
  let asks = 0;
  async function refresh() {
    const asked = ++asks;
    let stats;
    try {
      stats = (await api("GET", `/api/v1/stats${projectId ? `?projectId=${projectId}` : ""}`)).data;
    } catch (error) {
      failed(error, root);
      return;
    }
    if (!root.isConnected || asked !== asks) return; // left, or a newer answer is on its way
    // The stats are cached for a few seconds: figures older than a change seen are asked for again.
    if (stats.generatedAt < newestChange) setTimeout(refresh, STALE_RETRY_MS);
    render(stats);
  }

  function render(stats) {
    body.replaceChildren(
      countsSection(stats.counts),
      throughputSection(stats.throughput),
      processingSection(stats.processingTime, stats.providers),
      queuesSection(stats.queues, isAdmin, (changed) => {
        // The pause route answers the queue as it now is; the cached stats catch up later.
        for (const queue of stats.queues) if (queue.queue === changed.queue) Object.assign(queue, changed);
        render(stats);
        setTimeout(refresh, STALE_RETRY_MS * 3);
      }),
      workersSection(stats.workers),
      errorsSection(stats.errors),
    );
    body.setAttribute("aria-busy", "false");
  }
  const refreshSoon = debounce(refresh, REFRESH_AFTER_MS);
  return {
    refresh,
    onStatus(event) {
      if (event.updatedAt && event.updatedAt > newestChange) newestChange = event.updatedAt;
      refreshSoon();
    },
    onCreated(event) {
      if (event.createdAt > newestChange) newestChange = event.createdAt;
      refreshSoon();
    },
  };
}

function countsSection(counts) {
  const rows = STATUSES.map((status) =>
    h("tr", {}, h("th", { scope: "row" }, status), h("td", { class: "count" }, counts[status] ?? 0)),
  );
  return h(
    "section",
    { "aria-labelledby": "counts-title" },
    h("h2", { id: "counts-title" }, "Generations by status"),
    h(
      "table",
      { "aria-labelledby": "counts-title" },
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Status"), h("th", { scope: "col" }, "Count"))),
      h("tbody", {}, rows),
    ),
  );
}

// Created / succeeded / failed per minute over the last hour, drawn as three SVG lines.
function throughputSection(minutes) {
  const series = [
    ["created", "#1d4ed8"],
    ["succeeded", "#15803d"],
    ["failed", "#b91c1c"],
  ];
  const width = 600;
  const height = 200;
  const pad = 28;
  const top = Math.max(1, ...minutes.flatMap((m) => series.map(([key]) => m[key])));
  const x = (i) => pad + (i * (width - 2 * pad)) / Math.max(1, minutes.length - 1);
  const y = (v) => height - pad - (v * (height - 2 * pad)) / top;
  const totals = Object.fromEntries(series.map(([key]) => [key, minutes.reduce((sum, m) => sum + m[key], 0)]));
  const summary = `Last hour: ${totals.created} created, ${totals.succeeded} succeeded, ${totals.failed} failed; busiest minute ${top}.`;
  const svg = s(
    "svg",
    { viewBox: `0 0 ${width} ${height}`, role: "img", "aria-label": summary },
    s("line", { x1: pad, y1: height - pad, x2: width - pad, y2: height - pad, stroke: "#6b7280" }),
    s("line", { x1: pad, y1: pad, x2: pad, y2: height - pad, stroke: "#6b7280" }),
    s("text", { x: 2, y: pad + 4, "font-size": 12, fill: "#1a1a1a" }, top),
    s("text", { x: 2, y: height - pad + 4, "font-size": 12, fill: "#1a1a1a" }, 0),
    s("text", { x: pad, y: height - 6, "font-size": 12, fill: "#1a1a1a" }, "60 min ago"),
    s("text", { x: width - pad - 24, y: height - 6, "font-size": 12, fill: "#1a1a1a" }, "now"),
    series.map(([key, colour]) =>
      s("polyline", {
        fill: "none",
        stroke: colour,
        "stroke-width": 2,
        points: minutes.map((m, i) => `${x(i).toFixed(1)},${y(m[key]).toFixed(1)}`).join(" "),
      }),
    ),
  );
  return h(
    "section",
    { class: "chart" },
    h("h2", {}, "Throughput per minute"),
    svg,
    h("p", { class: "legend" }, series.map(([key]) => h("span", { class: key }, `${key} (${totals[key]})`))),
  );
}

function ms(value) {
  return value === null || value === undefined ? "–" : `${(value / 1000).toFixed(2)} s`;
}

function processingSection(overall, providers) {
  return h(
    "section",
    {},
    h("h2", {}, "Processing time (last hour)"),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        {},
        h(
          "thead",
          {},
          h("tr", {}, ["Provider", "p50", "p95", "Jobs"].map((t) => h("th", { scope: "col" }, t))),
        ),
        h(
          "tbody",
          {},
          h("tr", {}, h("th", { scope: "row" }, "all"), h("td", {}, ms(overall.p50Ms)), h("td", {}, ms(overall.p95Ms)), h("td", {}, overall.samples)),
          providers.map((p) =>
            h(
              "tr",
              {},
              h("th", { scope: "row" }, p.provider),
              h("td", {}, ms(p.processingTime.p50Ms)),
              h("td", {}, ms(p.processingTime.p95Ms)),
              h("td", {}, p.processingTime.samples),
            ),
          ),
        ),
      ),
    ),
  );
}

function queuesSection(queues, isAdmin, changed) {
  async function toggle(queue) {
    const provider = queue.providers[0];
    const action = queue.paused ? "resume" : "pause";
    const shared = queue.providers.length > 1 ? ` It is shared by ${queue.providers.join(", ")}.` : "";
    const text = queue.paused
      ? `Resume queue ${queue.queue}: workers take its pending jobs again.${shared}`
      : `Pause queue ${queue.queue}: its jobs stay pending and workers claim none until it is resumed.${shared}`;
    if (!(await confirmed(`${queue.paused ? "Resume" : "Pause"} a queue?`, text))) return;
    try {
      const answer = await api("POST", `/api/v1/admin/queues/${encodeURIComponent(provider)}/${action}`);
      notice(`Queue ${queue.queue} ${answer.data.paused ? "paused" : "resumed"}.`);
      changed({ queue: answer.data.queue, paused: answer.data.paused, pausedAt: answer.data.pausedAt });
    } catch (error) {
      failed(error);
    }
  }
  const head = ["Queue", "Providers", "Depth", "Pending", "Oldest pending", "State"];
  if (isAdmin) head.push("Action");
  return h(
    "section",
    {},
    h("h2", { id: "queues-title" }, "Queues"),
    h(
      "div",
      { class: "table-wrap" },
      h(
        "table",
        { "aria-labelledby": "queues-title" },
        h("thead", {}, h("tr", {}, head.map((t) => h("th", { scope: "col" }, t)))),
        h(
          "tbody",
          {},
          queues.map((q) =>
            h(
              "tr",
              {},
              h("th", { scope: "row" }, q.queue),
              h("td", {}, q.providers.join(", ")),
              h("td", {}, q.depth ?? "unknown"),
              h("td", {}, q.pending),
              h("td", {}, q.oldestPending ? `${when(q.oldestPending.createdAt)} (#${q.oldestPending.queuePosition})` : "–"),
              h("td", {}, badge(q.paused ? "paused" : "running")),
              isAdmin &&
                h("td", {}, h("button", { type: "button", onclick: () => toggle(q) }, q.paused ? "Resume" : "Pause")),
            ),
          ),
        ),
      ),
    ),
  );
}

function workersSection(workers) {
  const items = workers.items.map((w) =>
    h(
      "li",
      {},
      h("span", { class: "mono" }, w.name),
      ": ",
      w.active.length
        ? w.active.map((t) => (t.generationId ? `${t.task} ${t.generationId}` : t.task)).join(", ")
        : "idle",
    ),
  );
  return h(
    "section",
    {},
    h("h2", {}, `Workers alive: ${workers.alive}`),
    workers.reachable ? h("ul", {}, items) : h("p", {}, "The broker did not answer: workers unknown."),
  );
}

function errorsSection(errors) {
  return h(
    "section",
    {},
    h("h2", {}, "Top error codes (last hour)"),
    errors.length
      ? h("ol", {}, errors.map((e) => h("li", {}, h("span", { class: "mono" }, e.code), ` × ${e.count}`)))
      : h("p", {}, "No failures in the last hour."),
  );
}

// --- generations ----------------------------------------------------------------------------------

// datetime-local values are local times; the API wants ISO 8601 with a zone.
function isoOf(local) {
  return local ? new Date(local).toISOString() : "";
}

function localOf(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return new Date(d.getTime() - d.getTimezoneOffset() * 60000).toISOString().slice(0, 16);
}

function generationsView(root, params) {
  const isAdmin = state.session.kind === "admin";
  const filter = {
    status: params.get("status") || "",
    projectId: params.get("projectId") || "",
    provider: params.get("provider") || "",
    q: params.get("q") || "",
    createdAfter: params.get("createdAfter") || "",
    createdBefore: params.get("createdBefore") || "",
  };
  let cursors = [null]; // the cursor of each page seen: the first page has none
  const rows = new Map();

  function go(changes) {
    const next = new URLSearchParams();
    for (const [key, value] of Object.entries({ ...filter, ...changes })) if (value) next.set(key, value);
    location.hash = `#/generations${next.toString() ? `?${next}` : ""}`;
  }

  const statusButtons = h(
    "div",
    { class: "statuses", role: "group", "aria-label": "Status" },
    ["all", ...STATUSES].map((status) => {
      const value = status === "all" ? "" : status;
      return h(
        "button",
        { type: "button", "aria-pressed": String(filter.status === value), onclick: () => go({ status: value }) },
        status,
      );
    }),
  );

  const projectSelect = h("select", { name: "projectId" }, h("option", { value: "" }, "Every project"));
  const providerSelect = h("select", { name: "provider" }, h("option", { value: "" }, "Any provider"));
  const form = h(
    "form",
    {
      class: "filters",
      "aria-label": "Filters",
      onsubmit: (event) => {
        event.preventDefault();
        const data = new FormData(form);
        go({
          projectId: data.get("projectId") || "",
          provider: data.get("provider") || "",
          q: (data.get("q") || "").trim(),
          createdAfter: isoOf(data.get("createdAfter")),
          createdBefore: isoOf(data.get("createdBefore")),
        });
      },
    },
    isAdmin && h("label", {}, "Project", projectSelect),
    h("label", {}, "Provider", providerSelect),
    h("label", {}, "Prompt contains", h("input", { type: "search", name: "q", value: filter.q, maxlength: 200 })),
    h("label", {}, "Created after", h("input", { type: "datetime-local", name: "createdAfter", value: localOf(filter.createdAfter) })),
    h("label", {}, "Created before", h("input", { type: "datetime-local", name: "createdBefore", value: localOf(filter.createdBefore) })),
    h("button", { type: "submit" }, "Apply filters"),
  );

  const tbody = h("tbody", {});
  const summary = h("p", { class: "hint" });
  const firstButton = h("button", { type: "button", onclick: () => load(0) }, "First page");
  const nextButton = h("button", { type: "button", onclick: () => load(cursors.length - 1) }, "Next page");
  const bulkButton = h("button", { type: "button", onclick: bulkCancel }, "Cancel all pending");
  root.append(
    h("h1", {}, "Generations"),
    statusButtons,
    form,
    h(
      "table",
      { "aria-label": "Generations" },
      h(
        "thead",
        {},
        h(
          "tr",
          {},
          h("th", { scope: "col" }, "Status"),
          h("th", { scope: "col" }, "ID"),
          h("th", { scope: "col", class: "wide" }, "Prompt"),
          h("th", { scope: "col", class: "wide" }, "Provider"),
          h("th", { scope: "col", class: "wide" }, "Created"),
        ),
      ),
      tbody,
    ),
    summary,
    h("div", { class: "buttons" }, firstButton, nextButton, bulkButton),
  );

  async function fillChoices() {
    try {
      const providers = (await api("GET", "/api/v1/providers")).data;
      providerSelect.append(...providers.map((p) => h("option", { value: p.id }, p.name)));
      providerSelect.value = filter.provider;
      if (isAdmin) {
        const projects = (await api("GET", "/api/v1/admin/projects")).data;
        projectSelect.append(...projects.map((p) => h("option", { value: p.id }, `${p.name} (${p.slug})`)));
        projectSelect.value = filter.projectId;
      }
    } catch (error) {
      failed(error, root);
    }
  }

  function row(g) {
    return h(
      "tr",
      { "data-id": g.id },
      h("td", { class: "status" }, badge(g.status)),
      h("td", {}, h("a", { class: "mono", href: `#/generations/${g.id}` }, g.id)),
      h("td", { class: "wide" }, g.prompt.length > 120 ? `${g.prompt.slice(0, 120)}…` : g.prompt),
      h("td", { class: "wide" }, g.provider),
      h("td", { class: "wide" }, when(g.createdAt)),
    );
  }

  // Page `index` of the listing (0: the first, newest).
  async function load(index) {
    const query = new URLSearchParams({ limit: PAGE_SIZE });
    for (const [key, value] of Object.entries(filter)) if (value) query.set(key, value);
    if (cursors[index]) query.set("cursor", cursors[index]);
    let page;
    try {
      page = await api("GET", `/api/v1/generations?${query}`);
    } catch (error) {
      failed(error, root);
      return;
    }
    cursors = cursors.slice(0, index + 1);
    if (page.pagination.nextCursor) cursors.push(page.pagination.nextCursor);
    rows.clear();
    tbody.replaceChildren(
      ...page.data.map((g) => {
        const tr = row(g);
        rows.set(g.id, tr);
        return tr;
      }),
    );
    if (!page.data.length) tbody.append(h("tr", {}, h("td", { colspan: 5 }, "No generations match.")));
    const total = `${page.pagination.totalIsEstimate ? "about " : ""}${page.pagination.total}`;
    summary.textContent = `Page ${index + 1}; ${total} generations match.`;
    firstButton.disabled = index === 0;
    nextButton.disabled = !page.pagination.hasMore;
  }

  async function bulkCancel() {
    const text = "Cancel every pending generation that matches the filters above (up to 1,000 at a time)?";
    if (!(await confirmed("Cancel all pending?", text))) return;
    const body = {};
    for (const key of ["projectId", "provider", "q", "createdAfter", "createdBefore"]) if (filter[key]) body[key] = filter[key];
    try {
      const result = (await api("POST", "/api/v1/generations/cancel", body)).data;
      notice(`Cancelled ${result.cancelled} pending generations${result.more ? "; more remain: cancel again" : ""}.`);
      await load(0);
    } catch (error) {
      failed(error, root);
    }
  }

  const reloadFirst = debounce(() => load(0), REFRESH_AFTER_MS);
  fillChoices();
  return {
    refresh: () => load(cursors.length > 1 ? cursors.length - 2 : 0),
    onStatus(event) {
      const tr = rows.get(event.id);
      if (tr) {
        if (event.status === "deleted") {
          tr.remove();
          rows.delete(event.id);
        } else {
          tr.querySelector(".status").replaceChildren(badge(event.status));
        }
      } else if (cursors.length <= 2 && (!filter.status || filter.status === event.status)) {
        reloadFirst(); // a generation this first page should show
      }
    },
    onCreated(event) {
      const shown = (!filter.status || filter.status === "pending") && (!filter.projectId || filter.projectId === event.projectId);
      if (cursors.length <= 2 && shown) reloadFirst(); // new pending generations lead the first page
    },
  };
}

// --- one generation -------------------------------------------------------------------------------

function detailView(root, id) {
  const body = h("div", {});
  root.append(h("p", {}, h("a", { href: "#/generations" }, "← Generations")), body);
  let current = null;

  function field(name, value) {
    return [h("dt", {}, name), h("dd", {}, value === null || value === undefined || value === "" ? "–" : value)];
  }

  async function act(action) {
    const texts = {
      Cancel: ["Cancel this generation?", "It stops now; a worker running it drops the provider call."],
      Regenerate: ["Regenerate this generation?", "It runs again as a new version; the previous image is kept."],
      Delete: ["Delete this generation?", "The generation and its images are deleted for good."],
    };
    if (!(await confirmed(...texts[action]))) return;
    try {
      if (action === "Delete") {
        await api("DELETE", `/api/v1/generations/${id}`);
        notice(`Generation ${id} deleted.`);
        location.hash = "#/generations";
        return;
      }
      await api("POST", `/api/v1/generations/${id}/${action.toLowerCase()}`);
      notice(action === "Cancel" ? "Generation cancelled." : "Generation sent to run again.");
      await refresh();
    } catch (error) {
      failed(error, root);
    }
  }

  async function deliveries() {
    try {
      const list = (await api("GET", `/api/v1/generations/${id}/deliveries?limit=50`)).data;
      if (!list.length) return h("p", {}, "No webhook deliveries.");
      return deliveriesTable(list, refresh);
    } catch (error) {
      return h("p", { class: "error" }, error.message);
    }
  }

  async function refresh() {
    let g;
    try {
      g = (await api("GET", `/api/v1/generations/${id}`)).data;
    } catch (error) {
      body.replaceChildren(h("h1", {}, "Generation not found"), h("p", {}, error.message));
      return;
    }
    current = g;
    const image = g.outputImage;
    body.replaceChildren(
      h("h1", {}, "Generation ", h("span", { class: "mono" }, g.id)),
      h("p", {}, badge(g.status), g.queuePosition ? ` — position ${g.queuePosition} in its queue` : ""),
      h(
        "div",
        { class: "buttons" },
        h("button", { type: "button", disabled: !UNFINISHED.has(g.status), onclick: () => act("Cancel") }, "Cancel"),
        h("button", { type: "button", onclick: () => act("Regenerate") }, "Regenerate"),
        h("button", { type: "button", class: "danger", onclick: () => act("Delete") }, "Delete"),
      ),
      image
        ? h(
            "section",
            { class: "image" },
            h("h2", {}, "Image"),
            h("img", { src: image.publicUrl, alt: g.prompt, width: image.width, height: image.height }),
            h("p", { class: "hint" }, `${image.width}×${image.height}, ${image.mimeType}, ${image.fileSize} bytes`),
            h(
              "div",
              { class: "thumbs" },
              h("img", { src: image.thumbnails.sm, alt: `Small thumbnail: ${g.prompt}` }),
              h("img", { src: image.thumbnails.lg, alt: `Large thumbnail: ${g.prompt}` }),
            ),
          )
        : null,
      h("h2", {}, "Details"),
      h(
        "dl",
        { class: "fields" },
        field("ID", h("span", { class: "mono" }, g.id)),
        field("Project", h("span", { class: "mono" }, g.projectId)),
        field("Prompt", g.prompt),
        field("Original prompt", g.originalPrompt),
        field("Negative prompt", g.negativePrompt),
        field("Auto-enhance", g.autoEnhance ? "yes" : "no"),
        field("Enhancement engine", g.enhancementEngine),
        field("Enhancement template", g.enhancementTemplate),
        field("Provider", g.provider),
        field("Model", g.model),
        field("Connection", g.connectionId),
        field("Aspect ratio", g.aspectRatio),
        field("Seed", g.seed),
        field("Parameters", h("pre", {}, JSON.stringify(g.parameters, null, 2))),
        field("Meta", h("pre", {}, JSON.stringify(g.meta, null, 2))),
        field("Version", g.version),
        field("Attempts", g.attempts),
        field("Retries", g.retryCount),
        field("Error code", g.errorCode),
        field("Error message", g.errorMessage),
        field("Created", when(g.createdAt)),
        field("Started", when(g.startedAt)),
        field("Completed", when(g.completedAt)),
        field("Cancelled", when(g.cancelledAt)),
        field("Deadline", when(g.deadlineAt)),
        field("Processing time", g.processingTimeMs === null ? null : `${g.processingTimeMs} ms`),
        field("Webhook URL", g.webhookUrl),
      ),
      h("h2", {}, "Webhook deliveries"),
      await deliveries(),
    );
  }

  return {
    refresh,
    onStatus(event) {
      if (event.id !== id) return;
      if (event.status === "deleted") {
        notice("This generation was deleted.");
        return;
      }
      if (!current || current.status !== event.status) refresh();
    },
  };
}

// --- webhooks -------------------------------------------------------------------------------------

// `scoped(path)` adds what names the project to a /api/v1/webhooks path (an admin's ?projectId=).
function deliveriesTable(list, after, scoped = (path) => path) {
  async function redeliver(d) {
    if (!(await confirmed("Redeliver?", `Send the ${d.event} delivery to ${d.url} again now.`))) return;
    try {
      // Through its generation when it has one: that route serves admin sessions as well.
      const path = d.generationId
        ? `/api/v1/generations/${d.generationId}/deliveries/${d.id}/redeliver`
        : scoped(`/api/v1/webhooks/deliveries/${d.id}/redeliver`);
      await api("POST", path);
      notice("Delivery queued again.");
      await after();
    } catch (error) {
      failed(error);
    }
  }
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { "aria-label": "Webhook deliveries" },
      h(
        "thead",
        {},
        h("tr", {}, ["Status", "Event", "Attempts", "Last answer", "Created", ""].map((t) => h("th", { scope: "col" }, t))),
      ),
      h(
        "tbody",
        {},
        list.map((d) =>
          h(
            "tr",
            {},
            h("td", {}, badge(d.status)),
            h("td", {}, d.event, h("br"), h("span", { class: "hint" }, d.url)),
            h("td", {}, d.attempts),
            h("td", {}, d.lastStatusCode ?? d.lastError ?? "–"),
            h("td", {}, when(d.createdAt)),
            h(
              "td",
              {},
              h("button", { type: "button", disabled: d.status === "pending", onclick: () => redeliver(d) }, "Redeliver"),
            ),
          ),
        ),
      ),
    ),
  );
}

function webhooksView(root) {
  // An admin session manages the webhooks of the project it picks (the routes take ?projectId=).
  const isAdmin = state.session.kind === "admin";
  let projectId = "";
  const scoped = (path) => (isAdmin ? `${path}${path.includes("?") ? "&" : "?"}projectId=${encodeURIComponent(projectId)}` : path);
  const body = h("div", {});
  const projectSelect = h(
    "select",
    {
      onchange: () => {
        projectId = projectSelect.value;
        refresh();
      },
    },
    h("option", { value: "" }, "Choose a project"),
  );
  root.append(h("h1", {}, "Webhooks"), isAdmin && h("p", { class: "filters" }, h("label", {}, "Project", projectSelect)), body);
  if (isAdmin) {
    api("GET", "/api/v1/admin/projects")
      .then((answer) => projectSelect.append(...answer.data.map((p) => h("option", { value: p.id }, `${p.name} (${p.slug})`))))
      .catch((error) => failed(error, root));
  }

  async function endpointHealth(endpoint) {
    if (!endpoint.enabled) return ["disabled", endpoint.disabledReason || "disabled"];
    const failedPage = await api("GET", scoped(`/api/v1/webhooks/${endpoint.id}/deliveries?status=failed&limit=1`));
    const count = failedPage.pagination.total;
    return count ? ["failing", `${count} failed deliveries`] : ["healthy", "healthy"];
  }

  async function showDeliveries(endpoint, onlyFailed, into) {
    try {
      const status = onlyFailed ? "&status=failed" : "";
      const list = (await api("GET", scoped(`/api/v1/webhooks/${endpoint.id}/deliveries?limit=50${status}`))).data;
      into.replaceChildren(
        h("h2", {}, `${onlyFailed ? "Failed deliveries" : "Deliveries"} to ${endpoint.url}`),
        list.length ? deliveriesTable(list, () => showDeliveries(endpoint, onlyFailed, into), scoped) : h("p", {}, "None."),
      );
      into.focus();
    } catch (error) {
      failed(error, root);
    }
  }

  async function refresh() {
    if (isAdmin && !projectId) {
      body.replaceChildren(h("p", {}, "Webhook endpoints belong to a project: choose one to see its endpoints and deliveries."));
      return;
    }
    let endpoints;
    try {
      endpoints = (await api("GET", scoped("/api/v1/webhooks?limit=100"))).data;
    } catch (error) {
      failed(error, root);
      return;
    }
    const log = h("section", { tabindex: "-1" });
    const rows = await Promise.all(
      endpoints.map(async (endpoint) => {
        const [kind, text] = await endpointHealth(endpoint).catch(() => ["failing", "unknown"]);
        return h(
          "tr",
          {},
          h("td", {}, endpoint.url, endpoint.description ? h("div", { class: "hint" }, endpoint.description) : null),
          h("td", {}, endpoint.events.join(", ")),
          h("td", {}, h("span", { class: `badge ${kind}` }, text)),
          h(
            "td",
            {},
            h("div", { class: "buttons" },
              h("button", { type: "button", onclick: () => showDeliveries(endpoint, false, log) }, "Deliveries"),
              h("button", { type: "button", onclick: () => showDeliveries(endpoint, true, log) }, "Failures"),
            ),
          ),
        );
      }),
    );
    body.replaceChildren(
      endpoints.length
        ? h(
            "div",
            { class: "table-wrap" },
            h(
              "table",
              { "aria-label": "Webhook endpoints" },
              h("thead", {}, h("tr", {}, ["URL", "Events", "Health", ""].map((t) => h("th", { scope: "col" }, t)))),
              h("tbody", {}, rows),
            ),
          )
        : h("p", {}, "No webhook endpoints."),
      log,
    );
  }
  return { refresh };
}

start();
