// Capstan's dashboard: one page, no build step, no dependencies. The view follows the URL
// hash (#/cluster, #/nodes, #/pods, #/replicasets, #/nodes/NAME, #/pods/NS/NAME); lists
// are paged and filtered by the server; the store's change stream (/api/events) makes the
// page fetch its current view again, so it follows the cluster without polling it. With
// auth enabled the page first asks who is looking (the session is an HttpOnly cookie).
"use strict";

const PAGE_ROWS = 100;
const REFRESH_DEBOUNCE_MS = 250;
// Planes' terms, indexes and reachability are not in the store, so no change event
// announces them: the cluster view (a handful of rows) is fetched again this often.
const CLUSTER_REFRESH_MS = 5000;
const state = { offset: 0, q: "", refreshTimer: null, total: 0, source: null };

const $ = (id) => document.getElementById(id);

function escapeHtml(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  return parts.length ? parts : ["cluster"];
}

function showBanner(message) {
  const banner = $("banner");
  banner.textContent = message || "";
  banner.hidden = !message;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { Accept: "application/json", "Content-Type": "application/json" } });
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (response.status === 401 && path !== "/api/session") showSignIn();
  if (!response.ok) {
    const error = new Error(body.error || `HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function bar(used, allocatable, format) {
  const share = allocatable > 0 ? Math.min(1, used / allocatable) : 0;
  const full = share >= 0.9 ? " full" : "";
  return `<span class="bar${full}"><div style="width:${(share * 100).toFixed(1)}%"></div></span>` +
    `<span class="barlabel">${format(used)} / ${format(allocatable)}</span>`;
}

function table(headers, rows) {
  const head = headers.map((h) => `<th>${escapeHtml(h)}</th>`).join("");
  const body = rows.length ? rows.join("") : `<tr><td colspan="${headers.length}" class="muted">none</td></tr>`;
  return `<table><thead><tr>${head}</tr></thead><tbody>${body}</tbody></table>`;
}

function phaseClass(phase) {
  return { Running: "ok", Succeeded: "muted", Pending: "warn", Failed: "bad", Unknown: "bad" }[phase] || "";
}

function listQuery(extra) {
  const params = new URLSearchParams({ offset: state.offset, limit: PAGE_ROWS, q: state.q, ...extra });
  return params.toString();
}

function pager(list) {
  state.total = list.total;
  const last = Math.min(list.total, list.offset + list.items.length);
  $("count").textContent = list.total ? `${list.offset + 1}–${last} of ${list.total}` : "0";
  $("previous").disabled = list.offset === 0;
  $("next").disabled = last >= list.total;
}

const views = {
  async cluster() {
    const cluster = await api("/api/cluster");
    if (!cluster.leader) showBanner("This plane knows no leader: the cluster has lost quorum, or an election is under way.");
    const cards = cluster.planes.map((plane) => {
      const role = plane.leader ? `<span class="ok">leader</span>` : plane.learner ? "learner" : "follower";
      const s = plane.status;
      const body = s
        ? `<dt>term</dt><dd>${s.term}</dd><dt>raft index</dt><dd>${s.raftIndex}</dd>` +
          `<dt>applied index</dt><dd>${s.appliedIndex}</dd><dt>db size</dt><dd>${bytes(s.dbSize)}</dd>` +
          `<dt>health</dt><dd>${s.alarms.length ? `<span class="bad">${escapeHtml(s.alarms.join(", "))}</span>` : `<span class="ok">healthy</span>`}</dd>`
        : `<dt>health</dt><dd class="bad">unreachable: ${escapeHtml(plane.unreachable)}</dd>`;
      const roleName = plane.leader ? "leader" : plane.learner ? "learner" : "follower";
      return `<div class="card plane" data-name="${escapeHtml(plane.name)}" data-role="${roleName}" data-reachable="${Boolean(s)}"><h3>${escapeHtml(plane.name || plane.id)} ${plane.self ? '<span class="muted">(this plane)</span>' : ""}</h3>` +
        `<dl><dt>role</dt><dd>${role}</dd><dt>id</dt><dd>${plane.id}</dd>${body}<dt>clients</dt><dd>${escapeHtml(plane.clientUrls.join(", "))}</dd></dl></div>`;
    });
    return `<h2>Planes <span class="muted">revision ${cluster.revision}</span></h2><div class="cards">${cards.join("")}</div>`;
  },

  async nodes() {
    const list = await api(`/api/nodes?${listQuery()}`);
    pager(list);
    const rows = list.items.map((n) =>
      `<tr class="node" data-name="${escapeHtml(n.name)}" data-ready="${n.ready}">` +
      `<td><a href="#/nodes/${encodeURIComponent(n.name)}">${escapeHtml(n.name)}</a></td>` +
      `<td>${n.ready ? '<span class="ok">Ready</span>' : `<span class="bad">NotReady</span> <span class="muted">${escapeHtml(n.readyReason)}</span>`}${n.unschedulable ? ' <span class="warn">SchedulingDisabled</span>' : ""}</td>` +
      `<td>${escapeHtml(n.readySince)}</td>${leaseCell(n.lease)}<td>${escapeHtml(n.taints.join(", "))}</td>` +
      `<td>${bar(n.cpu.used, n.cpu.allocatable, (m) => `${(m / 1000).toFixed(2)}`)}</td>` +
      `<td>${bar(n.memory.used, n.memory.allocatable, bytes)}</td>` +
      `<td>${bar(n.pods.used, n.pods.allocatable, (p) => `${p}`)}</td></tr>`);
    return table(["Node", "Status", "Since", "Lease", "Taints", "CPU", "Memory", "Pods"], rows);
  },

  async pods() {
    const list = await api(`/api/pods?${listQuery()}`);
    pager(list);
    return podTable(list.items);
  },

  async replicasets() {
    const list = await api(`/api/replicasets?${listQuery()}`);
    pager(list);
    const rows = list.items.map((r) =>
      `<tr><td>${escapeHtml(r.namespace)}</td><td>${escapeHtml(r.name)}</td><td>${r.desired}</td><td>${r.current}</td>` +
      `<td class="${r.ready === r.desired ? "ok" : "warn"}">${r.ready}</td></tr>`);
    return table(["Namespace", "Name", "Desired", "Current", "Ready"], rows);
  },

  async node(name) {
    const node = await api(`/api/nodes/${encodeURIComponent(name)}`);
    const n = node.summary;
    return `<h2>Node ${escapeHtml(n.name)} ${n.ready ? '<span class="ok">Ready</span>' : '<span class="bad">NotReady</span>'}</h2>` +
      `<p>Lease: ${leaseText(n.lease)}</p><p>CPU ${bar(n.cpu.used, n.cpu.allocatable, (m) => `${(m / 1000).toFixed(2)}`)} &nbsp; Memory ${bar(n.memory.used, n.memory.allocatable, bytes)} &nbsp; Pods ${bar(n.pods.used, n.pods.allocatable, (p) => `${p}`)}</p>` +
      `<h2>Pods on this node</h2>${podTable(node.pods)}<h2>Object</h2><pre>${escapeHtml(JSON.stringify(node.object, null, 2))}</pre>`;
  },

  async pod(namespace, name) {
    const pod = await api(`/api/pods/${encodeURIComponent(namespace)}/${encodeURIComponent(name)}`);
    const p = pod.summary;
    const node = p.node ? `<a href="#/nodes/${encodeURIComponent(p.node)}">${escapeHtml(p.node)}</a>` : '<span class="warn">not bound</span>';
    const conditions = (pod.object.status.conditions || []).map((c) =>
      `<tr><td>${escapeHtml(c.type)}</td><td>${escapeHtml(c.status)}</td><td>${escapeHtml(c.reason)}</td><td>${escapeHtml(c.message)}</td><td>${escapeHtml(c.lastTransitionTime)}</td></tr>`);
    const containers = (pod.object.status.containerStatuses || []).map((c) =>
      `<tr><td>${escapeHtml(c.name)}</td><td>${c.ready ? "yes" : "no"}</td><td>${c.restartCount}</td><td>${escapeHtml(JSON.stringify(c.state))}</td></tr>`);
    const events = pod.events.map((e) =>
      `<tr class="event" data-reason="${escapeHtml(e.reason)}"><td>${e.revision}</td><td class="${e.type === "Warning" ? "warn" : ""}">${escapeHtml(e.type)}</td>` +
      `<td>${escapeHtml(e.reason)}</td><td>${escapeHtml(e.message)}</td><td>${escapeHtml(e.time)}</td></tr>`);
    return `<h2>Pod ${escapeHtml(namespace)}/${escapeHtml(name)} <span class="${phaseClass(p.phase)}">${escapeHtml(p.phase)}</span></h2>` +
      `<p>Node: ${node} &nbsp; Restarts: ${p.restarts} &nbsp; Created: ${escapeHtml(p.created)}</p>` +
      (p.unschedulable ? `<p class="warn">${escapeHtml(p.unschedulable)}</p>` : "") +
      `<h2>Conditions</h2>${table(["Type", "Status", "Reason", "Message", "Since"], conditions)}` +
      `<h2>Containers</h2>${table(["Name", "Ready", "Restarts", "State"], containers)}` +
      `<h2>Events</h2>${table(["Revision", "Type", "Reason", "Message", "Time"], events)}` +
      `<h2>Log (tail)</h2>` + (pod.logs.unavailable !== undefined
        ? `<p class="muted">${escapeHtml(pod.logs.unavailable)}</p>`
        : `<pre class="log">${escapeHtml(pod.logs.tail)}</pre>`) +
      `<h2>Object</h2><pre>${escapeHtml(JSON.stringify(pod.object, null, 2))}</pre>`;
  },
};

// A node's lease: renewed by its agent every few seconds; none once the agent is gone.
function leaseText(lease) {
  return lease ? `renewed ${lease.renewedSecondsAgo}s ago (TTL ${lease.ttl}s)` : '<span class="bad">none</span>';
}

function leaseCell(lease) {
  return `<td class="lease" data-renewed="${lease ? lease.renewedSecondsAgo : ""}">${leaseText(lease)}</td>`;
}

function podTable(items) {
  const rows = items.map((p) =>
    `<tr class="pod" data-name="${escapeHtml(p.namespace)}/${escapeHtml(p.name)}" data-node="${escapeHtml(p.node)}" data-phase="${escapeHtml(p.phase)}">` +
    `<td>${escapeHtml(p.namespace)}</td><td><a href="#/pods/${encodeURIComponent(p.namespace)}/${encodeURIComponent(p.name)}">${escapeHtml(p.name)}</a></td>` +
    `<td class="${phaseClass(p.phase)}">${escapeHtml(p.phase)}</td>` +
    `<td>${p.node ? `<a href="#/nodes/${encodeURIComponent(p.node)}">${escapeHtml(p.node)}</a>` : ""}</td>` +
    `<td>${p.restarts}</td><td>${escapeHtml(p.created)}</td><td class="muted">${escapeHtml(p.unschedulable || p.reason)}</td></tr>`);
  return table(["Namespace", "Name", "Phase", "Node", "Restarts", "Created", "Reason"], rows);
}

async function render() {
  const [view, ...args] = route();
  const list = ["nodes", "pods", "replicasets"].includes(view) && args.length === 0;
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.view === view));
  $("tools").hidden = !list;
  const name = { nodes: args.length ? "node" : "nodes", pods: args.length ? "pod" : "pods" }[view] || view;
  const draw = views[name];
  if (!draw) {
    $("view").innerHTML = `<h2>Not found</h2><p>No page ${escapeHtml(location.hash)}.</p>`;
    return;
  }
  try {
    const html = await draw(...args);
    showBanner("");
    $("view").innerHTML = html;
  } catch (error) {
    if (error.status === 401) {
      $("view").innerHTML = "";
    } else if (error.status === 404) {
      showBanner("");
      $("view").innerHTML = `<h2>Not found</h2><p>${escapeHtml(error.message)}</p>`;
    } else {
      // Say so plainly rather than keep showing what may be stale.
      showBanner(error.message);
      $("view").innerHTML = "";
    }
  }
}

function refreshSoon() {
  clearTimeout(state.refreshTimer);
  state.refreshTimer = setTimeout(render, REFRESH_DEBOUNCE_MS);
}

function follow() {
  if (state.source) state.source.close();
  const source = new EventSource("/api/events");
  state.source = source;
  source.onopen = () => { $("live").textContent = "live"; $("live").className = "on"; refreshSoon(); };
  source.addEventListener("change", refreshSoon);
  source.addEventListener("resync", refreshSoon);
  source.onerror = () => {
    $("live").textContent = "reconnecting";
    $("live").className = "";
    // Refused (a session that ended): the view's next call says why, or asks to sign in.
    if (source.readyState === EventSource.CLOSED) refreshSoon();
  };
}

function showSignIn() {
  if (state.source) state.source.close();
  state.source = null;
  $("live").textContent = "signed out";
  $("live").className = "";
  $("who").hidden = true;
  $("signin").hidden = false;
  $("view").innerHTML = "";
}

// Who is looking; then the page, live. Signed-out visitors of a cluster with auth get the form.
async function start() {
  const session = await api("/api/session").catch(() => ({}));
  if (session.authEnabled && !session.user) return showSignIn();
  $("signin").hidden = true;
  $("who").hidden = !session.user;
  $("user").textContent = session.user ? `signed in as ${session.user}` : "";
  render();
  follow();
}

$("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const body = JSON.stringify({ user: $("signin-user").value, password: $("signin-password").value });
  try {
    await api("/api/session", { method: "POST", body });
    $("signin-password").value = "";
    $("signin-error").textContent = "";
    start();
  } catch (error) {
    $("signin-error").textContent = error.message;
  }
});
$("signout").addEventListener("click", async () => { await api("/api/session", { method: "DELETE" }).catch(() => {}); showSignIn(); });
$("filter").addEventListener("input", (event) => { state.q = event.target.value; state.offset = 0; refreshSoon(); });
$("previous").addEventListener("click", () => { state.offset = Math.max(0, state.offset - PAGE_ROWS); render(); });
$("next").addEventListener("click", () => { state.offset += PAGE_ROWS; render(); });
window.addEventListener("hashchange", () => { state.offset = 0; render(); });
setInterval(() => { if (route()[0] === "cluster" && state.source) refreshSoon(); }, CLUSTER_REFRESH_MS);
start();
