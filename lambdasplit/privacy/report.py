"""How an assessment is shown: a table per layer, a plot of recovery against layer, a plain summary."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..util.extras import check
from .results import ATTACKER_HELP, ATTACKERS, ATTACKS, Assessment

check("matplotlib", "privacy")  # `assess` ends with its chart: say so before it starts

_SHORT = {"nearest-embedding": "nearest emb.", "logit-lens": "logit lens", "linear-probe": "linear probe",
          "mlp-probe": "MLP probe"}


@dataclass
class LayerRow:
    """One layer's top-1 recovery (%) per attack and target, and the best per attacker (the CSV rows)."""

    layer: int
    nearest_input: float | None
    nearest_next: float | None
    lens_input: float | None
    lens_next: float | None
    linear_input: float | None
    linear_next: float | None
    mlp_input: float | None
    mlp_next: float | None
    best_with_weights: float | None
    best_without_weights: float | None


def layer_rows(a: Assessment, metric: str = "top1") -> list[LayerRow]:
    rows = []
    for layer in a.layers:
        values = []
        for attack in ATTACKS:
            for target in ("input", "next"):
                s = a.score(layer, attack, target)
                values.append(None if s is None else round(100 * getattr(s, metric), 1))
        best = [a.recovery(layer, who, metric) for who in ATTACKERS]
        rows.append(LayerRow(layer, *values, *(None if b is None else round(100 * b, 1) for b in best)))
    return rows


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def markdown(a: Assessment, metric: str = "top1") -> str:
    head = ("| state at layer | nearest emb. (input) | logit lens (input / next) | linear probe (input / next) "
            "| MLP probe (input / next) | best, with the weights | best, without |\n"
            "|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for r in layer_rows(a, metric):
        lines.append(f"| {r.layer} | {_pct(r.nearest_input)} | {_pct(r.lens_input)} / {_pct(r.lens_next)} | "
                     f"{_pct(r.linear_input)} / {_pct(r.linear_next)} | {_pct(r.mlp_input)} / {_pct(r.mlp_next)} | "
                     f"**{_pct(r.best_with_weights)}** | **{_pct(r.best_without_weights)}** |")
    return "\n".join(lines)


def caption(a: Assessment, metric: str = "top1") -> str:
    m = a.meta
    noise = f" States carried Gaussian noise of {a.noise:g} x their RMS (train and test)." if a.noise else ""
    return (f"{metric} token recovery (%) from the hidden state entering each layer of {a.model} "
            f"({a.num_layers} layers; layer 0 is the embeddings). 'input' scores the token at that position (the "
            f"prompt and every token fed back), 'next' the token the model produces next. Probes trained on "
            f"{m.get('train_tokens', '?')} tokens of public text, every figure measured on "
            f"{m.get('test_tokens', '?')} held-out tokens ({m.get('test_sequences', '?')} sequences); the probes "
            f"know only tokens seen in training ({_pct(100 * m['coverage'] if 'coverage' in m else None)}% of the "
            f"held-out ones).{noise} Every figure is a LOWER BOUND: stronger attacks exist (exact inversion with "
            f"the public weights works at any depth). Measured {m.get('date', '?')} on {m.get('cores', '?')} cores, "
            f"torch {m.get('torch', '?')}, in {m.get('seconds', '?')} s.")


def plot(a: Assessment, path: Path, threshold: float | None = None, metric: str = "top1") -> None:
    from ..util.report import pyplot

    plt = pyplot("privacy")
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    panels = (("input", "uplink view: reading the input tokens"), ("next", "downlink view: reading the next token"))
    for ax, (target, title) in zip(axes, panels):
        for attack in ATTACKS:
            points = [(L, getattr(s, metric)) for L in a.layers if (s := a.score(L, attack, target))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, [100 * y for y in ys], marker="o", markersize=3, label=_SHORT[attack])
        if threshold is not None:
            ax.axhline(100 * threshold, color="grey", linestyle="--", linewidth=1, label=f"target {threshold:.0%}")
        ax.set_title(title)
        ax.set_xlabel("split point: state entering layer L")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"{metric} tokens recovered (%), lower bound")
    axes[0].set_ylim(0, 100)
    axes[1].legend(loc="upper left", fontsize=8)
    noise = f", noise {a.noise:g}x RMS" if a.noise else ""
    fig.suptitle(f"What an observer recovers from the hidden states of {a.model}{noise}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _ranges(layers: list[int]) -> str:
    if not layers:
        return "none"
    out, start = [], layers[0]
    for prev, cur in zip(layers, layers[1:] + [None]):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)


def summary(a: Assessment, threshold: float, metric: str = "top1") -> str:
    """Which split points keep the recovery under the threshold, for each attacker, in plain words."""
    lines = [f"Split points whose hidden state gives up at most {threshold:.0%} of the tokens ({metric}, best "
             "measured attack; a split (X, Y) sends the state at X up and the state at Y down, so both must pass):"]
    for who in ATTACKERS:
        safe = [L for L in a.layers if (r := a.recovery(L, who, metric)) is not None and r <= threshold]
        low = min(a.layers, key=lambda L: a.recovery(L, who, metric))
        best = a.best(low, who, metric)
        lines.append(f"- {ATTACKER_HELP[who]}:")
        if safe:
            lines.append(f"    safe layers: {_ranges(safe)}; any split with X and Y among them meets the target.")
        else:
            lines.append(f"    NO split point meets it. The least leaky state is at layer {low}, where the "
                         f"{best.attack} still recovers {getattr(best, metric):.0%} of the {best.target} tokens.")
    lines.append("These are lower bounds from four attacks; exact inversion with the public weights (SipIt) "
                 "recovers the input at any depth. Against an eavesdropper, TLS (serve --tls-cert) protects "
                 "every split; against the cloud itself, only the depth of the split and the noise defence "
                 "(a noise:S wire codec part) do, at the cost measured by `lambdasplit bench noise`.")
    return "\n".join(lines)
