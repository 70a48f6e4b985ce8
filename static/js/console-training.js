// The run page: charts of every metric the run logs (uPlot, vendored), redrawn every 2 s while
// the run is queued or running, and the log kept scrolled to its newest line. No inline script
// or style: uPlot sizes its elements through the CSSOM, which the CSP allows.
(function () {
  "use strict";
  const PALETTE = ["#1f5fbf", "#c2410c", "#2b8a3e", "#7b3fbf", "#a4161a", "#0f766e", "#b45309", "#4f5862"];
  const HEIGHT = 220;
  const EVERY_MS = 2000;

  const section = document.getElementById("run-charts");
  if (!section || typeof window.uPlot !== "function") return;
  const grid = section.querySelector("[data-charts]");
  const empty = section.querySelector("[data-charts-empty]");
  const url = section.getAttribute("data-metrics");
  const charts = new Map(); // group -> {plot, names, box}

  // The live region (replaced by htmx) says whether the run still lives.
  function active() {
    const live = document.getElementById("run-live");
    const status = live ? live.getAttribute("data-status") : "";
    return status === "queued" || status === "running";
  }

  // {"loss/train": [[step, value], ...], ...} -> {"loss": ["loss/train", ...], ...}
  function groups(metrics) {
    const out = new Map();
    Object.keys(metrics).sort().forEach((name) => {
      const group = name.includes("/") ? name.slice(0, name.indexOf("/")) : name;
      if (!out.has(group)) out.set(group, []);
      out.get(group).push(name);
    });
    return out;
  }

  // uPlot wants one x array for every series of a chart: the union of their steps, with
  // null where a metric has no value at that step (validation metrics are sparser).
  function aligned(metrics, names) {
    const steps = new Set();
    names.forEach((n) => metrics[n].forEach((p) => steps.add(p[0])));
    const xs = Array.from(steps).sort((a, b) => a - b);
    const index = new Map(xs.map((x, i) => [x, i]));
    const ys = names.map((n) => {
      const column = new Array(xs.length).fill(null);
      metrics[n].forEach((p) => { column[index.get(p[0])] = p[1]; });
      return column;
    });
    return [xs, ...ys];
  }

  // Per series, the index of its newest value: what the legend shows while no one hovers.
  function newest(data) {
    return data.map((column) => {
      for (let i = column.length - 1; i >= 0; i--) if (column[i] != null) return i;
      return null;
    });
  }

  function showNewest(u) {
    if (u.data[0].length && u.cursor.left < 0) u.setLegend({ idxs: newest(u.data) }, false);
  }

  function widthOf(box) {
    return Math.max(240, Math.floor(box.clientWidth) - 8);
  }

  function options(group, names, box) {
    return {
      width: widthOf(box),
      height: HEIGHT,
      scales: { x: { time: false } },
      axes: [
        { label: "step", size: 40, stroke: "#4f5862", grid: { stroke: "#e6e9ed" } },
        { size: 56, stroke: "#4f5862", grid: { stroke: "#e6e9ed" } },
      ],
      series: [
        { label: "step" },
        ...names.map((name, i) => ({
          label: name.slice(group.length + 1) || name, // "train" under the chart "loss"
          stroke: PALETTE[i % PALETTE.length],
          width: 2,
          spanGaps: true,
          points: { size: 5 },
        })),
      ],
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      // The cursor left the chart (uPlot blanks the legend): back to the newest values.
      hooks: { setLegend: [(u) => { if (u.legend.idx == null) showNewest(u); }] },
    };
  }

  function draw(metrics) {
    const wanted = groups(metrics);
    empty.hidden = wanted.size > 0;
    if (wanted.size === 0 && !active()) empty.textContent = "This run logged no metrics.";
    wanted.forEach((names, group) => {
      const data = aligned(metrics, names);
      let chart = charts.get(group);
      if (chart && chart.names.join("\n") !== names.join("\n")) {
        chart.plot.destroy(); // a new metric in the group: new series, new chart
        chart.box.remove();
        charts.delete(group);
        chart = undefined;
      }
      if (!chart) {
        const figure = document.createElement("figure");
        figure.className = "chart";
        figure.setAttribute("data-group", group);
        const title = document.createElement("h3");
        title.textContent = group;
        const box = document.createElement("div");
        box.className = "plot";
        figure.append(title, box);
        grid.append(figure);
        chart = { plot: new window.uPlot(options(group, names, box), data, box), names, box: figure };
        chart.inner = box;
        charts.set(group, chart);
      } else {
        chart.plot.setData(data);
      }
      showNewest(chart.plot);
    });
  }

  let inFlight = false;
  async function refresh() {
    if (inFlight) return;
    inFlight = true;
    // Read before fetching: the fetch after the run ended gets everything it logged.
    const live = active();
    try {
      const answer = await fetch(url, { headers: { accept: "application/json" }, cache: "no-store" });
      if (answer.ok) draw(await answer.json());
    } catch (error) {
      // A failed poll (a restart, a dropped connection) is tried again at the next tick.
    } finally {
      inFlight = false;
    }
    if (live) window.setTimeout(refresh, EVERY_MS);
    else section.setAttribute("data-polling", "done"); // the last fetch, after the run ended
  }

  // Keep the charts as wide as their boxes (a resized window, a narrow phone).
  if (typeof ResizeObserver === "function") {
    new ResizeObserver(() => {
      charts.forEach((chart) => chart.plot.setSize({ width: widthOf(chart.inner), height: HEIGHT }));
    }).observe(grid);
  }

  // The log's newest line is at its bottom: show it, on load and after each poll.
  function scrollLog() {
    const log = document.querySelector("[data-run-log]");
    if (log) log.scrollTop = log.scrollHeight;
  }
  document.addEventListener("htmx:afterSwap", scrollLog);
  scrollLog();
  refresh();
})();
