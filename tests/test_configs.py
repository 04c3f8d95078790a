"""Every shipped config parses, from any directory (includes resolve relative to the
including file): each binding names a real configurable and parameter."""

import glob
import os

import gin
import pytest

from kssl import config, training
from kssl.config import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.gin")))


def test_the_configs_are_found():
    assert len(CONFIGS) >= 20


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_parses_and_builds_its_optimizer(path, monkeypatch, tmp_path):
    # From outside the repository: includes resolve relative to the including file.
    monkeypatch.chdir(tmp_path)
    config.parse([path], [])
    settings = training.pipeline_settings()
    assert settings["batch_size"] >= 1
    # The learning rate is the configured one at the configured batch (no rescaling).
    optimizer = training.build_optimizer(10, batch_size=settings["batch_size"])
    assert float(optimizer.learning_rate) == pytest.approx(
        gin.query_parameter("optimizer.learning_rate"))
    assert gin.query_parameter("train.method") is not None


def test_includes_resolve_relative_to_the_including_file(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "configs" / "experiments").mkdir(parents=True)
    (project / "configs" / "base.gin").write_text("train.steps = 30\ntrain.seed = 1\n")
    (project / "configs" / "experiments" / "local.gin").write_text("train.seed = 2\n")
    (project / "configs" / "experiments" / "top.gin").write_text(
        "include 'configs/base.gin'  # relative to the project root\n"
        "include \"local.gin\"\n"
        "train.steps_per_epoch = 10\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config.parse([str(project / "configs" / "experiments" / "top.gin")])
    assert gin.query_parameter("train.steps") == 30
    assert gin.query_parameter("train.seed") == 2  # the later include wins
    assert gin.query_parameter("train.steps_per_epoch") == 10


def test_an_error_in_an_included_file_names_its_file_and_line(tmp_path, monkeypatch):
    (tmp_path / "base.gin").write_text("train.steps = 30\n\ntrain.stepz = 3\n")
    (tmp_path / "top.gin").write_text("include 'base.gin'\ninclude 'absent.gin'\n")
    monkeypatch.chdir(REPO)
    with pytest.raises(ConfigError) as caught:
        config.parse([str(tmp_path / "top.gin")])
    assert "stepz" in str(caught.value)
    assert f'In file "{tmp_path / "base.gin"}", line 3' in str(caught.value)
    (tmp_path / "base.gin").write_text("train.steps = 30\n")
    gin.clear_config()
    with pytest.raises(ConfigError, match="included file 'absent.gin' not found"):
        config.parse([str(tmp_path / "top.gin")])
