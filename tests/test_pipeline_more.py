"""End to end, second half: video, fusion and two user models (kind: external) through the
real dvc.yaml and stages on a tiny configuration (tests/pipeline_project.py), then the
README's `make sweep` over fusion modes as queued DVC experiments. Run beside
tests/test_pipeline.py, on the other pytest-xdist worker."""
import json
import os

import numpy as np
import pytest
from pipeline_project import (BIN, check_every_stage_declares_what_it_uses, check_index_page, check_planted_evidence,
                              check_second_repro_does_nothing, make_project, mlflow_runs, run_command,
                              stale_stages)
from user_models import CLIP_MODEL

# the fixture runs its half of the tiny pipeline (under the stage tracer) before the first test
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory, ["video", "fusion"], ["clipnet", "tokennet"])


def test_every_stage_declares_what_it_uses(project):
    check_every_stage_declares_what_it_uses(project)


def test_index_page_covers_every_experiment_and_is_logged_to_each_run(project):
    check_index_page(project)


def test_planted_evidence_video(project):
    check_planted_evidence(project, "video")


def test_second_repro_does_nothing(project):
    check_second_repro_does_nothing(project)


def test_external_models_run_through_the_pipeline(project):
    """Two user models (kind: external) through the real dvc.yaml: the recorded attention
    of the clip model equals a recomputation from its weights, the evaluation holds every
    method's faithfulness and evidence scores, the token model's attention is aggregated
    over its vocabulary, and each is one MLflow run whose model is logged by reference."""
    import hashlib

    import h5py
    import torch

    repo, env, _ = project
    data = repo / "data" / "clipnet"
    namespace: dict = {}
    exec(compile(CLIP_MODEL, "clipnet", "exec"), namespace)
    model = namespace["make_model"]()
    model.load_state_dict(torch.load(repo / "clipnet" / "model.pt", weights_only=True))
    model.eval()
    clips = torch.from_numpy(np.load(repo / "clipnet" / "clips.npy"))
    with torch.no_grad():
        x = model.cnn(clips.flatten(0, 1)).view(12, 5, -1).transpose(0, 1)        # [T, B, d]
        expected = []
        for layer in model.encoder.layers:                                         # post-norm layers
            q, k, _ = torch.nn.functional.linear(x, layer.self_attn.in_proj_weight,
                                                 layer.self_attn.in_proj_bias).chunk(3, -1)
            q = q.view(5, 12, 2, 8).permute(1, 2, 0, 3)
            k = k.view(5, 12, 2, 8).permute(1, 2, 0, 3)
            expected.append((q @ k.transpose(-1, -2) / 8 ** 0.5).softmax(-1))
            x = layer(x)
    with h5py.File(data / "extract" / "attention.h5") as f:
        stored = [torch.from_numpy(f[k][:].astype(np.float32)) for k in sorted(f)]   # "00.name", "01.name"
    assert len(stored) == 2
    for got, want in zip(stored, expected):
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())
    methods = {"raw", "received", "rollout", "grad_rollout", "flow", "input_x_gradient", "integrated_gradients"}
    assert set(evaluated["faithfulness"]["deletion_auc"]) == methods | {"random"}
    assert set(evaluated["evidence"]["auroc"]) == methods | {"random"}
    assert {"strongest_sink", "most_important"} <= set(evaluated["heads"])
    labels = np.load(repo / "clipnet" / "labels.npy")
    predicted = model(clips).argmax(-1).numpy()
    assert evaluated["accuracy"] == pytest.approx(float((predicted == labels).mean()))
    html = (data / "report" / "report.html").read_text()
    assert "clipnet/my_model.py:make_model" in html and "Is the explanation faithful?" in html

    summary = json.loads((repo / "data" / "tokennet" / "aggregate" / "summary.json").read_text())
    assert summary["vocabulary"] is True and summary["vocab_size"] == 12
    from attnlab.aggregate import VocabAttention
    agg = VocabAttention.load(repo / "data" / "tokennet" / "aggregate" / "vocab_layer0.npz")
    assert agg.count[0].sum() == 0 and agg.count[:, 0].sum() == 0           # <pad> never counted
    assert "Which token attends to which" in (repo / "data" / "tokennet" / "report" / "report.html").read_text()

    client, runs = mlflow_runs(repo, "clipnet")
    assert len(runs) == 1
    run = runs[0]
    digest = hashlib.sha256((repo / "clipnet" / "model.pt").read_bytes()).hexdigest()
    assert run.data.params["model.factory"] == "clipnet/my_model.py:make_model"
    assert run.data.params["model.weights_sha256"] == digest and run.data.params["kind"] == "external"
    assert run.data.metrics["evaluate.faithfulness.deletion_auc.rollout"] == pytest.approx(
        evaluated["faithfulness"]["deletion_auc"]["rollout"])
    assert not any(k.startswith("final.") for k in run.data.metrics)         # nothing was trained here
    logged = [a.path for a in client.list_artifacts(run.info.run_id, "model")]
    assert logged == ["model/model_reference.json"]                          # by reference, not pickled
    assert len(mlflow_runs(repo, "tokennet")[1]) == 1


def test_editing_a_users_file_makes_only_its_stages_stale(project):
    """New weights in clipnet/ (the directory externals names for clipnet): every clipnet
    stage that builds the model is stale, nothing else is; restoring them undoes it."""
    repo, env, _ = project
    path = repo / "clipnet" / "model.pt"
    original = path.read_bytes()
    import torch
    state = torch.load(path, weights_only=True)
    torch.save({k: v + 0.01 for k, v in state.items()}, path)
    try:
        stale, status = stale_stages(repo, env)
    finally:
        path.write_bytes(original)
    assert stale == {f"external-{s}@clipnet" for s in ("prepare", "extract", "explain", "evaluate", "report",
                                                        "track")}, status
    assert "up to date" in run_command(["dvc", "status"], repo, env).stdout


def test_fusion_outputs_and_queued_sweep_over_modes(project):
    """The fusion experiment's weights and report; then the README's `make sweep`: one
    queued `dvc exp run` per fusion mode, `dvc queue start -j 2`, each its own MLflow run
    (two modes: one per worker, run at the same time)."""
    repo, env, _ = project
    data = repo / "data" / "fusion"
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())
    assert evaluated["fusion"] == "attention" and evaluated["weights"]["informative"] is not None
    assert set(evaluated["faithfulness"]["deletion_auc"]) == {"weights", "input_x_gradient",
                                                               "integrated_gradients", "random"}
    weights = np.load(data / "extract" / "weights.npz")["weights"]
    np.testing.assert_allclose(weights.sum(1), 1.0, rtol=1e-5)
    assert "Which stream does the fusion weigh?" in (data / "report" / "report.html").read_text()
    for name in ("video", "fusion"):                           # no vocabulary: nothing aggregated, and said so
        assert json.loads((repo / "data" / name / "aggregate" / "summary.json").read_text())["vocabulary"] is False

    # the README's `make sweep`: 2 param sets queued, run by 2 workers sharing the cores
    # (-o: the environment is the test's own venv; it is not rebuilt in the copy)
    venv = BIN.parent
    run_command(["make", "-o", f"{venv}/.installed", "-o", f"{venv}/.attnlab", f"VENV={venv}", "sweep", "PARAM=fusion.model.fusion",
          "VALUES=sum scalar", "EXPERIMENTS=fusion", "JOBS=2"], repo, env)
    status = run_command(["dvc", "queue", "status"], repo, env).stdout
    assert status.count("Success") == 2 and "Failed" not in status, status
    client, runs = mlflow_runs(repo, "fusion")
    by_mode = {r.data.params["model.fusion"]: r for r in runs}
    assert set(by_mode) == {"attention", "sum", "scalar"} and len(runs) == 3
    per_worker = max(1, len(os.sched_getaffinity(0)) // 2)     # the Makefile's cores / JOBS
    for mode, run in by_mode.items():
        assert "evaluate.weights.mean.appearance" in run.data.metrics, mode
        if mode != "attention":            # a queued worker's stages ran with their share of the cores
            for stage in ("train", "explain", "evaluate"):
                assert run.data.tags[f"attnlab.stage.{stage}"].endswith(
                    f", 1 process x {per_worker} thread{'s' if per_worker > 1 else ''}"), (mode, run.data.tags)
        assert run.data.tags.get("dvc.exp_name") or mode == "attention", mode
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"report", "evaluate", "checkpoint"} <= artifacts, (mode, artifacts)
    assert len({r.data.tags.get("dvc.exp_name") for r in runs}) == 3
    assert by_mode["sum"].data.metrics["evaluate.weights.mean.appearance"] == pytest.approx(0.5)
