"""PNG plots of benchmark results: latency CDFs and throughput over time (matplotlib, Agg).

Each figure takes one or more labelled series (one per deployment) so a single run and a
side-by-side comparison use the same code. matplotlib is the ``bench`` extra: a missing install
raises ``PlotError`` with the command that fixes it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from kvrelay.loadtest.metrics import RequestRecord, throughput_timeline

MAX_POINTS = 2000  # CDF points drawn per series (quantiles of the data): keeps the PNGs small
LATENCIES = (("ttft_ms", "TTFT (ms)"), ("itl_ms", "inter-token latency (ms)"),
             ("e2e_ms", "end-to-end latency (s)"))


class PlotError(RuntimeError):
    """Plotting is unavailable (matplotlib missing)."""


def pyplot():  # type: ignore[no-untyped-def]
    """matplotlib.pyplot on the Agg backend; PlotError without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise PlotError("plots need matplotlib: pip install 'kvrelay[bench]' (or matplotlib)") from exc
    return plt


def latency_values(records: Sequence[RequestRecord]) -> dict[str, list[float]]:
    """Per-metric values of the successful requests (ITL pooled over tokens, E2E in seconds)."""
    out: dict[str, list[float]] = {"ttft_ms": [], "itl_ms": [], "e2e_ms": []}
    for r in records:
        if not r.ok:
            continue
        ttft, e2e = r.ttft_ms(), r.e2e_ms()
        if ttft is not None:
            out["ttft_ms"].append(ttft)
        if e2e is not None:
            out["e2e_ms"].append(e2e / 1000.0)
        out["itl_ms"].extend(r.itls_ms())
    return out


def _cdf(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    v = np.sort(np.asarray(values, dtype=float))
    if len(v) > MAX_POINTS:
        q = np.linspace(0.0, 1.0, MAX_POINTS)
        return np.quantile(v, q), q
    return v, np.arange(1, len(v) + 1) / len(v)


def latency_cdfs(series: Mapping[str, Mapping[str, Sequence[float]]], path: str | Path, title: str) -> Path:
    """One panel per latency (TTFT, ITL, E2E), one CDF line per series label."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=90)
    for ax, (key, label) in zip(axes, LATENCIES):
        for name, values in series.items():
            data = values.get(key) or []
            if data:
                x, y = _cdf(data)
                ax.plot(x, y, label=name, drawstyle="steps-post")
        ax.set_xlabel(label)
        ax.set_ylabel("share of " + ("tokens" if key == "itl_ms" else "requests"))
        ax.grid(True, alpha=0.3)
        if key == "itl_ms":
            ax.set_xscale("symlog", linthresh=10.0)
        for q in (0.5, 0.99):
            ax.axhline(q, color="grey", lw=0.5, ls=":")
        ax.legend(fontsize=8, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def throughput(series: Mapping[str, Sequence[RequestRecord]], path: str | Path, title: str,
               bin_s: float = 5.0) -> Path:
    """Output tokens/s over time per series label (``bin_s`` bins from the first send)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 3.4), dpi=90)
    for name, records in series.items():
        tl = throughput_timeline(records, bin_s)
        if tl:
            ax.plot([t for t, _, _ in tl], [v for _, v, _ in tl], label=name, drawstyle="steps-post")
    ax.set_xlabel("time since the first request (s)")
    ax.set_ylabel(f"output tokens/s ({bin_s:g} s bins)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def bars(rows: Mapping[str, Mapping[str, float]], path: str | Path, title: str, ylabel: str) -> Path:
    """Grouped bars: ``rows[group][label] = value`` (used by the scale projection)."""
    plt = pyplot()
    groups = list(rows)
    labels = sorted({k for r in rows.values() for k in r})
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=90)
    width = 0.8 / max(1, len(labels))
    for i, lab in enumerate(labels):
        ax.bar([g + i * width for g in range(len(groups))], [rows[g].get(lab, 0.0) for g in groups],
               width, label=lab)
    ax.set_xticks([g + width * (len(labels) - 1) / 2 for g in range(len(groups))], groups)
    ax.set_ylabel(ylabel)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:  # type: ignore[no-untyped-def]
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p)
    plt.close(fig)
    return p
