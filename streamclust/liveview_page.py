"""The live view's page: one HTML document with inline CSS and JS, no external resource.

Kept as a string constant (not a package-data file) so an editable install and a wheel serve the
same bytes without packaging configuration. ``__TITLE__`` (HTML-escaped by the server) and
``__POLL_MS__`` are substituted by :class:`streamclust.liveview.LiveView`.

What the page does: every ``__POLL_MS__`` ms it fetches ``state.json`` (the next fetch is scheduled
only after the previous one finished, so a slow server is never piled up on); when the version
changes it reloads ``map.png?v=<version>``, redraws flag rectangles over the map, the legend, the
progress bar, the flag table and the counters. The versions it displayed are recorded in
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
  .empty { color: #9aa0a6; font-style: italic; }
</style>
</head>
<body>
<h1 id="title">__TITLE__</h1>
<div id="status">connecting&hellip;</div>
<div class="layout">
  <div>
    <div id="mapbox" style="aspect-ratio: 1 / 1;">
      <img id="map" alt="membership map" src="">
      <div id="flagboxes"></div>
    </div>
    <div class="note">colour = cluster, brightness = membership, stripes = not yet scanned</div>
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
  function draw(st) {
    if (!shape || shape[0] !== st.scan_shape[0] || shape[1] !== st.scan_shape[1]) setShape(st.scan_shape);
    $("map").src = "map.png?v=" + st.version;
    const p = st.progress;
    $("progress-bar").style.width = (100 * p.fraction).toFixed(2) + "%";
    $("progress-text").textContent = p.done + " / " + p.total + " positions (" + (100 * p.fraction).toFixed(1) + " %)";
    drawLegend(st);
    drawFlags(st);
    drawCounters(st);
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
