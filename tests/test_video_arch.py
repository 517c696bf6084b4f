"""``video.model.arch``: params validation and the model each arch builds. Runs without
``transformers`` (its absence is simulated); the models themselves are tested in
test_hf.py and test_spacetime_model.py."""
from __future__ import annotations

import importlib.util
import inspect
import sys

import pytest

from attnlab.config import ConfigError, SpaceTimeModel, parse_params
from attnlab.experiments.clips import VideoExperiment

META = {"classes": [str(d) for d in range(10)], "frames": 8, "size": 32, "patch": 8}


def video(model: dict):
    return parse_params({"experiments": ["video"], "video": {"model": model}}).video


def test_default_arch_is_the_projects_model_with_unchanged_kwargs():
    factory, kwargs = VideoExperiment().model_spec(video({}), META)
    assert factory == "attnlab.models.spacetime:DividedSpaceTimeTransformer"
    # the same kwargs as before the arch knob existed: checkpoints of the default run are unchanged
    assert kwargs == {"n_classes": 10, "frames": 8, "size": 32, "patch": 8, "d_model": 48, "nhead": 4,
                      "num_layers": 2, "mlp_ratio": 2.0, "dropout": 0.0}


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers to validate")
def test_hf_arch_builds_the_hf_classifier_with_the_same_sizes():
    factory, kwargs = VideoExperiment().model_spec(video({"arch": "hf_timesformer", "d_model": 32}), META)
    assert factory == "attnlab.models.hf_timesformer:HFTimesformerClassifier"
    assert "arch" not in kwargs and kwargs["d_model"] == 32


def test_unknown_arch_names_the_key_and_the_choices():
    with pytest.raises(ConfigError, match=r"video\.model\.arch: .*'divided' or 'hf_timesformer'"):
        video({"arch": "timm"})


def test_hf_arch_without_transformers_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(ConfigError, match=r"video\.model: arch 'hf_timesformer' needs the transformers package, "
                                          r"which is not installed \(pip install -r requirements-test.txt\)"):
        video({"arch": "hf_timesformer"})
    video({"arch": "divided"})                                # the default needs nothing


def test_hf_model_without_transformers_is_a_clear_import_error(monkeypatch):
    from attnlab.models.hf_timesformer import HFTimesformerClassifier

    monkeypatch.setitem(sys.modules, "transformers", None)   # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"video.model.arch 'hf_timesformer' needs the transformers package.*"
                                          r"pip install -r requirements-test.txt"):
        HFTimesformerClassifier(10, frames=8)


def test_hf_model_defaults_equal_the_params_defaults():
    from attnlab.models.hf_timesformer import HFTimesformerClassifier

    parameters = inspect.signature(HFTimesformerClassifier).parameters
    fields = {k: f.default for k, f in SpaceTimeModel.model_fields.items() if k != "arch"}
    assert fields and all(parameters[k].default == v for k, v in fields.items())
