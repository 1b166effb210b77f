// peftlab board: the helpers every page shares (fetch, elements, the SVG curve, the header).
"use strict";

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const resp = await fetch(path, opts);
  const data = await resp.json().catch(() => ({error: `HTTP ${resp.status}`}));
  if (!resp.ok) throw Object.assign(new Error(data.error || `HTTP ${resp.status}`), {field: data.field});
  return data;
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else if (k === "text") node.textContent = v;
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function fmt(v, kind) {
  if (v === null || v === undefined) return "–";
  if (kind === "int") return Number(v).toLocaleString("en");
  if (kind === "loss") return Number(v).toFixed(4);
  if (kind === "pct") return (100 * v).toFixed(1) + "%";
  if (kind === "secs") return v >= 120 ? (v / 60).toFixed(1) + " min" : Number(v).toFixed(1) + " s";
  if (kind === "bytes") return (v / 2 ** 20).toFixed(0) + " MiB";
  return String(v);
}

function header(here) {
  const links = [["/", "Runs"], ["/new", "New run"], ["/compare", "Compare"], ["/chat", "Chat"]];
  document.body.prepend(el("header", {}, el("b", {text: "peftlab board"}),
    links.map(([href, name]) => el("a", {href, text: name, class: href === here ? "here" : null}))));
}

const COLORS = ["#2f5bd3", "#d1495b", "#1a7f37", "#b7791f", "#7b3fb3", "#138a8a", "#555", "#e07b39"];

// series: [{name, points: [[x, y], ...], dashed}] -> an <svg class=curve> with axes and a legend
function curve(series, opts = {}) {
  const W = opts.width || 640, H = opts.height || 300, L = 56, R = 150, T = 14, B = 34;
  const ns = "http://www.w3.org/2000/svg";
  const s = (tag, attrs, text) => {
    const n = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, v);
    if (text !== undefined) n.textContent = text;
    return n;
  };
  const svg = s("svg", {class: "curve", width: W, height: H, viewBox: `0 0 ${W} ${H}`, "data-testid": "curve"});
  const pts = series.flatMap(x => x.points);
  if (!pts.length) {
    svg.append(s("text", {x: W / 2 - 40, y: H / 2}, "no steps yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
  let [y0, y1] = [Math.min(...pts.map(p => p[1])), Math.max(...pts.map(p => p[1]))];
  if (x1 === x0) x1 = x0 + 1;
  if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
  const pad = (y1 - y0) * 0.05; y0 -= pad; y1 += pad;
  const X = x => L + (x - x0) / (x1 - x0) * (W - L - R), Y = y => T + (y1 - y) / (y1 - y0) * (H - T - B);
  svg.append(s("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#999"}));
  svg.append(s("line", {x1: L, y1: T, x2: L, y2: H - B, stroke: "#999"}));
  for (let i = 0; i <= 4; i++) {
    const yv = y0 + (y1 - y0) * i / 4, xv = x0 + (x1 - x0) * i / 4;
    svg.append(s("text", {x: 4, y: Y(yv) + 4}, yv.toPrecision(4)));
    svg.append(s("line", {x1: L, y1: Y(yv), x2: W - R, y2: Y(yv), stroke: "#eee"}));
    svg.append(s("text", {x: X(xv) - 8, y: H - B + 16}, Math.round(xv)));
  }
  svg.append(s("text", {x: (W - R) / 2, y: H - 4}, opts.xlabel || "step"));
  series.forEach((ser, i) => {
    const color = ser.color || COLORS[i % COLORS.length];
    const d = ser.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ");
    svg.append(s("path", {d, fill: "none", stroke: color, "stroke-width": 2, "data-series": ser.name,
                          "data-points": ser.points.length, "stroke-dasharray": ser.dashed ? "5,4" : "none"}));
    if (ser.points.length === 1) svg.append(s("circle", {cx: X(ser.points[0][0]), cy: Y(ser.points[0][1]), r: 3, fill: color}));
    svg.append(s("line", {x1: W - R + 10, y1: T + 10 + i * 16, x2: W - R + 30, y2: T + 10 + i * 16, stroke: color,
                          "stroke-width": 2, "stroke-dasharray": ser.dashed ? "5,4" : "none"}));
    svg.append(s("text", {x: W - R + 34, y: T + 14 + i * 16}, ser.name));
  });
  return svg;
}

// metrics records of several runs -> train (solid) and eval (dashed) loss series
function lossSeries(byRun) {
  const out = [];
  Object.entries(byRun).forEach(([name, recs], i) => {
    const color = COLORS[i % COLORS.length];
    const train = recs.filter(r => r.loss !== undefined && r.loss !== null).map(r => [r.step, r.loss]);
    const ev = recs.filter(r => r.eval_loss !== undefined && r.eval_loss !== null).map(r => [r.step, r.eval_loss]);
    const label = Object.keys(byRun).length > 1 ? name + " " : "";
    if (train.length) out.push({name: label + "train loss", points: train, color});
    if (ev.length) out.push({name: label + "eval loss", points: ev, color, dashed: true});
  });
  return out;
}

function table(headers, rows) {  // rows: [[{text, best}]]
  return el("table", {}, el("tr", {}, headers.map(h => el("th", {text: h}))),
    rows.map(r => el("tr", {}, r.map(c => el("td", {text: c.text, class: c.best ? "best" : null})))));
}

// read a text/event-stream response body, calling onEvent(parsed JSON) per `data:` line
async function readEvents(resp, onEvent) {
  const reader = resp.body.getReader(), dec = new TextDecoder();
  let buf = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\n\n")) >= 0) {
      const line = buf.slice(0, i).replace(/^data: /, "");
      buf = buf.slice(i + 2);
      if (line === "[DONE]") return;
      onEvent(JSON.parse(line));
    }
  }
}

// node.replaceChildren with arrays flattened (the DOM call would print an array as text)
function fill(node, ...kids) {
  node.replaceChildren(...kids.flat(Infinity).filter(k => k !== null && k !== undefined));
}
