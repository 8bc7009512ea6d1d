// Sampling in the page, as the Python client samples (lambdasplit/client/sampling.py): greedy at temperature 0;
// otherwise the logits over the temperature, the top k of them, then the smallest set of the most likely whose
// probability reaches top-p, renormalised. Seeded: the same seed draws the same tokens (mulberry32 random
// numbers, not torch's: the page and the Python client draw from the same distribution, not the same tokens).

export function makeSampler({ temperature = 0, topK = 0, topP = 1, seed = 0 } = {}) {
  let state = seed >>> 0;
  const random = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return (logits) => {
    let best = 0;
    for (let i = 1; i < logits.length; i++) if (logits[i] > logits[best]) best = i;
    if (!(temperature > 0)) return best;
    const V = logits.length;
    const weights = new Float64Array(V); // probabilities, unnormalised
    for (let i = 0; i < V; i++) weights[i] = Math.exp((logits[i] - logits[best]) / temperature);
    let ids = null; // the tokens still in the draw (null: all of them)
    if (topK > 0 && topK < V) { // every token at least as likely as the k-th (ties kept, as torch.topk's mask does)
      const kth = kthLargest(logits, topK);
      ids = [];
      for (let i = 0; i < V; i++) if (logits[i] >= kth) ids.push(i);
    }
    if (topP < 1) { // the most likely tokens until their probability reaches top-p
      const n = ids ? ids.length : V;
      let sum = 0;
      for (let j = 0; j < n; j++) sum += weights[ids ? ids[j] : j];
      // the nucleus lies among the tokens of probability >= (1 - topP) / n: the others hold less than 1 - topP
      // together, so the most likely ones reach topP first; only those are sorted
      const floor = ((1 - topP) / n) * sum;
      const candidates = [];
      for (let j = 0; j < n; j++) { const id = ids ? ids[j] : j; if (weights[id] >= floor) candidates.push(id); }
      candidates.sort((a, b) => weights[b] - weights[a]);
      let mass = 0;
      ids = [];
      for (const id of candidates) {
        ids.push(id);
        mass += weights[id] / sum;
        if (mass >= topP) break;
      }
    }
    const n = ids ? ids.length : V;
    let total = 0;
    for (let j = 0; j < n; j++) total += weights[ids ? ids[j] : j];
    let u = random() * total;
    for (let j = 0; j < n; j++) { u -= weights[ids ? ids[j] : j]; if (u <= 0) return ids ? ids[j] : j; }
    return ids ? ids[n - 1] : V - 1;
  };
}

// The k-th largest of `values`: a min-heap of the k largest so far (a sort of a copy when k is large).
function kthLargest(values, k) {
  if (k > 1024) return Float32Array.from(values).sort()[values.length - k];
  const heap = new Float32Array(k);
  let size = 0;
  const down = (i) => {
    for (;;) {
      const l = 2 * i + 1, r = l + 1;
      let m = i;
      if (l < size && heap[l] < heap[m]) m = l;
      if (r < size && heap[r] < heap[m]) m = r;
      if (m === i) return;
      [heap[i], heap[m]] = [heap[m], heap[i]];
      i = m;
    }
  };
  for (const v of values) {
    if (size < k) {
      let i = size++;
      heap[i] = v;
      while (i > 0 && heap[(i - 1) >> 1] > heap[i]) { const up = (i - 1) >> 1; [heap[i], heap[up]] = [heap[up], heap[i]]; i = up; }
    } else if (v > heap[0]) {
      heap[0] = v;
      down(0);
    }
  }
  return heap[0];
}
