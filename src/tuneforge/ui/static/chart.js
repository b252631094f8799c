/* A small SVG line chart (no dependencies): several series over training steps, redrawn as points arrive. */
(function () {
  "use strict";
  const NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#2457c5", "#d9480f", "#2b8a3e", "#862e9c", "#e67700", "#0b7285"];

  function el(name, attrs) {
    const node = document.createElementNS(NS, name);
    for (const k in attrs) node.setAttribute(k, attrs[k]);
    return node;
  }

  function fmt(v) {
    const a = Math.abs(v);
    if (a === 0) return "0";
    if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
    return (+v.toPrecision(3)).toString();
  }

  class LineChart {
    constructor(parent, title, id) {
      this.title = title;
      this.series = new Map();
      this.box = document.createElement("div");
      this.box.className = "chart";
      this.box.dataset.chart = id;
      const head = document.createElement("div");
      head.className = "title";
      head.textContent = title;
      this.box.appendChild(head);
      this.svg = el("svg", {viewBox: "0 0 360 190", role: "img", "aria-label": title + " chart"});
      this.box.appendChild(this.svg);
      parent.appendChild(this.box);
    }
    add(series, x, y) {
      if (typeof y !== "number" || !isFinite(y)) return;
      if (!this.series.has(series)) this.series.set(series, []);
      this.series.get(series).push([x, y]);
    }
    points() {
      let n = 0;
      for (const pts of this.series.values()) n += pts.length;
      return n;
    }
    draw() {
      const svg = this.svg;
      while (svg.firstChild) svg.removeChild(svg.firstChild);
      const all = [...this.series.values()].flat();
      this.box.dataset.points = String(all.length);
      if (!all.length) return;
      const L = 46, R = 352, T = 16, B = 168;
      let x0 = Math.min(...all.map(p => p[0])), x1 = Math.max(...all.map(p => p[0]));
      let y0 = Math.min(...all.map(p => p[1])), y1 = Math.max(...all.map(p => p[1]));
      if (x1 === x0) x1 = x0 + 1;
      if (y1 === y0) { y1 += Math.abs(y1) * 0.05 || 1; y0 -= Math.abs(y0) * 0.05 || 1; }
      const pad = (y1 - y0) * 0.06, floor = y0 >= 0 ? 0 : -Infinity;
      y0 = Math.max(floor, y0 - pad); y1 += pad;
      const sx = x => L + (x - x0) / (x1 - x0) * (R - L);
      const sy = y => B - (y - y0) / (y1 - y0) * (B - T);
      svg.appendChild(el("line", {x1: L, y1: B, x2: R, y2: B, stroke: "#c5cad3"}));
      svg.appendChild(el("line", {x1: L, y1: T, x2: L, y2: B, stroke: "#c5cad3"}));
      for (let i = 0; i <= 3; i++) {
        const v = y0 + (y1 - y0) * i / 3, y = sy(v);
        svg.appendChild(el("line", {x1: L, y1: y, x2: R, y2: y, stroke: "#eef0f3"}));
        const t = el("text", {x: L - 4, y: y + 3, "text-anchor": "end", "font-size": 9, fill: "#667085"});
        t.textContent = fmt(v); svg.appendChild(t);
      }
      for (const v of [x0, (x0 + x1) / 2, x1]) {
        const t = el("text", {x: sx(v), y: B + 12, "text-anchor": "middle", "font-size": 9, fill: "#667085"});
        t.textContent = fmt(Math.round(v)); svg.appendChild(t);
      }
      let i = 0, lx = L + 4;
      for (const [name, pts] of this.series) {
        const color = COLORS[i++ % COLORS.length];
        const d = pts.map(p => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" ");
        svg.appendChild(el("polyline", {points: d, fill: "none", stroke: color, "stroke-width": 1.6,
                                        "data-series": name}));
        if (pts.length <= 3) for (const p of pts) svg.appendChild(el("circle", {cx: sx(p[0]), cy: sy(p[1]), r: 2.5, fill: color}));
        const t = el("text", {x: lx, y: T - 4, "font-size": 10, fill: color});
        t.textContent = name + " " + fmt(pts[pts.length - 1][1]);
        svg.appendChild(t);
        lx += 8 + 6 * t.textContent.length;
      }
    }
  }
  window.LineChart = LineChart;
})();
