// Test driver for lambdasplit/browser/static/wire.js (used by tests/test_browser_wire.py).
//
// stdin:  {"jobs": [job, ...]} where a job is
//           {"op": "decode", "frame": BASE64}
//           {"op": "encode", "kind", "step", "pos", "rows", "cols", "codec", "extra", "code", "message",
//            "tensor": BASE64 of little-endian float32 values, or null}
// stdout: {"results": [result, ...]}, one per job, in order:
//           {"ok": true, "frame": BASE64} for an encode,
//           {"ok": true, "tensor": BASE64 float32 LE or null, "kind", "step", "pos", "rows", "cols", "codec",
//            "header", "extra", "code", "message"} for a decode,
//           {"ok": false, "code": ERROR_CODE, "message": ERROR_MESSAGE} when wire.js refused.
import { decodeFrame, encodeFrame } from "../../lambdasplit/browser/static/wire.js";

const b64 = (bytes) => Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength).toString("base64");

function floats(text) {
  const buf = Buffer.from(text, "base64");
  const out = new Float32Array(buf.length / 4);
  new Uint8Array(out.buffer).set(buf);
  return out;
}

function run(job) {
  try {
    if (job.op === "encode") {
      const tensor = job.tensor === null || job.tensor === undefined ? null : floats(job.tensor);
      const frame = encodeFrame({ ...job, tensor });
      return { ok: true, frame: b64(frame) };
    }
    const f = decodeFrame(new Uint8Array(Buffer.from(job.frame, "base64")));
    return { ok: true, kind: f.kind, step: f.step, pos: f.pos, rows: f.rows, cols: f.cols, codec: f.codec,
      header: f.header, extra: f.extra, code: f.code, message: f.message,
      tensor: f.tensor ? b64(f.tensor) : null };
  } catch (exc) {
    return { ok: false, code: exc.code ?? null, message: String(exc.message) };
  }
}

const chunks = [];
for await (const chunk of process.stdin) chunks.push(chunk);
const { jobs } = JSON.parse(Buffer.concat(chunks).toString("utf-8"));
process.stdout.write(JSON.stringify({ results: jobs.map(run) }));
