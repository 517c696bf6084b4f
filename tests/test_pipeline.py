"""End to end, first half: motion, a second motion instance (class-token pooling), tokens and
frames through the real dvc.yaml and stages on a tiny configuration, in a temporary git +
DVC repository, with MLflow runs checked in the project's SQLite store; then `dvc repro
--force` (determinism) and `dvc exp run` (a second run). The other half (video, fusion and
its queued sweep, user models) is tests/test_pipeline_more.py; the project is built by
tests/pipeline_project.py."""
import json
import sys

import numpy as np
import pytest
import yaml
from pipeline_project import (check_every_stage_declares_what_it_uses, check_index_page, check_planted_evidence,
                              check_second_repro_does_nothing, make_project, mlflow_runs, run_command,
                              stale_stages)

# the fixture runs its half of the tiny pipeline (under the stage tracer) before the first test
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory, ["motion", "motion_cls", "tokens", "frames"])


def test_every_stage_declares_what_it_uses(project):
    check_every_stage_declares_what_it_uses(project)


def test_index_page_covers_every_experiment_and_is_logged_to_each_run(project):
    check_index_page(project)


def test_planted_evidence_frames(project):
    check_planted_evidence(project, "frames")


def test_second_repro_does_nothing(project):
    check_second_repro_does_nothing(project)


def test_repro_produces_every_output(project):
    repo, env, _ = project
    data = repo / "data" / "motion"
    metrics = json.loads((data / "train" / "metrics.json").read_text())
    assert 0.0 <= metrics["test_accuracy"] <= 1.0 and "test_macro_f1" in metrics
    history = (data / "train" / "history.csv").read_text().splitlines()
    assert history[0].startswith("epoch,") and len(history) == 1 + 3
    import h5py
    with h5py.File(data / "extract" / "attention.h5") as f:
        shapes = sorted({f[k].shape for k in f})
        dtypes = {f[k].dtype for k in f}
    assert shapes == [(40, 2, 100, 100)] and len(list(data.glob("extract/attention.h5"))) == 1
    assert {str(d) for d in dtypes} == {"float16"}
    explained = np.load(data / "explain" / "importance.npz")
    methods = {"raw", "received", "rollout", "grad_rollout", "flow", "alti", "attnlrp", "value_zeroing", "knockout",
               "input_x_gradient", "integrated_gradients"}
    assert set(explained.files) == methods | {"target", "y", "rows"}
    assert explained["rows"].tolist() == np.linspace(0, 39, 10).round().astype(int).tolist()   # spread over the test set
    for m in methods:
        assert explained[m].shape == (10, 100)
        np.testing.assert_allclose(explained[m].sum(1), 1.0, rtol=1e-4)
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())
    assert set(evaluated["faithfulness"]["deletion_auc"]) == methods | {"random"}
    assert {"strongest_sink", "most_important"} <= set(evaluated["heads"])
    assert (data / "evaluate" / "deletion.csv").read_text().startswith("fraction,")
    html = (data / "report" / "report.html").read_text()
    assert "Is the explanation faithful?" in html and "the strongest sink" in html
    assert html.count("data:image/png;base64,") >= 4
    assert "http://" not in html and "https://" not in html        # opens offline
    status = run_command(["dvc", "status"], repo, env).stdout
    assert "up to date" in status


def test_editing_library_code_makes_its_stages_stale(project):
    """A library file only the aggregate stage runs: editing it makes aggregate@tokens
    (and only the stages that run it) stale in `dvc status`; undoing the edit makes
    the pipeline up to date again."""
    repo, env, _ = project
    path = repo / "src" / "attnlab" / "aggregate_views.py"
    original = path.read_text()
    path.write_text(original + "\n# edited\n")
    try:
        stale, status = stale_stages(repo, env)
    finally:
        path.write_text(original)
    assert "aggregate@tokens" in stale, status
    assert not any(s.startswith(("train@", "prepare@", "explain@")) for s in stale), status
    assert "up to date" in run_command(["dvc", "status"], repo, env).stdout


def test_two_instances_of_one_kind_run_side_by_side(project):
    """motion and motion_cls (kind: motion, class-token pooling) through the real dvc.yaml:
    two MLflow experiments, each run with its own params, and separate outputs."""
    repo, env, _ = project
    _, motion = mlflow_runs(repo, "motion")
    _, motion_cls = mlflow_runs(repo, "motion_cls")
    assert len(motion_cls) == 1 and len(motion) >= 1
    assert motion_cls[0].data.params["model.pooling"] == "cls" and motion_cls[0].data.params["kind"] == "motion"
    assert {r.data.params["model.pooling"] for r in motion} == {"mean"} and "kind" not in motion[0].data.params
    evaluated = json.loads((repo / "data" / "motion_cls" / "evaluate" / "metrics.json").read_text())
    assert set(evaluated["faithfulness"]["deletion_auc"]) == {"raw", "rollout", "random"}
    import h5py
    with h5py.File(repo / "data" / "motion_cls" / "extract" / "attention.h5") as f:
        assert {f[k].shape for k in f} == {(40, 2, 101, 101)}            # the class token is a position
    assert "attnlab — motion_cls (motion)" in (repo / "data" / "motion_cls" / "report" / "report.html").read_text()


def test_tokens_vocab_attention_outputs(project):
    repo, env, _ = project
    data = repo / "data" / "tokens"
    from attnlab.aggregate import VocabAttention
    meta = json.loads((data / "prepare" / "meta.json").read_text())
    summary = json.loads((data / "aggregate" / "summary.json").read_text())
    assert summary["views"] == ["layer0"] and summary["headline"] == "layer0"
    agg = VocabAttention.load(data / "aggregate" / "vocab_layer0.npz")
    assert agg.sum.shape == (len(meta["vocab"]),) * 2
    pad = meta["vocab"].index("<pad>")
    assert agg.count[pad].sum() == 0 and agg.count[:, pad].sum() == 0      # padding never counted
    top = (data / "aggregate" / "top_pairs_layer0.csv").read_text().splitlines()
    assert top[0].startswith("query_id,key_id,query_token,key_token")
    evaluated = json.loads((data / "evaluate" / "metrics.json").read_text())
    assert 0.0 <= evaluated["planted"]["recall_at_k"] <= 1.0
    assert {"raw", "rollout", "random"} <= set(evaluated["faithfulness"]["deletion_auc"])
    assert "rollout" in evaluated["evidence"]["auroc"]
    assert (data / "evaluate" / "deletion.csv").read_text().startswith("fraction,method,probability")
    assert "Which token attends to which" in (data / "report" / "report.html").read_text()
    for name in ("motion", "motion_cls", "frames"):         # no vocabulary: nothing aggregated, and said so
        assert json.loads((repo / "data" / name / "aggregate" / "summary.json").read_text())["vocabulary"] is False


def test_same_params_and_seed_give_identical_outputs(project):
    """Every motion stage re-run from scratch (`dvc repro --force`, as `make run` runs DVC) on the same machine
    gives byte-identical outputs: the same `dvc.lock` hashes (track's run id aside, the
    state it logs is the same run), hence the same metrics, attention and report."""
    repo, env, _ = project

    def outs():
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        return {(name, o["path"]): o["md5"] for name, stage in lock.items()
                if name.endswith("@motion") and not name.startswith("track@") for o in stage.get("outs", [])}

    before = outs()
    assert len(before) >= 8
    run = json.loads((repo / "data/motion/track/run.json").read_text())
    out = run_command([sys.executable, "-m", "attnlab.dvcrun", "repro", "--force", "track@motion"], repo, env).stdout
    assert "Running stage 'train@motion'" in out
    assert outs() == before
    assert json.loads((repo / "data/motion/track/run.json").read_text()) == run      # the same state: not logged again


def test_mlflow_run_holds_params_metrics_model_attention(project):
    repo, env, _ = project
    client, runs = mlflow_runs(repo)
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["train.epochs"] == "3" and run.data.params["model.d_model"] == "16"
    metrics = json.loads((repo / "data/motion/train/metrics.json").read_text())
    assert run.data.metrics["final.test_accuracy"] == pytest.approx(metrics["test_accuracy"])
    assert len(client.get_metric_history(run.info.run_id, "test_accuracy")) == 3
    evaluated = json.loads((repo / "data/motion/evaluate/metrics.json").read_text())
    assert run.data.metrics["evaluate.faithfulness.deletion_auc.rollout"] == pytest.approx(
        evaluated["faithfulness"]["deletion_auc"]["rollout"])
    arts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"attention", "explain", "evaluate", "report"} <= arts
    import mlflow.pytorch
    from attnlab.models import EncoderClassifier
    mlflow.set_tracking_uri(f"sqlite:///{repo / 'mlflow.db'}")
    model = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
    assert type(model) is EncoderClassifier
    head = run_command(["git", "rev-parse", "HEAD"], repo, env).stdout.strip()
    assert run.data.tags["git.commit"] == head
    assert run.data.tags["dvc.exp_name"] == "workspace"
    assert {"dvc.lock.prepare", "dvc.lock.train", "dvc.lock.extract"} <= set(run.data.tags)
    recorded = json.loads((repo / "data/motion/track/run.json").read_text())
    assert recorded["run_id"] == run.info.run_id


def test_exp_run_with_changed_param_makes_second_run(project):
    """`dvc exp run -S` with an evaluate param changed: only evaluate, report and track run
    again, and the new state is a second MLflow run (train's metrics in both)."""
    repo, env, _ = project
    out = run_command(["dvc", "exp", "run", "-S", "motion.evaluate.steps=4", "--name", "coarser"], repo, env).stdout
    assert "Running stage 'evaluate@motion'" in out and "Running stage 'train@motion'" not in out
    client, runs = mlflow_runs(repo)
    assert len(runs) == 2
    assert len(mlflow_runs(repo, "tokens")[1]) == 1                   # tokens' state did not change
    by_steps = {r.data.params["evaluate.steps"]: r for r in runs}
    assert set(by_steps) == {"5", "4"}
    assert by_steps["4"].data.tags["dvc.exp_name"] == "coarser"
    assert all("final.test_accuracy" in r.data.metrics for r in runs)
