// Drawing what the network sees: byte counts, the time split, hex frames and state heatmaps.

export function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} kB`;
  return `${(n / 1024 / 1024).toFixed(2)} MB`;
}

export function formatMs(ms) {
  return ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${Math.round(ms)} ms`;
}

// A stacked bar of device / network / cloud time, and the figures in words.
export function drawLatency(parts, text, event) {
  const total = Math.max(event.device_ms + event.network_ms + event.cloud_ms, 1e-9);
  for (const name of ["device", "network", "cloud"]) {
    parts[name].style.width = `${(100 * event[`${name}_ms`]) / total}%`;
  }
  text.textContent = `device ${formatMs(event.device_ms)} · network ${formatMs(event.network_ms)} · ` +
    `cloud ${formatMs(event.cloud_ms)}`;
}

// One row of a hidden state as a square grid: blue negative, white zero, red positive.
export function drawHeatmap(canvas, values) {
  const ctx = canvas.getContext("2d");
  if (!values || !values.length) {
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    return;
  }
  const side = Math.ceil(Math.sqrt(values.length));
  canvas.width = side;
  canvas.height = side;
  const rms = Math.sqrt(values.reduce((sum, v) => sum + v * v, 0) / values.length);
  const scale = 3 * rms || 1;
  const image = ctx.createImageData(side, side);
  values.forEach((v, i) => {
    const t = Math.max(-1, Math.min(1, v / scale));
    const fade = Math.round(255 * (1 - Math.abs(t)));
    const [r, g, b] = t >= 0 ? [255, fade, fade] : [fade, fade, 255];
    image.data.set([r, g, b, 255], i * 4);
  });
  ctx.putImageData(image, 0, 0);
  const largest = Math.max(...values.map(Math.abs));
  canvas.title = `${values.length} values; RMS ${rms.toFixed(3)}, largest magnitude ${largest.toFixed(2)}`;
}

// The leakage `lambdasplit assess` measured for the states this split sends.
export function leakageTable(leakage, assessmentPath) {
  if (!leakage) {
    return `<p class="note">This model has not been assessed on this device, so there is no measured figure yet. ` +
      `Run <code>lambdasplit assess</code> (it writes <code>${escapeHtml(assessmentPath)}</code>).</p>`;
  }
  const pct = (v) => (v === null || v === undefined ? "not assessed" : `${(100 * v).toFixed(1)}%`);
  const risk = (v) => (v !== null && v > 0.5 ? "risk-high" : "");
  const row = (what, p) =>
    `<tr><td>${what} (state at layer ${p.layer})</td><td class="${risk(p["with-weights"])}">${pct(p["with-weights"])}</td>` +
    `<td>${pct(p["without-weights"])}</td></tr>`;
  return `<table><tr><th></th><th>with the weights</th><th>without</th></tr>` +
    row("uplink", leakage.up) + row("downlink", leakage.down) + `</table>` +
    `<p class="note">${leakage.metric} by the strongest measured attack${leakage.noise ? `, noise ${leakage.noise}` : ""}` +
    ` (${escapeHtml(leakage.measured || "")}); a lower bound: exact inversion with the public weights works at any depth.</p>`;
}

export function escapeHtml(text) {
  return String(text).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
}
