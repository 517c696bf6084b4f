"""A checkpoint cannot run code: the factory named inside a file is only a label, checked
against the project's factories and the ones the user declared before anything is
imported; damaged checkpoints give one clear error naming the file."""
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from attnlab import pipeline
from attnlab.config import EXPERIMENTS
from attnlab.experiments import KINDS
from attnlab.models import (PROJECT_FACTORIES, CheckpointError, EncoderClassifier, build_model, load_checkpoint,
                            save_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
ENCODER = "attnlab.models.encoder:EncoderClassifier"
KW = {"in_features": 3, "n_classes": 2, "d_model": 8, "nhead": 2, "num_layers": 1, "dim_feedforward": 16}


def _project_checkpoint(path):
    torch.manual_seed(0)
    model = EncoderClassifier(**KW)
    save_checkpoint(path, model, ENCODER, KW)
    return model


def test_project_checkpoint_loads_with_the_old_signature(tmp_path):
    model = _project_checkpoint(tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt")
    assert type(loaded) is EncoderClassifier and not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("payload", [
    lambda out: {"factory": "subprocess:run", "kwargs": {"args": ["touch", str(out)]}},      # as in the issue
    lambda out: {"factory": "subprocess:run", "kwargs": {"args": ["touch", str(out)]}, "state_dict": {}},
    lambda out: {"factory": "os:system", "kwargs": {"command": f"touch {out}"}, "state_dict": {}},
])
def test_checkpoint_naming_a_foreign_callable_is_refused_and_runs_nothing(tmp_path, payload):
    out = tmp_path / "pwned"
    torch.save(payload(out), tmp_path / "model.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(tmp_path / "model.pt")
    assert not out.exists()
    text = str(err.value)
    assert text.startswith(f"{tmp_path / 'model.pt'}: ")
    assert "\n" not in text
    if "state_dict" in payload(out):
        factory = payload(out)["factory"]
        assert f"factory {factory!r} is not allowed: expected a model factory the project ships (" in text
        assert "or one declared in params.yaml or on the command line" in text
    else:
        assert "no 'state_dict'" in text


def _user_module(tmp_path, monkeypatch, name):
    """A module of the user's that leaves a mark when imported, and builds a model."""
    mark = tmp_path / f"{name}.imported"
    (tmp_path / f"{name}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(mark)!r}).touch()\n"
        "from attnlab.models import EncoderClassifier\n"
        "def make(**kw):\n"
        "    return EncoderClassifier(**kw)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return f"{name}:make", mark


def test_undeclared_factory_is_not_even_imported(tmp_path, monkeypatch):
    factory, mark = _user_module(tmp_path, monkeypatch, "attnlab_test_usermod_a")
    model = _project_checkpoint(tmp_path / "ref.pt")
    torch.save({"factory": factory, "kwargs": KW, "state_dict": model.state_dict()}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match=f"factory '{factory}' is not allowed"):
        load_checkpoint(tmp_path / "model.pt")
    assert not mark.exists()
    with pytest.raises(CheckpointError, match=f"^factory '{factory}' is not allowed"):
        build_model(factory, KW)
    assert not mark.exists()


def test_factory_declared_by_the_user_is_used(tmp_path, monkeypatch):
    factory, mark = _user_module(tmp_path, monkeypatch, "attnlab_test_usermod_b")
    model = _project_checkpoint(tmp_path / "ref.pt")
    torch.save({"factory": factory, "kwargs": KW, "state_dict": model.state_dict()}, tmp_path / "model.pt")
    loaded = load_checkpoint(tmp_path / "model.pt", allowed=[factory])       # e.g. from params.yaml
    assert mark.exists()
    x = torch.randn(2, 5, 3)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    # declared explicitly: the file's own factory label is ignored (never imported)
    torch.save({"factory": "subprocess:run", "kwargs": KW, "state_dict": model.state_dict()}, tmp_path / "evil.pt")
    assert type(load_checkpoint(tmp_path / "evil.pt", factory=factory)) is EncoderClassifier
    # a bare state dict, built by the declared factory with no kwargs... needs kwargs: clear error
    torch.save(model.state_dict(), tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match=f"kwargs do not fit '{factory}'"):
        load_checkpoint(tmp_path / "bare.pt", factory=factory)


def test_every_kind_builds_a_project_factory():
    """The factory every experiment kind trains is in the allow-list, so its checkpoints load."""
    meta = {"n_features": 3, "classes": ["a", "b"], "vocab": [f"t{i}" for i in range(8)], "n_items": 8,
            "frames": 2, "size": 16, "patch": 8, "channels": [3, 17]}
    seen = set()
    for name, kind in KINDS.items():
        if "train" not in EXPERIMENTS[name].model_fields:
            continue                           # not trained here (external): the user declares its factory
        cfg = EXPERIMENTS[name]()              # the kind's default params
        factory, _ = kind().model_spec(cfg, meta)
        assert factory in PROJECT_FACTORIES, (name, factory)
        seen.add(factory)
    assert seen and seen <= set(PROJECT_FACTORIES)
    for factory in PROJECT_FACTORIES:                  # each names a module of the package
        module, _, attr = factory.partition(":")
        assert module.startswith("attnlab.models.") and attr.isidentifier()
        assert importlib.util.find_spec(module) is not None, factory


def test_truncated_or_foreign_checkpoint_names_the_file(tmp_path):
    path = tmp_path / "model.pt"
    _project_checkpoint(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    assert str(err.value).startswith(f"{path}: not a readable checkpoint (damaged, truncated or not written by "
                                     "torch.save: ")
    assert "\n" not in str(err.value)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match=r"holds a list; expected a checkpoint"):
        load_checkpoint(path)
    model = EncoderClassifier(**KW)
    save_checkpoint(path, model, ENCODER, {**KW, "d_model": 16})        # weights of another size
    with pytest.raises(CheckpointError, match=f"the state dict does not fit '{ENCODER}': Error"):
        load_checkpoint(path)


def _stage_inputs(data):
    """Just what the extract stage reads before the checkpoint: a dataset and its meta."""
    (data / "motion" / "prepare").mkdir(parents=True)
    np.savez(data / "motion" / "prepare" / "dataset.npz", x_test=np.zeros((2, 5, 3), np.float32))
    (data / "motion" / "prepare" / "meta.json").write_text(json.dumps({}))
    (data / "motion" / "train").mkdir()
    return data / "motion" / "train" / "model.pt"


@pytest.mark.parametrize("damage", ["truncated", "foreign factory"])
def test_extract_stage_refuses_a_bad_checkpoint_and_writes_nothing(tmp_path, capsys, damage):
    path = _stage_inputs(tmp_path / "data")
    out = tmp_path / "pwned"
    if damage == "truncated":
        _project_checkpoint(path)
        path.write_bytes(path.read_bytes()[:100])
    else:
        torch.save({"factory": "subprocess:run", "kwargs": {"args": ["touch", str(out)]}, "state_dict": {}}, path)
    with pytest.raises(SystemExit) as exit_:
        pipeline.run("extract", ["motion", "--params", str(ROOT / "params.yaml"), "--data", str(tmp_path / "data")],
                     progress=False)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ")
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "data" / "motion").iterdir()) == ["prepare", "train"]
