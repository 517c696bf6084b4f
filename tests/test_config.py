"""params.yaml validation: one clear line naming the key, no partial outputs."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from attnlab.config import EXPERIMENTS, ConfigError, flatten, load_params, parse_params

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
     "motion.train: unknown key 'lrr' (did you mean 'lr'?); accepted: epochs, batch_size, lr, weight_decay, schedule, warmup, seed"),
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
    assert lines == [f"error: {tmp_path / 'params.yaml'}: motion.prepare: unknown key 'normalise' "
                     "(did you mean 'normalize'?); accepted: source, normalize"]
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
     "params.yaml: a.kind: unknown experiment kind 'moton' (did you mean 'motion'?); accepted: motion, tokens, frames, video, fusion"),
    ({"experiments": ["motion", "motion"], "motion": {}}, "experiments: listed twice: 'motion'"),
    ({"experiments": "motion", "motion": {}}, "experiments: expected a list of experiment names"),
    ({"experiments": ["a"], "b": {"kind": "motion"}}, "experiments[0]: unknown experiment 'a'; accepted: "
                                                       + ", ".join(k for k in EXPERIMENTS if k != "external") + ", b"),
])
def test_instance_errors_name_the_key(data, message):
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    assert message in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- the bad-input matrix
def _kinds():
    from attnlab.config import EXPERIMENTS

    return ", ".join(EXPERIMENTS)


TRAIN_KEYS = "epochs, batch_size, lr, weight_decay, schedule, warmup, seed"
BAD_PARAMS = [   # (a change to a valid file, the exact one-line message after "params.yaml: ")
    ("misspelt key", ("motion", "train", "lrr", 0.1),
     f"motion.train: unknown key 'lrr' (did you mean 'lr'?); accepted: {TRAIN_KEYS}"),
    ("unknown key, nothing close", ("motion", "train", "zzz", 1), f"motion.train: unknown key 'zzz'; accepted: {TRAIN_KEYS}"),
    ("misspelt section", ("motion", "trian", None, {}),
     "motion: unknown key 'trian' (did you mean 'train'?); accepted: train, extract, aggregate, explain, evaluate, "
     "report, prepare, model"),
    ("wrong type", ("motion", "train", "epochs", "many"),
     "motion.train.epochs: Input should be a valid integer, unable to parse string as an integer (got 'many')"),
    ("fraction for an integer", ("motion", "train", "batch_size", 2.5),
     "motion.train.batch_size: Input should be a valid integer, got a number with a fractional part (got 2.5)"),
    ("boolean for a number", ("motion", "train", "lr", True), "motion.train.lr: expected a number, got the boolean True"),
    ("infinite", ("motion", "train", "lr", float("inf")), "motion.train.lr: Input should be a finite number (got inf)"),
    ("negative lr", ("motion", "train", "lr", -0.001), "motion.train.lr: Input should be greater than 0 (got -0.001)"),
    ("nhead does not divide d_model (encoder)", ("motion", "model", "nhead", 5),
     "motion.model: d_model=32 must be divisible by nhead=5"),
    ("nhead does not divide d_model (causal)", ("tokens", "model", "nhead", 3),
     "tokens.model: d_model=64 must be divisible by nhead=3"),
    ("nhead does not divide d_model (space-time)", ("video", "model", "nhead", 5),
     "video.model: d_model=48 must be divisible by nhead=5"),
    ("nhead does not divide d_model (fusion)", ("fusion", "model", "nhead", 3),
     "fusion.model: d_model=32 must be divisible by nhead=3"),
    ("discard_ratio 1", ("motion", "explain", "discard_ratio", 1.0),
     "motion.explain.discard_ratio: Input should be less than 1 (got 1.0)"),
    ("discard_ratio < 0", ("motion", "explain", "discard_ratio", -0.1),
     "motion.explain.discard_ratio: Input should be greater than or equal to 0 (got -0.1)"),
    ("top_k 0", ("tokens", "aggregate", "top_k", 0), "tokens.aggregate.top_k: Input should be greater than 0 (got 0)"),
    ("unknown method", ("motion", "explain", "methods", ["rolout"]),
     "motion.explain.methods: unknown method 'rolout'; accepted for sequence items: raw, received, rollout, "
     "grad_rollout, flow, norm, norm_rollout, input_x_gradient, integrated_gradients, alti, attnlrp, value_zeroing, "
     "knockout"),
    ("sanity threshold 0", ("motion", "evaluate", "sanity", {"threshold": 0}),
     "motion.evaluate.sanity.threshold: Input should be greater than 0 (got 0)"),
    ("sanity key misspelt", ("motion", "evaluate", "sanity", {"sample": 4}),
     "motion.evaluate.sanity: unknown key 'sample' (did you mean 'samples'?); accepted: samples, threshold, "
     "independent"),
]


def _project_params():
    return yaml.safe_load((ROOT / "params.yaml").read_text())


def _edited(change):
    params = _project_params()
    section, stage, key, value = change
    if key is None:
        params[section][stage] = value
    else:
        params[section].setdefault(stage, {})[key] = value
    return params


def test_norm_methods_are_refused_for_hugging_face_timesformer():
    pytest.importorskip("transformers", reason="arch hf_timesformer needs transformers (requirements-test.txt)")
    params = _edited(("video", "model", "arch", "hf_timesformer"))
    params["video"]["explain"]["methods"] = ["rollout", "norm_rollout"]
    with pytest.raises(ConfigError) as err:
        parse_params(params)
    assert str(err.value) == ("params.yaml: video: explain.methods: 'norm_rollout' needs norm-aware attention, which "
                              "the recorder does not take from Hugging Face's TimeSformer (only from "
                              "nn.MultiheadAttention and AttentionProbs markers); remove it or use model.arch "
                              "'divided'")


@pytest.mark.parametrize("case, change, message", BAD_PARAMS, ids=[c[0] for c in BAD_PARAMS])
def test_bad_params_matrix(case, change, message):
    with pytest.raises(ConfigError) as err:
        parse_params(_edited(change))
    assert str(err.value) == f"params.yaml: {message}"


@pytest.mark.parametrize("data, message", [
    ({"experiments": ["motion", "moton"], "motion": {}},
     "params.yaml: experiments[1]: unknown experiment 'moton' (did you mean 'motion'?); accepted: {trained}"),
    ({"experiments": ["motion", "walking"], "motion": {}},
     "params.yaml: experiments[1]: unknown experiment 'walking'; accepted: {trained}"),
    ({"experiments": ["motion"], "motion": {}, "motoin": {}},
     "params.yaml: unknown key 'motoin' (did you mean 'motion'?); accepted: experiments, externals, device, {kinds}, "
     "or a section with 'kind: <one of those>'"),
    ({"experiments": ["a"], "a": {"kind": "tokns"}},
     "params.yaml: a.kind: unknown experiment kind 'tokns' (did you mean 'tokens'?); accepted: {kinds}"),
])
def test_unknown_experiment_suggests_the_closest(data, message):
    with pytest.raises(ConfigError) as err:
        parse_params(data)
    trained = ", ".join(k for k in EXPERIMENTS if k != "external")    # external ones are listed in externals
    assert str(err.value) == message.format(kinds=_kinds(), trained=trained)


def test_unknown_experiment_on_the_command_line_suggests_the_closest():
    params = parse_params({"experiments": ["motion", "tokens"], "motion": {}, "tokens": {}})
    with pytest.raises(ConfigError) as err:
        params.experiment("tokns")
    assert str(err.value) == ("experiment 'tokns' is not listed in params.yaml 'experiments' or 'externals' "
                              "(did you mean 'tokens'?) (listed: motion, tokens)")


def test_empty_section_means_its_defaults():
    """``train:`` with every key commented out is YAML null: the section's defaults, not an error."""
    params = parse_params(yaml.safe_load("experiments: [motion]\nmotion:\n  train:\n  model:\n"))
    assert params.motion.train.epochs == 60 and params.motion.model.d_model == 32


@pytest.mark.parametrize("stage", ["train", "track"])
@pytest.mark.parametrize("case, change, message",
                         [BAD_PARAMS[0], BAD_PARAMS[3], BAD_PARAMS[7], BAD_PARAMS[8],
                          ("unknown experiment", None, "experiment 'moton' is not listed in params.yaml "
                           "'experiments' or 'externals' (did you mean 'motion'?) (listed: {listed})")],
                         ids=["misspelt", "type", "negative-lr", "nhead", "experiment"])
def test_stage_entry_point_stops_before_writing(tmp_path, monkeypatch, capsys, stage, case, change, message):
    """Through the stages' entry point, in a project directory: exit status 2, one line on
    stderr, and nothing written (no data/ directory, no MLflow store or run)."""
    from attnlab import pipeline

    params = _project_params() if change is None else _edited(change)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("ATTNLAB_ROOT", raising=False)
    with pytest.raises(SystemExit) as exit_:
        pipeline.run(stage, ["moton" if change is None else "motion"], progress=False)
    assert exit_.value.code == 2
    expected = message.format(listed=", ".join(params["experiments"]))
    prefix = "" if change is None else "params.yaml: "
    assert capsys.readouterr().err.splitlines() == [f"error: {prefix}{expected}"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]     # no data/, mlflow.db, mlartifacts/


def test_one_map_of_kinds_each_owning_its_schema_and_report():
    """Every kind of ``attnlab.experiments.KINDS`` (found in its package, not listed)
    declares its params schema, the one ``parse_params`` validates its sections with,
    and draws its own report; the report package keeps no table of kinds."""
    import inspect

    import attnlab.report
    from attnlab.experiments import KINDS, Experiment

    assert list(KINDS) == list(EXPERIMENTS)
    for name, kind in KINDS.items():
        assert kind.name == name and kind.params is EXPERIMENTS[name]
        assert kind.write_report is not None and issubclass(kind, Experiment)
    assert KINDS["tokens"].write_report is not Experiment.write_report          # its own report
    assert KINDS["fusion"].write_report is not Experiment.write_report
    source = inspect.getsource(attnlab.report.write_report)
    assert not any(f'"{k}"' in source for k in [*KINDS, "classifier"])


def test_params_validation_does_not_import_torch():
    """Loading and validating params.yaml (every stage's first step; method names and
    needs included) imports neither torch nor the heavy libraries."""
    import subprocess
    import sys

    code = ("import sys\nfrom attnlab.config import load_params\np = load_params('params.yaml')\n"
            "[p.experiment(e) for e in p.experiments]\n"
            "heavy = sorted(m for m in ('torch', 'pandas', 'mlflow', 'h5py', 'sklearn', 'scipy', 'matplotlib',"
            " 'transformers', 'seaborn', 'networkx') if m in sys.modules)\nprint(heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
