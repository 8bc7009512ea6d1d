// The read-back panel: what the strongest assessed attack recovered from this conversation's uplink frames,
// token by token under the truth (the truth comes from the device; the attack never sees it).

import { escapeHtml } from "./wire.js";

function cell(text) {
  const shown = text.replace(/\r/g, "␍").replace(/\n/g, "⏎").replace(/\t/g, "⇥");
  return escapeHtml(shown === "" ? "∅" : shown);
}

function tokens(event, from, to) {
  let html = "";
  for (let i = from; i < to; i++) {
    const hit = event.guesses[i][0] === event.truth[i];
    const near = !hit && event.guesses[i].includes(event.truth[i]);
    html += `<span class="tok ${hit ? "hit" : near ? "near" : "miss"}" title="position ${event.positions[i]}">` +
      `<b>${cell(event.truth_pieces[i])}</b><i>${cell(event.pieces[i])}</i></span>`;
  }
  return html;
}

// The panel's HTML for an `attack` event (see web/chat.py and static/tab.js).
export function readbackView(event) {
  if (event.error) return `<p class="note">${escapeHtml(event.error)}</p>`;
  const n = event.positions.length;
  const hits = event.guesses.filter((g, i) => g[0] === event.truth[i]).length;
  const near = event.guesses.filter((g, i) => g.includes(event.truth[i])).length;
  const pct = (k) => (n ? `${((100 * k) / n).toFixed(0)}%` : "–");
  const cut = event.positions.filter((p) => p < event.prompt_tokens).length;
  const where = event.where === "tab"
    ? "This app ran it on the uplink frames the page sent it (the bytes the body server received); the truth comes from this tab."
    : "The device ran it on the uplink frames it sent.";
  return `<p class="summary" data-testid="readback-summary" data-hits="${hits}" data-positions="${n}">` +
    `The <b>${escapeHtml(event.attack)}</b> attack on the uplink states at layer ${event.layer} read back ` +
    `<b>${hits} of ${n}</b> tokens (${pct(hits)}) exactly, and ${near} (${pct(near)}) among its 5 best guesses.</p>` +
    `<p class="legend">upper line: what was sent · lower line: what the attack read (green: exact, amber: in its 5 best, red: wrong)</p>` +
    (cut ? `<h4>the prompt, as the model saw it</h4><div class="tokens">${tokens(event, 0, cut)}</div>` : "") +
    (n > cut ? `<h4>the answer, as the device fed it back</h4><div class="tokens">${tokens(event, cut, n)}</div>` : "") +
    (event.assessed ? "" : `<p class="note warn" data-testid="readback-unassessed">This model has not been assessed on ` +
      `this machine, so this is the fallback that needs only the public weights, and it is weak past layer 0. The ` +
      `probes <code>lambdasplit assess</code> trains read far more (on SmolLM2, about 75% of the tokens at layer 1).</p>`) +
    `<p class="note">${where} A lower bound: stronger attacks exist (docs/privacy.md).</p>`;
}
