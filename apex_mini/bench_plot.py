"""Plots of a serving report (from `bench serve` or `simulate`): throughput per policy, and the
TTFT and TPOT distributions as CDFs. matplotlib is an optional extra."""
from __future__ import annotations

import sys
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib, an optional extra: pip install matplotlib"
                         ) from None
    return plt


def check_plot() -> None:
    """Raise ValueError now, before a run whose results --plot would draw, if it cannot."""
    _pyplot()


def figure(rep: dict, title: str | None = None):
    """A 1x3 figure: output tok/s per policy, TTFT CDF, TPOT CDF."""
    plt = _pyplot()
    fig, (ax_tp, ax_ttft, ax_tpot) = plt.subplots(1, 3, figsize=(13, 3.6))
    names = list(rep["policies"])
    rows = [rep["policies"][n] for n in names]
    bars = ax_tp.bar(names, [r["throughput_tok_s"] for r in rows], color="tab:blue")
    for bar, r in zip(bars, rows):
        if r.get("ratio_to_gpu_only"):
            ax_tp.annotate(f"{r['ratio_to_gpu_only']:.2f}x", (bar.get_x() + bar.get_width() / 2,
                           bar.get_height()), ha="center", va="bottom", fontsize=8)
    ax_tp.set_ylabel("output tokens/s")
    ax_tp.set_title("throughput (label: x gpu-only)")
    for ax, key, scale, unit in ((ax_ttft, "ttft_s", 1.0, "TTFT (s)"),
                                 (ax_tpot, "tpot_s", 1e3, "TPOT (ms)")):
        for name, r in zip(names, rows):
            values = sorted(v * scale for v in r.get("samples", {}).get(key, []))
            if values:
                frac = [(i + 1) / len(values) for i in range(len(values))]
                ax.step(values, frac, where="post", label=name)
        ax.set_xlabel(unit)
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{unit.split()[0]} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"{rep['workload'].get('name')} workload, {rep['model'].get('name')}",
                 fontsize=10)
    fig.tight_layout()
    return fig


def save_plot(rep: dict, path: str, title: str | None = None) -> None:
    fig = figure(rep, title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    print(f"wrote {path}", file=sys.stderr)
