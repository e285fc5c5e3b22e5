"""The live view's page: one HTML document with inline CSS and JS, no external resource.

Kept as a string constant (not a package-data file) so an editable install and a wheel serve the
same bytes without packaging configuration. ``__TITLE__`` (HTML-escaped by the server) and
``__POLL_MS__`` are substituted by :class:`streamclust.app.liveview.LiveView`.

What the page does: every ``__POLL_MS__`` ms it fetches ``state.json`` (the next fetch is scheduled
only after the previous one finished, so a slow server is never piled up on); when the version
changes it reloads ``map.png?v=<version>``, redraws flag rectangles over the map, the legend, the
progress bar, the flag table and the counters. With evidence it also shows the virtual bright field
(``bf.png``, flags outlined), and for the selected flag (the first, or a clicked table row) fetches
``evidence.json`` at most once a second: centre spectra of region and matrix in SVG with element
lines, centre patterns and their difference on canvases, the statistics and their history; a click
on the map or the bright field fetches ``position.json``. Buttons POST to ``action`` (follow up,
dismiss) and the action state is redrawn at every poll. The versions it displayed are recorded in
``#versions-seen[data-versions]`` so a test can prove the view updated while it was open.
"""

from __future__ import annotations

__all__ = ["PAGE_TEMPLATE"]

PAGE_TEMPLATE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
  :root { color-scheme: dark; }
  body { margin: 0; padding: 16px 20px; background: #16181c; color: #e6e6e6;
         font: 14px/1.4 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif; }
  h1 { font-size: 18px; margin: 0 0 8px 0; font-weight: 600; }
  #status { font-size: 12px; color: #9aa0a6; margin-bottom: 10px; }
  #status.lost { color: #ff6b6b; font-weight: 600; }
  .layout { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
  #mapbox { position: relative; width: 512px; line-height: 0;
            outline: 1px solid #444;
            /* stripes = not yet scanned (the map is transparent there) */
            background: repeating-linear-gradient(45deg, #2a2d33 0 6px, #202227 6px 12px); }
  #map { width: 100%; height: 100%; display: block; image-rendering: pixelated; }
  .flagbox { position: absolute; box-sizing: border-box; border: 2px solid #ff2d55;
             box-shadow: 0 0 0 1px #000, inset 0 0 0 1px #000; pointer-events: none; }
  .flaglabel { position: absolute; left: 0; top: -20px; white-space: nowrap; line-height: 16px;
               font-size: 12px; padding: 1px 4px; background: #ff2d55; color: #fff; font-weight: 600; }
  .side { width: 420px; }
  h2 { font-size: 13px; text-transform: uppercase; letter-spacing: .06em; color: #9aa0a6;
       margin: 14px 0 6px 0; font-weight: 600; }
  .bar { height: 12px; background: #2a2d33; border-radius: 6px; overflow: hidden; }
  #progress-bar { height: 100%; width: 0; background: #4caf50; transition: width .2s; }
  #progress-text { margin-top: 4px; font-variant-numeric: tabular-nums; }
  table { border-collapse: collapse; width: 100%; font-variant-numeric: tabular-nums; }
  td, th { padding: 2px 8px 2px 0; text-align: left; vertical-align: top; }
  th { color: #9aa0a6; font-weight: 500; font-size: 12px; }
  td.num { text-align: right; }
  .swatch { display: inline-block; width: 14px; height: 14px; vertical-align: -2px;
            border: 1px solid #000; margin-right: 6px; }
  .note { font-size: 12px; color: #9aa0a6; }
  #map, #bf { cursor: crosshair; }
  .mapcol { max-width: 512px; }
  #bfbox { position: relative; width: 256px; line-height: 0; margin-top: 10px; outline: 1px solid #444;
           background: repeating-linear-gradient(45deg, #2a2d33 0 6px, #202227 6px 12px); }
  #bf { width: 100%; height: 100%; display: block; image-rendering: pixelated; }
  .bfbox { position: absolute; box-sizing: border-box; border: 1px solid #ff2d55; pointer-events: none; }
  .marker { position: absolute; box-sizing: border-box; border: 2px solid #00e5ff; pointer-events: none; }
  tr.flag { cursor: pointer; }
  tr.flag.selected { background: #2f3440; }
  #evidence { margin-top: 18px; display: none; }
  #evidence.on { display: block; }
  .evrow { display: flex; gap: 20px; flex-wrap: wrap; align-items: flex-start; }
  svg text { fill: #c8ccd2; font-size: 11px; }
  .patterns canvas { width: 128px; height: 128px; image-rendering: pixelated; outline: 1px solid #444;
                     display: block; }
  .patterns figure { margin: 0; display: inline-block; margin-right: 8px; }
  .patterns figcaption { font-size: 11px; color: #9aa0a6; line-height: 16px; }
  /* the action line wraps under the patterns rather than pushing them under the spectrum */
  #actions { max-width: 420px; }
  button { background: #2f3440; color: #e6e6e6; border: 1px solid #555; border-radius: 4px;
           padding: 4px 10px; font: inherit; cursor: pointer; margin-right: 6px; }
  button:disabled { opacity: .45; cursor: default; }
  .state-sent, .state-acknowledged { color: #ffd166; } .state-done { color: #4caf50; }
  .state-failed { color: #ff6b6b; } .state-dismissed { color: #9aa0a6; }
  .empty { color: #9aa0a6; font-style: italic; }
</style>
</head>
<body>
<h1 id="title">__TITLE__</h1>
<div id="status">connecting&hellip;</div>
<div class="layout">
  <div class="mapcol">
    <div id="mapbox" style="aspect-ratio: 1 / 1;">
      <img id="map" alt="membership map" src="">
      <div id="flagboxes"></div>
    </div>
    <div class="note">colour = cluster, brightness = membership, stripes = not yet scanned;
      click a position for its own spectrum and pattern</div>
    <div id="bfbox" style="aspect-ratio: 1 / 1; display: none;">
      <img id="bf" alt="virtual bright field" src="">
      <div id="bfboxes"></div>
    </div>
    <div class="note" id="bfnote" style="display: none;">virtual bright field, flags outlined</div>
  </div>
  <div class="side">
    <h2>Progress</h2>
    <div class="bar"><div id="progress-bar"></div></div>
    <div id="progress-text">&ndash;</div>
    <h2>Clusters</h2>
    <table id="legend"></table>
    <h2>Flags</h2>
    <div id="flags"><span class="empty">none yet</span></div>
    <h2>Counters</h2>
    <table id="counters"></table>
  </div>
</div>
<div id="evidence">
  <h2 id="ev-title">Evidence</h2>
  <div class="evrow">
    <div>
      <svg id="spectrum" width="640" height="240" role="img" aria-label="EDS spectra"></svg>
      <div id="fe-co" class="note"></div>
    </div>
    <div class="patterns">
      <figure><canvas id="pat-region" width="32" height="32"></canvas><figcaption id="cap-region">region</figcaption></figure>
      <figure><canvas id="pat-matrix" width="32" height="32"></canvas><figcaption id="cap-matrix">matrix</figcaption></figure>
      <figure><canvas id="pat-diff" width="32" height="32"></canvas><figcaption>difference (red = region brighter)</figcaption></figure>
      <div id="actions" style="margin-top: 12px;"></div>
    </div>
  </div>
  <div class="evrow">
    <div><table id="stats"></table></div>
    <div><svg id="history" width="420" height="170" role="img" aria-label="test statistic over the scan"></svg></div>
  </div>
</div>
<div id="versions-seen" data-versions="" hidden></div>
<script>
"use strict";
(function () {
  const POLL_MS = __POLL_MS__;
  const MAP_SIDE = 512;
  let shown = -1, shape = null, failures = 0;
  const $ = (id) => document.getElementById(id);
  const fmt = (v) => (typeof v === "number" && !Number.isInteger(v)) ? v.toPrecision(4) : String(v);
  function el(tag, attrs, text) {
    const e = document.createElement(tag);
    for (const k in (attrs || {})) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function swatch(colour) { return el("span", {"class": "swatch", style: "background:" + colour}); }
  function setShape(s) {
    shape = s;
    const box = $("mapbox"), ny = s[0], nx = s[1];
    const w = nx >= ny ? MAP_SIDE : Math.max(64, Math.round(MAP_SIDE * nx / ny));
    box.style.width = w + "px";
    box.style.aspectRatio = nx + " / " + ny;
  }
  function drawFlags(st) {
    const host = $("flagboxes"), ny = st.scan_shape[0], nx = st.scan_shape[1];
    host.replaceChildren();
    st.flags.forEach((f, i) => {
      const b = f.bbox;  // half-open (y0, x0, y1, x1) in scan pixels
      const box = el("div", {"class": "flagbox", "data-flag": String(i)});
      box.style.left = (100 * b[1] / nx) + "%";
      box.style.top = (100 * b[0] / ny) + "%";
      box.style.width = (100 * (b[3] - b[1]) / nx) + "%";
      box.style.height = (100 * (b[2] - b[0]) / ny) + "%";
      const name = f.label || ("cluster " + f.cluster);
      const lab = el("div", {"class": "flaglabel"}, (i + 1) + ": " + name);
      if (b[0] * MAP_SIDE / ny < 20) lab.style.top = "100%";  // no room above the box
      box.appendChild(lab);
      host.appendChild(box);
    });
    const list = $("flags");
    list.replaceChildren();
    if (!st.flags.length) { list.appendChild(el("span", {"class": "empty"}, "none yet")); return; }
    const t = el("table", {id: "flag-table"});
    const head = el("tr");
    ["#", "flag", "cluster", "score", "positions", "y0,x0 \u2192 y1,x1"].forEach((h) => head.appendChild(el("th", {}, h)));
    t.appendChild(head);
    st.flags.forEach((f, i) => {
      const r = el("tr", {"class": "flag"});
      if (f.flag_id != null) {
        r.dataset.flagId = String(f.flag_id);
        if (sel && sel.flag === f.flag_id) r.classList.add("selected");
        r.addEventListener("click", () => select({flag: f.flag_id}));
      } else r.addEventListener("click", () => select({cluster: f.cluster}));
      r.appendChild(el("td", {}, String(i + 1)));
      r.appendChild(el("td", {"class": "flag-label"}, f.label || ("cluster " + f.cluster)));
      const c = el("td"); c.appendChild(swatch(st.palette[f.cluster] || "#888")); c.append(String(f.cluster));
      r.appendChild(c);
      r.appendChild(el("td", {"class": "num"}, f.score == null ? "\u2013" : fmt(f.score)));
      r.appendChild(el("td", {"class": "num"}, f.n_positions == null ? "\u2013" : String(f.n_positions)));
      r.appendChild(el("td", {}, f.bbox.slice(0, 2).join(",") + " \u2192 " + f.bbox.slice(2).join(",")));
      t.appendChild(r);
    });
    list.appendChild(t);
  }
  function drawLegend(st) {
    const t = $("legend");
    t.replaceChildren();
    const total = st.cluster_counts.reduce((a, b) => a + b, 0);
    st.palette.forEach((c, k) => {
      const r = el("tr");
      const name = el("td"); name.appendChild(swatch(c)); name.append("cluster " + k);
      r.appendChild(name);
      const n = st.cluster_counts[k] || 0;
      r.appendChild(el("td", {"class": "num"}, String(n)));
      r.appendChild(el("td", {"class": "num"}, total ? (100 * n / total).toFixed(1) + " %" : "\u2013"));
      t.appendChild(r);
    });
  }
  function drawCounters(st) {
    const t = $("counters");
    t.replaceChildren();
    const keys = Object.keys(st.counters);
    if (!keys.length) { const r = el("tr"); r.appendChild(el("td", {"class": "empty"}, "none")); t.appendChild(r); return; }
    keys.forEach((k) => {
      const r = el("tr");
      r.appendChild(el("td", {}, k));
      const v = st.counters[k];
      r.appendChild(el("td", {"class": "num"}, v == null ? "\u2013" : fmt(v)));
      t.appendChild(r);
    });
  }

  // ---------------------------------------------------------------- evidence, positions, actions
  // the action token travels in the URL fragment (never sent to the server in the request line)
  const TOKEN = decodeURIComponent((location.hash.match(/token=([^&]+)/) || [])[1] || "");
  let sel = null, evidence = null, posData = null, evVersion = -1, evBusy = false, evLast = 0;
  let lastState = null, shownBf = null;
  // SVG children as markup: the HTML parser puts them in the SVG namespace (no namespace URI here)
  const esc = (v) => String(v).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"})[c]);
  function svg(tag, attrs, text) {
    let m = "<" + tag;
    for (const k in (attrs || {})) m += " " + k + '="' + esc(attrs[k]) + '"';
    return m + ">" + (text === undefined ? "" : esc(text)) + "</" + tag + ">";
  }
  const fmtP = (p) => p == null ? "\u2013" : (p < 1e-3 ? p.toExponential(1) : p.toPrecision(2));
  function plotSpectra() {
    const host = $("spectrum");
    host.replaceChildren();
    const base = evidence && evidence.available ? evidence : posData;
    if (!base) return;
    const out = [];
    const W = 620, H = 240, L = 44, R = 10, T = 12, B = 28;
    const e = base.energy_kev, series = [];
    if (evidence && evidence.available && evidence.matrix)
      series.push({id: "spec-matrix", y: evidence.matrix.counts, colour: "#9aa0a6",
                   name: "matrix (cluster " + evidence.matrix_cluster + ")"});
    if (evidence && evidence.available)
      series.push({id: "spec-region", y: evidence.region.counts, colour: "#ff2d55",
                   name: (evidence.flag_id != null ? "flag " + evidence.flag_id : "cluster " + evidence.cluster) + " centre"});
    if (posData) series.push({id: "spec-position", y: posData.counts, colour: "#00e5ff",
                              name: "position y " + posData.y + ", x " + posData.x});
    // square-root counts: the Fe and Co lines are small beside the low-energy peaks
    let ymax = 0;
    series.forEach((s) => s.y.forEach((v) => { if (v != null && v > ymax) ymax = v; }));
    const sy = (v) => T + (H - T - B) * (1 - Math.sqrt(Math.max(v || 0, 0) / (ymax || 1)));
    const e0 = e[0], e1 = e[e.length - 1];
    const sx = (x) => L + (W - L - R) * (x - e0) / ((e1 - e0) || 1);
    out.push(svg("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#444"}));
    for (let k = Math.ceil(e0); k <= e1; k++) {
      out.push(svg("line", {x1: sx(k), x2: sx(k), y1: H - B, y2: H - B + 4, stroke: "#777"}));
      out.push(svg("text", {x: sx(k) - 3, y: H - B + 15}, String(k)));
    }
    out.push(svg("text", {x: W - 60, y: H - 2}, "energy / keV"));
    out.push(svg("text", {x: 2, y: T + 10}, "\u221acounts"));
    (base.lines || []).forEach((ln) => {
      if (ln.kev < e0 || ln.kev > e1) return;
      out.push(svg("line", {x1: sx(ln.kev), x2: sx(ln.kev), y1: T, y2: H - B, stroke: "#ffd166",
                                    "stroke-dasharray": "3 3", "class": "line-marker"}));
      out.push(svg("text", {x: sx(ln.kev) + 2, y: T + 12 + (ln.name.startsWith("Co") ? 12 : 0)}, ln.name));
    });
    series.forEach((s, i) => {
      const pts = s.y.map((v, j) => sx(e[j]).toFixed(1) + "," + sy(v).toFixed(1)).join(" ");
      out.push(svg("polyline", {id: s.id, points: pts, fill: "none", stroke: s.colour, "stroke-width": 1.2}));
      // the legend sits over 2-5 keV, where these spectra have no line
      out.push(svg("text", {x: sx(Math.min(2.3, e1)), y: T + 30 + 14 * i, style: "fill:" + s.colour}, s.name));
    });
    host.innerHTML = out.join("");
    host.dataset.series = series.map((s) => s.id).join(" ");
  }
  function drawPattern(id, a, diverging) {
    const c = $(id), ctx = c.getContext("2d");
    if (!a) { ctx.clearRect(0, 0, c.width, c.height); c.dataset.drawn = ""; return; }
    const h = a.length, w = a[0].length;
    c.width = w; c.height = h;
    let m = 0;
    a.forEach((r) => r.forEach((v) => { if (v != null && Math.abs(v) > m) m = Math.abs(v); }));
    const img = ctx.createImageData(w, h);
    for (let y = 0; y < h; y++) for (let x = 0; x < w; x++) {
      const v = (a[y][x] || 0) / (m || 1), o = 4 * (y * w + x);
      if (diverging) {  // red: region brighter, blue: matrix brighter
        img.data[o] = v > 0 ? 255 : Math.round(255 * (1 + v));
        img.data[o + 1] = Math.round(255 * (1 - Math.abs(v)));
        img.data[o + 2] = v < 0 ? 255 : Math.round(255 * (1 - v));
      } else { const g = Math.round(255 * Math.max(v, 0)); img.data[o] = img.data[o + 1] = img.data[o + 2] = g; }
      img.data[o + 3] = 255;
    }
    ctx.putImageData(img, 0, 0);
    c.dataset.drawn = String(w) + "x" + String(h);
  }
  function fecoText(name, fc) {
    if (!fc || fc.ratio == null) return name + ": Fe/Co K\u03b1 \u2013";
    return name + ": Fe/Co K\u03b1 " + fc.ratio.toFixed(2) + " \u00b1 " + fc.sigma.toFixed(2);
  }
  function drawStats() {
    const t = $("stats");
    t.replaceChildren();
    if (!evidence || !evidence.statistics) return;
    const s = evidence.statistics;
    const rows = [["composition p", fmtP(s.p_value_eds)], ["pattern p", fmtP(s.p_value_cbed)],
                  ["level (alpha share)", fmtP(s.level)], ["composition effect", s.effect_eds == null ? "\u2013" : fmt(s.effect_eds)],
                  ["pattern effect", s.effect_cbed == null ? "\u2013" : fmt(s.effect_cbed)],
                  ["score", s.score == null ? "\u2013" : fmt(s.score)]];
    const c = s.composition;
    if (c && c.region_share && c.matrix_share) {
      // the flagger's [flags] elements name the shares, in their order
      const names = evidence.elements || [];
      c.region_share.forEach((v, i) => rows.push([(names[i] || "line " + (i + 1)) + " share region / matrix",
        (100 * v).toFixed(1) + " / " + (100 * c.matrix_share[i]).toFixed(1) + " %"]));
    }
    rows.forEach((r) => { const tr = el("tr"); tr.appendChild(el("th", {}, r[0])); tr.appendChild(el("td", {"class": "num"}, r[1])); t.appendChild(tr); });
  }
  function drawHistory() {
    const host = $("history");
    host.replaceChildren();
    const h = evidence && evidence.history;
    if (!h || !h.length) return;
    const out = [];
    const W = 420, H = 170, L = 40, R = 10, T = 10, B = 26;
    const useP = h.some((r) => r.p_value_eds != null || r.p_value_cbed != null);
    const f = useP ? (v) => (v == null ? null : -Math.log10(Math.max(v, 1e-300))) : (v) => v;
    const keys = useP ? [["p_value_eds", "#ff2d55", "composition"], ["p_value_cbed", "#56b4e9", "pattern"], ["level", "#ffd166", "level"]]
                      : [["score", "#ff2d55", "score"]];
    let ymax = useP ? 10 : 1;
    h.forEach((r) => keys.forEach((k) => { const v = f(r[k[0]]); if (v != null && v > ymax) ymax = v; }));
    // -log10 p on a log axis from 1 (p = 0.1): a composition p of 1e-120 and a level of 1e-3 both show
    const sx = (x) => L + (W - L - R) * x;
    const sy = useP ? (v) => T + (H - T - B) * (1 - Math.log10(Math.max(v, 1)) / Math.log10(ymax))
                    : (v) => T + (H - T - B) * (1 - v / ymax);
    if (useP) for (let d = 1; d <= ymax; d *= 10) out.push(svg("text", {x: L - 24, y: sy(d) + 4}, String(d)));
    out.push(svg("rect", {x: L, y: T, width: W - L - R, height: H - T - B, fill: "none", stroke: "#444"}));
    [0, 0.5, 1].forEach((x) => out.push(svg("text", {x: sx(x) - 8, y: H - B + 14}, (100 * x) + "%")));
    out.push(svg("text", {x: W - 150, y: H - 2}, "of the scan acquired"));
    out.push(svg("text", {x: 2, y: H - 4}, useP ? "\u2212log\u2081\u2080 p" : "score"));
    keys.forEach((k, i) => {
      const pts = h.filter((r) => r[k[0]] != null).map((r) => sx(r.fraction).toFixed(1) + "," + sy(f(r[k[0]])).toFixed(1));
      if (!pts.length) return;
      if (pts.length === 1) pts.push(pts[0].replace(/^[^,]+/, (v) => (parseFloat(v) + 3).toFixed(1)));
      out.push(svg("polyline", {"class": "hist-" + k[0], points: pts.join(" "), fill: "none", stroke: k[1],
                                         "stroke-width": 1.5, "stroke-dasharray": k[0] === "level" ? "4 3" : ""}));
      out.push(svg("text", {x: L + 6, y: T + 12 + 13 * i, style: "fill:" + k[1]}, k[2]));
    });
    host.innerHTML = out.join("");
  }
  function drawEvidence() {
    const box = $("evidence");
    if (!evidence && !posData) { box.className = ""; return; }
    box.className = "on";
    const what = evidence ? (evidence.flag_id != null ? "flag " + evidence.flag_id + " (cluster " + evidence.cluster + ")"
                                                     : "cluster " + evidence.cluster) : "position";
    $("ev-title").textContent = "Evidence: " + what + (evidence && evidence.available && evidence.threshold != null
      ? " \u00b7 centres of members above " + evidence.threshold : "");
    box.dataset.flag = evidence && evidence.flag_id != null ? String(evidence.flag_id) : "";
    plotSpectra();
    const av = evidence && evidence.available;
    drawPattern("pat-region", posData ? posData.pattern : (av ? evidence.region.pattern : null), false);
    drawPattern("pat-matrix", av && evidence.matrix ? evidence.matrix.pattern : null, false);
    drawPattern("pat-diff", av && !posData ? evidence.pattern_difference : null, true);
    $("cap-region").textContent = posData ? "position " + posData.y + "," + posData.x : (av ? "region (" + evidence.region.n_positions + " positions)" : "region");
    $("cap-matrix").textContent = av && evidence.matrix ? "matrix (" + evidence.matrix.n_positions + " positions)" : "matrix";
    const parts = [];
    if (av) parts.push(fecoText("region", evidence.region.fe_co));
    if (av && evidence.matrix) parts.push(fecoText("matrix", evidence.matrix.fe_co));
    if (posData) parts.push(fecoText("position", posData.fe_co));
    if (evidence && !evidence.available) parts.push("no centre data in this live view");
    $("fe-co").textContent = parts.join(" \u00b7 ");
    drawStats();
    drawHistory();
  }
  async function fetchEvidence(force) {
    if (!sel || evBusy || !lastState) return;
    const now = Date.now();
    // at most one evidence fetch a second: the operator reads it, the scan does not wait for it
    if (!force && (lastState.version === evVersion || now - evLast < 1000)) return;
    evBusy = true; evLast = now;
    try {
      const q = sel.flag != null ? "flag=" + sel.flag : "cluster=" + sel.cluster;
      const r = await fetch("evidence.json?" + q, {cache: "no-store"});
      if (r.ok) { evidence = await r.json(); evVersion = evidence.version; drawEvidence(); }
      else if (r.status === 404 && sel.flag != null) { $("ev-title").textContent += " (no longer active)"; evVersion = lastState.version; }
    } catch (e) { /* the status line reports a lost connection */ }
    evBusy = false;
  }
  function select(s) {
    sel = s; posData = null; evVersion = -1; markPosition(null);
    document.querySelectorAll("tr.flag").forEach((r) => r.classList.toggle("selected", s && s.flag != null && r.dataset.flagId === String(s.flag)));
    fetchEvidence(true);
  }
  function markPosition(p) {
    ["flagboxes", "bfboxes"].forEach((id) => { const old = $(id).querySelector(".marker"); if (old) old.remove(); });
    if (p == null || !shape) return;
    const ny = shape[0], nx = shape[1], y = Math.floor(p / nx), x = p % nx;
    ["flagboxes", "bfboxes"].forEach((id) => {
      const m = el("div", {"class": "marker"});
      m.style.left = (100 * x / nx) + "%"; m.style.top = (100 * y / ny) + "%";
      m.style.width = Math.max(100 / nx, 1) + "%"; m.style.height = Math.max(100 / ny, 1) + "%";
      $(id).appendChild(m);
    });
  }
  async function clickPosition(ev) {
    if (!shape || !lastState || !lastState.positions_available) return;
    const r = ev.target.getBoundingClientRect();
    const x = Math.floor((ev.clientX - r.left) / r.width * shape[1]), y = Math.floor((ev.clientY - r.top) / r.height * shape[0]);
    if (x < 0 || y < 0 || x >= shape[1] || y >= shape[0]) return;
    const p = y * shape[1] + x;
    markPosition(p);
    try {
      const res = await fetch("position.json?p=" + p, {cache: "no-store"});
      posData = res.ok ? await res.json() : null;
      if (!res.ok) $("fe-co").textContent = "position " + y + "," + x + ": not acquired yet";
      else drawEvidence();
    } catch (e) { /* status line */ }
  }
  async function act(body) {
    const headers = {"Content-Type": "application/json"};
    if (TOKEN) headers["X-Streamclust-Token"] = TOKEN;
    try {
      const r = await fetch("action", {method: "POST", headers: headers, body: JSON.stringify(body)});
      const js = await r.json();
      if (!r.ok) $("action-state").textContent = "refused: " + (js.error || r.status);
    } catch (e) { $("action-state").textContent = "not sent: " + e; }
  }
  function drawActions(st) {
    const host = $("actions");
    if (!sel || sel.flag == null) { host.replaceChildren(); return; }
    const fid = sel.flag, a = (st.actions || {})[String(fid)] || {}, fu = a.followup;
    let line = $("action-state");
    if (!line || host.dataset.flag !== String(fid)) {
      host.replaceChildren();
      host.dataset.flag = String(fid);
      const dwell = el("input", {id: "dwell", type: "number", min: "0.01", step: "0.05", value: "0.1",
                                 style: "width: 60px; margin-right: 6px;", title: "follow-up dwell per position / s"});
      const b1 = el("button", {id: "btn-followup"}, "follow up");
      b1.addEventListener("click", () => act({action: "followup", flag_id: fid, dwell_s: parseFloat($("dwell").value)}));
      const b2 = el("button", {id: "btn-dismiss"}, "dismiss");
      b2.addEventListener("click", () => act({action: "dismiss", flag_id: fid}));
      host.append("dwell / s ", dwell, b1, b2);
      line = el("div", {id: "action-state", "class": "note"});
      host.appendChild(line);
    }
    const busy = fu && (fu.state === "sent" || fu.state === "acknowledged");
    $("btn-followup").disabled = !st.followup_enabled || busy;
    $("btn-followup").title = st.followup_enabled ? "" : "no follow-up endpoint configured";
    $("btn-dismiss").disabled = a.judgement === "dismissed";
    let text = "", cls = "";
    if (fu) {
      cls = "state-" + fu.state;
      text = "follow-up " + fu.state + (fu.state === "done" ? ": Fe/Co K\u03b1 " + fmt(fu.fe_co_ratio) + ", Fe SNR " + fmt(fu.snr_fe) +
             (fu.scan_snr_fe != null ? " (scan: " + fmt(fu.scan_snr_fe) + ")" : "") +
             " (" + fu.n_acquired + " positions at " + fu.dwell_s + " s)" : "") + (fu.error ? ": " + fu.error : "");
    }
    if (a.judgement) { text += (text ? " \u00b7 " : "") + "operator: " + a.judgement; if (!cls) cls = "state-dismissed"; }
    if (line.textContent.startsWith("refused") && !fu && !a.judgement) return;
    line.className = "note " + cls; line.textContent = text;
    line.dataset.state = fu ? fu.state : (a.judgement || "");
  }
  function drawBf(st) {
    if (st.bf_version == null) return;
    $("bfbox").style.display = ""; $("bfnote").style.display = "";
    $("bfbox").style.aspectRatio = st.scan_shape[1] + " / " + st.scan_shape[0];
    if (shownBf !== st.bf_version) { $("bf").src = "bf.png?v=" + st.bf_version; shownBf = st.bf_version; }
    const host = $("bfboxes"), ny = st.scan_shape[0], nx = st.scan_shape[1];
    host.querySelectorAll(".bfbox").forEach((b) => b.remove());
    st.flags.forEach((f) => {
      const b = f.bbox, box = el("div", {"class": "bfbox"});
      box.style.left = (100 * b[1] / nx) + "%"; box.style.top = (100 * b[0] / ny) + "%";
      box.style.width = (100 * (b[3] - b[1]) / nx) + "%"; box.style.height = (100 * (b[2] - b[0]) / ny) + "%";
      host.appendChild(box);
    });
  }
  $("map").addEventListener("click", clickPosition);
  $("bf").addEventListener("click", clickPosition);
  function draw(st) {
    if (!shape || shape[0] !== st.scan_shape[0] || shape[1] !== st.scan_shape[1]) setShape(st.scan_shape);
    $("map").src = "map.png?v=" + st.version;
    const p = st.progress;
    $("progress-bar").style.width = (100 * p.fraction).toFixed(2) + "%";
    $("progress-text").textContent = p.done + " / " + p.total + " positions (" + (100 * p.fraction).toFixed(1) + " %)";
    drawLegend(st);
    drawFlags(st);
    drawCounters(st);
    drawBf(st);
    lastState = st;
    // the first flag is shown at once: the operator's question is "what is it?"
    if (!sel && st.evidence && st.flags.length && st.flags[0].flag_id != null) select({flag: st.flags[0].flag_id});
    const seen = $("versions-seen");
    seen.dataset.versions = (seen.dataset.versions ? seen.dataset.versions + " " : "") + st.version;
    shown = st.version;
  }
  async function poll() {
    try {
      const r = await fetch("state.json", {cache: "no-store"});
      if (!r.ok) throw new Error("HTTP " + r.status);
      const st = await r.json();
      failures = 0;
      if (st.version !== shown) draw(st);
      lastState = st;
      drawActions(st);  // a follow-up's state changes without a new version
      fetchEvidence(false);
      const s = $("status");
      s.className = "";
      s.textContent = "live \u00b7 version " + st.version + " \u00b7 updated " + st.age_s.toFixed(1) + " s ago" +
        (st.invalid_labels ? " \u00b7 " + st.invalid_labels + " invalid labels (not drawn)" : "");
    } catch (e) {
      failures += 1;
      const s = $("status");
      s.className = "lost";
      s.textContent = "connection lost \u2013 showing version " + shown + "; retrying (" + failures + ")";
    }
    setTimeout(poll, POLL_MS);
  }
  poll();
})();
</script>
</body>
</html>
"""
