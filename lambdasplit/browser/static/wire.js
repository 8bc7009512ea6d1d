// lambdasplit wire frames in the browser: the same bytes as lambdasplit/wire/frame.py and codecs.py.
//
//   offset 0  magic   "LSPL"
//   offset 4  version u8 (= 2)
//   offset 5  hlen    u32 little-endian, length of the header
//   offset 9  header  msgpack map: kind, step, pos, [code, message], [shape, codec, crc], nbytes, [extra]
//   then      payload nbytes bytes, as the codec wrote them (CRC-32 in the header)
//
// Codecs here: fp32, fp16, bf16 and int8/6/4/3/2 (one zero point and scale per row) with or without out:K.
// Encoding reproduces Python's bytes exactly: float rounding to nearest-even, torch.round (half to even),
// the order torch's CPU topk (libstdc++ partial_sort / nth_element) returns outliers in, ties included,
// and LSB-first bit packing. had, pca, zstd, noise and :tensor/:channel are refused with a clear error.
// No dependencies; ES module; runs in browsers and in Node.

export const MAGIC = "LSPL";
export const VERSION = 2;
export const KINDS = ["hidden", "grad", "lora", "error"];
export const LIMITS = Object.freeze({
  maxFrameBytes: 64 << 20,
  maxHeaderBytes: 4096,
  maxRows: 1 << 17,
  maxDims: 3,
  maxValues: (64 << 20) / 4,
});
const PREFIX = 9;
const FP16_MAX = 65504;

// An error with a short machine-readable `code`, as frame.py's FrameError ("malformed", "corrupt", ...).
export class WireError extends Error {
  constructor(code, message) {
    super(message);
    this.name = "WireError";
    this.code = code;
  }
}

// ---- CRC-32 (zlib.crc32: reflected polynomial 0xEDB88320) ---------------------------------------------

const CRC_TABLE = (() => {
  const table = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    table[n] = c >>> 0;
  }
  return table;
})();

// The CRC-32 of `bytes` (a Uint8Array), as an unsigned 32-bit number.
export function crc32(bytes) {
  let c = 0xffffffff;
  for (let i = 0; i < bytes.length; i++) c = CRC_TABLE[(c ^ bytes[i]) & 0xff] ^ (c >>> 8);
  return (c ^ 0xffffffff) >>> 0;
}

// ---- msgpack, just what frame headers use ------------------------------------------------------------
// Encodes as msgpack.packb(..., use_bin_type=True): the smallest int encoding (unsigned for >= 0), floats
// as float64, str8/16/32, arrays and maps. A JS number that is an integer is sent as an int; wrap a value in
// MsgFloat to send a float that happens to be whole (Python's 2.0). Object keys keep JS order, which puts
// integer-like keys ("1") first; pass a Map to control the order exactly.

export class MsgFloat {
  constructor(value) {
    this.value = Number(value);
  }
}

const textEncoder = new TextEncoder();
const textDecoder = new TextDecoder("utf-8", { fatal: true });

class ByteWriter {
  constructor() {
    this.buf = new Uint8Array(256);
    this.view = new DataView(this.buf.buffer);
    this.len = 0;
  }
  reserve(n) {
    if (this.len + n <= this.buf.length) return;
    const bigger = new Uint8Array(Math.max(this.buf.length * 2, this.len + n));
    bigger.set(this.buf.subarray(0, this.len));
    this.buf = bigger;
    this.view = new DataView(bigger.buffer);
  }
  u8(v) { this.reserve(1); this.buf[this.len++] = v; }
  u16(v) { this.reserve(2); this.view.setUint16(this.len, v); this.len += 2; }
  u32(v) { this.reserve(4); this.view.setUint32(this.len, v); this.len += 4; }
  u64(v) { this.reserve(8); this.view.setBigUint64(this.len, BigInt(v)); this.len += 8; }
  i64(v) { this.reserve(8); this.view.setBigInt64(this.len, BigInt(v)); this.len += 8; }
  f64(v) { this.reserve(8); this.view.setFloat64(this.len, v); this.len += 8; }
  bytes(b) { this.reserve(b.length); this.buf.set(b, this.len); this.len += b.length; }
  result() { return this.buf.slice(0, this.len); }
}

function packInt(w, n) {
  // n: a safe integer Number or a BigInt; the same choice of encoding as msgpack-python
  const big = typeof n === "bigint";
  const v = big ? n : BigInt(n);
  if (v >= 0n) {
    if (v < 0x80n) w.u8(Number(v));
    else if (v < 0x100n) { w.u8(0xcc); w.u8(Number(v)); }
    else if (v < 0x10000n) { w.u8(0xcd); w.u16(Number(v)); }
    else if (v < 0x100000000n) { w.u8(0xce); w.u32(Number(v)); }
    else if (v < 1n << 64n) { w.u8(0xcf); w.u64(v); }
    else throw new WireError("malformed", `integer ${v} is too large for msgpack`);
  } else if (v >= -0x20n) w.u8(0x100 + Number(v));
  else if (v >= -0x80n) { w.u8(0xd0); w.u8(0x100 + Number(v)); }
  else if (v >= -0x8000n) { w.u8(0xd1); w.u16(0x10000 + Number(v)); }
  else if (v >= -0x80000000n) { w.u8(0xd2); w.u32(0x100000000 + Number(v)); }
  else if (v >= -(1n << 63n)) { w.u8(0xd3); w.i64(v); }
  else throw new WireError("malformed", `integer ${v} is too small for msgpack`);
}

function packStr(w, s) {
  const b = textEncoder.encode(s);
  if (b.length < 32) w.u8(0xa0 | b.length);
  else if (b.length < 0x100) { w.u8(0xd9); w.u8(b.length); }
  else if (b.length < 0x10000) { w.u8(0xda); w.u16(b.length); }
  else { w.u8(0xdb); w.u32(b.length); }
  w.bytes(b);
}

function packValue(w, v) {
  if (v === null || v === undefined) w.u8(0xc0);
  else if (v === false) w.u8(0xc2);
  else if (v === true) w.u8(0xc3);
  else if (v instanceof MsgFloat) { w.u8(0xcb); w.f64(v.value); }
  else if (typeof v === "bigint") packInt(w, v);
  else if (typeof v === "number") {
    if (Number.isSafeInteger(v)) packInt(w, v);
    else { w.u8(0xcb); w.f64(v); }
  } else if (typeof v === "string") packStr(w, v);
  else if (v instanceof Uint8Array) {
    if (v.length < 0x100) { w.u8(0xc4); w.u8(v.length); }
    else if (v.length < 0x10000) { w.u8(0xc5); w.u16(v.length); }
    else { w.u8(0xc6); w.u32(v.length); }
    w.bytes(v);
  } else if (Array.isArray(v)) {
    if (v.length < 16) w.u8(0x90 | v.length);
    else if (v.length < 0x10000) { w.u8(0xdc); w.u16(v.length); }
    else { w.u8(0xdd); w.u32(v.length); }
    for (const item of v) packValue(w, item);
  } else if (typeof v === "object") {
    const entries = v instanceof Map ? [...v.entries()] : Object.entries(v);
    if (entries.length < 16) w.u8(0x80 | entries.length);
    else if (entries.length < 0x10000) { w.u8(0xde); w.u16(entries.length); }
    else { w.u8(0xdf); w.u32(entries.length); }
    for (const [key, item] of entries) {
      packValue(w, key);
      packValue(w, item);
    }
  } else throw new WireError("malformed", `cannot pack a ${typeof v} into msgpack`);
}

// A value as msgpack bytes (Uint8Array).
export function msgpackEncode(value) {
  const w = new ByteWriter();
  packValue(w, value);
  return w.result();
}

// The limits frame.py's unpackb applies to a header: no bin, short arrays, maps and strings.
const HEADER_UNPACK = { maxBin: 0, maxArray: 16, maxMap: 32, maxStr: 2048 };

class ByteReader {
  constructor(bytes, limits) {
    this.b = bytes;
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    this.pos = 0;
    this.limits = limits;
  }
  need(n) {
    if (this.pos + n > this.b.length) throw new Error("unexpected end of data");
  }
  u8() { this.need(1); return this.b[this.pos++]; }
  u16() { this.need(2); const v = this.view.getUint16(this.pos); this.pos += 2; return v; }
  u32() { this.need(4); const v = this.view.getUint32(this.pos); this.pos += 4; return v; }
  take(n) { this.need(n); const v = this.b.subarray(this.pos, this.pos + n); this.pos += n; return v; }
  // integers past 2^53 come back as BigInt, so no value changes on the way
  big(v) { return v >= -(2n ** 53n) && v <= 2n ** 53n ? Number(v) : v; }
  u64() { this.need(8); const v = this.view.getBigUint64(this.pos); this.pos += 8; return this.big(v); }
  i64() { this.need(8); const v = this.view.getBigInt64(this.pos); this.pos += 8; return this.big(v); }
}

function check(n, max, what) {
  if (max !== undefined && n > max) throw new Error(`${n} exceeds max_${what}_len(${max})`);
  return n;
}

function unpackStr(r, n) {
  check(n, r.limits.maxStr, "str");
  return textDecoder.decode(r.take(n));
}

function unpackArray(r, n) {
  check(n, r.limits.maxArray, "array");
  const out = [];
  for (let i = 0; i < n; i++) out.push(unpackValue(r));
  return out;
}

function unpackMap(r, n) {
  check(n, r.limits.maxMap, "map");
  const out = {};
  for (let i = 0; i < n; i++) {
    const key = unpackValue(r);
    if (typeof key !== "string") throw new Error(`${typeof key} is not allowed for map key`);
    // defineProperty, so a key named "__proto__" is an ordinary key
    Object.defineProperty(out, key, { value: unpackValue(r), enumerable: true, writable: true, configurable: true });
  }
  return out;
}

// Floats come back wrapped in MsgFloat, so checks can tell Python's 1.0 from 1 (see plainValue).
function unpackValue(r) {
  const t = r.u8();
  if (t < 0x80) return t;
  if (t >= 0xe0) return t - 0x100;
  if ((t & 0xf0) === 0x80) return unpackMap(r, t & 0x0f);
  if ((t & 0xf0) === 0x90) return unpackArray(r, t & 0x0f);
  if ((t & 0xe0) === 0xa0) return unpackStr(r, t & 0x1f);
  switch (t) {
    case 0xc0: return null;
    case 0xc2: return false;
    case 0xc3: return true;
    case 0xc4: case 0xc5: case 0xc6: {
      const n = t === 0xc4 ? r.u8() : t === 0xc5 ? r.u16() : r.u32();
      return r.take(check(n, r.limits.maxBin, "bin")).slice();
    }
    case 0xca: { r.need(4); const v = r.view.getFloat32(r.pos); r.pos += 4; return new MsgFloat(v); }
    case 0xcb: { r.need(8); const v = r.view.getFloat64(r.pos); r.pos += 8; return new MsgFloat(v); }
    case 0xcc: return r.u8();
    case 0xcd: return r.u16();
    case 0xce: return r.u32();
    case 0xcf: return r.u64();
    case 0xd0: { const v = r.u8(); return v >= 0x80 ? v - 0x100 : v; }
    case 0xd1: { const v = r.u16(); return v >= 0x8000 ? v - 0x10000 : v; }
    case 0xd2: { const v = r.u32(); return v >= 0x80000000 ? v - 0x100000000 : v; }
    case 0xd3: return r.i64();
    case 0xd9: return unpackStr(r, r.u8());
    case 0xda: return unpackStr(r, r.u16());
    case 0xdb: return unpackStr(r, r.u32());
    case 0xdc: return unpackArray(r, r.u16());
    case 0xdd: return unpackArray(r, r.u32());
    case 0xde: return unpackMap(r, r.u16());
    case 0xdf: return unpackMap(r, r.u32());
    default: throw new Error(`unsupported msgpack type 0x${t.toString(16)}`);
  }
}

// MsgFloat wrappers replaced by plain numbers, all the way down.
function plainValue(v) {
  if (v instanceof MsgFloat) return v.value;
  if (Array.isArray(v)) return v.map(plainValue);
  if (v && typeof v === "object" && !(v instanceof Uint8Array)) {
    const out = {};
    for (const [k, item] of Object.entries(v)) {
      Object.defineProperty(out, k, { value: plainValue(item), enumerable: true, writable: true, configurable: true });
    }
    return out;
  }
  return v;
}

// Bytes -> value; `raw: true` keeps floats as MsgFloat. The whole input must be one value.
export function msgpackDecode(bytes, { limits = {}, raw = false } = {}) {
  const r = new ByteReader(bytes, limits);
  const value = unpackValue(r);
  if (r.pos !== bytes.length) throw new Error("extra data after the msgpack value");
  return raw ? value : plainValue(value);
}

// ---- float formats ---------------------------------------------------------------------------------
// Bit-level conversions through one shared 4-byte buffer (float32 <-> uint32).

const F32 = new Float32Array(1);
const U32 = new Uint32Array(F32.buffer);

function f32Bits(x) { F32[0] = x; return U32[0]; }
function bitsF32(b) { U32[0] = b; return F32[0]; }

// Shift `m` right by `s` bits, rounding to nearest, ties to even (m, s small enough for exact doubles).
function shiftRoundEven(m, s) {
  const div = 2 ** s;
  const q = Math.floor(m / div);
  const r = m - q * div;
  const half = div / 2;
  return r > half || (r === half && q % 2 === 1) ? q + 1 : q;
}

// float32 -> IEEE half bits, round to nearest even (as torch's .to(float16)); past the range -> infinity.
export function f32ToF16Bits(x) {
  const b = f32Bits(x);
  const sign = (b >>> 16) & 0x8000;
  const exp = (b >>> 23) & 0xff;
  const mant = b & 0x7fffff;
  if (exp === 0xff) return sign | 0x7c00 | (mant ? 0x200 : 0); // inf, NaN
  if (exp > 112) {
    // a normal half (or rounded up to infinity): drop 13 mantissa bits; a carry runs into the exponent
    const v = shiftRoundEven(((exp - 112) << 10) * 8192 + mant, 13);
    return sign | Math.min(v, 0x7c00);
  }
  if (exp < 102) return sign; // below half the smallest subnormal: zero
  // a subnormal half: (1.mant) x 2^(exp-127) in units of 2^-24
  return sign | shiftRoundEven(0x800000 | mant, 126 - exp);
}

// IEEE half bits -> its (exact) value.
export function f16BitsToF32(h) {
  const sign = h & 0x8000 ? -1 : 1;
  const exp = (h >>> 10) & 0x1f;
  const mant = h & 0x3ff;
  if (exp === 0) return sign * mant * 2 ** -24;
  if (exp === 0x1f) return mant ? NaN : sign * Infinity;
  return sign * (1024 + mant) * 2 ** (exp - 25);
}

// float32 -> bfloat16 bits, round to nearest even (c10::BFloat16); NaN stays NaN.
export function f32ToBf16Bits(x) {
  const b = f32Bits(x);
  if (Number.isNaN(x)) return 0x7fc0;
  return Math.floor((b + 0x7fff + (Math.floor(b / 65536) & 1)) / 65536);
}

export function bf16BitsToF32(h) {
  return bitsF32(h * 65536);
}

// The float32 just after `x` toward +infinity or -infinity (x finite).
function nextF32(x, up) {
  if (x === 0) return up ? 2 ** -149 : -(2 ** -149);
  const b = f32Bits(x);
  return bitsF32((x > 0) === up ? b + 1 : b - 1);
}

// fround(a * b + c) with one rounding, as the FMA torch's addcmul compiles to. a * b must be exact in a double
// (here: an integer code below 256 times a float32 scale); the sum is rounded to double, then fixed up where
// that first rounding landed it exactly halfway between two float32s (double rounding).
function fmaF32(a, b, c) {
  const p = a * b;
  const s = p + c;
  // two-sum: the exact error of s
  const bb = s - p;
  const err = (p - (s - bb)) + (c - bb);
  const r = Math.fround(s);
  if (err === 0 || r === s || !Number.isFinite(r)) return r;
  const other = nextF32(r, s > r);
  if ((r + other) / 2 !== s) return r; // not a tie: the first rounding cannot change the result
  const upper = Math.max(r, other);
  const lower = Math.min(r, other);
  return err > 0 ? upper : lower;
}

// Round half to even (torch.round, std::nearbyint), for the non-negative quotients quantize makes.
function roundHalfEven(q) {
  const f = Math.floor(q);
  const d = q - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

// ---- codec names ---------------------------------------------------------------------------------

const FLOAT_FORMATS = { fp32: 4, fp16: 2, bf16: 2 };
const INT_BITS = [8, 6, 4, 3, 2];

// A codec name -> {name (canonical, as the frames carry it), format, bits, outliers}, or a WireError.
export function parseCodec(text) {
  if (typeof text !== "string" || !text.trim()) throw new WireError("codec", `a codec name is needed, got ${text}`);
  const spec = { format: null, bits: null, outliers: 0 };
  for (const raw of text.trim().toLowerCase().split("+")) {
    const [part, arg] = raw.trim().split(/:(.*)/s);
    if (part in FLOAT_FORMATS || /^int(0|[1-9][0-9]*)$/.test(part)) {
      if (spec.format) throw new WireError("codec", `'${text}' sets format twice`);
      spec.format = part;
      if (part.startsWith("int")) {
        spec.bits = Number(part.slice(3));
        if (!INT_BITS.includes(spec.bits)) {
          throw new WireError("codec", `${part} is not offered; integer codecs have ${INT_BITS.join(", ")} bits`);
        }
        if (arg !== undefined && arg !== "row") {
          throw new WireError("codec", `granularity '${arg}' in '${raw}' is not supported here: ` +
            "only one scale per row");
        }
      } else if (arg !== undefined) {
        throw new WireError("codec", `${part} takes no option, got '${raw}'`);
      }
    } else if (part === "out") {
      if (spec.outliers) throw new WireError("codec", `'${text}' sets outliers twice`);
      if (!/^[1-9][0-9]*$/.test(arg ?? "") || Number(arg) > 256) {
        throw new WireError("codec", `'${raw}' needs a whole number from 1 to 256 after the colon`);
      }
      spec.outliers = Number(arg);
    } else if (["had", "pca", "zstd", "noise"].includes(part)) {
      throw new WireError("codec", `codec part '${part}' (in '${text}') is not implemented in the browser; ` +
        "use fp32, fp16, bf16 or int8/6/4/3/2 with or without out:K");
    } else {
      throw new WireError("codec", `unknown codec part '${raw}' in '${text}'`);
    }
  }
  if (!spec.format) throw new WireError("codec", `'${text}' names no number format (fp32, fp16, bf16 or int8/6/4/3/2)`);
  if (spec.outliers && spec.bits === null) {
    throw new WireError("codec", `out:K keeps outliers beside integer codes; ${spec.format} has no integer codes`);
  }
  spec.name = spec.format + (spec.outliers ? `+out:${spec.outliers}` : "");
  return spec;
}

// Bytes of a (rows, cols) payload of this codec.
export function payloadSize(spec, rows, cols) {
  if (spec.bits === null) return rows * cols * FLOAT_FORMATS[spec.format];
  return rows * 8 + rows * spec.outliers * 4 + Math.ceil((rows * cols * spec.bits) / 8);
}

function refuseNonFinite(values, name, what) {
  for (let i = 0; i < values.length; i++) {
    if (!Number.isFinite(values[i])) {
      throw new WireError("non_finite", `${name}: ${what} holds non-finite values (NaN or infinity); ` +
        "they are never sent or accepted");
    }
  }
}

// ---- outliers: torch.topk(k, sorted=False) on the CPU, step by step ------------------------------------
// torch fills (value, index) pairs and, with comp(a, b) = a.value > b.value, calls std::partial_sort when
// k * 64 <= n and std::nth_element otherwise; the indices come out in whatever order that leaves them. These
// are libstdc++'s algorithms, so ties go exactly where they go in Python.

function swap(q, i, j) { const t = q[i]; q[i] = q[j]; q[j] = t; }

function pushHeap(q, v, first, hole, top, value) {
  let parent = Math.floor((hole - 1) / 2);
  while (hole > top && v[q[first + parent]] > v[value]) {
    q[first + hole] = q[first + parent];
    hole = parent;
    parent = Math.floor((hole - 1) / 2);
  }
  q[first + hole] = value;
}

function adjustHeap(q, v, first, hole, len, value) {
  const top = hole;
  let child = hole;
  while (child < Math.floor((len - 1) / 2)) {
    child = 2 * (child + 1);
    if (v[q[first + child]] > v[q[first + child - 1]]) child--;
    q[first + hole] = q[first + child];
    hole = child;
  }
  if ((len & 1) === 0 && child === Math.floor((len - 2) / 2)) {
    child = 2 * (child + 1);
    q[first + hole] = q[first + child - 1];
    hole = child - 1;
  }
  pushHeap(q, v, first, hole, top, value);
}

function makeHeap(q, v, first, last) {
  const len = last - first;
  if (len < 2) return;
  for (let parent = Math.floor((len - 2) / 2); parent >= 0; parent--) {
    adjustHeap(q, v, first, parent, len, q[first + parent]);
  }
}

function popHeap(q, v, first, last, result) {
  const value = q[result];
  q[result] = q[first];
  adjustHeap(q, v, first, 0, last - first, value);
}

function heapSelect(q, v, first, middle, last) {
  makeHeap(q, v, first, middle);
  for (let i = middle; i < last; i++) if (v[q[i]] > v[q[first]]) popHeap(q, v, first, middle, i);
}

function partialSort(q, v, first, middle, last) {
  heapSelect(q, v, first, middle, last);
  for (let end = middle; end - first > 1;) {
    end--;
    popHeap(q, v, first, end, end);
  }
}

function moveMedianToFirst(q, v, result, a, b, c) {
  const gt = (i, j) => v[q[i]] > v[q[j]];
  if (gt(a, b)) {
    if (gt(b, c)) swap(q, result, b);
    else if (gt(a, c)) swap(q, result, c);
    else swap(q, result, a);
  } else if (gt(a, c)) swap(q, result, a);
  else if (gt(b, c)) swap(q, result, c);
  else swap(q, result, b);
}

function unguardedPartition(q, v, first, last, pivot) {
  for (;;) {
    while (v[q[first]] > v[q[pivot]]) first++;
    last--;
    while (v[q[pivot]] > v[q[last]]) last--;
    if (!(first < last)) return first;
    swap(q, first, last);
    first++;
  }
}

function insertionSort(q, v, first, last) {
  if (first === last) return;
  for (let i = first + 1; i !== last; i++) {
    const value = q[i];
    if (v[value] > v[q[first]]) {
      q.copyWithin(first + 1, first, i);
      q[first] = value;
    } else {
      let hole = i;
      while (v[value] > v[q[hole - 1]]) {
        q[hole] = q[hole - 1];
        hole--;
      }
      q[hole] = value;
    }
  }
}

function nthElement(q, v, first, nth, last) {
  if (first === last || nth === last) return;
  let depth = 2 * Math.floor(Math.log2(last - first));
  while (last - first > 3) {
    if (depth === 0) {
      heapSelect(q, v, first, nth + 1, last);
      swap(q, first, nth);
      return;
    }
    depth--;
    const mid = first + Math.floor((last - first) / 2);
    moveMedianToFirst(q, v, first, first + 1, mid, last - 1);
    const cut = unguardedPartition(q, v, first + 1, last, first);
    if (cut <= nth) first = cut;
    else last = cut;
  }
  insertionSort(q, v, first, last);
}

// The indices torch's x.abs().topk(k, sorted=False) gives for one row `mag` (|x|, float32 values).
export function topkIndices(mag, k) {
  const n = mag.length;
  const q = new Int32Array(n);
  for (let j = 0; j < n; j++) q[j] = j;
  if (k * 64 <= n) partialSort(q, mag, 0, k, n);
  else nthElement(q, mag, 0, k - 1, n);
  return Array.from(q.subarray(0, k));
}

// ---- codecs: (rows, cols) float32 <-> payload bytes ---------------------------------------------------

function encodeFloats(x, spec) {
  const out = new Uint8Array(x.length * FLOAT_FORMATS[spec.format]);
  const view = new DataView(out.buffer);
  if (spec.format === "fp32") {
    x.forEach((v, i) => view.setFloat32(4 * i, v, true));
    return out;
  }
  if (spec.format === "fp16" && x.some((v) => Math.abs(v) > FP16_MAX)) {
    throw new WireError("codec", `${spec.name}: a value exceeds the fp16 range (65504); use bf16 or fp32`);
  }
  const toBits = spec.format === "fp16" ? f32ToF16Bits : f32ToBf16Bits;
  const fromBits = spec.format === "fp16" ? f16BitsToF32 : bf16BitsToF32;
  for (let i = 0; i < x.length; i++) {
    const bits = toBits(x[i]);
    if (!Number.isFinite(fromBits(bits))) { // a float32 past bf16's range would go out as infinity
      throw new WireError("non_finite", `${spec.format}: the tensor to send (in this format) holds non-finite values ` +
        "(NaN or infinity); they are never sent or accepted");
    }
    view.setUint16(2 * i, bits, true);
  }
  return out;
}

function decodeFloats(bytes, spec, count) {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const x = new Float32Array(count);
  for (let i = 0; i < count; i++) {
    if (spec.format === "fp32") x[i] = view.getFloat32(4 * i, true);
    else if (spec.format === "fp16") x[i] = f16BitsToF32(view.getUint16(2 * i, true));
    else x[i] = bf16BitsToF32(view.getUint16(2 * i, true));
  }
  refuseNonFinite(x, spec.name, "the payload");
  return x;
}

// One row's zero point, scale and codes: zero = min, scale = (max - min) / (2^bits - 1) (1 if that is 0),
// code = round_half_even((x - zero) / scale), all in float32 as torch computes them.
function quantizeRow(row, bits, name) {
  let lo = row[0];
  let hi = lo;
  for (let i = 0; i < row.length; i++) { // torch.aminmax's scan: the first of equal values (+0 / -0) wins
    const v = row[i];
    if (!(v >= lo)) lo = v;
    else if (!(v <= hi)) hi = v;
  }
  const levels = 2 ** bits - 1;
  let scale = Math.fround(Math.fround(hi - lo) / levels);
  if (!Number.isFinite(scale)) {
    throw new WireError("codec", `${name}: cannot quantize non-finite values (nan or inf), or a range wider than ` +
      "float32 holds");
  }
  if (!(scale > 0)) scale = 1;
  const codes = new Uint8Array(row.length);
  for (let i = 0; i < row.length; i++) {
    const q = Math.fround(Math.fround(row[i] - lo) / scale);
    codes[i] = Math.min(Math.max(roundHalfEven(q), 0), levels);
  }
  return { zero: lo, scale, codes };
}

// Codes of `bits` bits packed densely, least significant bit first.
export function packBits(codes, bits) {
  if (bits === 8) return Uint8Array.from(codes);
  const out = new Uint8Array(Math.ceil((codes.length * bits) / 8));
  let acc = 0;
  let nacc = 0;
  let o = 0;
  for (let i = 0; i < codes.length; i++) {
    acc |= codes[i] << nacc;
    nacc += bits;
    while (nacc >= 8) {
      out[o++] = acc & 0xff;
      acc >>>= 8;
      nacc -= 8;
    }
  }
  if (nacc > 0) out[o] = acc & 0xff;
  return out;
}

export function unpackBits(bytes, bits, count) {
  if (bits === 8) return Uint8Array.from(bytes.subarray(0, count));
  const codes = new Uint8Array(count);
  const mask = (1 << bits) - 1;
  let acc = 0;
  let nacc = 0;
  let p = 0;
  for (let i = 0; i < count; i++) {
    while (nacc < bits) {
      acc |= bytes[p++] << nacc;
      nacc += 8;
    }
    codes[i] = acc & mask;
    acc >>>= bits;
    nacc -= bits;
  }
  return codes;
}

function encodeInts(x, spec, rows, cols) {
  const k = spec.outliers;
  const zero = new Float32Array(rows);
  const scale = new Float32Array(rows);
  const idx = new Uint16Array(rows * k);
  const outl = new Uint16Array(rows * k);
  const codes = new Uint8Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    const row = Float32Array.from(x.subarray(r * cols, (r + 1) * cols));
    if (k) { // the k largest magnitudes travel apart in fp16; their places are quantized as 0
      const picked = topkIndices(row.map(Math.abs), k);
      picked.forEach((j, i) => {
        if (Math.abs(row[j]) > FP16_MAX) {
          throw new WireError("codec", `${spec.name}: an outlier exceeds the fp16 range; use a float codec`);
        }
        idx[r * k + i] = j;
        outl[r * k + i] = f32ToF16Bits(row[j]);
      });
      for (const j of picked) row[j] = 0;
    }
    const q = quantizeRow(row, spec.bits, spec.name);
    zero[r] = q.zero;
    scale[r] = q.scale;
    codes.set(q.codes, r * cols);
  }
  // layout: zero (f32 x rows), scale (f32 x rows), outlier index (u16 x rows x k), value (f16), codes
  const packed = packBits(codes, spec.bits);
  const out = new Uint8Array(payloadSize(spec, rows, cols));
  const view = new DataView(out.buffer);
  let o = 0;
  for (const v of zero) { view.setFloat32(o, v, true); o += 4; }
  for (const v of scale) { view.setFloat32(o, v, true); o += 4; }
  for (const v of idx) { view.setUint16(o, v, true); o += 2; }
  for (const v of outl) { view.setUint16(o, v, true); o += 2; }
  out.set(packed, o);
  return out;
}

function decodeInts(bytes, spec, rows, cols) {
  const k = spec.outliers;
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const zero = new Float32Array(rows);
  const scale = new Float32Array(rows);
  let o = 0;
  for (let r = 0; r < rows; r++, o += 4) zero[r] = view.getFloat32(o, true);
  for (let r = 0; r < rows; r++, o += 4) scale[r] = view.getFloat32(o, true);
  for (let r = 0; r < rows; r++) {
    if (!(Number.isFinite(zero[r]) && Number.isFinite(scale[r]) && scale[r] >= 0)) {
      throw new WireError("codec", `${spec.name}: corrupt payload (a scale or zero point is negative or not finite)`);
    }
  }
  const idx = new Uint16Array(rows * k);
  const values = new Float32Array(rows * k);
  for (let i = 0; i < rows * k; i++, o += 2) idx[i] = view.getUint16(o, true);
  for (let i = 0; i < rows * k; i++, o += 2) values[i] = f16BitsToF32(view.getUint16(o, true));
  if (idx.some((j) => j >= cols)) {
    throw new WireError("codec", `${spec.name}: corrupt payload (an outlier index is past the row's ${cols} values)`);
  }
  // zero + code * scale, fused as in torch.addcmul; then the outliers go back in their places
  const codes = unpackBits(bytes.subarray(o), spec.bits, rows * cols);
  const x = new Float32Array(rows * cols);
  for (let r = 0; r < rows; r++) {
    for (let c = 0; c < cols; c++) x[r * cols + c] = fmaF32(codes[r * cols + c], scale[r], zero[r]);
    for (let i = 0; i < k; i++) x[r * cols + idx[r * k + i]] = values[r * k + i];
  }
  if (!x.every(Number.isFinite)) {
    throw new WireError("codec", `${spec.name}: corrupt payload (it decodes to values that are not finite)`);
  }
  return x;
}

// A (rows, cols) float32 tensor (row-major Float32Array) -> payload bytes of codec `codec` (name or spec).
export function encodeTensor(tensor, rows, cols, codec) {
  const spec = typeof codec === "string" ? parseCodec(codec) : codec;
  if (!(tensor instanceof Float32Array)) tensor = Float32Array.from(tensor);
  if (!(rows > 0 && cols > 0) || tensor.length !== rows * cols) {
    throw new WireError("codec", `a tensor of ${tensor.length} values is not (${rows}, ${cols})`);
  }
  if (spec.outliers > cols) {
    throw new WireError("codec", `${spec.name}: ${spec.outliers} outliers per row, but a row has ${cols} values`);
  }
  refuseNonFinite(tensor, spec.name, "the tensor to send");
  return spec.bits === null ? encodeFloats(tensor, spec) : encodeInts(tensor, spec, rows, cols);
}

// Payload bytes -> (rows, cols) Float32Array; the payload's size must be exactly what the shape takes.
export function decodeTensor(payload, rows, cols, codec) {
  const spec = typeof codec === "string" ? parseCodec(codec) : codec;
  if (spec.outliers > cols) {
    throw new WireError("codec", `${spec.name}: ${spec.outliers} outliers per row, but a row has ${cols} values`);
  }
  const raw = payloadSize(spec, rows, cols);
  if (payload.length !== raw) {
    throw new WireError("codec", `${spec.name} payload of shape [${rows}, ${cols}] must be ${raw} bytes, got ` +
      `${payload.length}`);
  }
  return spec.bits === null ? decodeFloats(payload, spec, rows * cols) : decodeInts(payload, spec, rows, cols);
}

// ---- frames ---------------------------------------------------------------------------------------

// A frame as bytes. `tensor` is a row-major Float32Array of `rows` x `cols` (or of `shape`, 1 to 3 dims);
// error frames take `code` and `message` and no tensor. The header's keys come in frame.py's order.
export function encodeFrame({ kind = "hidden", step = 0, pos = 0, tensor = null, rows, cols, shape, codec = "fp32",
  extra = {}, code = "", message = "" } = {}) {
  const header = new Map([["kind", kind], ["step", step], ["pos", pos]]);
  let payload = new Uint8Array(0);
  if (kind === "error") {
    header.set("code", code);
    header.set("message", Array.from(String(message)).slice(0, 1000).join("")); // message[:1000], code points
  }
  if (tensor !== null && tensor !== undefined) {
    shape = shape ?? [rows, cols];
    const width = shape[shape.length - 1];
    const nrows = shape.slice(0, -1).reduce((a, b) => a * b, 1);
    const spec = typeof codec === "string" ? parseCodec(codec) : codec;
    payload = encodeTensor(tensor, nrows, width, spec);
    header.set("shape", [...shape]);
    header.set("codec", spec.name);
    header.set("crc", crc32(payload));
  }
  header.set("nbytes", payload.length);
  const extraSize = extra instanceof Map ? extra.size : Object.keys(extra ?? {}).length;
  if (extraSize) header.set("extra", extra);
  const packed = msgpackEncode(header);
  const out = new Uint8Array(PREFIX + packed.length + payload.length);
  out.set(textEncoder.encode(MAGIC), 0);
  out[4] = VERSION;
  new DataView(out.buffer).setUint32(5, packed.length, true);
  out.set(packed, PREFIX);
  out.set(payload, PREFIX + packed.length);
  return out;
}

function isInt(v) {
  return typeof v === "number" && Number.isInteger(v);
}

function intField(header, key) {
  const v = header[key] ?? 0;
  if (!isInt(v) || v < 0 || v >= 2 ** 40) {
    throw new WireError("malformed", `header field '${key}' must be a non-negative integer, got ${show(v)}`);
  }
  return v;
}

// A header value for a message, floats written as floats (Python's 1.0 is not the integer 1).
function show(v) {
  if (v instanceof MsgFloat) return Number.isInteger(v.value) ? `${v.value}.0` : String(v.value);
  return JSON.stringify(plainValue(v), (_, x) => (typeof x === "bigint" ? x.toString() : x)) ?? String(v);
}

// Python's `not value` for what msgpack decodes to: None, False, 0, 0.0, "", [] and {}.
function pyFalsy(v) {
  if (v instanceof MsgFloat) return v.value === 0;
  if (Array.isArray(v)) return v.length === 0;
  if (v && typeof v === "object" && !(v instanceof Uint8Array)) return Object.keys(v).length === 0;
  return !v;
}

// The prefix checked and the header parsed: {header (floats as MsgFloat), payload}.
function splitFrame(bytes, limits) {
  if (bytes.length < PREFIX) {
    throw new WireError("malformed", `frame of ${bytes.length} bytes is shorter than the ${PREFIX}-byte prefix`);
  }
  const magic = String.fromCharCode(...bytes.subarray(0, 4));
  if (magic !== MAGIC) {
    throw new WireError("malformed", `bad magic ${JSON.stringify(magic)}; expected "LSPL" ` +
      "(is this a lambdasplit frame?)");
  }
  if (bytes[4] !== VERSION) {
    throw new WireError("version", `frame version ${bytes[4]} is not supported; this side speaks ${VERSION}`);
  }
  const hlen = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength).getUint32(5, true);
  if (hlen > limits.maxHeaderBytes || PREFIX + hlen > bytes.length) {
    throw new WireError("malformed", `header length ${hlen} is over the limit or past the end of the frame`);
  }
  let header;
  try {
    header = msgpackDecode(bytes.subarray(PREFIX, PREFIX + hlen), { limits: HEADER_UNPACK, raw: true });
  } catch (exc) {
    throw new WireError("malformed", `header is not valid msgpack: ${exc.message}`);
  }
  if (!header || typeof header !== "object" || Array.isArray(header) || header instanceof MsgFloat ||
      header instanceof Uint8Array) {
    throw new WireError("malformed", "header must be a map");
  }
  return { header, payload: bytes.subarray(PREFIX + hlen) };
}

// The header's shape, refused unless it is 1..3 positive integers whose size fits the limits.
function boundedShape(shape, limits) {
  const dims = Array.isArray(shape) ? shape.length : 0;
  if (dims < 1 || dims > limits.maxDims || !shape.every((s) => isInt(s) && s > 0)) {
    throw new WireError("shape", `shape must be 1..${limits.maxDims} positive integers, got ${show(shape)}`);
  }
  const rows = shape.slice(0, -1).reduce((a, b) => a * b, 1);
  const cols = shape[shape.length - 1];
  if (rows > limits.maxRows) throw new WireError("shape", `${rows} rows exceed the limit of ${limits.maxRows}`);
  if (rows * cols > limits.maxValues) {
    throw new WireError("too_large", `a tensor of shape [${shape}] holds ${rows * cols} values, over the limit of ` +
      `${limits.maxValues} (what a ${limits.maxFrameBytes}-byte fp32 frame holds)`);
  }
  return { rows, cols };
}

function hex8(n) {
  return n.toString(16).padStart(8, "0");
}

// Parse and validate a frame (Uint8Array / ArrayBuffer) as decode_frame does; a WireError says what was wrong.
// Returns {kind, step, pos, shape, rows, cols, codec, tensor (Float32Array, row-major), header, code, message,
// extra}; an error frame has code and message and no tensor. `codec` (optional): the only codec accepted.
export function decodeFrame(bytes, { limits = LIMITS, codec = null } = {}) {
  if (bytes instanceof ArrayBuffer) bytes = new Uint8Array(bytes);
  if (bytes.length > limits.maxFrameBytes) {
    throw new WireError("too_large", `frame of ${bytes.length} bytes exceeds the limit of ${limits.maxFrameBytes}`);
  }
  const { header, payload } = splitFrame(bytes, limits);
  const kind = header.kind;
  if (!KINDS.includes(kind)) {
    throw new WireError("malformed", `unknown frame kind ${show(kind ?? null)}; expected one of ${KINDS.join(", ")}`);
  }
  const [step, pos, nbytes] = ["step", "pos", "nbytes"].map((k) => intField(header, k));
  if (nbytes !== payload.length) {
    throw new WireError("malformed", `header says ${nbytes} payload bytes, frame carries ${payload.length}`);
  }
  const extra = pyFalsy(header.extra) ? {} : header.extra; // header.get("extra") or {}
  if (typeof extra !== "object" || Array.isArray(extra) || extra instanceof MsgFloat || extra instanceof Uint8Array) {
    throw new WireError("malformed", "'extra' must be a map");
  }
  const base = { kind, step, pos, header: plainValue(header), extra: plainValue(extra) };
  if (kind === "error") {
    return { ...base, code: String(plainValue(header.code) ?? ""), message: String(plainValue(header.message) ?? ""),
      tensor: null, shape: null, rows: 0, cols: 0, codec: null };
  }
  const { rows, cols } = boundedShape(header.shape, limits);
  const name = header.codec;
  const expected = codec === null ? null : typeof codec === "string" ? parseCodec(codec) : codec;
  if (expected && name !== expected.name) {
    throw new WireError("bad_codec", `this session's codec for the direction is ${expected.name}, ` +
      `the frame is ${name}`);
  }
  const crc = header.crc;
  if (!isInt(crc)) throw new WireError("malformed", "a hidden frame needs the integer 'crc' of its payload");
  const spec = expected ?? parseCodec(String(plainValue(name)));
  const raw = payloadSize(spec, rows, cols);
  if (spec.outliers > cols) {
    throw new WireError("codec", `${spec.name}: ${spec.outliers} outliers per row, but a row has ${cols} values`);
  }
  if (payload.length !== raw) { // before the CRC is computed
    throw new WireError("codec", `${spec.name} payload of shape [${header.shape}] must be ${raw} bytes, ` +
      `got ${payload.length}`);
  }
  const actual = crc32(payload);
  if (actual !== crc) {
    throw new WireError("corrupt", `payload CRC-32 is ${hex8(actual)}, the header says ${hex8(crc >>> 0)}: ` +
      "the frame was damaged on the way");
  }
  const tensor = decodeTensor(payload, rows, cols, spec);
  return { ...base, shape: [...header.shape], rows, cols, codec: spec.name, tensor, code: "", message: "" };
}
