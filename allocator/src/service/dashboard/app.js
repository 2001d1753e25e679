// Shardline operator dashboard. Plain JavaScript, no framework, no build
// step: every figure comes from the allocator's JSON API with the
// operator's bearer token; charts are inline SVG drawn here.
'use strict';

const TOKEN_KEY = 'shardline.token';
const SVG_NS = 'http://www.w3.org/2000/svg';
const PAGE = 50;

// ------------------------------------------------------------ utilities

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  append(el, children);
  return el;
}

function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  append(el, children);
  return el;
}

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

function $(id) { return document.getElementById(id); }

function fill(id, ...children) {
  const el = typeof id === 'string' ? $(id) : id;
  if (!el) return;
  el.replaceChildren();
  append(el, children);
}

function sleep(ms) { return new Promise((r) => setTimeout(r, ms)); }

function fmtTime(ms) {
  if (!ms) return '—';
  return new Date(ms).toISOString().replace('T', ' ').replace(/\.\d+Z$/, 'Z');
}

function fmtAge(ms) {
  if (!ms) return 'never';
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  if (s < 90) return s + ' s ago';
  if (s < 5400) return Math.round(s / 60) + ' min ago';
  if (s < 172800) return Math.round(s / 3600) + ' h ago';
  return Math.round(s / 86400) + ' d ago';
}

function num(x, digits) {
  if (x === undefined || x === null || Number.isNaN(x)) return '—';
  return Number(x).toFixed(digits === undefined ? 0 : digits);
}

function shardName(r) {
  if (r === null || r === undefined) return '?';
  if (typeof r === 'string') return r;
  return r.id ? (r.version ? r.id + '@' + r.version : r.id) : JSON.stringify(r);
}

function table(headers, rows, attrs) {
  return h('table', attrs,
    h('thead', null, h('tr', null, headers.map((x) =>
      h('th', { class: x.startsWith('#') ? 'num' : null }, x.replace(/^#/, ''))))),
    h('tbody', null, rows));
}

function na(what) { return h('p', { class: 'na' }, what + ': not available on this allocator'); }

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

async function api(path, opts) {
  opts = opts || {};
  const headers = { Authorization: 'Bearer ' + (token() || '') };
  let body;
  if (opts.body !== undefined) {
    headers['Content-Type'] = 'application/json';
    body = JSON.stringify(opts.body);
  }
  const r = await fetch(path, { method: opts.method || 'GET', headers, body, cache: 'no-store' });
  const text = await r.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (r.status === 401) {
    askToken('The allocator refused the token' + (data && data.error ? ': ' + data.error : '.'));
    throw new ApiError(401, 'unauthorized');
  }
  return { status: r.status, ok: r.ok, data, bytes: text.length };
}

// A route the other parts of this version may not have: 404, 405 and 501
// all mean "this allocator does not serve it".
function unavailable(r) { return r.status === 404 || r.status === 405 || r.status === 501; }

function errorText(r) {
  return (r.data && r.data.error) ? r.data.error : ('HTTP ' + r.status);
}

// ---------------------------------------------------------------- token

function askToken(message) {
  const d = $('login');
  fill('login-error', message || '');
  if (!d.open) d.showModal();
}

function initLogin() {
  $('login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const t = $('login-token').value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $('login-token').value = '';
    $('login').close();
    route();
  });
  $('logout').addEventListener('click', () => {
    sessionStorage.removeItem(TOKEN_KEY);
    askToken('');
  });
}

// ----------------------------------------------------------- live events

const live = { handlers: new Set(), connected: false, abort: null };

// A stream left open by a page the browser keeps (reload, back-forward
// cache) holds one of the six connections a browser allows per host: the
// seventh reload would then wait a minute for a free one. End it when the
// page goes.
window.addEventListener('pagehide', () => { if (live.abort) live.abort.abort(); });
window.addEventListener('pageshow', (e) => { if (e.persisted) location.reload(); });

async function liveLoop() {
  for (;;) {
    if (!token()) { await sleep(1000); continue; }
    try {
      live.abort = new AbortController();
      const r = await fetch('/v1/events', {
        headers: { Authorization: 'Bearer ' + token() }, cache: 'no-store', signal: live.abort.signal,
      });
      if (!r.ok || !r.body) { await sleep(5000); continue; }
      setLive(true);
      const reader = r.body.getReader();
      const decoder = new TextDecoder();
      let buf = '';
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buf.indexOf('\n\n')) >= 0) {
          const block = buf.slice(0, cut);
          buf = buf.slice(cut + 2);
          let name = 'message', data = '';
          for (const line of block.split('\n')) {
            if (line.startsWith('event:')) name = line.slice(6).trim();
            else if (line.startsWith('data:')) data += line.slice(5).trim();
          }
          if (!data) continue;
          let obj;
          try { obj = JSON.parse(data); } catch (_) { continue; }
          for (const f of live.handlers) f(name, obj);
        }
      }
    } catch (_) { /* reconnect below */ }
    setLive(false);
    await sleep(3000);
  }
}

function setLive(on) {
  live.connected = on;
  const el = $('live');
  el.className = 'live ' + (on ? 'on' : 'off');
  el.textContent = on ? 'live ●' : 'live ○';
}

// Calls `f` at most once per `ms`, trailing.
function throttle(f, ms) {
  let timer = null, last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(() => { timer = null; last = Date.now(); f(); }, wait);
  };
}

// ---------------------------------------------------------------- router

let generation = 0;

function route() {
  generation += 1;
  live.handlers.clear();
  let hash = location.hash || '#/fleet';
  if (hash.startsWith('#token=')) {
    sessionStorage.setItem(TOKEN_KEY, decodeURIComponent(hash.slice(7)));
    history.replaceState(null, '', '#/fleet');
    hash = '#/fleet';
  }
  if (!token()) { askToken(''); return; }
  for (const a of document.querySelectorAll('header nav a')) {
    a.classList.toggle('active', hash.startsWith(a.getAttribute('href')));
  }
  const gen = generation;
  const page = hash.startsWith('#/device/') ? renderDevice(decodeURIComponent(hash.slice(9)), gen)
    : hash.startsWith('#/catalog') ? renderCatalog(gen)
      : hash.startsWith('#/audit') ? renderAudit(gen)
        : renderFleet(gen);
  page.catch((e) => {
    if (e instanceof ApiError && e.status === 401) return;
    fill('main', h('p', { class: 'error' }, 'Error: ' + e.message));
  });
}

// ----------------------------------------------------------------- fleet

const fleetQuery = { q: '', tier: '', tenant: '', offset: 0 };
let fleetMeasured = false;

async function renderFleet(gen) {
  fill('main',
    h('h1', null, 'Fleet'),
    h('div', { class: 'cards', id: 'fleet-cards' }, h('span', { class: 'muted' }, 'Loading…')),
    h('div', { class: 'grid' },
      h('section', { class: 'panel' }, h('h2', null, 'Units per tier'), h('div', { id: 'fleet-tiers' })),
      h('section', { class: 'panel' }, h('h2', null, 'Units per tenant'), h('div', { id: 'fleet-tenants' })),
      h('section', { class: 'panel' }, h('h2', null, 'Reputation'), h('div', { id: 'fleet-reputation' })),
      h('section', { class: 'panel' }, h('h2', null, 'Failing catalog entries'), h('div', { id: 'fleet-failing' }))),
    h('section', { class: 'panel' },
      h('h2', null, 'Devices'),
      h('div', { class: 'toolbar' },
        h('input', { id: 'fleet-q', type: 'search', placeholder: 'device id contains…', value: fleetQuery.q }),
        h('select', { id: 'fleet-tier' }, h('option', { value: '' }, 'every tier')),
        h('select', { id: 'fleet-tenant' }, h('option', { value: '' }, 'every tenant')),
        h('button', { id: 'fleet-prev', type: 'button' }, '‹ prev'),
        h('button', { id: 'fleet-next', type: 'button' }, 'next ›'),
        h('span', { id: 'fleet-range', class: 'muted' })),
      h('div', { id: 'fleet-table' })));
  let debounce = null;
  $('fleet-q').addEventListener('input', () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => { fleetQuery.q = $('fleet-q').value; fleetQuery.offset = 0; loadTable(gen); }, 250);
  });
  $('fleet-tier').addEventListener('change', () => { fleetQuery.tier = $('fleet-tier').value; fleetQuery.offset = 0; loadTable(gen); });
  $('fleet-tenant').addEventListener('change', () => { fleetQuery.tenant = $('fleet-tenant').value; fleetQuery.offset = 0; loadTable(gen); });
  $('fleet-prev').addEventListener('click', () => { fleetQuery.offset = Math.max(0, fleetQuery.offset - PAGE); loadTable(gen); });
  $('fleet-next').addEventListener('click', () => { fleetQuery.offset += PAGE; loadTable(gen); });
  const refresh = throttle(() => { if (gen === generation) { loadSummary(gen); loadTable(gen); } }, 3000);
  live.handlers.add((name) => { if (name === 'report' || name === 'instruction') refresh(); });
  await Promise.all([loadSummary(gen), loadTable(gen)]);
  if (!fleetMeasured && gen === generation) {
    // From navigation start to the summary and the table on screen (the bench reads it).
    fleetMeasured = true;
    performance.mark('fleet:rendered');
    document.body.dataset.fleetRendered = String(performance.now());
  }
}

async function loadSummary(gen) {
  const r = await api('/v1/fleet');
  if (gen !== generation) return;
  if (!r.ok) {
    fill('fleet-cards', unavailable(r) ? na('Fleet summary') : h('p', { class: 'error' }, errorText(r)));
    return;
  }
  const f = r.data;
  const card = (k, v, id) => h('div', { class: 'card', id }, h('div', { class: 'v' }, v), h('div', { class: 'k' }, k));
  fill('fleet-cards',
    card('devices', f.devices, 'card-devices'),
    card('online', f.presence.online, 'card-online'),
    card('stale', f.presence.stale, 'card-stale'),
    card('offline', f.presence.offline, 'card-offline'),
    card('not seen yet', f.presence.unknown, 'card-unknown'),
    card('drained', f.drained, 'card-drained'),
    card('active shards', f.active_shards, 'card-shards'),
    card('pending instructions', f.pending_instructions, 'card-pending'));
  fill('fleet-tiers', usageTable('tier', f.tiers));
  fill('fleet-tenants', usageTable('tenant', f.tenants.map((t) => Object.assign({}, t, { name: t.name || '(none)' }))));
  fill('fleet-reputation', histogram(f.reputation_histogram));
  fill('fleet-failing', f.failing_catalog.length === 0 ? h('p', { class: 'muted' }, 'none')
    : table(['shard', 'capability', 'arch', 'state', '#devices', 'reason'], f.failing_catalog.map((c) =>
      h('tr', null, h('td', null, c.shard), h('td', null, c.capability), h('td', null, c.arch),
        h('td', null, c.marked ? 'failing (avoided)' : 'start failures'),
        h('td', { class: 'num' }, c.devices), h('td', { class: 'wrap' }, c.reason)))));
  fillSelect('fleet-tier', f.tiers.map((t) => t.name), fleetQuery.tier);
  fillSelect('fleet-tenant', f.tenants.map((t) => t.name).filter((n) => n), fleetQuery.tenant);
  performance.mark('fleet:summary');
}

function fillSelect(id, names, selected) {
  const el = $(id);
  if (!el) return;
  const first = el.options[0];
  el.replaceChildren(first);
  for (const n of names) el.append(h('option', { value: n, selected: n === selected }, n));
}

function usageBar(used, cap) {
  const w = 70, frac = cap > 0 ? Math.min(1, used / cap) : 0;
  return s('svg', { width: w, height: 12, class: 'usage' },
    s('rect', { class: 'bar cap', x: 0, y: 0, width: w, height: 12 }),
    s('rect', { class: 'bar', x: 0, y: 0, width: Math.round(w * frac), height: 12 }));
}

function usageTable(what, rows) {
  return table([what, '#devices', 'compute used / capacity', '', 'data used / capacity', ''], rows.map((t) =>
    h('tr', null, h('td', null, t.name), h('td', { class: 'num' }, t.devices),
      h('td', { class: 'num' }, t.compute_units_used + ' / ' + t.compute_units_capacity),
      h('td', null, usageBar(t.compute_units_used, t.compute_units_capacity)),
      h('td', { class: 'num' }, t.data_units_used + ' / ' + t.data_units_capacity),
      h('td', null, usageBar(t.data_units_used, t.data_units_capacity)))));
}

function histogram(buckets) {
  const W = 360, H = 130, pad = 18, n = buckets.length, bw = (W - 2 * pad) / n;
  const max = Math.max(1, ...buckets);
  const svg = s('svg', { width: W, height: H, class: 'chart histogram', id: 'reputation-histogram' });
  buckets.forEach((c, i) => {
    const bh = Math.round((H - 2 * pad) * c / max);
    const x = pad + i * bw;
    svg.append(s('rect', { class: 'bar', x: x + 1, y: H - pad - bh, width: bw - 2, height: bh },
      s('title', null, (i * 10) + '–' + (i * 10 + 10) + ': ' + c + ' devices')));
    svg.append(s('text', { x: x + bw / 2, y: H - 4, 'text-anchor': 'middle' }, String(i * 10)));
    if (c > 0) svg.append(s('text', { x: x + bw / 2, y: H - pad - bh - 2, 'text-anchor': 'middle' }, String(c)));
  });
  svg.append(s('line', { class: 'axis', x1: pad, y1: H - pad, x2: W - pad, y2: H - pad }));
  return svg;
}

async function loadTable(gen) {
  const p = new URLSearchParams({ offset: fleetQuery.offset, limit: PAGE });
  if (fleetQuery.q) p.set('q', fleetQuery.q);
  if (fleetQuery.tier) p.set('tier', fleetQuery.tier);
  if (fleetQuery.tenant) p.set('tenant', fleetQuery.tenant);
  const r = await api('/v1/devices?' + p);
  if (gen !== generation) return;
  if (!r.ok) { fill('fleet-table', h('p', { class: 'error' }, errorText(r))); return; }
  const page = r.data;
  if (page.total > 0 && page.offset >= page.total) {
    fleetQuery.offset = Math.max(0, Math.floor((page.total - 1) / PAGE) * PAGE);
    return loadTable(gen);
  }
  fill('fleet-range', page.total === 0 ? 'no device matches'
    : (page.offset + 1) + '–' + (page.offset + page.devices.length) + ' of ' + page.total);
  $('fleet-prev').disabled = page.offset === 0;
  $('fleet-next').disabled = page.offset + page.devices.length >= page.total;
  fill('fleet-table', table(
    ['device', 'tier', 'tenant', 'presence', '#reputation', '#compute', '#data', '#shards', 'last report', '#pending', 'drained'],
    page.devices.map((d) => h('tr', { 'data-device': d.device },
      h('td', null, h('a', { href: '#/device/' + encodeURIComponent(d.device) }, d.device)),
      h('td', null, d.tier), h('td', null, d.tenant || ''),
      h('td', null, h('span', { class: 'pill ' + d.presence }, d.presence)),
      h('td', { class: 'num' }, num(d.reputation, 1)),
      h('td', { class: 'num' }, d.compute_units), h('td', { class: 'num' }, d.data_units),
      h('td', { class: 'num' }, d.active_shards),
      h('td', { title: fmtTime(d.last_report_ms) }, fmtAge(d.last_report_ms)),
      h('td', { class: 'num' }, d.pending_instructions),
      h('td', null, d.drained ? 'drained' : ''))),
    { id: 'devices-table' }));
  performance.mark('fleet:table');
}

// ---------------------------------------------------------------- device

// QoS samples seen while the page is open, per device (used when the
// allocator keeps no history).
const liveQos = new Map();
const liveInstructions = new Map();

async function renderDevice(id, gen) {
  const panel = (title, pid, extra) => h('section', { class: 'panel', id: pid + '-panel' },
    h('h2', null, title), extra || null, h('div', { id: pid }, h('span', { class: 'muted' }, 'Loading…')));
  fill('main',
    h('h1', null, 'Device ', h('span', { id: 'dev-id' }, id)),
    h('div', { class: 'cards', id: 'dev-head' }),
    h('section', { class: 'panel', id: 'dev-actions' },
      h('h2', null, 'Operator actions'),
      h('div', { class: 'toolbar' },
        h('button', { id: 'act-drain', type: 'button', class: 'danger', onclick: () => act(id, 'drain') }, 'Drain'),
        h('button', { id: 'act-resume', type: 'button', onclick: () => act(id, 'resume') }, 'Resume'),
        h('span', null, ' shard '),
        h('select', { id: 'act-shard' }),
        h('button', { id: 'act-pin', type: 'button', onclick: () => act(id, 'pin', true) }, 'Pin'),
        h('button', { id: 'act-unpin', type: 'button', onclick: () => act(id, 'unpin', true) }, 'Unpin'),
        h('button', { id: 'act-revoke', type: 'button', class: 'danger', onclick: () => act(id, 'revoke', true) }, 'Revoke'),
        h('button', { id: 'act-unrevoke', type: 'button', onclick: () => act(id, 'unrevoke', true) }, 'Unrevoke')),
      h('p', { id: 'msg' })),
    panel('QoS per class', 'dev-qos'),
    panel('Capabilities and leases', 'dev-timeline'),
    h('div', { class: 'grid' }, panel('Instructions', 'dev-instr'), panel('Reputation changes', 'dev-rep')),
    h('div', { class: 'grid' }, panel('Shard failures and refusals', 'dev-fail'), panel('Decisions', 'dev-dec')),
    panel('Remote diagnostics', 'dev-diag',
      h('div', { class: 'toolbar' }, h('button', { id: 'diag-ask', type: 'button', onclick: () => askDiagnostics(id, gen) }, 'Ask for diagnostics'))));
  api('/v1/catalog').then((r) => {
    if (gen !== generation || !r.ok) return;
    fillSelect('act-shard', r.data.map((c) => c.shard), '');
  });
  const refresh = throttle(() => { if (gen === generation) loadDevice(id, gen); }, 1000);
  live.handlers.add((name, ev) => {
    if (ev.device !== id) return;
    if (name === 'instruction') {
      const l = liveInstructions.get(id) || [];
      l.unshift(ev);
      liveInstructions.set(id, l.slice(0, 50));
    }
    if (name === 'diagnostics') loadDiagnostics(id, gen);
    refresh();
  });
  await loadDevice(id, gen);
  loadDiagnostics(id, gen);
}

async function act(id, op, needsShard) {
  const body = {};
  if (needsShard) {
    const shard = $('act-shard').value;
    if (!shard) { fill('msg', h('span', { class: 'error' }, 'choose a shard first')); return; }
    body.shard = shard;
  }
  const r = await api('/v1/devices/' + encodeURIComponent(id) + '/' + op, { method: 'POST', body });
  fill('msg', r.ok ? h('span', { id: 'msg-ok' }, op + (body.shard ? ' ' + body.shard : '') + ': done')
    : h('span', { class: 'error' }, op + ': ' + errorText(r)));
  loadDevice(id, generation);
}

async function deviceHistory(id, kind) {
  const r = await api('/v1/devices/' + encodeURIComponent(id) + '/history?kind=' + kind + '&limit=500');
  if (!r.ok) return { available: false, entries: [], status: r.status };
  return { available: true, entries: (r.data && r.data.entries) || [] };
}

async function loadDevice(id, gen) {
  const [r, qos, instr, rep, dec] = await Promise.all([
    api('/v1/devices/' + encodeURIComponent(id)),
    deviceHistory(id, 'qos'), deviceHistory(id, 'instruction'), deviceHistory(id, 'reputation'), deviceHistory(id, 'decision')]);
  if (gen !== generation) return;
  if (!r.ok) {
    fill('dev-head', h('p', { class: 'error' }, r.status === 404 ? 'This device is not enrolled.' : errorText(r)));
    return;
  }
  const d = r.data, p = d.policy || {};
  const card = (k, v) => h('div', { class: 'card' }, h('div', { class: 'v' }, v), h('div', { class: 'k' }, k));
  fill('dev-head',
    card('presence', h('span', { class: 'pill ' + d.presence }, d.presence)),
    card('tier', d.tier), card('tenant', p.tenant || '—'),
    card('reputation', num(p.reputation, 1)),
    card('budget (compute / data)', (p.budget_compute_units ?? '—') + ' / ' + (p.budget_data_units ?? '—')),
    card('last report', fmtAge(d.last_report_ms)),
    card('state', p.drained ? 'drained' : 'serving'),
    card('key', d.key_id));
  // QoS: the stored history, else what this page saw.
  const samples = liveQos.get(id) || [];
  if (p.last_qos && !samples.some((x) => x.seq === p.last_qos.seq)) {
    for (const c of p.last_qos.classes || []) {
      samples.push({ seq: p.last_qos.seq, at_ms: p.last_qos.at_ms, class: String(c.class),
        mbit: (c.rate_bps || 0) / 1e6, latency_ms: c.rtt_p95_us ? c.rtt_p95_us / 1000 : null,
        loss_pct: (c.loss_permille || 0) / 10 });
    }
    while (samples.length > 2000) samples.shift();
    liveQos.set(id, samples);
  }
  // Stored windows (`qos_window_s` each; p95 as the latency series),
  // then the reports this page saw after the last stored window.
  const stored = qos.entries.map((e) => ({ ...e, latency_ms: e.rtt_p95_ms ?? e.latency_ms }));
  const lastStored = stored.reduce((m, e) => Math.max(m, e.at_ms + (e.window_ms || 0)), 0);
  fill('dev-qos', qos.available
    ? qosCharts(stored.concat(samples.filter((x) => x.at_ms > lastStored)),
      stored.length ? 'stored history, then reports seen live' : 'reports seen live (no history window closed yet)')
    : [na('QoS history'), qosCharts(samples, 'since this page opened')]);
  fill('dev-timeline', timeline(p, instr.entries));
  fill('dev-instr', instructions(d, instr, liveInstructions.get(id) || []));
  fill('dev-rep', reputation(p, rep));
  fill('dev-fail', failures(p));
  fill('dev-dec', decisions(p, dec));
}

function qosCharts(entries, source) {
  const byClass = new Map();
  for (const e of entries) {
    if (e.kind && e.kind !== 'qos') continue;
    const c = String(e.class);
    if (!byClass.has(c)) byClass.set(c, []);
    byClass.get(c).push(e);
  }
  if (byClass.size === 0) return h('p', { class: 'muted' }, 'No QoS reported yet (' + source + ').');
  const boxes = [];
  for (const [c, list] of [...byClass.entries()].sort()) {
    list.sort((a, b) => a.at_ms - b.at_ms);
    const last = list[list.length - 1];
    boxes.push(h('div', { class: 'chart-box', 'data-class': c },
      h('div', null, h('b', null, c), ' ',
        h('span', { class: 'muted' }, num(last.mbit, 2) + ' Mbit/s, p95 ' + num(last.latency_ms, 1) + ' ms, loss ' + num(last.loss_pct, 1) + ' %')),
      lineChart(list, [{ key: 'mbit', cls: 'line', label: 'Mbit/s' }, { key: 'latency_ms', cls: 'line2', label: 'p95 ms' }])));
  }
  return [h('p', { class: 'muted' }, 'Source: ' + source + '. Blue: Mbit/s; orange: p95 latency (ms), each on its own scale.'),
    h('div', { class: 'charts' }, boxes)];
}

function lineChart(points, series) {
  const W = 320, H = 120, pad = 22;
  const t0 = points[0].at_ms, t1 = Math.max(points[points.length - 1].at_ms, t0 + 1);
  const svg = s('svg', { width: W, height: H, class: 'chart qos-chart' });
  svg.append(s('line', { class: 'axis', x1: pad, y1: H - pad, x2: W - 4, y2: H - pad }));
  svg.append(s('line', { class: 'axis', x1: pad, y1: 4, x2: pad, y2: H - pad }));
  const x = (t) => pad + (W - pad - 4) * (t - t0) / (t1 - t0);
  for (const se of series) {
    const vals = points.filter((p) => typeof p[se.key] === 'number');
    if (vals.length === 0) continue;
    const max = Math.max(1e-9, ...vals.map((p) => p[se.key]));
    const y = (v) => H - pad - (H - pad - 6) * v / max;
    if (vals.length === 1) {
      svg.append(s('circle', { class: 'pt', cx: x(vals[0].at_ms), cy: y(vals[0][se.key]), r: 3 }));
    } else {
      svg.append(s('polyline', { class: se.cls, points: vals.map((p) => x(p.at_ms).toFixed(1) + ',' + y(p[se.key]).toFixed(1)).join(' ') },
        s('title', null, se.label + ' (max ' + num(max, 2) + ')')));
    }
    if (se.cls === 'line') svg.append(s('text', { x: 2, y: 12 }, num(max, max < 10 ? 1 : 0)));
  }
  svg.append(s('text', { x: pad, y: H - 6 }, new Date(t0).toISOString().slice(11, 19)));
  svg.append(s('text', { x: W - 4, y: H - 6, 'text-anchor': 'end' }, new Date(t1).toISOString().slice(11, 19)));
  return svg;
}

function timeline(p, instrEntries) {
  const leases = p.leases || [];
  const now = Date.now();
  const parts = [];
  const tags = [];
  if ((p.pinned || []).length) tags.push('pinned: ' + p.pinned.join(', '));
  if ((p.revoked || []).length) tags.push('revoked: ' + p.revoked.join(', '));
  if (p.drained) tags.push('drained');
  parts.push(h('p', null, tags.length ? tags.join(' · ') : h('span', { class: 'muted' }, 'nothing pinned, revoked or drained')));
  if (leases.length === 0) {
    parts.push(h('p', { class: 'muted', id: 'no-leases' }, 'No active lease.'));
  } else {
    const t0 = Math.min(...leases.map((l) => l.granted_at_ms), now - 60000);
    const t1 = Math.max(...leases.map((l) => l.expires_at_ms), now + 1000);
    const W = 720, row = 22, pad = 150, H = leases.length * row + 24;
    const x = (t) => pad + (W - pad - 8) * (t - t0) / (t1 - t0);
    const svg = s('svg', { width: W, height: H, class: 'chart timeline', id: 'lease-timeline' });
    leases.forEach((l, i) => {
      const y = 4 + i * row;
      const name = l.capability + ' · ' + shardName(l.shard);
      svg.append(s('text', { x: 2, y: y + 13 }, name.length > 28 ? name.slice(0, 27) + '…' : name));
      svg.append(s('rect', { class: 'lease' + (l.expires_at_ms < now ? ' expired' : ''), x: x(l.granted_at_ms), y,
        width: Math.max(2, x(l.expires_at_ms) - x(l.granted_at_ms)), height: row - 6 },
      s('title', null, name + ': ' + l.units + ' units, granted ' + fmtTime(l.granted_at_ms) + ', expires ' + fmtTime(l.expires_at_ms))));
    });
    for (const e of instrEntries || []) {
      if (e.at_ms < t0) continue;
      svg.append(s('line', { class: 'axis', x1: x(e.at_ms), y1: 0, x2: x(e.at_ms), y2: H - 20 }, s('title', null, 'instruction ' + e.seq)));
    }
    svg.append(s('line', { class: 'line2', x1: x(now), y1: 0, x2: x(now), y2: H - 20 }));
    svg.append(s('text', { x: pad, y: H - 4 }, fmtTime(t0)));
    svg.append(s('text', { x: W - 8, y: H - 4, 'text-anchor': 'end' }, fmtTime(t1)));
    parts.push(svg);
    parts.push(table(['capability', 'shard', 'kind', '#units', 'granted', 'expires'], leases.map((l) =>
      h('tr', null, h('td', null, l.capability), h('td', null, shardName(l.shard)), h('td', null, String(l.kind)),
        h('td', { class: 'num' }, l.units), h('td', null, fmtTime(l.granted_at_ms)), h('td', null, fmtTime(l.expires_at_ms)))),
    { id: 'leases-table' }));
  }
  return parts;
}

function instructions(d, hist, seen) {
  const parts = [h('p', null, 'sent ' + d.instructions_sent + ', applied ' + d.instructions_applied +
    ', rejected ' + d.instructions_rejected + '; last applied #' + d.applied_instruction_seq +
    (d.pending_instructions.length ? '; pending #' + d.pending_instructions.join(', #') : '; none pending'))];
  if (hist.available) {
    // A `sent` entry lists the operations; later ones give the outcome.
    parts.push(table(['#seq', 'when', 'status', 'operations', 'why'], hist.entries.map((e) =>
      h('tr', { 'data-status': e.status }, h('td', { class: 'num' }, e.seq), h('td', null, fmtTime(e.at_ms)),
        h('td', null, e.status), h('td', { class: 'wrap' }, (e.ops || []).join('; ')),
        h('td', { class: 'wrap' }, e.reason || ''))), { id: 'instructions-table' }));
  } else {
    parts.push(na('Instruction history'));
    if (seen.length) {
      parts.push(h('p', { class: 'muted' }, 'Seen live since this page opened:'));
      parts.push(table(['#seq', 'when', 'status'], seen.map((e) =>
        h('tr', null, h('td', { class: 'num' }, e.seq), h('td', null, fmtTime(e.at_ms)),
          h('td', null, e.kind === 'ack' ? e.outcome : 'sent')))));
    }
  }
  return parts;
}

function reputation(p, hist) {
  const rows = (p.reputation_history || []).map((e) => ({ at_ms: e.at_ms, from: e.old, to: e.new, reason: e.reason }));
  if (hist.available) {
    for (const e of hist.entries) {
      if (!rows.some((r) => r.at_ms === e.at_ms && r.reason === e.reason)) rows.push(e);
    }
  }
  rows.sort((a, b) => b.at_ms - a.at_ms);
  if (rows.length === 0) return h('p', { class: 'muted' }, 'No change yet.');
  return table(['when', '#from', '#to', 'reason'], rows.map((e) =>
    h('tr', null, h('td', null, fmtTime(e.at_ms)), h('td', { class: 'num' }, num(e.from, 1)),
      h('td', { class: 'num' }, num(e.to, 1)), h('td', { class: 'wrap' }, e.reason))), { id: 'reputation-table' });
}

function failures(p) {
  const sf = Object.entries(p.start_failures || {});
  const rf = Object.entries(p.refusal_reasons || {});
  const parts = [];
  parts.push(sf.length === 0 ? h('p', { class: 'muted' }, 'No shard failed to start.')
    : table(['shard', '#count', 'last', 'avoided until', 'reason'], sf.map(([k, f]) =>
      h('tr', null, h('td', null, k), h('td', { class: 'num' }, f.count), h('td', null, fmtTime(f.last_ms)),
        h('td', null, fmtTime(f.until_ms)), h('td', { class: 'wrap' }, f.reason))), { id: 'failures-table' }));
  parts.push(rf.length === 0 ? h('p', { class: 'muted' }, 'No capability refused.')
    : table(['capability', 'refused because'], rf.map(([k, why]) =>
      h('tr', null, h('td', null, k), h('td', { class: 'wrap' }, why))), { id: 'refusals-table' }));
  return parts;
}

function decisions(p, hist) {
  // The stored history has every decision; the device view's latest ones
  // fill in what history does not hold (none kept, or pruned).
  const rows = hist.available
    ? hist.entries.map((e) => ({ at_ms: e.at_ms, what: e.decision, subject: e.capability, why: e.reason || '' }))
    : [];
  const key = (r) => r.what + '\u0000' + r.subject + '\u0000' + r.why;
  const stored = new Set(rows.map(key));
  for (const d of p.decisions || []) {
    const r = { at_ms: d.at_ms, what: String(d.kind), subject: d.subject, why: d.explanation };
    if (!stored.has(key(r))) rows.push(r);
  }
  rows.sort((a, b) => b.at_ms - a.at_ms);
  if (rows.length === 0) return h('p', { class: 'muted' }, 'No decision yet.');
  return table(['when', 'decision', 'about', 'why'], rows.map((e) =>
    h('tr', null, h('td', null, fmtTime(e.at_ms)), h('td', null, e.what), h('td', null, e.subject),
      h('td', { class: 'wrap explanation' }, e.why))), { id: 'decisions-table' });
}

async function loadDiagnostics(id, gen) {
  const r = await api('/v1/devices/' + encodeURIComponent(id) + '/diagnostics');
  if (gen !== generation) return;
  if (!r.ok) {
    // No answer yet is a 400 naming it, not a failure of the page.
    const none = r.data && r.data.error && /no diagnostics/i.test(r.data.error);
    fill('dev-diag', none ? h('p', { class: 'muted' }, r.data.error)
      : unavailable(r) ? na('Remote diagnostics') : h('p', { class: 'error' }, errorText(r)));
    return;
  }
  const d = r.data || {};
  fill('dev-diag',
    h('p', null, 'Received ' + fmtTime(d.at_ms) + (d.truncated ? ' (truncated)' : '')),
    h('h2', null, 'Status'), h('pre', { id: 'diag-status' }, JSON.stringify(d.status, null, 2)),
    h('h2', null, 'Log lines'), h('pre', { id: 'diag-log' }, (d.log_lines || []).join('\n')));
}

async function askDiagnostics(id, gen) {
  const r = await api('/v1/devices/' + encodeURIComponent(id) + '/diagnostics', { method: 'POST', body: {} });
  fill('msg', r.ok ? 'diagnostics asked for; they appear below when the device answers'
    : h('span', { class: 'error' }, unavailable(r) ? 'Remote diagnostics are not available on this allocator.' : 'diagnostics: ' + errorText(r)));
  if (r.ok) setTimeout(() => loadDiagnostics(id, gen), 2000);
}

// --------------------------------------------------------------- catalog

async function renderCatalog(gen) {
  fill('main', h('h1', null, 'Catalog'),
    h('section', { class: 'panel' }, h('h2', null, 'Shards'), h('div', { id: 'cat-shards' }, 'Loading…')),
    h('section', { class: 'panel' }, h('h2', null, 'Rollouts'), h('div', { id: 'cat-rollouts' }, 'Loading…'), h('p', { id: 'msg' })));
  const [c, ro] = await Promise.all([api('/v1/catalog'), api('/v1/rollouts')]);
  if (gen !== generation) return;
  if (!c.ok) fill('cat-shards', unavailable(c) ? na('Catalog') : h('p', { class: 'error' }, errorText(c)));
  else {
    fill('cat-shards', table(['shard', 'capability', 'alternatives', 'digests (per architecture)', 'failing', 'start failures'], c.data.map((r) => {
      const digests = Object.entries(r.digests || {});
      const failing = (r.failing || []).map((f) => f.arch + ': ' + f.reason).join('; ');
      const starts = Object.entries(r.start_failures || {}).map(([a, n]) => a + ' ×' + n).join(', ');
      return h('tr', { 'data-shard': r.shard }, h('td', null, r.shard), h('td', null, r.capability),
        h('td', null, (r.alternatives || []).join(', ')),
        h('td', { class: 'wrap' }, digests.length ? digests.map(([a, d]) => h('div', null, a + ': ', h('code', { title: d }, d.slice(0, 16) + '…'))) : '—'),
        h('td', { class: 'wrap' + (failing ? ' error' : '') }, failing || 'no'),
        h('td', null, starts || '0'));
    }), { id: 'catalog-table' }));
  }
  if (!ro.ok) { fill('cat-rollouts', unavailable(ro) ? na('Staged rollouts') : h('p', { class: 'error' }, errorText(ro))); return; }
  // `GET /v1/rollouts`: { active: [...], ended: [...], config } (RolloutView).
  const active = (ro.data && ro.data.active) || [];
  const ended = (ro.data && ro.data.ended) || [];
  const cfg = (ro.data && ro.data.config) || {};
  if (active.length === 0 && ended.length === 0) {
    fill('cat-rollouts', h('p', { class: 'muted' }, 'No rollout. A changed catalog entry is rolled out to a canary share first (' +
      ((cfg.canary_permille || 0) / 10) + ' % of each tenant × tier group).'));
    return;
  }
  const row = (x, live) => {
    const groups = Object.entries(x.groups || {}).map(([g, [n, c]]) => g + ': ' + c + ' of ' + n).join(', ');
    const failures = Object.entries(x.failures || {}).map(([d, why]) => d + ': ' + why).join('; ');
    return h('tr', { 'data-rollout': x.shard, 'data-phase': x.phase },
      h('td', null, x.shard), h('td', null, x.previous_version + ' → ' + x.new_version),
      h('td', null, x.phase), h('td', null, fmtTime(x.started_ms)),
      h('td', { class: 'wrap' }, groups || '—'),
      h('td', null, (x.failure_pct || 0).toFixed(0) + ' % (threshold ' + (x.threshold_pct || 0).toFixed(0) + ' %)'),
      h('td', { class: 'wrap' + (failures ? ' error' : '') }, failures || 'none'),
      h('td', { class: 'wrap explanation' }, x.reason || ''),
      h('td', null, live && x.phase === 'canary' ? [
        h('button', { type: 'button', onclick: () => rollout(x.shard, 'promote', gen) }, 'Promote'), ' ',
        h('button', { type: 'button', class: 'danger', onclick: () => rollout(x.shard, 'rollback', gen) }, 'Roll back')] : ''));
  };
  fill('cat-rollouts', table(['shard', 'version', 'phase', 'started', 'canaries per group', 'failure rate', 'failures', 'why', ''],
    [...active.map((x) => row(x, true)), ...ended.map((x) => row(x, false))], { id: 'rollouts-table' }));
}

async function rollout(shard, op, gen) {
  const r = await api('/v1/rollouts/' + encodeURIComponent(shard) + '/' + op, { method: 'POST', body: {} });
  fill('msg', r.ok ? op + ' ' + shard + ': done' : h('span', { class: 'error' }, op + ': ' + errorText(r)));
  if (gen === generation) renderCatalog(gen);
}

// ----------------------------------------------------------------- audit

async function renderAudit(gen) {
  fill('main', h('h1', null, 'Audit log'),
    h('section', { class: 'panel' },
      h('div', { class: 'toolbar' },
        h('input', { id: 'audit-actor', placeholder: 'actor' }),
        h('input', { id: 'audit-target', placeholder: 'target' }),
        h('button', { id: 'audit-go', type: 'button' }, 'Filter'),
        h('button', { id: 'audit-export', type: 'button' }, 'Export CSV'),
        h('button', { id: 'audit-export-jsonl', type: 'button' }, 'Export JSON lines')),
      h('div', { id: 'audit-list' }, 'Loading…')));
  const params = () => {
    const p = new URLSearchParams({ limit: 500 });
    if ($('audit-actor').value) p.set('actor', $('audit-actor').value);
    if ($('audit-target').value) p.set('target', $('audit-target').value);
    return p;
  };
  const load = async () => {
    const r = await api('/v1/audit?' + params());
    if (gen !== generation) return;
    if (!r.ok) { fill('audit-list', unavailable(r) ? na('Audit log') : h('p', { class: 'error' }, errorText(r))); return; }
    const entries = (r.data && r.data.entries) || [];
    fill('audit-list', entries.length === 0 ? h('p', { class: 'muted' }, 'No entry.')
      : table(['when', 'actor', 'role', 'action', 'target', 'outcome', 'detail'], entries.map((e) =>
        h('tr', null, h('td', null, fmtTime(e.at_ms)), h('td', null, e.actor), h('td', null, e.role),
          h('td', null, e.action), h('td', null, e.target), h('td', null, e.outcome),
          h('td', { class: 'wrap' }, typeof e.detail === 'string' ? e.detail : JSON.stringify(e.detail)))), { id: 'audit-table' }));
  };
  // The export needs the token too, so it is fetched here and saved as a file.
  const exportAs = async (format, ext, type) => {
    const p = params();
    p.set('format', format);
    const r = await fetch('/v1/audit?' + p, { headers: { Authorization: 'Bearer ' + token() } });
    if (!r.ok) { fill('audit-list', na('Audit export')); return; }
    const blob = new Blob([await r.text()], { type });
    const a = h('a', { href: URL.createObjectURL(blob), download: 'shardline-audit.' + ext });
    document.body.append(a);
    a.click();
    a.remove();
  };
  $('audit-go').addEventListener('click', load);
  $('audit-export').addEventListener('click', () => exportAs('csv', 'csv', 'text/csv'));
  $('audit-export-jsonl').addEventListener('click', () => exportAs('jsonl', 'jsonl', 'application/x-ndjson'));
  live.handlers.add((name) => { if (name === 'audit') load(); });
  await load();
}

// ------------------------------------------------------------------ start

initLogin();
window.addEventListener('hashchange', route);
route();
liveLoop();
