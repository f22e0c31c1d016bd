"""Training curves of several runs in one figure (the report's ``training_curves.png``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from training.engine import read_history
from training.fileio import atomic_path

PANELS = (
    ("train_loss", "training loss"),
    ("val_loss", "validation loss (the objective)"),
    ("val_dice_volume", "validation Dice of g, per volume (liver, tumour)"),
    ("val_psnr", "validation PSNR in the disc (dB)"),
)


def plot_training_curves(runs: Mapping[str, str | Path], path: str | Path) -> None:
    """One panel per metric, one line per run, against the epoch.

    Args:
        runs: label -> run folder (with ``history.csv``); runs without a history are skipped.
        path: the PNG to write (atomically).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    histories = {label: read_history(run) for label, run in runs.items() if (Path(run) / "history.csv").is_file()}
    if not histories:
        raise ValueError("no run has a history.csv to plot")
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.6))
    for ax, (key, title) in zip(axes, PANELS):
        for index, (label, history) in enumerate(histories.items()):
            points = [(row["epoch"], row[key]) for row in history if key in row]
            if points:  # one colour per run in every panel, whichever panels it appears in
                ax.plot(*zip(*points), marker=".", color=f"C{index % 10}", label=label)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)
