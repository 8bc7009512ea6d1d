// Test driver for lambdasplit/browser/static/sampling.js (used by tests/test_browser_sampling.py).
//
// stdin:  {"jobs": [{"logits": [...], "options": {temperature, topK, topP, seed}, "draws": N}, ...]}
// stdout: {"results": [[token, ...], ...]}: the N tokens one sampler drew, in order, for each job.
import { makeSampler } from "../../lambdasplit/browser/static/sampling.js";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).jobs.map(({ logits, options, draws }) => {
  const sample = makeSampler(options);
  const values = Float32Array.from(logits);
  return Array.from({ length: draws }, () => sample(values));
});
process.stdout.write(JSON.stringify({ results }));
