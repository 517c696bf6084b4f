"""params.yaml validation: one clear line naming the key, no partial outputs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnlab.config import ConfigError, flatten, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


def test_project_params_are_valid():
    params = load_params(ROOT / "params.yaml")
    assert params.experiments
    for name in params.experiments:
        assert params.experiment(name) is not None


@pytest.mark.parametrize("data, message", [
    ({"experiments": ["motion", "walking"], "motion": {}},
     "experiments[1]: unknown experiment 'walking'; accepted: motion, tokens, frames, video"),
    ({"experiments": ["motion"], "motion": {"train": {"lrr": 0.1}}},
     "motion.train: unknown key 'lrr'; accepted: epochs, batch_size, lr, weight_decay, schedule, warmup, seed"),
    ({"experiments": ["motion"], "motion": {"train": {"epochs": "many"}}}, "motion.train.epochs:"),
    ({"experiments": ["motion"], "motion": {"train": {"lr": -1}}}, "motion.train.lr:"),
    ({"experiments": ["motion"], "motion": {"model": {"pooling": "max"}}}, "motion.model.pooling:"),
    ({"experiments": ["motion"], "motion": {"model": {"d_model": 30, "nhead": 4}}},
     "d_model=30 must be divisible by nhead=4"),
    ({"experiments": ["motion"]}, "'motion' is listed but has no 'motion:' section"),
    ({"experiments": ["motion"], "motion": {}, "motoin": {}}, "unknown key 'motoin'"),
])
def test_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    text = str(err.value)
    assert message in text
    assert "\n" not in text


def test_wrong_type_reports_the_value():
    with pytest.raises(ConfigError, match=r"motion\.train\.epochs: .*\(got 'many'\)"):
        parse_params({"experiments": ["motion"], "motion": {"train": {"epochs": "many"}}})


def test_experiment_not_listed():
    params = parse_params({"experiments": ["motion"], "motion": {}})
    with pytest.raises(ConfigError, match="'tokens' is not listed"):
        params.experiment("tokens")


def test_flatten_gives_dotted_keys():
    flat = flatten(parse_params({"experiments": ["motion"], "motion": {"train": {"lr": 0.5}}}).motion)
    assert flat["train.lr"] == 0.5 and flat["model.pooling"] == "mean"
    assert all(not isinstance(v, dict) for v in flat.values())


def test_bad_yaml_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("experiments: [motion\nmotion: {")
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: not valid YAML") and "\n" not in str(err.value)


def test_stage_with_bad_params_fails_cleanly(tmp_path):
    """A stage given a malformed params file exits 2 with one stderr line and writes nothing."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["motion"]["prepare"]["normalise"] = True          # misspelt key
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    proc = subprocess.run([sys.executable, str(ROOT / "stages" / "prepare.py"), "motion",
                           "--params", str(tmp_path / "params.yaml"), "--data", str(tmp_path / "data")],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: {tmp_path / 'params.yaml'}: motion.prepare: unknown key 'normalise'; "
                     "accepted: source, normalize"]
    assert not (tmp_path / "data").exists()


def test_one_default_per_knob():
    """A params key passed to a library function has the same default in both places,
    so a key left out of params.yaml means what the library's documentation says."""
    import inspect

    from attnlab import config as c
    from attnlab.data.clips import make_frame_clips, make_video_clips
    from attnlab.data.fusion import make_two_stream
    from attnlab.models.causal import CausalTransformerLM
    from attnlab.models.encoder import EncoderClassifier
    from attnlab.models.frames import frames_classifier
    from attnlab.models.fusion import TwoStreamClassifier
    from attnlab.models.spacetime import DividedSpaceTimeTransformer

    pairs = [(c.FramesPrepare, make_frame_clips), (c.VideoPrepare, make_video_clips),
             (c.FusionPrepare, make_two_stream), (c.EncoderModel, EncoderClassifier),
             (c.EncoderModel, frames_classifier), (c.CausalModel, CausalTransformerLM),
             (c.SpaceTimeModel, DividedSpaceTimeTransformer), (c.FusionModel, TwoStreamClassifier)]
    compared = 0
    for section, fn in pairs:
        parameters = inspect.signature(fn).parameters
        for name, field in section.model_fields.items():
            if name in parameters and parameters[name].default is not inspect.Parameter.empty:
                assert parameters[name].default == field.default, (section.__name__, fn.__name__, name)
                compared += 1
    assert compared >= 30


@pytest.mark.parametrize("section, key, value, expected", [
    ("video", "explain", {"discard_ratio": 0.1}, "video.explain: unknown key 'discard_ratio'"),
    ("video", "explain", {"flow_max_pairs": 10}, "video.explain: unknown key 'flow_max_pairs'"),
    ("fusion", "report", {"examples": 2}, "fusion.report: unknown key 'examples'"),
    ("tokens", "aggregate", {"attention": "max"}, "tokens.aggregate.attention:"),
    ("tokens", "aggregate", {"layers": []}, "tokens.aggregate.layers:"),
])
def test_params_without_effect_are_refused(section, key, value, expected):
    with pytest.raises(ConfigError, match=re.escape(expected)):
        parse_params({"experiments": [section], section: {key: value}})


def test_several_instances_of_one_kind_each_with_its_own_section():
    params = parse_params({"experiments": ["motion", "motion_cls"], "motion": {},
                           "motion_cls": {"kind": "motion", "model": {"pooling": "cls"}}})
    assert params.kind("motion") == params.kind("motion_cls") == "motion"
    assert params.experiment("motion").model.pooling == "mean"
    assert params.experiment("motion_cls").model.pooling == "cls"
    assert "kind" not in flatten(params.experiment("motion_cls"))


@pytest.mark.parametrize("data, message", [
    ({"experiments": ["a"], "a": {"kind": "motion", "train": {"lr": -1}}}, "params.yaml: a.train.lr: "),
    ({"experiments": ["a"], "a": {"kind": "moton"}},
     "params.yaml: a.kind: unknown experiment kind 'moton'; accepted: motion, tokens, frames, video, fusion"),
    ({"experiments": ["motion", "motion"], "motion": {}}, "experiments: listed twice: 'motion'"),
    ({"experiments": "motion", "motion": {}}, "experiments: expected a list of experiment names"),
    ({"experiments": ["a"], "b": {"kind": "motion"}}, "experiments[0]: unknown experiment 'a'; accepted: motion, "
                                                       "tokens, frames, video, fusion, b"),
])
def test_instance_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    assert message in str(err.value) and "\n" not in str(err.value)
