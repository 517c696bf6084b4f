"""The ``device`` setting: validated when params are loaded, resolved in one place, and
device-agnostic code paths (tested on the CPU; CUDA is only ever pretended)."""
import re
from pathlib import Path

import pytest
import torch
import yaml

from attnlab.config import ConfigError, flatten, parse_params, resolve_device, stage_device

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "attnlab"


def _params(**top):
    return {"experiments": ["motion"], "motion": {}, **top}


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA pretended (nothing is ever put on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


# --------------------------------------------------------------------------- the setting
@pytest.mark.parametrize("value, expected", [("auto", "cpu"), ("cpu", "cpu")])
def test_cpu_settings_without_cuda(no_cuda, value, expected):
    params = parse_params(_params(device=value))
    assert params.device == value
    assert stage_device(params.motion) == torch.device(expected)


@pytest.mark.parametrize("value, expected", [("auto", "cuda"), ("cuda", "cuda"), ("cuda:1", "cuda:1"),
                                             ("cpu", "cpu")])
def test_cuda_settings_with_cuda(two_gpus, value, expected):
    assert stage_device(parse_params(_params(device=value)).motion) == torch.device(expected)


def test_default_is_auto_and_not_a_knob_of_the_experiment(no_cuda):
    params = parse_params(_params())
    assert params.device == "auto" and stage_device(params.motion) == torch.device("cpu")
    # not a field: not logged to MLflow with the section, not in the training fingerprint's dump
    with_cpu = parse_params(_params(device="cpu")).motion
    assert flatten(with_cpu) == flatten(params.motion) and "device" not in with_cpu.model_dump()


def test_auto_is_the_cpu_on_this_machine():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_project_params_declare_auto():
    assert yaml.safe_load((ROOT / "params.yaml").read_text())["device"] == "auto"


@pytest.mark.parametrize("value", ["gpu", "CPU", "cuda:", "cuda:x", "cuda0", " cpu", "mps", 0, True, None, ["cpu"]])
def test_bad_values_name_the_accepted_ones(value):
    with pytest.raises(ConfigError) as err:
        parse_params(_params(device=value))
    assert str(err.value) == f"params.yaml: device: expected auto, cpu, cuda or cuda:<index>, got {value!r}"


@pytest.mark.parametrize("value", ["cuda", "cuda:0"])
def test_cuda_without_cuda_fails_at_load(no_cuda, value):
    with pytest.raises(ConfigError) as err:
        parse_params(_params(device=value))
    assert str(err.value) == (f"params.yaml: device: {value!r} but torch.cuda.is_available() is False; "
                              "use 'auto' or 'cpu'")


def test_cuda_index_beyond_the_visible_devices(two_gpus):
    with pytest.raises(ConfigError) as err:
        parse_params(_params(device="cuda:2"))
    assert str(err.value) == "params.yaml: device: 'cuda:2' but only 2 CUDA devices are visible (cuda:0..cuda:1)"


def test_resolve_device_rejects_the_same_way(no_cuda):
    with pytest.raises(ConfigError, match=r"^device: 'cuda' but torch.cuda.is_available\(\) is False"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match=r"^device: expected auto, cpu, cuda or cuda:<index>, got 'tpu'$"):
        resolve_device("tpu")


def test_misspelt_top_level_key_suggests_device():
    with pytest.raises(ConfigError, match=r"unknown key 'devcie' \(did you mean 'device'\?\); "
                                          r"accepted: experiments, externals, device, motion"):
        parse_params(_params(devcie="cpu"))


def test_stage_with_cuda_on_a_cpu_machine_exits_cleanly(tmp_path, monkeypatch, capsys, no_cuda):
    from attnlab.pipeline import run

    params = yaml.safe_load((ROOT / "params.yaml").read_text()) | {"device": "cuda:0"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(SystemExit) as exit_:
        run("train", ["motion", "--params", str(tmp_path / "params.yaml"), "--data", str(tmp_path / "data")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == (f"error: {tmp_path / 'params.yaml'}: device: 'cuda:0' but "
                                               "torch.cuda.is_available() is False; use 'auto' or 'cpu'")
    assert not (tmp_path / "data").exists()


def test_dvc_yaml_declares_device_where_the_model_runs():
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    using = {"train", "extract", "explain", "evaluate", "external-extract", "external-explain", "external-evaluate"}
    for name, stage in stages.items():
        if name == "index":        # shows the params on its page; runs no model
            continue
        params = [p for p in stage.get("do", stage).get("params", []) if isinstance(p, str)]
        assert ("device" in params) == (name in using), name


# --------------------------------------------------------------------------- the same outputs
def _tiny_tokens_run(tmp_path: Path, device: str) -> Path:
    from attnlab.pipeline import run

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["experiments"], params["device"] = ["tokens"], device
    t = params["tokens"]
    t["prepare"].update(n=160, max_len=12, vocab_size=14, n_rules=3)
    t["model"].update(d_model=16, nhead=2, num_layers=2, dim_feedforward=32)
    t["train"].update(epochs=1, batch_size=32)
    t["aggregate"].update(min_count=1, top_k=4)
    t["evaluate"].update(steps=3, resamples=20, sanity={"samples": 2, "threshold": 0.5, "independent": False})
    t["report"].update(examples=1)
    tmp_path.mkdir()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    argv = ["tokens", "--params", str(tmp_path / "params.yaml"), "--data", str(tmp_path / "data")]
    for stage in ("prepare", "train", "extract", "aggregate", "explain", "evaluate"):
        run(stage, argv, progress=False)
    return tmp_path / "data" / "tokens"


def test_cpu_and_auto_give_byte_identical_outputs(tmp_path):
    """On this machine ``auto`` is the CPU: every file of train, extract, explain and
    evaluate is the same, byte for byte, as with ``cpu``; the checkpoint holds CPU tensors."""
    a = _tiny_tokens_run(tmp_path / "cpu", "cpu")
    b = _tiny_tokens_run(tmp_path / "auto", "auto")
    for stage in ("train", "extract", "aggregate", "explain", "evaluate"):
        files = sorted(p.relative_to(a) for p in (a / stage).rglob("*") if p.is_file())
        assert files and files == sorted(p.relative_to(b) for p in (b / stage).rglob("*") if p.is_file())
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    state = torch.load(a / "train" / "model.pt", weights_only=True)["state_dict"]
    assert {t.device.type for t in state.values()} == {"cpu"}


# --------------------------------------------------------------------------- device-agnostic code
def _meta_model():
    from attnlab.models.encoder import EncoderClassifier

    torch.manual_seed(0)
    return EncoderClassifier(in_features=3, n_classes=3, d_model=8, nhead=2, num_layers=2, dim_feedforward=16,
                             dropout=0.0).to("meta").eval()


def test_explain_batch_moves_the_inputs_to_the_models_device():
    """A model on the ``meta`` device (no data, every op still checked for devices) given
    CPU inputs, target and baseline: recorded attention, gradients and importance are on
    the model's device. (Methods that validate their inputs' values cannot run on meta.)"""
    from attnlab.attribution import SequenceItems, explain_batch, record_target
    from attnlab.config import Explain

    model, x, target = _meta_model(), torch.randn(4, 5, 3), torch.zeros(4, dtype=torch.long)
    atts, grads, tgt = record_target(model, x, target=target)
    assert {t.device.type for t in [*atts, *grads, tgt]} == {"meta"}
    methods = ["received", "input_x_gradient", "integrated_gradients"]
    imp, batch = explain_batch(methods, model, x, SequenceItems(5), Explain(methods=methods, ig_steps=2),
                               target=target, baseline=torch.zeros(3))
    assert {v.device.type for v in imp.values()} == {"meta"} and batch.x.device.type == "meta"
    assert {v.shape for v in imp.values()} == {(4, 5)}


def test_perturbation_curves_follow_the_inputs_device():
    from attnlab.evaluate import deletion_curve, patch_masker, road_masker, sequence_masker, stream_masker

    model, x = _meta_model(), torch.randn(4, 5, 3, device="meta")
    curve = deletion_curve(model, x, torch.rand(4, 5), sequence_masker(torch.zeros(3)), target=torch.zeros(4).long(),
                           steps=3)
    assert {curve.probs.device.type, curve.auc.device.type, curve.fractions.device.type} == {"meta"}
    keep = torch.ones(4, 5, dtype=torch.bool, device="meta")
    assert road_masker(0.1)(x, keep).device.type == "meta"
    clip = torch.randn(2, 2, 1, 4, 4, device="meta")
    assert patch_masker(2, 2, 4, torch.zeros(1, 1, 1))(clip, torch.ones(2, 8, dtype=torch.bool, device="meta")
                                                        ).device.type == "meta"
    streams = torch.randn(2, 5, 4, 4, device="meta")
    assert stream_masker([2, 3])(streams, torch.ones(2, 2, dtype=torch.bool, device="meta")).device.type == "meta"


def test_to_device_moves_nested_batches():
    from attnlab.devices import model_device, to_device

    moved = to_device((torch.zeros(2), [torch.ones(1)], {"mask": torch.ones(2, dtype=torch.bool)}, 3, "s"), "meta")
    assert moved[0].device.type == moved[1][0].device.type == moved[2]["mask"].device.type == "meta"
    assert moved[3:] == (3, "s")
    assert model_device(_meta_model()).type == "meta" and model_device(torch.nn.ReLU()).type == "cpu"


#: Modules that may move tensors to the CPU, and why: where tensors leave torch for a
#: file, numpy/scipy/pandas or a CPU-only algorithm, or state that lives on the CPU by
#: design. Everything else (the maths: explain/, capture, attribution, the methods,
#: faithfulness, baselines, ground truth, the experiments) must run where its inputs are.
CPU_ALLOWED = {
    "store.py": "saving attention to HDF5",
    "pipeline/stages.py": "saving the importance arrays",
    "models/__init__.py": "checkpoints of CPU tensors, map_location on load",
    "training.py": "the resume file's map_location",
    "models/external.py": "the user's weights' map_location",
    "devices.py": "a model without parameters is on the CPU",
    "explain/flow.py": "max-flow (scipy) runs on the CPU; the result is moved back",
    "evaluate/heads.py": "HeadStats' O(L*H) sums live on the CPU",
    "aggregate.py": "VocabAttention's tables are numpy arrays",
    "evaluate/summaries.py": "curves to pandas",
    "evaluate/sanity.py": "rank correlations with scipy",
    "evaluate/faithfulness.py": "the curves' step bookkeeping (which inputs are distinct) is done on the CPU",
    "explain/rollout.py": "a cache-blocked head fusion for CPU tensors; other devices take the plain path",
    "explain/grad_rollout.py": "a cache-blocked product for CPU tensors; other devices take the plain path",
    "models/pretrained.py": "the frozen encoder's features, computed once, are kept on the CPU for the head's training",
    "evaluate/knockout.py": "the random items are drawn by a seeded CPU generator (the same draws on every device)",
}
#: Tensor factories in the maths without ``device=`` (CPU by design), by file and line text.
FACTORY_ALLOWED = {
    ("evaluate/faithfulness.py", "owner = torch.repeat_interleave(torch.arange"),   # moved at use
    ("evaluate/faithfulness.py", "torch.rand(tuple(shape), generator=gen"),         # CPU generator, then .to
    ("evaluate/faithfulness.py", "counts_cpu = torch."),                             # step bookkeeping, then .to
    ("evaluate/faithfulness.py", "n_valid = torch.full((b,), n)"),                   # step bookkeeping
    ("evaluate/faithfulness.py", "fresh = torch.ones(n_steps, b, dtype=torch.bool)"),  # then .to
}
MATHS = ["explain", "capture.py", "attribution.py", "items.py", "methods", "evaluate/faithfulness.py",
         "evaluate/baselines.py", "evaluate/groundtruth.py", "evaluate/sanity.py", "evaluate/uncertainty.py"]


def _sources(*under: str):
    for part in under:
        path = SRC / part
        yield from ([path] if path.is_file() else sorted(path.rglob("*.py")))


def test_no_cpu_outside_the_listed_places():
    """``.cpu()``, ``"cpu"`` and ``device("cpu")`` only where CPU_ALLOWED says why."""
    cpu = re.compile(r"\.cpu\(\)|[\"']cpu[\"']")
    found = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        if rel.startswith(("report/", "data/")) or rel in ("tracking.py", "config.py", "schema.py", "cli.py"):
            continue                           # figures and logging, CPU data generation, the setting itself
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if cpu.search(line.split("#")[0]) and rel not in CPU_ALLOWED:
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "CPU assumptions outside the allowed places:\n" + "\n".join(found)


def test_maths_makes_tensors_on_its_inputs_device():
    """Tensor factories in the maths pass ``device=`` (or ``.to(...)`` on the same line),
    so nothing is created on the CPU next to inputs on another device."""
    factory = re.compile(r"torch\.(zeros|ones|full|empty|arange|eye|linspace|tensor|rand|randn|tril_indices)\(")
    found = []
    for path in _sources(*MATHS):
        rel = path.relative_to(SRC).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if (factory.search(code) and "device" not in code and ".to(" not in code
                    and not any(rel == f and text in code for f, text in FACTORY_ALLOWED)):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "tensors made on the CPU in the maths:\n" + "\n".join(found)
