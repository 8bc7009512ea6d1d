// The page: a chat through the split model, and live views of what crosses the network.
// The device is this machine's Python process (/api/chat) or, with `lambdasplit web --in-browser`, this tab
// itself (tab.js): both give the same events, drawn the same way.
import { api, stopRun, streamEvents } from "./http.js";
import { setupImage } from "./image.js";
import { readbackView } from "./readback.js";
import { chatInTab, loadTabDevice, tabCodecs } from "./tab.js";
import { drawHeatmap, drawLatency, escapeHtml, formatBytes, leakageTable } from "./wire.js";

const $ = (id) => document.getElementById(id);
const state = { info: null, history: [], run: null, controller: null, tab: null };
const inTab = () => Boolean(state.info?.tab) && $("device-mode").value === "tab";

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function settings() {
  const num = (id) => Number($(id).value);
  const seed = $("seed").value.trim();
  return {
    x: num("x"), y: num("y"), up: $("up").value, down: $("down").value,
    temperature: num("temperature"), top_p: num("top_p"), top_k: num("top_k"),
    max_tokens: num("max_tokens"), seed: seed === "" ? null : Number(seed),
  };
}

function describeSplit() {
  const { x, y } = settings();
  const n = state.info.num_layers;
  $("split-desc").textContent = `this device: embeddings + layers [0, ${x}) and [${y}, ${n}) + norm + LM head · ` +
    `body server: layers [${x}, ${y})`;
}

async function refreshLeakage() {
  describeSplit();
  const { x, y } = settings();
  try {
    const { leakage } = await (await api(`/api/leakage?x=${x}&y=${y}`)).json();
    $("leakage").innerHTML = leakageTable(leakage, state.info.assessment_path);
  } catch (error) {
    $("leakage").textContent = error.message;
  }
}

function addMessage(role, text) {
  const hint = document.querySelector("#messages .hint");
  if (hint) hint.remove();
  const el = document.createElement("div");
  el.className = `msg ${role}`;
  el.dataset.testid = role === "user" ? "user-message" : "assistant-message";
  el.textContent = text;
  $("messages").append(el);
  $("messages").scrollTop = $("messages").scrollHeight;
  return el;
}

function onWire(event) {
  if (event.bytes_up !== undefined) {
    $("bytes-up").textContent = formatBytes(event.bytes_up);
    $("bytes-up").dataset.bytes = event.bytes_up;
    $("bytes-down").textContent = formatBytes(event.bytes_down);
    $("bytes-down").dataset.bytes = event.bytes_down;
    $("steps").textContent = event.steps;
    $("counted").textContent = event.counted_at_socket
      ? `counted at the socket, headers included (frames alone: ${formatBytes(event.frame_up)} up, ${formatBytes(event.frame_down)} down)`
      : "frame bytes (socket counters unavailable here)";
  }
  $("tps").textContent = event.tokens > 1 ? event.tokens_per_s.toFixed(1) : "–";
  drawLatency({ device: $("lat-device"), network: $("lat-network"), cloud: $("lat-cloud") }, $("latency-text"), event);
  if (event.frames) {
    for (const dir of ["up", "down"]) {
      const frame = event.frames[dir];
      $(`hex-${dir}`).textContent = frame.hex;
      $(`${dir}-len`).textContent = `(${formatBytes(frame.bytes)}` + (frame.rows ? `, ${frame.rows} × ${frame.dim} values)` : ")");
      drawHeatmap($(`heat-${dir}`), frame.state);
    }
  }
}

function onEvent(event, bubble, answer) {
  if (event.type === "start") {
    state.run = event.id ?? null;
    $("cloud-only").textContent = event.cloud_only;
    $("wire-codecs").textContent = `split ${event.split[0]}:${event.split[1]} · up ${event.wire.up} · down ${event.wire.down}`;
    $("leakage").innerHTML = leakageTable(event.leakage, state.info.assessment_path);
    $("readback").innerHTML = `<p class="note">reading back the uplink after the answer …</p>`;
  } else if (event.type === "text") {
    answer.text = event.full ?? answer.text + event.text;
    bubble.textContent = answer.text;
    $("messages").scrollTop = $("messages").scrollHeight;
  } else if (event.type === "wire") {
    onWire(event);
  } else if (event.type === "done") {
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.dataset.testid = "finish";
    meta.textContent = `${event.completion_tokens} tokens · ${event.finish_reason}` +
      (event.tokens_per_round_trip > 1 ? ` · ${event.tokens_per_round_trip.toFixed(2)} tokens per round trip` : "");
    bubble.append(meta);
    bubble.dataset.finish = event.finish_reason;
  } else if (event.type === "attack") {
    $("readback").innerHTML = readbackView(event);
    $("readback").dataset.done = "1";
  }
}

async function send(prompt) {
  showError("");
  state.history.push({ role: "user", content: prompt });
  addMessage("user", prompt);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  bubble.dataset.device = inTab() ? "tab" : "python";
  setBusy(true);
  const answer = { text: "" };
  state.controller = new AbortController();
  delete $("readback").dataset.done;
  try {
    const handle = (event) => onEvent(event, bubble, answer);
    if (inTab()) {
      await chatInTab(state.tab, state.info, state.history, settings(), state.controller.signal, handle);
    } else {
      await streamEvents("/api/chat", { messages: state.history, ...settings() }, state.controller.signal, handle);
    }
  } catch (error) {
    if (error.name !== "AbortError") showError(error.message);
  } finally {
    bubble.classList.remove("streaming");
    if (answer.text) state.history.push({ role: "assistant", content: answer.text });
    else state.history.pop();  // nothing came back: forget the question too
    state.run = null;
    state.controller = null;
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  document.body.dataset.busy = busy ? "1" : "";
}

function setCodecs(codecs, defaults) {
  for (const id of ["up", "down"]) {
    $(id).innerHTML = codecs.map((c) => `<option>${escapeHtml(c)}</option>`).join("");
    $(id).value = defaults[id];
  }
}

// The device-in-the-tab choice: load the exported parts now, and switch the controls when it is chosen.
function setupTab(info) {
  $("device-choice").hidden = false;
  $("device-mode").value = "tab";
  const apply = () => {
    const tab = inTab();
    $("where").innerHTML = tab ? "head &amp; tail <b>in this tab</b>" : "head &amp; tail on <b>this device</b>";
    for (const id of ["x", "y"]) {
      $(id).disabled = tab;
      $(id).value = tab ? info.tab.split[id === "x" ? 0 : 1] : info.defaults[id];
    }
    const [up, down] = info.tab.default_wire.split(",");
    if (tab && state.tab) setCodecs(tabCodecs(state.tab.wire, [up, down, ...info.codecs].filter((c, i, a) => a.indexOf(c) === i)), { up, down });
    else if (!tab) setCodecs(info.codecs, info.defaults);
    $("send").disabled = tab && !state.tab;
    refreshLeakage();
  };
  $("device-mode").addEventListener("change", apply);
  $("tab-status").textContent = `loading the head and tail into this tab (${formatBytes(info.tab.download_bytes)}) …`;
  apply();
  loadTabDevice(info).then((tab) => {
    state.tab = tab;
    $("tab-status").textContent = `in this tab: split ${info.tab.split.join(":")}, ONNX Runtime Web ` +
      `(${tab.device.backend === "webgpu" ? "WebGPU" : crossOriginIsolated ? "WASM threads" : "one WASM thread"})`;
    document.body.dataset.tabReady = "1";
    apply();
  }).catch((error) => {
    $("tab-status").textContent = `the tab could not load the device: ${error.message}`;
    showError(`the tab could not load the device: ${error.message}`);
  });
}

async function main() {
  const info = await (await api("/api/info")).json();
  state.info = info;
  $("server").textContent = info.server;
  $("model").textContent = `${info.model} · ${info.num_layers} layers · D = ${info.hidden_size}`;
  $("api-url").textContent = `${location.origin}/v1 (model "${info.model}")`;
  for (const id of ["x", "y"]) {
    $(id).min = info.served[0];
    $(id).max = info.served[1];
    $(id).value = info.defaults[id];
  }
  setCodecs(info.codecs, info.defaults);
  setupImage(info);
  if (info.tab) setupTab(info);
  ["x", "y"].forEach((id) => $(id).addEventListener("change", refreshLeakage));
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.controller) return;
    $("prompt").value = "";
    send(prompt);
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => stopRun(state.run && `/api/chat/${state.run}/stop`, state.controller));
  $("clear").addEventListener("click", () => {
    state.history = [];
    $("messages").innerHTML = "";
  });
  await refreshLeakage();
  document.body.dataset.ready = "1";
}

main().catch((error) => showError(`cannot start: ${error.message}`));
