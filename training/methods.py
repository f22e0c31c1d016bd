"""Method names: what each reconstruction is called in a data set, tables and figures.

The fixed methods are ``lowdose``, ``fbp``, ``bm3d`` and ``fulldose``; trained
reconstructors are ``baseunet`` (alpha = 0), ``ta<alpha>`` (task-adaptive) and ``joint<C>``
(joint training), with the weight written as :func:`method_name` writes it (``ta0.5``,
``joint0.9``). A trained reconstructor that departs from the paper's training (another
loss form, a warm start, another g or up-sampling) carries a *variant* tag after a dash:
``ta0.5-balanced``, ``baseunet-interp``. This module imports neither torch nor MONAI, so that evaluation workers
can use it without paying for them.
"""

from __future__ import annotations

import math
import re

from training.dataset import BASELINES, FULLDOSE, LOWDOSE, SEGMENTATION


def method_name(task: str, weight: float, variant: str | None = None) -> str:
    """The evaluation name of a trained reconstructor: ``baseunet``, ``ta0.5`` or ``joint0.9``,
    with ``-<variant>`` appended where one is given (``ta0.5-balanced``).

    Raises:
        ValueError: for a task that does not reconstruct, or a variant tag other than a lower-case
            letter followed by lower-case letters and digits.
    """
    if task == "reconstruction":
        name = BASE_UNET if weight == 0.0 else f"ta{weight:g}"
    elif task == "joint":
        name = f"joint{weight:g}"
    else:
        raise ValueError(f"a {task!r} model does not reconstruct")
    if variant is None:
        return name
    if not _VARIANT.fullmatch(variant):
        raise ValueError(f"a variant tag is a lower-case letter followed by lower-case letters and digits "
                         f"(e.g. balanced, interp), got {variant!r}")
    return f"{name}-{variant}"


RESERVED_METHODS = (LOWDOSE, FULLDOSE, SEGMENTATION, *BASELINES)
"""Names a trained reconstructor may not be written under: the data set's own volumes."""
_FIXED_LABELS = {LOWDOSE: "Low-dose", "fbp": "FBP", "bm3d": "BM3D", FULLDOSE: "Full-dose"}
BASE_UNET = "baseunet"
_WEIGHTED = re.compile(r"^(ta|joint)(.+)$")
_VARIANT = re.compile(r"[a-z][a-z0-9]*")


def _split_variant(name: str) -> tuple[str, str | None]:
    """``("ta0.5", "balanced")`` for ``ta0.5-balanced``; ``(name, None)`` without a valid tag."""
    base, dash, variant = name.rpartition("-")
    if dash and base and _VARIANT.fullmatch(variant):
        return base, variant
    return name, None


def without_variant(name: str) -> str:
    """A method's name without its variant tag: ``ta0.5`` for ``ta0.5-balanced`` and for ``ta0.5``."""
    return _split_variant(name)[0]


def _trained_weight(name: str) -> tuple[str, float] | None:
    """``("reconstruction" | "joint", weight)`` of a trained method's name (variant tag or not),
    or None if it is not one.

    Only the canonical spelling (:func:`method_name`'s) is accepted, so
    that one model has one name: ``ta0.5``, not ``ta0.50`` or ``ta5e-1``.
    """
    name = _split_variant(name)[0]
    if name == BASE_UNET:
        return "reconstruction", 0.0
    match = _WEIGHTED.match(name)
    if match is None:
        return None
    try:
        weight = float(match.group(2))
    except ValueError:
        return None
    task = "reconstruction" if match.group(1) == "ta" else "joint"
    if not math.isfinite(weight) or not 0.0 <= weight <= 1.0 or (task == "reconstruction" and weight == 0.0):
        return None  # alpha = 0 is spelled baseunet
    return (task, weight) if method_name(task, weight) == name else None


def is_known_method(name: str) -> bool:
    """Whether ``name`` is a method the evaluation can label (see the module docstring)."""
    return name in _FIXED_LABELS or _trained_weight(name) is not None


def method_label(method: str) -> str:
    """The name of a method in tables and figures, as in the paper's Tables I and II.

    ``lowdose`` "Low-dose", ``fbp`` "FBP", ``bm3d`` "BM3D", ``fulldose`` "Full-dose",
    ``baseunet`` "Base U-Net", ``ta0.5`` "Task-adaptive α=0.5", ``joint0.9``
    "Joint training C=0.9"; a variant is named after a comma: ``ta0.5-balanced``
    "Task-adaptive α=0.5, balanced".

    Raises:
        ValueError: for any other name.
    """
    if method in _FIXED_LABELS:
        return _FIXED_LABELS[method]
    parsed = _trained_weight(method)
    if parsed is None:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(_FIXED_LABELS)}, "
                         f"{BASE_UNET}, ta<alpha> (e.g. ta0.5) and joint<C> (e.g. joint0.9), each with an optional "
                         "-<variant> tag (e.g. ta0.5-balanced)")
    task, weight = parsed
    variant = _split_variant(method)[1]
    if task == "reconstruction":
        label = "Base U-Net" if weight == 0.0 else f"Task-adaptive α={weight:g}"
    else:
        label = f"Joint training C={weight:g}"
    return label if variant is None else f"{label}, {variant}"


def check_trained_method_name(method: str) -> None:
    """Refuse a name a trained reconstructor cannot be written and evaluated under.

    Raises:
        ValueError: a name of the data set's own volumes, or one :func:`method_label` does not know.
    """
    if method in RESERVED_METHODS:
        raise ValueError(f"method name {method!r} is taken by the data set's own volumes {list(RESERVED_METHODS)}; "
                         "choose another (by default the model's own: baseunet, ta<alpha>, joint<C>)")
    if _trained_weight(method) is None:
        raise ValueError(f"method name {method!r} is not one the evaluation can label; use {BASE_UNET}, "
                         "ta<alpha> (e.g. ta0.5) or joint<C> (e.g. joint0.9), optionally with a -<variant> tag "
                         "(e.g. ta0.5-balanced)")


PSNR_TOLERANCE_DB = 1.0
"""The default served variant is the best-Dice task-adaptive model within this of the best validation PSNR
(:func:`default_variant`): the served default must stay a CT image about as good as the Base U-Net's, not
trade the image for the Dice."""


def default_variant(metrics: dict[str, dict[str, float]]) -> str:
    """The task-adaptive model with the best validation Dice among those whose validation PSNR
    is within ``PSNR_TOLERANCE_DB`` of the best one: task adaptation, while the images stay CT."""
    best_psnr = max(m.get("val_psnr", -math.inf) for m in metrics.values())
    adaptive = {name: m for name, m in metrics.items() if name.startswith("ta")}
    close = {name: m for name, m in adaptive.items() if m.get("val_psnr", -math.inf) >= best_psnr - PSNR_TOLERANCE_DB}
    pool = close or adaptive or metrics
    return max(pool, key=lambda name: pool[name].get("val_dice_volume", -math.inf))
