"""The Slicer extension's icon (128 x 128 PNG): an axial CT slice with the liver and a tumour overlaid.

    .venv/bin/python docs/make_slicer_icon.py
"""

from __future__ import annotations

import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Circle, Ellipse  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ICONS = [ROOT / "TaskAdaptiveCT" / "TaskAdaptiveCT" / "Resources" / "Icons" / "TaskAdaptiveCT.png",
         ROOT / "TaskAdaptiveCT" / "TaskAdaptiveCT.png"]
LIVER = (221 / 255, 130 / 255, 101 / 255)  # Slicer's GenericAnatomyColors: liver
TUMOR = (144 / 255, 238 / 255, 144 / 255)  # and mass


def main() -> None:
    figure = plt.figure(figsize=(1.28, 1.28), dpi=100)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.set_xlim(0, 128)
    axes.set_ylim(0, 128)
    axes.axis("off")
    axes.add_patch(Circle((64, 64), 63, color="#1d2530"))  # the reconstruction disc
    axes.add_patch(Ellipse((64, 62), 108, 80, color="#8c8c8c"))  # body
    axes.add_patch(Ellipse((64, 62), 98, 70, color="#b4b4b4"))  # soft tissue
    axes.add_patch(Ellipse((40, 68), 44, 42, color=LIVER, alpha=0.9))  # liver, on the image's left (patient's right)
    axes.add_patch(Circle((34, 74), 8, color=TUMOR))  # tumour
    axes.add_patch(Circle((64, 36), 9, color="#f0f0f0"))  # spine
    axes.add_patch(Ellipse((88, 64), 18, 24, color="#9a9a9a"))  # spleen / bowel
    ICONS[0].parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(ICONS[0], transparent=True)
    plt.close(figure)
    for copy in ICONS[1:]:
        shutil.copyfile(ICONS[0], copy)
    print("wrote", ", ".join(str(p.relative_to(ROOT)) for p in ICONS))


if __name__ == "__main__":
    main()
