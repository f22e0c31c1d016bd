"""Training configuration: YAML, overrides and the errors for bad keys and values."""

from __future__ import annotations

import pytest

from training.config import ConfigError, TrainingConfig, load_config, save_config
from training.networks import UNetConfig


def test_defaults_yaml_and_overrides(tmp_path):
    assert load_config() == TrainingConfig()
    path = tmp_path / "cpu.yaml"
    path.write_text("task: joint\nweight: 0.9\nnetwork:\n  features: 16\n  depth: 3\nepochs: 20\n")
    config = load_config(path, ["network.features=8", "learning_rate=3e-4", "segmenter_checkpoint=g.pt", "amp=false"])
    assert config.task == "joint" and config.weight == 0.9 and config.epochs == 20
    assert config.network == UNetConfig(features=8, depth=3)
    assert config.learning_rate == pytest.approx(3e-4) and config.segmenter_checkpoint == "g.pt" and config.amp is False
    assert load_config(overrides=["weight=1"]).weight == 1.0  # an int where a float is expected


def test_saved_config_loads_back_identically(tmp_path):
    config = load_config(overrides=["task=segmentation", "network.norm=instance", "seed=7"])
    save_config(tmp_path / "config.yaml", config)
    assert load_config(tmp_path / "config.yaml") == config


@pytest.mark.parametrize("overrides, message", [
    (["epoch=3"], r"unknown config key 'epoch'; known keys: task, weight, network, epochs"),
    (["network.widht=3"], r"unknown config key 'network.widht'; known keys of network: features, depth"),
    (["weight=1.5"], r"weight \(alpha\) must be in \[0, 1\], got 1.5"),
    (["task=joint", "weight=-1"], r"weight \(C\) must be in \[0, 1\]"),
    (["task=denoise"], r"task must be one of"),
    (["epochs=ten"], r"config key 'epochs' must be int, got 'ten'"),
    (["amp=1"], r"config key 'amp' must be bool, got 1"),
    (["network.depth=0"], r"network: depth must be between 1 and 7"),
    (["network=3"], r"network must be a mapping"),
    (["epochs"], r"not of the form key=value"),
])
def test_bad_keys_and_values_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=overrides)


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml: cannot read"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")
