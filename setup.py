"""TaskAdaptiveCT: task-adaptive low-dose CT reconstruction."""

from pathlib import Path

from setuptools import find_packages, setup

setup(
    name="taskadaptivect",
    version="0.1.0",
    description="Task-adaptive low-dose CT reconstruction: simulation, baselines, training and serving",
    long_description=Path(__file__).with_name("README.md").read_text(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["training", "training.*"]),
    install_requires=[
        line.split("#")[0].strip()
        for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
        if line.split("#")[0].strip() and not line.startswith(("pytest",))
    ],
    entry_points={"console_scripts": ["tact=training.cli:main"]},
)
