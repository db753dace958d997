"""The position-sweep plot, one function for the CLI, the Space and the benchmarks (matplotlib, optional)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def sweep_figure(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    *,
    baseline: float | None = None,
    ylabel: str = "perplexity",
    title: str | None = None,
    own_slot: int | None = None,
    path: str | Path | None = None,
    size: tuple[float, float] = (7, 4),
):
    """Perplexity (or a ratio) against position, one line per curve, the untouched model as a dashed line.

    Args:
        curves: label -> [(position, value), ...] (e.g. one curve per mode, per domain, or with/without recovery).
        baseline: the untouched model's value on the same axis (1.0 for ratios).
        own_slot: mark the organ's own donor slot with a dotted vertical line.
        path: also save the figure there (PNG), creating the folder.

    Returns:
        The matplotlib `Figure` (closed after saving when `path` is given).
    """
    import matplotlib  # optional dependency: only plots need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=size)
    for label, points in curves.items():
        points = sorted(points)
        ax.plot([p for p, _ in points], [v for _, v in points], marker="o", label=label)
    if baseline is not None:
        ax.axhline(baseline, color="grey", linestyle="--", label="untouched")
    if own_slot is not None:
        ax.axvline(own_slot, color="grey", linestyle=":", label="organ's own slot")
    ax.set_xlabel("position (first recipient layer the organ occupies)")
    ax.set_ylabel(f"{ylabel} (log scale)")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title(title or "Organ position sweep")
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        plt.close(fig)
    return fig


def sweep_result_curves(rows: Sequence[Mapping]) -> dict[str, list[tuple[int, float]]]:
    """`{mode: [(position, perplexity), ...]}` from a `SweepResult`'s rows (or their JSON)."""
    curves: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        curves.setdefault(row["mode"], []).append((int(row["position"]), float(row["perplexity"])))
    return curves
