// One-off trial behind the sampling figures of this stop's note: milliseconds per sampled token of each given
// sampling.js module on 49152 logits (a fixed Gumbel-like spread), for temperature alone, top-k 50 and top-p 0.9.
// Not a lambdasplit command. To compare with the version before the speed-up:
//
//   git show 6766e27:lambdasplit/browser/static/sampling.js > /tmp/sampling-before.mjs
//   node scripts/trials/sampling_speed.mjs /tmp/sampling-before.mjs lambdasplit/browser/static/sampling.js
import { resolve } from "node:path";
import { pathToFileURL } from "node:url";

const files = process.argv.slice(2);
if (!files.length) files.push("lambdasplit/browser/static/sampling.js");
const modules = await Promise.all(files.map((f) => import(pathToFileURL(resolve(f)).href)));
const V = 49152;
const logits = new Float32Array(V);
let s = 1;
const rnd = () => { s = (s * 16807) % 2147483647; return s / 2147483647; };
for (let i = 0; i < V; i++) logits[i] = -Math.log(-Math.log(rnd())) * 2;
for (const options of [{ temperature: 0.7 }, { temperature: 0.7, topK: 50 }, { temperature: 0.7, topP: 0.9 }]) {
  const row = modules.map(({ makeSampler }, i) => {
    const sample = makeSampler({ ...options, seed: 1 });
    for (let j = 0; j < 5; j++) sample(logits);
    const started = performance.now();
    for (let j = 0; j < 40; j++) sample(logits);
    return `${files[i]} ${((performance.now() - started) / 40).toFixed(2)} ms`;
  });
  console.log(JSON.stringify(options), row.join(", "));
}
