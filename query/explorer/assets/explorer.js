// The cube explorer: a page over the slice API (docs/slices.md). The
// address bar's query string holds the whole view and is, but for "sort",
// the very request sent to /api/v1/cube/slice, so a shared link, a reload,
// back and forward all show the same answer.
'use strict';

// The slice parameters the page sets, in the order the URL shows them.
const API_PARAMS = ['family', 'where', 'by', 'since', 'start', 'end', 'step', 'resolution', 'measures', 'limit'];
// Characters a query string may carry unescaped; the URL stays readable.
const READABLE = { '%2C': ',', '%3D': '=', '%7C': '|', '%7E': '~', '%3A': ':', '%2F': '/', '%21': '!' };
const STEPS = ['10s', '1m', '5m', '15m', '1h', '6h', '1d'];
// The chart draws the first groups only; more lines are unreadable.
const MAX_LINES = 10;
const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];
const SVG = 'http://www.w3.org/2000/svg';

const number = new Intl.NumberFormat('en-US', { maximumFractionDigits: 6 });
const $ = (id) => document.getElementById(id);

let schema = null; // the answer of /api/v1/cube/schema
let state = null; // the view the URL holds
let shown = null; // the slice on screen
let latest = 0; // the newest request; answers to older ones are dropped

// ---- state and URL

function readURL() {
  const q = new URLSearchParams(location.search);
  const s = {};
  for (const k of API_PARAMS) s[k] = q.get(k) || '';
  s.sort = q.get('sort') || '';
  return s;
}

function params(s) {
  const q = new URLSearchParams();
  for (const k of API_PARAMS) if (s[k]) q.set(k, s[k]);
  return q;
}

function queryString(s) {
  const q = params(s);
  if (s.sort) q.set('sort', s.sort);
  return q.toString().replace(/%(2C|3D|7C|7E|3A|2F|21)/g, (m) => READABLE[m]);
}

// remember makes s the current view; how is 'push' (a new history entry),
// 'replace', or '' when the URL already shows it.
function remember(s, how) {
  state = s;
  const qs = queryString(s);
  if (how === 'push' && qs !== location.search.slice(1)) history.pushState(null, '', '?' + qs);
  else if (how === 'replace') history.replaceState(null, '', '?' + qs);
}

function defaults() {
  const f = schema.families[0];
  return {
    family: f.name, where: '', by: f.dimensions.length ? f.dimensions[0].levels[0] : '',
    since: '1h', start: '', end: '', step: '', resolution: '', measures: 'sum,count', limit: '20', sort: '',
  };
}

// afterSlice is the view a drill-down or roll-up answer stands for.
function afterSlice(d, s) {
  return { ...s, where: d.where.join(','), by: d.by.join(',') };
}

const list = (v) => v.split(',').map((x) => x.trim()).filter((x) => x);
const family = (name) => schema.families.find((f) => f.name === name);

// ---- API

async function api(path, q) {
  let resp;
  try {
    resp = await fetch('api/v1/cube/' + path + (q ? '?' + q.toString() : ''), { headers: { Accept: 'application/json' } });
  } catch (e) {
    throw new Error('cannot reach the node: ' + e.message);
  }
  let body = null;
  try {
    body = await resp.json();
  } catch (e) {
    // Not JSON: reported below with the HTTP status.
  }
  if (!resp.ok || !body || body.status !== 'success') {
    throw new Error(body && body.error ? `${body.errorType}: ${body.error}` : `HTTP ${resp.status} ${resp.statusText}`);
  }
  return body.data;
}

// run performs request, which resolves to [view, slice], and shows the
// answer unless a newer request started meanwhile.
async function run(request, how) {
  const mine = ++latest;
  document.body.dataset.state = 'loading';
  try {
    const [s, d] = await request();
    if (mine !== latest) return;
    remember(s, how);
    fillForm(s);
    shown = d;
    draw();
    document.body.dataset.state = 'ready';
  } catch (e) {
    if (mine !== latest) return;
    showError(e.message);
  }
}

// load shows view s; the URL changes first, so a refused request stays
// shareable and shows the same error again.
function load(s, how) {
  remember(s, how);
  run(async () => [s, await api('slice', params(s))], '');
}

// navigate calls a drill-down or roll-up endpoint times times, from view
// s and then from the view each answer stands for, and shows the last
// answer.
function navigate(s, path, extra, times) {
  run(async () => {
    let d = null;
    for (let i = 0; i < times; i++) {
      const q = params(s);
      for (const [k, v] of Object.entries(extra)) q.set(k, v);
      d = await api(path, q);
      s = afterSlice(d, s);
    }
    return [s, d];
  }, 'push');
}

// ---- the form

function option(sel, value, text) {
  const o = document.createElement('option');
  o.value = value;
  o.textContent = text;
  sel.append(o);
}

// choose selects value, adding it when the list lacks it (a URL may name
// any duration or an unknown family; the API judges it).
function choose(sel, value) {
  if (![...sel.options].some((o) => o.value === value)) option(sel, value, value);
  sel.value = value;
}

function fillBy(fam, by) {
  const box = $('by');
  box.replaceChildren(box.querySelector('legend'));
  if (!fam) return;
  for (const dim of fam.dimensions) {
    const span = el('span', { class: 'dimension' });
    for (const l of dim.levels) {
      const cb = el('input', { type: 'checkbox', value: l, id: 'by-' + l, 'data-testid': 'by-' + l });
      cb.checked = by.includes(l);
      span.append(el('label', { for: 'by-' + l }, cb, ' ' + l));
    }
    box.append(span);
  }
}

function fillForm(s) {
  choose($('family'), s.family);
  fillBy(family(s.family), list(s.by));
  $('where').value = s.where;
  choose($('since'), s.since);
  $('start').value = s.start;
  $('end').value = s.end;
  rangeInputs();
  $('step').value = s.step;
  choose($('resolution'), s.resolution);
  $('limit').value = s.limit;
  const ms = s.measures ? list(s.measures) : ['sum'];
  for (const cb of document.querySelectorAll('#measures input')) cb.checked = ms.includes(cb.value);
}

function readForm() {
  const since = $('since').value;
  const checked = (sel) => [...document.querySelectorAll(sel)].filter((c) => c.checked).map((c) => c.value).join(',');
  return {
    family: $('family').value,
    where: $('where').value.trim(),
    by: checked('#by input'),
    since,
    start: since ? '' : $('start').value.trim(),
    end: since ? '' : $('end').value.trim(),
    step: $('step').value.trim(),
    resolution: $('resolution').value,
    measures: checked('#measures input'),
    limit: $('limit').value.trim(),
    sort: state ? state.sort : '',
  };
}

function rangeInputs() {
  const preset = $('since').value !== '';
  $('start').disabled = preset;
  $('end').disabled = preset;
}

// ---- drawing

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  e.append(...children);
  return e;
}

function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  e.append(...children);
  return e;
}

const time = (sec) => new Date(sec * 1000).toISOString().replace(/:00\.000Z$|\.000Z$/, 'Z').replace('T', ' ');
const groupName = (d, g) => d.by.map((l) => g.labels[l]).join(' / ') || 'all';

function draw() {
  $('error').hidden = true;
  drawInfo(shown);
  drawCrumbs(shown);
  drawTable(shown);
  drawChart(shown);
}

function showError(msg) {
  const e = $('error');
  e.textContent = msg;
  e.hidden = false;
  shown = null;
  $('info').replaceChildren();
  $('crumbs').replaceChildren();
  $('chart-section').hidden = true;
  for (const part of ['thead', 'tbody', 'tfoot']) $('table').querySelector(part).replaceChildren();
  $('table-caption').textContent = '';
  document.body.dataset.state = 'error';
}

function drawInfo(d) {
  const info = $('info');
  info.replaceChildren(
    'Served from cuboid ',
    el('strong', { 'data-testid': 'cuboid' }, d.cuboid.length ? d.cuboid.join(', ') : 'apex (no labels)'),
    ' at resolution ',
    el('strong', { 'data-testid': 'resolution-used' }, d.resolution),
  );
  if (d.step) info.append(', step ', el('strong', {}, d.step));
  const align = d.range.alignment ? d.range.alignment[0].toUpperCase() + d.range.alignment.slice(1) + '.' : '';
  info.append(`; ${d.totalGroups} group${d.totalGroups === 1 ? '' : 's'}, ${time(d.range.start)} to ${time(d.range.end)}. ${align}`);
}

// equalities maps each label the slice pins with "label=value" to its value.
function equalities(where) {
  const m = new Map();
  for (const w of where) {
    const i = w.search(/[=!]/);
    if (w[i] === '=' && w[i + 1] !== '~') m.set(w.slice(0, i), w.slice(i + 1));
  }
  return m;
}

// drawCrumbs shows, per hierarchy, the levels pinned by drilling down; a
// crumb rolls back up to it.
function drawCrumbs(d) {
  const nav = $('crumbs');
  nav.replaceChildren();
  const eq = equalities(d.where);
  for (const dim of family(d.family).dimensions) {
    if (dim.levels.length < 2) continue;
    const pinned = dim.levels.filter((l) => eq.has(l));
    const grouped = dim.levels.slice(1).some((l) => d.by.includes(l));
    if (!pinned.length && !grouped) continue;
    const ol = el('ol', { 'data-testid': 'crumbs-' + dim.name, 'aria-label': dim.name });
    const crumb = (text, ups) => {
      if (ups === 0) return el('li', { 'aria-current': 'location' }, text);
      const b = el('button', { type: 'button', 'data-testid': 'crumb' }, text);
      b.addEventListener('click', () => navigate(state, 'rollup', { dimension: dim.name }, ups));
      return el('li', {}, b);
    };
    ol.append(crumb('all ' + dim.name, pinned.length));
    pinned.forEach((l, i) => ol.append(crumb(`${l} ${eq.get(l)}`, pinned.length - 1 - i)));
    const up = el('button', { type: 'button', 'data-testid': 'up-' + dim.name, class: 'up' }, 'Up');
    up.addEventListener('click', () => navigate(state, 'rollup', { dimension: dim.name }, 1));
    nav.append(el('div', { class: 'crumbs' }, ol, up));
  }
}

function columns(d) {
  return [...d.by.map((l) => ({ key: l, num: false })), ...d.measures.map((m) => ({ key: m, num: true }))];
}

// sorting is the column and direction the rows are in: the one clicked, or
// the order the API applied.
function sorting(d) {
  const keys = columns(d).map((c) => c.key);
  const [key, dir] = state.sort.split(':');
  if (keys.includes(key) && (dir === 'asc' || dir === 'desc')) return [key, dir];
  const desc = d.order.startsWith('-');
  const measure = desc ? d.order.slice(1) : d.order;
  return keys.includes(measure) ? [measure, desc ? 'desc' : 'asc'] : ['', ''];
}

function sortBy(key, num) {
  const [cur, dir] = sorting(shown);
  const next = cur === key ? (dir === 'asc' ? 'desc' : 'asc') : num ? 'desc' : 'asc';
  remember({ ...state, sort: `${key}:${next}` }, 'replace');
  drawTable(shown);
}

// drillLevel is the level a click on a row pins: the deepest group-by level
// of the first hierarchy that has one below it.
function drillLevel(d) {
  for (const dim of family(d.family).dimensions) {
    const deepest = dim.levels.findLastIndex((l) => d.by.includes(l));
    if (deepest >= 0 && deepest < dim.levels.length - 1) return [dim, deepest];
  }
  return [null, -1];
}

// drill pins a row's value at level i of dim, and its values above it
// (a cluster name may repeat across datacenters), then groups by the next
// level down.
function drill(d, g, dim, i) {
  const eq = equalities(d.where);
  const where = [...d.where];
  for (const l of dim.levels.slice(0, i)) {
    if (eq.get(l) !== g.labels[l]) where.push(`${l}=${g.labels[l]}`);
  }
  navigate({ ...state, where: where.join(',') }, 'drilldown', { dimension: dim.levels[i], value: g.labels[dim.levels[i]] }, 1);
}

function drawTable(d) {
  const table = $('table');
  const cols = columns(d);
  const [key, dir] = sorting(d);
  const head = el('tr');
  for (const c of cols) {
    const sort = c.key === key ? (dir === 'asc' ? 'ascending' : 'descending') : 'none';
    const b = el('button', { type: 'button', 'data-testid': 'sort-' + c.key }, c.key, el('span', { 'aria-hidden': 'true', class: 'arrow' }, sort === 'ascending' ? ' ▲' : sort === 'descending' ? ' ▼' : ''));
    b.addEventListener('click', () => sortBy(c.key, c.num));
    head.append(el('th', { scope: 'col', 'aria-sort': sort, class: c.num ? 'num' : '' }, b));
  }
  table.querySelector('thead').replaceChildren(head);

  const value = (g, c) => (c.num ? g.values[c.key] : g.labels[c.key] || '');
  const rows = d.groups.map((g, i) => [g, i]);
  const col = cols.find((c) => c.key === key);
  if (col && state.sort) {
    const sign = dir === 'asc' ? 1 : -1;
    rows.sort(([a, i], [b, j]) => {
      const x = value(a, col);
      const y = value(b, col);
      const cmp = col.num ? x - y : x.localeCompare(y, undefined, { numeric: true });
      return sign * cmp || i - j;
    });
  }
  const [dim, lvl] = drillLevel(d);
  const cells = (g) => cols.map((c) => {
    if (!c.num) {
      const text = g.labels[c.key] || '';
      return el('td', {}, dim && c.key === dim.levels[lvl] ? el('button', { type: 'button', class: 'drill', title: `Drill into ${c.key} ${text}` }, text) : text);
    }
    return el('td', { class: 'num', 'data-measure': c.key, 'data-value': String(g.values[c.key]) }, number.format(g.values[c.key]));
  });
  const body = rows.map(([g]) => {
    const tr = el('tr', { 'data-testid': 'row' }, ...cells(g));
    if (dim) {
      tr.classList.add('drillable');
      tr.addEventListener('click', () => drill(d, g, dim, lvl));
    }
    return tr;
  });
  if (!d.groups.length) body.push(el('tr', {}, el('td', { colspan: cols.length }, 'No data in this range.')));
  table.querySelector('tbody').replaceChildren(...body);

  const foot = [];
  const footRow = (testid, label, g) => el('tr', { 'data-testid': testid },
    el('th', { scope: 'row', colspan: d.by.length }, label),
    ...d.measures.map((m) => el('td', { class: 'num', 'data-measure': m, 'data-value': String(g.values[m]) }, number.format(g.values[m]))));
  if (d.by.length && d.rest) foot.push(footRow('rest', `(${d.rest.groups} more)`, d.rest));
  if (d.by.length) foot.push(footRow('total', '(total)', d.total));
  table.querySelector('tfoot').replaceChildren(...foot);

  $('table-caption').textContent = `${d.family} by ${d.by.join(', ') || 'nothing (one group)'}` +
    (d.where.length ? ` where ${d.where.join(', ')}` : '') +
    (dim ? `; click a row to drill down to its ${dim.levels[lvl + 1]}s` : '');
}

// niceCeil rounds v up to 1, 2 or 5 times a power of ten.
function niceCeil(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  return [1, 2, 5, 10].map((k) => k * p).find((x) => x >= v);
}

function drawChart(d) {
  const section = $('chart-section');
  section.hidden = !d.step || !d.groups.length;
  if (section.hidden) return;
  const m = d.measures[0];
  const groups = d.groups.slice(0, MAX_LINES);
  const ts = groups[0].series.map((p) => p.t);
  const [t0, t1] = [ts[0], ts[ts.length - 1]];
  const top = niceCeil(Math.max(...groups.flatMap((g) => g.series.map((p) => p.values[m]))));
  const [W, H, L, R, T, B] = [800, 260, 70, 12, 10, 28];
  const x = (t) => (t1 === t0 ? (L + W - R) / 2 : L + ((t - t0) / (t1 - t0)) * (W - L - R));
  const y = (v) => H - B - (v / top) * (H - T - B);

  $('chart-title').textContent = `${m} per ${d.step}` + (d.groups.length > MAX_LINES ? ` (the first ${MAX_LINES} groups)` : '');
  const chart = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': `${m} per ${d.step} of each group, ${time(t0)} to ${time(t1)}` });
  for (const v of [0, top / 2, top]) {
    chart.append(svg('line', { x1: L, x2: W - R, y1: y(v), y2: y(v), class: 'grid' }));
    chart.append(svg('text', { x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, number.format(v)));
  }
  chart.append(svg('text', { x: L, y: H - 8, 'text-anchor': 'start' }, time(t0)));
  if (t1 !== t0) chart.append(svg('text', { x: W - R, y: H - 8, 'text-anchor': 'end' }, time(t1)));
  const legend = [];
  groups.forEach((g, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = g.series.map((p) => `${x(p.t).toFixed(1)},${y(p.values[m]).toFixed(1)}`).join(' ');
    chart.append(svg('polyline', { points: pts, stroke: color, fill: 'none', 'stroke-width': 2, 'data-testid': 'line' }, svg('title', {}, groupName(d, g))));
    const swatch = el('span', { class: 'swatch', 'aria-hidden': 'true' });
    swatch.style.background = color;
    legend.push(el('li', {}, swatch, groupName(d, g)));
  });
  $('chart').replaceChildren(chart);
  $('legend').replaceChildren(...legend);
}

// ---- start

async function start() {
  $('since').addEventListener('change', rangeInputs);
  $('family').addEventListener('change', () => fillBy(family($('family').value), []));
  $('query').addEventListener('submit', (e) => {
    e.preventDefault();
    load(readForm(), 'push');
  });
  window.addEventListener('popstate', () => {
    const s = readURL();
    fillForm(s);
    load(s, '');
  });
  try {
    schema = await api('schema');
  } catch (e) {
    showError('cannot load the cube schema: ' + e.message);
    return;
  }
  for (const f of schema.families) option($('family'), f.name, f.name);
  for (const r of schema.resolutions) option($('resolution'), r.step, `${r.step} (kept ${r.retention})`);
  const steps = new Set([...schema.resolutions.map((r) => r.step), ...STEPS]);
  for (const s of steps) $('steps').append(el('option', { value: s }));
  if (!schema.families.length) {
    showError('the schema has no family');
    return;
  }
  const s = location.search ? readURL() : defaults();
  fillForm(s);
  load(s, 'replace');
}

start();
