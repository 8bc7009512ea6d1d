"""What every bench leaves behind: a Markdown table with its caption, a CSV, JSON and a PNG chart.

A bench measures rows (dataclasses), then hands them here with its own Markdown and plot; the
file names share one stem (`codecs.md`, `codecs.csv`, ... or `table1.md`, ...).
"""

from __future__ import annotations

import csv
import datetime
import json
import platform
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from .extras import require


def machine_meta() -> dict:
    """Where and when a bench ran, for its caption and JSON."""
    return {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "cores": torch.get_num_threads(), "torch": torch.__version__}


def write_report(out: Path, stem: str, rows: Sequence, table: str, caption: str, meta: dict,
                 plot: Callable[[Path], None] | None = None) -> list[Path]:
    """Write STEM.md (table and caption), STEM.csv, STEM.json and, with `plot`, STEM.png; print the table."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.json"]
    written[0].write_text(f"{table}\n\n{caption}\n")
    dicts = [asdict(r) for r in rows]
    with open(written[1], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dicts[0]))
        writer.writeheader()
        writer.writerows(dicts)
    written[2].write_text(json.dumps({"meta": meta, "rows": dicts}, indent=2, ensure_ascii=False))
    if plot is not None:
        written.append(out / f"{stem}.png")
        plot(written[-1])
    print(f"\n{table}\n\n{caption}\nwritten: " + ", ".join(str(p) for p in written))
    return written


def pyplot(extra: str = "bench"):
    """matplotlib's pyplot on the file-only backend (benches run on servers without a display). Without
    matplotlib: MissingExtra, naming `extra` (the one the caller's command installs it with)."""
    matplotlib = require("matplotlib", extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
