// The Image tab: text to image through a body server that holds only the U-Net. The picture sharpens step by
// step (decoded here); beside it, the noise that crossed the network in that step, and the bytes it took.
import { stopRun, streamEvents } from "./http.js";
import { escapeHtml, formatBytes } from "./wire.js";

const $ = (id) => document.getElementById(id);
const run = { id: null, controller: null };
const TABS = { chat: ["chat-pane", "side"], image: ["image-pane"] };
const header = {};  // per tab: what the header says the body server is and holds

export function setupImage(info) {
  const tab = $("tab-image");
  tab.disabled = !info.diffusion;
  if (info.image) {
    tab.title = info.diffusion ? `U-Net of ${info.image.model} on ${info.image.server}` : info.image.problem;
  }
  header.chat = { server: $("server").textContent, model: $("model").textContent };
  $("tab-chat").addEventListener("click", () => showTab("chat"));
  tab.addEventListener("click", () => showTab("image"));
  if (!info.diffusion) return;
  const { defaults, codecs } = info.image;
  header.image = { server: info.image.server,
    model: `${info.image.model} · text encoder & VAE here, U-Net there · ${info.image.default_size} px` };
  $("image-prompt").value = defaults.prompt;
  $("image-steps").value = defaults.steps;
  $("image-seed").value = defaults.seed;
  $("image-guidance").value = defaults.guidance;
  $("image-codec").innerHTML = codecs.map((c) => `<option>${escapeHtml(c)}</option>`).join("");
  $("image-codec").value = defaults.down;
  $("image-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if (!run.controller && $("image-prompt").value.trim()) generate();
  });
  $("image-stop").addEventListener("click", () => stopRun(run.id && `/api/image/${run.id}/stop`, run.controller));
}

function showTab(name) {
  for (const [tab, panes] of Object.entries(TABS)) {
    const active = tab === name;
    $(`tab-${tab}`).classList.toggle("active", active);
    $(`tab-${tab}`).setAttribute("aria-selected", String(active));
    panes.forEach((id) => { $(id).hidden = !active; });
  }
  $("server").textContent = header[name].server;
  $("model").textContent = header[name].model;
}

function settings() {
  return {
    prompt: $("image-prompt").value.trim(), steps: Number($("image-steps").value), seed: Number($("image-seed").value),
    guidance: Number($("image-guidance").value), codec: $("image-codec").value,
  };
}

function showError(message) {
  $("image-error").textContent = message;
  $("image-error").hidden = !message;
}

function setCounter(id, bytes) {
  $(id).textContent = formatBytes(bytes);
  $(id).dataset.bytes = bytes;
}

function onEvent(event) {
  const out = $("image-out");
  if (event.type === "start") {
    run.id = event.id;
    $("image-codecs").textContent = `${event.model} · ${event.size[0]}×${event.size[1]} · up ${event.wire.up} · ` +
      `down ${event.wire.down}`;
    setCounter("image-bytes-up", event.bytes_up);
  } else if (event.type === "step") {
    $("image-step").textContent = `${event.index + 1} / ${event.steps}`;
    $("image-step").dataset.step = event.index + 1;
    setCounter("image-step-bytes", event.bytes);
    setCounter("image-bytes-down", event.bytes_down);
    $("image-noise").src = event.noise;
    $("image-noise").title = `step ${event.index + 1}, t = ${event.t}: ${event.bytes} bytes`;
    if (event.image) {
      out.src = event.image;
      $("image-at").textContent = `${event.index + 1}`;
    }
  } else if (event.type === "done") {
    out.src = event.image;
    out.dataset.finish = event.finish_reason;
    $("image-at").textContent = `${event.steps}` + (event.finish_reason === "cancelled" ? " (stopped)" : "");
    $("image-totals").textContent = `${event.steps} steps in ${event.seconds.toFixed(2)} s (U-Net on the server: ` +
      `${event.cloud_s.toFixed(2)} s) · up, once: ${formatBytes(event.bytes_up)} (${event.wire.up}) · down: ` +
      `${formatBytes(Math.round(event.bytes_per_step))} per step, ${formatBytes(event.bytes_down)} in all ` +
      `(${event.wire.down})` + (event.finish_reason === "cancelled" ? " · stopped" : "");
  }
}

async function generate() {
  showError("");
  const body = settings();
  $("image-cloud-only").textContent = JSON.stringify({ prompt: body.prompt, steps: body.steps, seed: body.seed,
    guidance: body.guidance }, null, 1);
  delete $("image-out").dataset.finish;
  for (const id of ["image-step-bytes", "image-bytes-down", "image-bytes-up"]) setCounter(id, 0);
  $("image-step").textContent = "0";
  $("image-totals").textContent = "…";
  setBusy(true);
  run.controller = new AbortController();
  try {
    await streamEvents("/api/image", body, run.controller.signal, onEvent);
  } catch (error) {
    if (error.name !== "AbortError") showError(error.message);
  } finally {
    run.id = null;
    run.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("generate").disabled = busy;
  $("image-stop").disabled = !busy;
}
