"""Every shipped config parses: each binding names a real configurable and parameter."""

import glob
import os

import gin
import pytest

from kssl import config, training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.gin")))


def test_the_configs_are_found():
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_and_builds_its_optimizer(path, monkeypatch):
    monkeypatch.chdir(REPO)  # includes are relative to the repository root
    config.parse([path], [])
    settings = training.pipeline_settings()
    assert settings["batch_size"] >= 1
    # The learning rate is the configured one at the configured batch (no rescaling).
    optimizer = training.build_optimizer(10, batch_size=settings["batch_size"])
    assert float(optimizer.learning_rate) == pytest.approx(
        gin.query_parameter("optimizer.learning_rate"))
    assert gin.query_parameter("train.method") is not None
