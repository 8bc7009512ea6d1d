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
    let order = Array.from(logits.keys()).sort((a, b) => logits[b] - logits[a]);
    if (topK > 0) order = order.slice(0, topK);
    const weights = order.map((i) => Math.exp((logits[i] - logits[best]) / temperature));
    const sum = weights.reduce((a, b) => a + b, 0);
    let kept = order.length, mass = 0;
    for (let j = 0; j < order.length; j++) {
      mass += weights[j] / sum;
      if (mass >= topP) { kept = j + 1; break; }
    }
    const total = weights.slice(0, kept).reduce((a, b) => a + b, 0);
    let u = random() * total;
    for (let j = 0; j < kept; j++) { u -= weights[j]; if (u <= 0) return order[j]; }
    return order[kept - 1];
  };
}
