// The feature browser page. Data arrive as <script> files calling FEATURE_DATA.* (see site.py),
// so the page needs no server: #<member> shows a member's searchable latent list (#<member>?q=TEXT
// with TEXT in its search box), #<member>/<latent> one latent's page (loaded on demand).
"use strict";

const FEATURE_DATA = {
  info: null, tokens: {}, lists: {}, latents: {},
  site(info) { this.info = info; },
  vocab(map) { this.tokens = map; },
  list(dir, data) { this.lists[dir] = data; },
  latent(dir, i, data) { this.latents[dir + "/" + i] = data; },
  start() { window.addEventListener("hashchange", route); route(); },
};

const LIST_LIMIT = 300;  // rows of the latent list drawn at once (the search narrows them)

function load(src) {
  return new Promise((resolve, reject) => {
    const s = document.createElement("script");
    s.src = src;
    s.onload = resolve;
    s.onerror = () => reject(new Error("cannot load " + src));
    document.head.appendChild(s);
  });
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}

function tokenText(id) {
  const t = FEATURE_DATA.tokens[String(id)];
  return t === undefined ? "#" + id : t;
}

function shown(text) {  // whitespace made visible where it would vanish
  return text.replace(/\n/g, "\u23ce").replace(/\t/g, "\u21e5");
}

function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "\u2013";
  if (x === 0) return "0";
  const a = Math.abs(x);
  return a >= 1e4 || a < 1e-3 ? x.toExponential(2) : x.toPrecision(digits);
}

function pct(d) { return d === 0 ? "0" : (100 * d).toPrecision(3) + "%"; }

function member(dir) {
  return FEATURE_DATA.info.members.find((m) => m.dir === dir);
}

async function route() {
  const main = document.getElementById("main");
  const info = FEATURE_DATA.info;
  if (!info) { main.textContent = "data/site.js is missing: rebuild with train-sae features"; return; }
  document.title = "Features: " + info.title;
  // #<member>[/<latent>][?q=<search>] (a search in the link fills the list's search box)
  const [path, query] = location.hash.slice(1).split("?");
  const [dir, latent] = decodeURIComponent(path).split("/");
  const q = new URLSearchParams(query || "").get("q") || "";
  const m = member(dir) || info.members[0];
  drawNav(m.dir);
  try {
    if (latent !== undefined && latent !== "") await drawLatent(main, m, Number(latent));
    else await drawList(main, m, q);
  } catch (err) {
    main.replaceChildren(el("p", { class: "warn", text: String(err.message || err) }));
  }
}

function drawNav(current) {
  const nav = document.getElementById("members");
  nav.replaceChildren(...FEATURE_DATA.info.members.map((m) =>
    el("a", { href: "#" + m.dir, class: m.dir === current ? "current" : "" }, m.name)));
}

function notes(info) {
  return info.notes.map((n) => el("p", { class: "warn note-line", text: n }));
}

async function drawList(main, m, q) {
  if (!FEATURE_DATA.lists[m.dir]) await load("data/" + m.dir + "/list.js");
  const data = FEATURE_DATA.lists[m.dir];
  const info = FEATURE_DATA.info;
  const search = el("input", { type: "search", id: "search",
                               placeholder: "latent index, or a token in its top contexts" });
  search.value = q;
  const sort = el("select", { id: "sort" },
                  el("option", { value: "index" }, "by index"),
                  el("option", { value: "density" }, "by density, highest first"),
                  el("option", { value: "rare" }, "by density, lowest first (live)"),
                  el("option", { value: "max" }, "by max activation"));
  const deadOnly = el("input", { type: "checkbox", id: "dead" });
  const count = el("span", { class: "note", id: "count" });
  const body = el("tbody");
  const table = el("table", { id: "latents" },
                   el("thead", {}, el("tr", {}, el("th", {}, "latent"), el("th", {}, "density"),
                                      el("th", {}, "mean act (firing)"), el("th", {}, "max act"),
                                      el("th", {}, "top tokens"))), body);
  main.replaceChildren(
    el("h2", {}, m.name + " ", el("small", { text: `${m.arch}, ${m.d_sae} latents, reads ` +
       m.inputs.join(", ") })),
    el("p", { class: "note", text: `${info.rows.toLocaleString()} of ${info.store_rows.toLocaleString()} ` +
       `store rows read from ${info.store}; ${m.dead} of ${m.shown} latents shown are dead ` +
       `(never fired on them).` }),
    ...notes(info),
    el("div", { class: "controls" }, search, sort, el("label", {}, deadOnly, " dead only"), count),
    table);
  const n = data.density.length;
  const tokensLower = data.tokens.map((ids) => ids.map((id) => tokenText(id).toLowerCase()));
  function redraw() {
    const q = search.value.trim();
    const qLower = q.toLowerCase();
    let idx = [];
    for (let i = 0; i < n; i++) {
      if (deadOnly.checked && data.count[i] !== 0) continue;
      if (q === "" || String(i).startsWith(q) || tokensLower[i].some((t) => t.includes(qLower)))
        idx.push(i);
    }
    const key = sort.value;
    if (key === "density") idx.sort((a, b) => data.density[b] - data.density[a]);
    if (key === "rare") {
      idx = idx.filter((i) => data.count[i] > 0);
      idx.sort((a, b) => data.density[a] - data.density[b]);
    }
    if (key === "max") idx.sort((a, b) => data.max[b] - data.max[a]);
    count.textContent = `${idx.length} latent(s)` + (idx.length > LIST_LIMIT ?
      `, first ${LIST_LIMIT} shown` : "");
    const top = Math.max(...data.density, 1e-12);
    body.replaceChildren(...idx.slice(0, LIST_LIMIT).map((i) => {
      const dead = data.count[i] === 0;
      return el("tr", { class: dead ? "dead" : "", "data-latent": String(i) },
        el("td", {}, el("a", { href: `#${m.dir}/${i}` }, String(i))),
        el("td", { class: "num" }, dead ? el("span", { class: "dead-badge" }, "dead") :
           pct(data.density[i]),
           dead ? null : el("span", { class: "bar",
                                      style: `width:${Math.round(60 * data.density[i] / top)}px` })),
        el("td", { class: "num" }, fmt(data.mean[i])),
        el("td", { class: "num" }, fmt(data.max[i])),
        el("td", {}, data.tokens[i].map((id) => JSON.stringify(shown(tokenText(id)))).join("  ")));
    }));
  }
  search.addEventListener("input", redraw);
  sort.addEventListener("change", redraw);
  deadOnly.addEventListener("change", redraw);
  redraw();
}

async function drawLatent(main, m, i) {
  if (!(i >= 0 && i < m.shown)) throw new Error(`${m.name} has no page for latent ${i}`);
  const key = m.dir + "/" + i;
  if (!FEATURE_DATA.latents[key]) await load(`data/${m.dir}/l/${i}.js`);
  const d = FEATURE_DATA.latents[key];
  const info = FEATURE_DATA.info;
  const parts = [
    el("p", {}, el("a", { href: "#" + m.dir }, "\u2190 all latents of " + m.name),
       i > 0 ? el("a", { href: `#${m.dir}/${i - 1}`, style: "margin-left:16px" }, "previous") : null,
       i + 1 < m.shown ? el("a", { href: `#${m.dir}/${i + 1}`, style: "margin-left:16px" }, "next")
         : null),
    el("h2", { id: "latent-title" }, `${m.name} \u00b7 latent ${i} `,
       d.count === 0 ? el("span", { class: "dead-badge" }, "dead") : null),
    el("div", { class: "stats" },
       el("div", {}, el("b", { id: "density", text: pct(d.density) }), "firing density"),
       el("div", {}, el("b", { text: d.count.toLocaleString() }), `times fired in ${info.rows.toLocaleString()} rows`),
       el("div", {}, el("b", { text: fmt(d.mean) }), "mean activation when firing"),
       el("div", {}, el("b", { text: d.top.length ? fmt(d.top[0].act) : "\u2013" }), "max activation")),
    ...notes(info),
  ];
  if (d.count === 0) {
    parts.push(el("p", { class: "note", text: "This latent is dead: it never fired on the rows read." }));
  } else {
    parts.push(el("div", { class: "panels" },
      el("div", { class: "panel" }, el("h3", {}, "Activation histogram (firing rows)"), histogram(d.hist)),
      d.logits ? logitTable("Promoted tokens", d.logits.promoted, "pos") : null,
      d.logits ? logitTable("Suppressed tokens", d.logits.suppressed, "neg") : null));
    parts.push(el("h3", {}, `Top activations`), examples(d.top, "top"));
    for (const [g, q] of d.quantiles.entries())
      parts.push(el("h3", {}, `Sampled from quantile ${g + 1} of ${d.quantiles.length} ` +
                    `(activations ${fmt(q.low)} to ${fmt(q.high)})`), examples(q.examples, "q" + g));
  }
  main.replaceChildren(...parts);
  window.scrollTo(0, 0);
}

function examples(list, group) {
  return el("div", { class: "examples", "data-group": group }, ...list.map((ex) => {
    const max = Math.max(...ex.a.filter((a) => a !== null), 1e-12);
    const toks = ex.t.map((id, j) => {
      const a = ex.a[j];
      const cls = "tok" + (a === null ? " na" : "") + (j === ex.c ? " max" : "");
      const style = a !== null && a > 0 ? `background: rgba(255, 120, 0, ${Math.min(1, a / max).toFixed(3)})` : "";
      return el("span", { class: cls, style, "data-id": String(id),
                          title: a === null ? "not cached or not read" : "activation " + fmt(a, 4) },
                shown(tokenText(id)));
    });
    return el("div", { class: "ex", "data-row": String(ex.row), "data-act": String(ex.act) },
              el("span", { class: "val", text: fmt(ex.act) }), ...toks);
  }));
}

function histogram(h) {
  const W = 360, H = 120, n = h.counts.length;
  let last = n - 1;
  while (last > 0 && h.counts[last] === 0) last--;
  const bins = h.counts.slice(0, last + 1);
  const top = Math.max(...bins, 1);
  const bw = W / bins.length;
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + 18); svg.setAttribute("id", "histogram");
  bins.forEach((c, j) => {
    const r = document.createElementNS(ns, "rect");
    const hh = c ? Math.max(1, H * c / top) : 0;
    r.setAttribute("x", j * bw); r.setAttribute("y", H - hh);
    r.setAttribute("width", Math.max(1, bw - 1)); r.setAttribute("height", hh);
    r.setAttribute("fill", "#5b8def");
    const t = document.createElementNS(ns, "title");
    t.textContent = `${fmt(j * h.width)} to ${fmt((j + 1) * h.width)}: ${c}`;
    r.append(t); svg.append(r);
  });
  for (const [x, label, anchor] of [[0, "0", "start"], [W, fmt(bins.length * h.width), "end"]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", H + 14); t.setAttribute("font-size", "11");
    t.setAttribute("text-anchor", anchor); t.textContent = label; svg.append(t);
  }
  return svg;
}

function logitTable(title, rows, cls) {
  return el("div", { class: "panel logits" }, el("h3", {}, title),
    el("table", {}, el("tbody", {}, ...rows.map(([id, v]) => el("tr", {},
      el("td", { class: "tokcell", text: JSON.stringify(shown(tokenText(id))) }),
      el("td", { class: "num " + cls, text: fmt(v) }))))));
}
