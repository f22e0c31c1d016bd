"""Exceptions raised at the package's boundaries (files, CLI, datasets)."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Input data that cannot be used, with the file it came from and what is wrong.

    Args:
        path: the offending file or folder (``None`` when there is none).
        problem: a sentence saying what is wrong and, where possible, how to fix it.
    """

    def __init__(self, path: str | Path | None, problem: str) -> None:
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


class OptionError(ValueError):
    """A command-line option whose value cannot be used, with what is wrong.

    Args:
        option: the option as typed, e.g. ``--size``.
        problem: a sentence saying what is wrong and, where possible, how to fix it.
    """

    def __init__(self, option: str, problem: str) -> None:
        self.option = option
        self.problem = problem
        super().__init__(f"{option}: {problem}")
