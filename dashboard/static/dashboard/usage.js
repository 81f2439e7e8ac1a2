// The usage page's charts, drawn with the vendored Chart.js from the figures the page embeds as JSON
// (json_script: data, not code, so the Content-Security-Policy's script-src 'self' holds).
"use strict";

const PALETTE = ["#4338ca", "#0e9384", "#dc6803", "#c11574", "#2e90fa", "#66c61c", "#7a5af8", "#e31b54", "#98a2b3"];

function usageCharts() {
  const source = document.getElementById("usage-data");
  if (!source || typeof Chart === "undefined") return;
  const data = JSON.parse(source.textContent);
  Chart.defaults.font.family = getComputedStyle(document.body).fontFamily;
  Chart.defaults.color = "#5b6472";
  Chart.defaults.animation = false;
  const days = data.days;
  const stacked = (series) => series.map((s, n) => ({
    label: s.label, data: s.data, backgroundColor: PALETTE[n % PALETTE.length], borderWidth: 0,
  }));
  const common = {
    responsive: true, maintainAspectRatio: false, interaction: {mode: "index", intersect: false},
    plugins: {legend: {position: "bottom", labels: {boxWidth: 12}}},
  };
  const bars = (id, datasets, stack) => new Chart(document.getElementById(id), {
    type: "bar", data: {labels: days, datasets},
    options: {...common, scales: {x: {stacked: stack}, y: {stacked: stack, beginAtZero: true}}},
  });
  bars("chart-spend", stacked(data.spend), true);
  bars("chart-requests", stacked(data.requests), true);
  bars("chart-tokens", [
    {label: "Input", data: data.input_tokens, backgroundColor: PALETTE[0]},
    {label: "Output", data: data.output_tokens, backgroundColor: PALETTE[1]},
  ], true);
  const line = (id, datasets) => new Chart(document.getElementById(id), {
    type: "line", data: {labels: days, datasets},
    options: {...common, spanGaps: true, scales: {y: {beginAtZero: true}}},
  });
  line("chart-latency", [
    {label: "p50", data: data.p50, borderColor: PALETTE[0], backgroundColor: PALETTE[0], pointRadius: 2},
    {label: "p95", data: data.p95, borderColor: PALETTE[2], backgroundColor: PALETTE[2], pointRadius: 2},
  ]);
  line("chart-errors", [
    {label: "Errors", data: data.error_rate, borderColor: PALETTE[7], backgroundColor: PALETTE[7], pointRadius: 2},
  ]);
}

document.addEventListener("DOMContentLoaded", usageCharts);
