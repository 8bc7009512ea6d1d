// The device in the page: tokenizer, head and tail (ONNX Runtime Web), sampling, and the body server's wire
// protocol over one WebSocket per session. Only hidden states leave the page; the prompt and the answer never do.
//
//   prompt -> chat template -> tokenizer -> head (ORT) -> frame ->  WebSocket  -> body server
//   text   <- detokenizer   <- sample    <- tail (ORT) <- frame <-  WebSocket  <-
//
// Files it loads from its own folder (written by `lambdasplit export-web`): manifest.json, head.onnx, tail.onnx
// (or their int8 copies), tokenizer.json, tokenizer_config.json, chat_template.jinja, and the runtimes.
//
// Backends: "wasm" (ONNX Runtime's WASM build, threads and SIMD) or "webgpu" (its WebGPU build: the parts run on
// the GPU, and an operator WebGPU lacks runs in WASM). "auto" takes WebGPU where the browser has a hardware
// adapter, else WASM: a software adapter (SwiftShader, a fallback adapter) is slower than WASM.

import { Tokenizer } from "./tokenizers.min.mjs";
import { Template } from "./jinja.js";
import { makeSampler } from "./sampling.js";
import { decodeFrame, encodeFrame } from "./wire.js";

let ort = null; // the runtime module this page loaded (one per page: its Tensor class goes with its sessions)
let ortBackend = null;
const RUNTIMES = { wasm: "ort.wasm.min.mjs", webgpu: "ort.webgpu.min.mjs" };
const BACKENDS = ["auto", "wasm", "webgpu"];

// The backend `requested` resolves to in this browser; an explicit "webgpu" without an adapter is an error.
export async function chooseBackend(requested = "auto") {
  if (!BACKENDS.includes(requested)) throw new Error(`unknown backend ${JSON.stringify(requested)}; use one of ${BACKENDS.join(", ")}`);
  if (requested === "wasm") return "wasm";
  const adapter = navigator.gpu ? await navigator.gpu.requestAdapter().catch(() => null) : null;
  if (requested === "webgpu") {
    if (!adapter) throw new Error("this browser offers no WebGPU adapter (WebGPU needs a secure context, and a browser and GPU that support it); use the wasm backend");
    return "webgpu";
  }
  const software = !adapter || adapter.isFallbackAdapter || adapter.info?.architecture === "swiftshader";
  return software ? "wasm" : "webgpu";
}

async function loadRuntime(backend) {
  if (ort && ortBackend !== backend) throw new Error(`this page already runs the ${ortBackend} backend; reload it to use ${backend}`);
  if (!ort) {
    ort = await import(`./${RUNTIMES[backend]}`); // beside this module, wherever the page serves it
    ortBackend = backend;
  }
}

const WS_PROTOCOL = "lambdasplit.v1";
const WS_KEY_PROTOCOL = "lambdasplit.key.";

// One exported part with its own KV cache: each step's presents are the next step's pasts.
class Part {
  constructor(session, manifest, name) {
    this.session = session;
    this.inputs = new Set(session.inputNames);
    this.pastNames = manifest.parts[name].inputs.filter((n) => n.startsWith("past."));
    this.shape = [manifest.kv_heads, manifest.head_dim];
    this.reset();
  }

  reset() {
    this.past = this.pastNames.map(() => new ort.Tensor("float32", new Float32Array(0), [1, this.shape[0], 0, this.shape[1]]));
  }

  // first: the ids (head) or the hidden state (tail) of `rows` new rows at positions pos..pos+rows-1
  async step(firstName, first, pos, rows) {
    const total = pos + rows;
    const mask = new Uint8Array(rows * total);
    for (let r = 0; r < rows; r++) mask.fill(1, r * total, r * total + pos + r + 1);
    const feeds = { [firstName]: first, mask: new ort.Tensor("bool", mask, [1, 1, rows, total]) };
    if (this.inputs.has("positions")) {
      feeds.positions = new ort.Tensor("int64", BigInt64Array.from({ length: rows }, (_, i) => BigInt(pos + i)), [1, rows]);
    }
    this.pastNames.forEach((name, i) => { feeds[name] = this.past[i]; });
    const out = await this.session.run(feeds);
    const names = this.session.outputNames;
    this.past = names.slice(1).map((n) => out[n]);
    return out[names[0]];
  }
}

export class BrowserDevice {
  static async load(base = "./", { int8 = false, threads = navigator.hardwareConcurrency || 1, backend = "auto" } = {}) {
    const device = new BrowserDevice();
    device.backend = await chooseBackend(backend);
    await loadRuntime(device.backend);
    const get = async (file) => { const r = await fetch(base + file); if (!r.ok) throw new Error(`${file}: ${r.status}`); return r; };
    device.manifest = await (await get("manifest.json")).json();
    const config = await (await get("tokenizer_config.json")).json();
    device.tokenizer = new Tokenizer(await (await get("tokenizer.json")).json(), config);
    const template = config.chat_template || (await fetch(base + "chat_template.jinja").then((r) => (r.ok ? r.text() : null)));
    device.template = template ? new Template(template) : null;
    device.specials = { bos_token: config.bos_token, eos_token: config.eos_token };
    ort.env.wasm.wasmPaths = base;
    ort.env.wasm.numThreads = crossOriginIsolated ? threads : 1;  // threads need cross-origin isolation
    const key = int8 ? "int8_file" : "file";
    const started = performance.now();
    // a tied embedding table, kept once outside both fp32 files (export-web): fetched once, given to both
    const shared = !int8 && device.manifest.shared
      ? new Uint8Array(await (await get(device.manifest.shared.file)).arrayBuffer()) : null;
    for (const name of ["head", "tail"]) {
      const externalData = (shared && device.manifest.parts[name].external || []).map((path) => ({ path, data: shared }));
      const session = await ort.InferenceSession.create(base + device.manifest.parts[name][key],
        { executionProviders: device.backend === "webgpu" ? ["webgpu", "wasm"] : ["wasm"], externalData });
      device[name] = new Part(session, device.manifest, name);
    }
    device.loadMs = performance.now() - started;
    return device;
  }

  encodePrompt(text, chat = true) {
    return chat && this.template ? this.encodeMessages([{ role: "user", content: text }]) : this.tokenizer.encode(text).ids;
  }

  // A whole conversation through the model's chat template, ready for the assistant's next turn.
  encodeMessages(messages) {
    if (!this.template) throw new Error(`${this.manifest.model} has no chat template`);
    const rendered = this.template.render({ messages, add_generation_prompt: true, ...this.specials });
    return this.tokenizer.encode(rendered, { add_special_tokens: false }).ids;
  }

  // Open a session on the body server and its WebSocket. The session is opened by a POST: by this page, with
  // the token in its Authorization header, or by `open(ask)` (a host that holds the token and hands out the
  // session, as `lambdasplit web --in-browser` does). Its key goes in the WebSocket's subprotocols (a page
  // cannot set headers there; never in the URL).
  async connect(server, { token = null, wire = null, maxPositions = null, open = null } = {}) {
    const codecs = (wire || this.manifest.default_wire).split(",");
    const [up, down] = [codecs[0], codecs[1] ?? codecs[0]];
    const [x, y] = this.manifest.split;
    const seed = Math.floor(Math.random() * 2 ** 31);
    let opened;
    if (open) {
      opened = await open({ up, down, seed, ...(maxPositions ? { max_positions: maxPositions } : {}) });
    } else {
      const request = { model_fingerprint: this.manifest.body_fingerprint, x, y, wire: { up, down, seed }, cache: true,
        ...(maxPositions ? { max_positions: maxPositions } : {}) };
      const headers = { "Content-Type": "application/json", ...(token ? { Authorization: `Bearer ${token}` } : {}) };
      const response = await fetch(`${server.replace(/\/$/, "")}/v1/sessions`, { method: "POST", headers, body: JSON.stringify(request) });
      opened = await response.json();
      if (!response.ok) throw new Error(`the body server refused the session: ${opened.error}: ${opened.message}`);
    }
    const url = `${server.replace(/^http/, "ws").replace(/\/$/, "")}/v1/sessions/${opened.session_id}/ws`;
    const ws = new WebSocket(url, [WS_PROTOCOL, WS_KEY_PROTOCOL + opened.key]);
    ws.binaryType = "arraybuffer";
    await new Promise((resolve, reject) => {
      ws.onopen = resolve;
      ws.onerror = () => reject(new Error(`the WebSocket to ${url} failed: is the body server up, and does it allow ` +
        `this page's origin (lambdasplit serve --allow-origin ${location.origin})?`));
    });
    this.maxPositions = opened.max_positions;
    this.replies = [];
    this.waiting = null;
    ws.onmessage = (event) => {
      const bytes = new Uint8Array(event.data);
      if (this.waiting) { const w = this.waiting; this.waiting = null; w(bytes); } else this.replies.push(bytes);
    };
    Object.assign(this, { ws, up, down, sessionId: opened.session_id, pos: 0, stepIndex: 0, traffic: { up: 0, down: 0 },
      sent: [], received: [] });
    this.head.reset();
    this.tail.reset();
    return opened;
  }

  nextReply() {
    if (this.replies.length) return Promise.resolve(this.replies.shift());
    return new Promise((resolve) => { this.waiting = resolve; });
  }

  // One step: ids at this.pos -> head -> body (over the WebSocket) -> tail -> the logits of the last row.
  async step(ids) {
    const rows = ids.length, D = this.manifest.hidden_size;
    let t = performance.now();
    const hidden = await this.head.step("ids", new ort.Tensor("int64", BigInt64Array.from(ids.map(BigInt)), [1, rows]), this.pos, rows);
    let deviceMs = performance.now() - t;
    const frame = encodeFrame({ kind: "hidden", step: this.stepIndex, pos: this.pos, tensor: hidden.data, rows, cols: D, codec: this.up });
    this.sent.push(frame);
    t = performance.now();
    this.ws.send(frame);
    const replyBytes = await this.nextReply();
    const roundMs = performance.now() - t;
    const reply = decodeFrame(replyBytes);
    if (reply.kind === "error") throw new Error(`the body server refused a step: ${reply.code}: ${reply.message}`);
    this.traffic.up += frame.length;
    this.traffic.down += replyBytes.length;
    this.received.push(replyBytes);
    t = performance.now();
    const logits = await this.tail.step("hidden", new ort.Tensor("float32", reply.tensor, [1, rows, D]), this.pos, rows);
    deviceMs += performance.now() - t;
    const V = logits.dims[2];
    this.pos += rows;
    this.stepIndex += 1;
    const cloudMs = Number.isInteger(reply.extra.cloud_us) ? reply.extra.cloud_us / 1000 : 0;
    return { logits: logits.data.subarray((rows - 1) * V, rows * V), deviceMs, roundMs, cloudMs, up: frame, down: replyBytes };
  }

  // Generate: yields {id, text, deviceMs, roundMs} per token; the text is the answer so far.
  async *generate(prompt, { chat = true, ...options } = {}) {
    yield* this.generateIds(this.encodePrompt(prompt, chat), options);
  }

  // Generate from prompt ids: yields {id, text, eos, deviceMs, roundMs, cloudMs, up, down} per token (up and
  // down: the step's frames). An end-of-sequence token ends it (yielded with eos: true, no text, unless
  // stopAtEos is false).
  async *generateIds(ids, { maxNewTokens = 64, stopAtEos = true, ...sampling } = {}) {
    const sample = makeSampler(sampling);
    const eos = new Set(this.manifest.eos_token_ids);
    const answer = [];
    for (let n = 0; n < maxNewTokens; n++) {
      const result = await this.step(ids);
      const id = sample(result.logits);
      if (stopAtEos && eos.has(id)) {
        yield { ...result, id, eos: true, text: this.tokenizer.decode(answer, { skip_special_tokens: true }) };
        return;
      }
      answer.push(id);
      yield { ...result, id, eos: false, text: this.tokenizer.decode(answer, { skip_special_tokens: true }) };
      ids = [id];
    }
  }

  close() { if (this.ws) this.ws.close(); }
}
