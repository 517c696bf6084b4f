"""Learning-rate schedules of the training loops."""
import torch

from attnlab.config import Train
from attnlab.training import make_schedule


def _lrs(cfg, steps_per_epoch):
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched, seen = make_schedule(opt, cfg, steps_per_epoch), []
    for _ in range(cfg.epochs * steps_per_epoch):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_constant_schedule_keeps_the_rate():
    assert _lrs(Train(epochs=3, lr=0.01), 4) == [0.01] * 12


def test_onecycle_warms_up_to_lr_then_decays():
    cfg = Train(epochs=10, lr=0.01, schedule="onecycle", warmup=0.2)
    lrs = _lrs(cfg, 10)                                     # 100 steps, peak after 20% of them
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert abs(peak - 20) <= 1 and abs(lrs[peak] - 0.01) < 1e-6
    assert lrs[0] < 0.001 and lrs[-1] < 1e-4
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1:]))


# --------------------------------------------------------------------------- resume after a kill
import pytest  # noqa: E402

from attnlab import training  # noqa: E402
from attnlab.models.causal import CausalTransformerLM  # noqa: E402
from attnlab.models.encoder import EncoderClassifier  # noqa: E402


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs (not even `except Exception`)."""


def _classifier_run(cfg, path=None, kill_after=None, monkeypatch=None):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, 3, generator=g), torch.arange(24) % 3
    torch.manual_seed(0)
    model = EncoderClassifier(in_features=3, n_classes=3, d_model=8, nhead=2, num_layers=1, dim_feedforward=16,
                              dropout=0.2)
    if kill_after is not None:                 # the epoch after `kill_after` dies while evaluating
        calls, real = [], training.classification_metrics

        def metrics(*args):
            calls.append(1)
            if len(calls) > kill_after:
                raise Killed
            return real(*args)

        monkeypatch.setattr(training, "classification_metrics", metrics)
    context = training.resumable(path, "key") if path else _nothing()
    with context:
        history = training.fit_classifier(model, x[:16], y[:16], x[16:], y[16:], cfg)
    model.epochs_run = len(calls) if kill_after is not None else None
    return model, history


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("schedule", ["constant", "onecycle"])
def test_classifier_resumes_after_a_kill_to_the_same_weights(tmp_path, monkeypatch, capsys, schedule):
    cfg = Train(epochs=4, batch_size=5, lr=0.01, schedule=schedule, seed=3)
    reference, ref_history = _classifier_run(cfg)
    path = tmp_path / ".resume" / "train.pt"
    with pytest.raises(Killed):
        _classifier_run(cfg, path, kill_after=2, monkeypatch=monkeypatch)
    assert torch.load(path, weights_only=True)["epoch"] == 2          # the last complete epoch
    monkeypatch.undo()
    capsys.readouterr()
    resumed, history = _classifier_run(cfg, path, kill_after=99, monkeypatch=monkeypatch)
    assert resumed.epochs_run == 2                                       # epochs 3 and 4 only
    assert capsys.readouterr().err == f"train: resuming after epoch 2 from {path}\n"
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name                                   # bit for bit
    assert history.equals(ref_history)
    assert not path.exists()                                             # removed on success


def test_resume_file_of_other_params_is_ignored(tmp_path, monkeypatch):
    path = tmp_path / "train.pt"
    cfg = Train(epochs=3, batch_size=5, lr=0.01, seed=3)
    with pytest.raises(Killed):
        _classifier_run(cfg, path, kill_after=1, monkeypatch=monkeypatch)
    monkeypatch.undo()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(24, 6, 3, generator=g), torch.arange(24) % 3
    torch.manual_seed(0)
    model = EncoderClassifier(in_features=3, n_classes=3, d_model=8, nhead=2, num_layers=1, dim_feedforward=16,
                              dropout=0.2)
    with training.resumable(path, "another key"):                      # changed params or data
        history = training.fit_classifier(model, x[:16], y[:16], x[16:], y[16:], cfg)
    reference, ref_history = _classifier_run(cfg)
    assert history.equals(ref_history)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), model.state_dict().values()))


def test_language_model_resumes_after_a_kill(tmp_path, monkeypatch):
    cfg = Train(epochs=3, batch_size=4, lr=0.01, seed=1)
    g = torch.Generator().manual_seed(0)
    tokens, mask = torch.randint(0, 7, (12, 6), generator=g), torch.ones(12, 6, dtype=torch.bool)

    def run(path=None, kill_after=None):
        torch.manual_seed(0)
        model = CausalTransformerLM(vocab_size=7, max_len=6, d_model=8, nhead=2, num_layers=1, dim_feedforward=16)
        if kill_after is not None:
            calls, real = [], training.lm_evaluate

            def evaluate(*args, **kw):
                calls.append(1)
                if len(calls) > kill_after:
                    raise Killed
                return real(*args, **kw)

            monkeypatch.setattr(training, "lm_evaluate", evaluate)
        with training.resumable(path, "k") if path else _nothing():
            history = training.fit_lm(model, (tokens[:8], mask[:8]), (tokens[8:], mask[8:]), cfg)
        return model, history

    reference, ref_history = run()
    with pytest.raises(Killed):
        run(tmp_path / "lm.pt", kill_after=1)
    monkeypatch.undo()
    resumed, history = run(tmp_path / "lm.pt", kill_after=2)         # a third epoch would die: it must resume
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), resumed.state_dict().values()))
    assert history.equals(ref_history)


def test_train_stage_resumes_where_a_killed_run_stopped(tmp_path, monkeypatch, capsys):
    """Through the stage entry point: a run killed in epoch 3 leaves no train/ output but a
    resume checkpoint beside it; the next run trains epochs 3-4 only and writes the same
    model as an uninterrupted run in another directory."""
    import json

    import numpy as np
    import yaml

    from attnlab import pipeline
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["motion"]["model"].update(d_model=8, nhead=2, num_layers=1, dim_feedforward=16)
    params["motion"]["train"].update(epochs=4, batch_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    g = torch.Generator().manual_seed(0)
    for name in ("a", "b"):
        prepared = tmp_path / name / "motion" / "prepare"
        prepared.mkdir(parents=True)
        np.savez(prepared / "dataset.npz", x_train=torch.randn(16, 5, 3, generator=torch.Generator().manual_seed(0)).numpy(),
                 y_train=np.arange(16) % 2, x_test=torch.randn(6, 5, 3, generator=g.manual_seed(1)).numpy(),
                 y_test=np.arange(6) % 2)
        (prepared / "meta.json").write_text(json.dumps({"n_features": 3, "classes": ["x", "y"], "n_items": 5}))

    def run(name):
        pipeline.run("train", ["motion", "--params", str(tmp_path / "params.yaml"), "--data", str(tmp_path / name)],
                     progress=False)
        return torch.load(tmp_path / name / "motion" / "train" / "model.pt", weights_only=True)["state_dict"]

    reference = run("a")
    calls, real = [], training.classification_metrics

    def metrics(*args):
        calls.append(1)
        if len(calls) == 3:
            raise Killed
        return real(*args)

    monkeypatch.setattr(training, "classification_metrics", metrics)
    with pytest.raises(Killed):
        run("b")
    assert sorted(p.name for p in (tmp_path / "b" / "motion").iterdir()) == [".resume", "prepare"]
    calls.clear()
    capsys.readouterr()
    resumed = run("b")
    assert len(calls) == 2 and "train: resuming after epoch 2" in capsys.readouterr().err
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    assert not (tmp_path / "b" / "motion" / ".resume" / "train.pt").exists()


def test_train_stage_killed_with_sigkill_resumes_to_the_same_result(tmp_path):
    """The real stage script in a child process, killed with SIGKILL (nothing runs after it:
    no `finally`, no atexit) as soon as its first per-epoch resume checkpoint exists. The
    next run says where it resumes, trains only the remaining epochs (its progress bar
    counts them) and writes the same files as an uninterrupted run in another directory:
    bit for bit, since training on CPU with one thread is deterministic and the checkpoint
    holds the model, optimizer, schedule, shuffling generator and torch RNG (dropout)."""
    import json
    import os
    import re
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import numpy as np
    import yaml

    root = Path(__file__).resolve().parents[1]
    epochs = 30                  # ~50 ms each: the first checkpoint appears long before the last epoch
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["motion"]["model"].update(d_model=8, nhead=2, num_layers=1, dim_feedforward=16)
    params["motion"]["train"].update(epochs=epochs, batch_size=8)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    for name in ("reference", "killed"):
        g = torch.Generator().manual_seed(0)
        prepared = tmp_path / name / "motion" / "prepare"
        prepared.mkdir(parents=True)
        np.savez(prepared / "dataset.npz", x_train=torch.randn(256, 5, 3, generator=g).numpy(),
                 y_train=np.arange(256) % 2, x_test=torch.randn(6, 5, 3, generator=g).numpy(), y_test=np.arange(6) % 2)
        (prepared / "meta.json").write_text(json.dumps({"n_features": 3, "classes": ["x", "y"], "n_items": 5}))
    env = {**os.environ, "ATTNLAB_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}

    def start(name):
        return subprocess.Popen([sys.executable, str(root / "stages" / "train.py"), "motion", "--params",
                                 str(tmp_path / "params.yaml"), "--data", str(tmp_path / name)],
                                cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    reference = start("reference")                           # uninterrupted, alongside
    victim = start("killed")
    resume_file = tmp_path / "killed" / "motion" / ".resume" / "train.pt"
    deadline = time.monotonic() + 60
    while not resume_file.exists():
        assert victim.poll() is None, f"the stage ended before its first checkpoint:\n{victim.communicate()[1]}"
        assert time.monotonic() < deadline, "no resume checkpoint after 60 s"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    done = torch.load(resume_file, weights_only=True)["epoch"]        # the last complete epoch
    assert 1 <= done < epochs
    killed_dir = tmp_path / "killed" / "motion"
    assert not (killed_dir / "train").exists()                     # no output of the killed run...
    assert [p.name.split(".")[1] for p in killed_dir.iterdir() if p.name.startswith(".train.")] == ["train"]
    # ...but its empty temporary directory: SIGKILL skipped the cleanup, the next run does it

    resumed = start("killed")
    _, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"train: resuming after epoch {done} from {resume_file}\n" in err
    bars = re.findall(r"train: 100%\|[^|]*\| (\d+)/(\d+) ", err)
    assert bars and {int(a) for bar in bars for a in bar} == {epochs - done}    # only the remaining epochs ran
    _, ref_err = reference.communicate(timeout=120)
    assert reference.returncode == 0, ref_err
    assert "resuming" not in ref_err

    ref_dir = tmp_path / "reference" / "motion"
    ref_model = torch.load(ref_dir / "train" / "model.pt", weights_only=True)
    got_model = torch.load(killed_dir / "train" / "model.pt", weights_only=True)
    assert ref_model["state_dict"].keys() == got_model["state_dict"].keys()
    for key, value in ref_model["state_dict"].items():
        assert torch.equal(value, got_model["state_dict"][key]), key               # bit for bit
    for name in ("history.csv", "metrics.json"):
        assert (killed_dir / "train" / name).read_bytes() == (ref_dir / "train" / name).read_bytes(), name
    assert len((killed_dir / "train" / "history.csv").read_text().splitlines()) == 1 + epochs
    # nothing of the killed run is left: its temporary train directory and the resume file are gone
    # (.timings: when the stage that succeeded ran, recorded by the stage runner)
    assert sorted(p.name for p in killed_dir.iterdir()) == [".timings", "prepare", "train"]
    assert sorted(p.name for p in ref_dir.iterdir()) == [".timings", "prepare", "train"]
    assert sorted(p.name for p in (killed_dir / ".timings").iterdir()) == ["train.json"]
