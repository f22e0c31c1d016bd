"""Render the docs figure of a synthetic phantom: ``docs/images/phantom.png``.

A middle axial slice of a 512 x 512 phantom in a soft-tissue window (W 400, L 40), beside
the same slice with its liver / tumour segmentation overlaid. Axial slices are shown the
radiological way, as everywhere in this project: ``display = slice[::-1, ::-1].T`` puts
anterior at the top and the patient's right on the image's left.

Usage, from the repository root with the package installed (``make venv``) or on
``PYTHONPATH``::

    python docs/make_phantom_figure.py [--seed 25] [--out docs/images/phantom.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from training.fileio import atomic_path  # noqa: E402
from training.phantom import generate_phantom  # noqa: E402
from training.volume import LABEL_LIVER, LABEL_TUMOR  # noqa: E402

WINDOW, LEVEL = 400.0, 40.0
LABEL_COLOURS = ListedColormap([(0, 0, 0, 0), (0.9, 0.25, 0.2, 0.45), (1.0, 0.85, 0.1, 0.8)])


def radiological(axial: np.ndarray) -> np.ndarray:
    """An ``(X, Y)`` RAS slice as an image: anterior at the top, patient's right on the left."""
    return axial[::-1, ::-1].T


def render(seed: int, out: Path, size: int = 512, slices: int = 32) -> Path:
    """Draw the phantom for ``seed`` and write the two-panel figure to ``out`` (PNG, atomically)."""
    volume = generate_phantom(np.random.default_rng(seed), size=size, slices=slices, case_id=f"seed-{seed}")
    k = slices // 2
    image = radiological(volume.hu[:, :, k])
    labels = radiological(volume.segmentation[:, :, k])
    sx, sy, sz = volume.spacing

    fig, axes = plt.subplots(1, 2, figsize=(8.0, 4.3), dpi=100)
    for ax in axes:
        ax.imshow(image, cmap="gray", vmin=LEVEL - WINDOW / 2, vmax=LEVEL + WINDOW / 2, interpolation="nearest")
        ax.set_axis_off()
        for text, xy in (("R", (0.02, 0.5)), ("L", (0.98, 0.5)), ("A", (0.5, 0.97))):
            ax.text(*xy, text, color="w", transform=ax.transAxes, ha="center", va="center", fontsize=9)
    axes[1].imshow(labels, cmap=LABEL_COLOURS, vmin=0, vmax=2, interpolation="nearest")
    axes[0].set_title(f"W {WINDOW:.0f} / L {LEVEL:.0f} HU", fontsize=10)
    axes[1].set_title("reference segmentation", fontsize=10)
    axes[1].legend(
        handles=[Patch(color=LABEL_COLOURS(LABEL_LIVER), label="liver"), Patch(color=LABEL_COLOURS(LABEL_TUMOR), label="tumour")],
        loc="lower right",
        fontsize=8,
        framealpha=0.6,
    )
    fig.suptitle(
        f"Synthetic phantom (seed {seed}), slice {k + 1}/{slices}: {size}x{size}, "
        f"{sx:.2f} x {sy:.2f} mm pixels, {sz:.1f} mm slices",
        fontsize=10,
    )
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", pil_kwargs={"optimize": True})
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=25, help="phantom seed (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "images" / "phantom.png")
    args = parser.parse_args()
    print(render(args.seed, args.out))


if __name__ == "__main__":
    main()
