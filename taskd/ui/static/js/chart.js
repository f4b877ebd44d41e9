// Time-series charts with uPlot (x in seconds, as uPlot wants).

import uPlot from "../vendor/uPlot.esm.js";

const COLOURS = ["#2f6fde", "#d9822b", "#2a9d5c", "#b04ad6", "#c23c3c", "#5a6b7d"];

export function lineChart(target, { title, labels, xs, ys, format, width, height = 180, points = false, range = null }) {
  const series = [
    {},
    ...labels.map((label, i) => ({
      label,
      stroke: COLOURS[i % COLOURS.length],
      width: 1.5,
      value: (u, v) => (v === null || v === undefined ? "–" : format ? format(v) : v.toFixed(2)),
      points: { show: points },
    })),
  ];
  const options = {
    title,
    width: width || Math.max(300, target.clientWidth || 600),
    height,
    series,
    axes: [{}, { values: (u, values) => values.map((v) => (format ? format(v) : v)), size: 70 }],
    scales: { x: range ? { time: true, range: () => range } : { time: true } },
    legend: { live: false },
  };
  return new uPlot(options, [xs, ...ys], target);
}

export function failureSeries(options, label) {
  return {
    label,
    stroke: "#c23c3c",
    fill: "#c23c3c",
    paths: () => null,
    points: { show: true, size: 9, stroke: "#c23c3c", fill: "#c23c3c" },
    ...options,
  };
}

export { uPlot };
