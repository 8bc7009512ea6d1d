// The device in this tab (`lambdasplit web --in-browser`): the tokenizer, the head and the tail run here, in
// ONNX Runtime Web, and the frames go straight to the body server over a WebSocket. A chat yields the same
// events as the Python device's /api/chat stream (start, text, wire, done, then attack), so the page draws
// both the same way. This app only opens the body session (it holds the token) and, after the answer, reads
// back the uplink frames the body server already received; the prompt and the answer stay in this tab.

import { api } from "./http.js";

const FRAME_EVERY_MS = 250; // how often the hex view and the heatmap refresh, as chat.py's FRAME_EVERY_S
const HEX_BYTES = 256;

// The exported device and its wire module, loaded from this app's /device/ folder; the page's ?backend=
// (wasm, webgpu or auto, the default) picks where the parts run.
export async function loadTabDevice(info) {
  const base = info.tab.path;
  const [{ BrowserDevice }, wire] = await Promise.all([import(`${base}device.js`), import(`${base}wire.js`)]);
  const backend = new URLSearchParams(location.search).get("backend") || "auto";
  const device = await BrowserDevice.load(base, { backend });
  return { device, wire };
}

// The codecs of `names` the page's wire module speaks (the others need a session's rotation or basis).
export function tabCodecs(wire, names) {
  return names.filter((name) => { try { wire.parseCodec(name); return true; } catch { return false; } });
}

// The bytes of a frame as an observer sees them: the same lines as lambdasplit/wire/hexdump.py.
export function hexdump(bytes, limit = HEX_BYTES) {
  const rows = [];
  for (let off = 0; off < Math.min(bytes.length, limit); off += 16) {
    const chunk = bytes.subarray(off, Math.min(off + 16, bytes.length));
    const hex = Array.from(chunk, (b) => b.toString(16).padStart(2, "0")).join(" ");
    const text = Array.from(chunk, (b) => (b >= 32 && b < 127 ? String.fromCharCode(b) : ".")).join("");
    rows.push(`  ${off.toString(16).padStart(4, "0")}  ${hex.padEnd(47)}  |${text}|`);
  }
  return rows.join("\n");
}

function frameView(wire, bytes) {
  const view = { bytes: bytes.length, hex: hexdump(bytes) };
  try {
    const frame = wire.decodeFrame(bytes);
    if (frame.tensor && frame.rows) {
      Object.assign(view, { rows: frame.rows, dim: frame.cols,
        state: Array.from(frame.tensor.subarray((frame.rows - 1) * frame.cols), (v) => Math.round(v * 1000) / 1000) });
    }
  } catch { /* the hex alone */ }
  return view;
}

// The request a cloud-only service would receive: chat.py's cloud_only_request, here.
function cloudOnly(model, messages, options) {
  return JSON.stringify({ model, messages, max_tokens: options.max_tokens, temperature: options.temperature }, null, 1);
}

function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

// One chat turn in the tab: calls onEvent(event) with /api/chat's events. `signal` stops it between tokens.
export async function chatInTab({ device, wire }, info, messages, options, signal, onEvent) {
  const [x, y] = info.tab.split;
  const ids = device.encodeMessages(messages);
  const open = async (ask) => (await api("/api/body-session", {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(ask) })).json();
  await device.connect(info.tab.server, { wire: `${options.up},${options.down}`, open });
  try {
    const limit = Math.min(device.maxPositions, device.manifest.max_positions);
    const maxTokens = Math.min(options.max_tokens, limit - ids.length);
    if (maxTokens < 1) {
      throw new Error(`the prompt takes ${ids.length} tokens; the model and the body server allow ${limit} positions, ` +
        "so no room is left for an answer");
    }
    const { leakage } = await (await api(`/api/leakage?x=${x}&y=${y}`)).json();
    onEvent({ type: "start", split: [x, y], wire: { up: options.up, down: options.down }, prompt_tokens: ids.length,
      max_tokens: maxTokens, cloud_only: cloudOnly(device.manifest.model, messages, options), leakage });
    const sampling = { temperature: options.temperature, topK: options.top_k, topP: options.top_p,
      seed: options.seed ?? Math.floor(Math.random() * 2 ** 31) };
    const started = performance.now();
    const totals = { device: 0, network: 0, cloud: 0 };
    const answer = [];
    let shown = "", finish = "length", lastFrames = 0;
    for await (const t of device.generateIds(ids, { maxNewTokens: maxTokens, ...sampling })) {
      totals.device += t.deviceMs;
      totals.network += t.roundMs - t.cloudMs;
      totals.cloud += t.cloudMs;
      answer.push(t.id);
      if (t.eos) { finish = "stop"; break; }
      if (t.text !== shown) {
        onEvent(t.text.startsWith(shown) ? { type: "text", text: t.text.slice(shown.length) } : { type: "text", full: t.text });
        shown = t.text;
      }
      const now = performance.now();
      const frames = now - lastFrames >= FRAME_EVERY_MS;
      if (frames) lastFrames = now;
      onEvent(wireEvent(device, wire, answer.length, now - started, totals, frames ? t : null));
      if (signal.aborted) { finish = "cancelled"; break; }
    }
    const last = { up: device.sent.at(-1), down: device.received.at(-1) };
    onEvent(wireEvent(device, wire, answer.length - (finish === "stop" ? 1 : 0), performance.now() - started, totals, last));
    onEvent({ type: "done", finish_reason: finish, prompt_tokens: ids.length,
      completion_tokens: answer.length - (finish === "stop" ? 1 : 0), tokens_per_round_trip: 1 });
    onEvent(await readBack(device, x, ids.concat(answer), ids.length));
  } finally {
    device.close();
  }
}

function wireEvent(device, wire, tokens, elapsedMs, totals, frames) {
  const event = { type: "wire", tokens, tokens_per_s: tokens / (elapsedMs / 1000), device_ms: totals.device,
    network_ms: totals.network, cloud_ms: totals.cloud, steps: device.stepIndex, frame_up: device.traffic.up,
    frame_down: device.traffic.down, bytes_up: device.traffic.up, bytes_down: device.traffic.down,
    counted_at_socket: false };
  if (frames && frames.up) event.frames = { up: frameView(wire, frames.up), down: frameView(wire, frames.down) };
  return event;
}

// The attack's read-back of this session's uplink frames (computed by this app, where the assessment's probes
// are; it gets the frames only), and the truth beside it (from this tab: the positions' own tokens).
async function readBack(device, layer, ids, promptTokens) {
  try {
    const found = await (await api("/api/attack", { method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ layer, frames: device.sent.map(toBase64) }) })).json();
    const keep = found.positions.map((p, i) => [p, i]).filter(([p]) => p < ids.length - 1).map(([, i]) => i);
    const pick = (list) => keep.map((i) => list[i]);
    const positions = pick(found.positions);
    const truth = positions.map((p) => ids[p]);
    return { type: "attack", ...found, positions, guesses: pick(found.guesses), pieces: pick(found.pieces), truth,
      prompt_tokens: promptTokens, truth_pieces: truth.map((id) => device.tokenizer.decode([id], { skip_special_tokens: false })), where: "tab" };
  } catch (error) {
    return { type: "attack", error: `the read-back failed: ${error.message}` };
  }
}
