// Charts drawn by the vendored uPlot (vendor/VENDORED.md). Values here are floats: pixels only;
// every figure shown as text comes from the API's decimal strings.
import uPlot from "../vendor/uPlot.esm.js";

const PALETTE = ["#2f5bea", "#e0663a", "#1f9d74", "#a855f7", "#d4a017", "#0ea5b7", "#db2777", "#64748b"];

function theme() {
  const css = getComputedStyle(document.documentElement);
  return { fg: css.getPropertyValue("--muted").trim() || "#555", grid: css.getPropertyValue("--line").trim() || "#ddd" };
}

function axes(xValues) {
  const t = theme();
  const axis = { stroke: t.fg, grid: { stroke: t.grid, width: 1 }, ticks: { stroke: t.grid, width: 1 } };
  const small = { font: "11px system-ui, sans-serif" };
  return [{ ...axis, ...small, ...(xValues ? { values: xValues } : {}) }, { ...axis, ...small, size: 56 }];
}

// Follow the container's width (the chart redraws when the layout changes).
function fit(plot, el, height) {
  const observer = new ResizeObserver(() => {
    const width = Math.floor(el.clientWidth);
    if (width > 0 && width !== plot.width) plot.setSize({ width, height });
  });
  observer.observe(el);
  return plot;
}

// Stacked bars: each series is drawn as the running total up to it, the tallest first, so the
// later (shorter) bars paint the lower parts; the legend shows each series' own value.
function stacked(el, x, xSeries, xAxis, xScale, seriesNames, values, height, unit) {
  el.replaceChildren();
  const running = [];
  let acc = x.map(() => 0);
  for (const row of values) {
    acc = acc.map((v, i) => v + row[i]);
    running.push(acc);
  }
  const totals = values.map((row) => row.reduce((a, b) => a + b, 0));
  const order = seriesNames.map((_, i) => i).reverse();
  const bars = uPlot.paths.bars({ size: [0.7, 48], align: 0 });
  const opts = {
    width: Math.max(200, Math.floor(el.clientWidth)),
    height,
    tzDate: (ts) => uPlot.tzDate(new Date(ts * 1000), "Etc/UTC"),
    scales: { x: xScale, y: { range: (u, min, max) => [0, max > 0 ? max * 1.1 : 1] } },
    axes: axes(xAxis),
    series: [
      xSeries,
      ...order.map((i) => ({
        label: seriesNames[i],
        stroke: PALETTE[i % PALETTE.length],
        fill: PALETTE[i % PALETTE.length] + "cc",
        width: 0,
        paths: bars,
        points: { show: false },
        // the period's total until the cursor picks a bar
        value: (u, v, s, idx) => `${+(idx == null ? totals[i] : values[i][idx]).toFixed(6)} ${unit}`.trim(),
      })),
    ],
    cursor: { points: { show: false } },
  };
  const plot = new uPlot(opts, [x, ...order.map((i) => running[i])], el);
  plot.root.setAttribute("role", "img");
  plot.root.setAttribute("aria-label", `Bar chart of ${seriesNames.join(", ")}; the tables beside it hold the figures`);
  return fit(plot, el, height);
}

// Credits per day (YYYY-MM-DD strings), stacked by series (e.g. models).
export function dailyStacked(el, days, seriesNames, values, { height = 260, unit = "credits" } = {}) {
  const x = days.map((d) => Date.parse(`${d}T00:00:00Z`) / 1000);
  const xSeries = { label: "day", value: (u, ts) => (ts == null ? "all" : new Date(ts * 1000).toISOString().slice(0, 10)) };
  const xScale = { time: true, range: (u, min, max) => [min - 43200, max + 43200] };
  return stacked(el, x, xSeries, undefined, xScale, seriesNames, values, height, unit);
}

// "100 to 1000" -> "100–1k": axis labels that fit side by side on a phone
function short(label) {
  return label.replace(/(\d+)000\b/g, "$1k").replace(" to ", "–").replace(" and more", "+").replace("below ", "< ");
}

// Counts over named categories (e.g. balance ranges), stacked by series (e.g. tiers).
export function categoryStacked(el, categories, seriesNames, values, { height = 240, unit = "" } = {}) {
  const x = categories.map((_, i) => i);
  const xSeries = { label: "range", value: (u, v) => (v == null ? "all" : categories[v] ?? "") };
  const xAxis = (u, splits) => splits.map((s) => (Number.isInteger(s) ? short(categories[s] ?? "") : ""));
  const xScale = { time: false, range: () => [-0.5, categories.length - 0.5] };
  return stacked(el, x, xSeries, xAxis, xScale, seriesNames, values, height, unit);
}
