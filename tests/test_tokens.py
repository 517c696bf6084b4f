"""Token sources and the causal LM, checked against literal loops and recomputations."""
from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attnlab.data.tokens import (BOS, MAX_LINE_CHARS, PAD, UNK, TokenData, Vocab, bach_sequences, file_sequences,
                                 planted_sequences, pydoc_sequences, read_token_lines, train_test_split)
from attnlab.io import DataError
from attnlab.models.causal import CausalTransformerLM, lm_loss, lm_metrics


def rows_as_strings(data: TokenData) -> list[list[str]]:
    return [[data.vocab[int(t)] for t, m in zip(tok, msk) if m] for tok, msk in zip(data.tokens, data.mask)]


# --------------------------------------------------------------------------- vocab
def test_vocab_build_orders_by_count_then_name_and_maps_unknown():
    v = Vocab.build([["b", "a", "c", "b"], ["c", "d", "b"]], min_count=2)
    assert v.itos == [PAD, UNK, BOS, "b", "c"]                  # b:3, c:2; a, d below min_count
    assert v.encode(["c", "zzz", "a"]) == [4, 1, 1]
    assert Vocab.build([["x", "y", "y"]], top_k=1).itos == [PAD, UNK, BOS, "y"]
    with pytest.raises(ValueError, match="specials"):
        Vocab(["a", "b"])


# --------------------------------------------------------------------------- planted
def test_planted_rules_hold_in_every_sequence():
    data = planted_sequences(300, vocab_size=40, length=32, n_rules=8, plants_per_seq=3, seed=3)
    rules = data.meta["rules"]
    trig_of = {r["probe"]: r["trigger"] for r in rules}
    triggers = {r["trigger"] for r in rules}
    yes, no = data.meta["yes"], data.meta["no"]
    assert data.tokens.shape == (300, 32) and data.mask.all()
    assert set(data.true_pairs) == {(r["probe"], r["trigger"]) for r in rules}
    assert len(set(trig_of)) == len(set(triggers)) == 8 and not set(trig_of) & triggers

    n_present = n_probes = 0
    for row, seq in enumerate(rows_as_strings(data)):
        probes_here = 0
        for i, tok in enumerate(seq):
            if tok in trig_of:                                  # a probe: next token is the answer
                probes_here += 1
                n_probes += 1
                present = trig_of[tok] in seq[:i]
                n_present += present
                assert seq[i + 1] == (yes if present else no)
                assert data.rule_mask[row, i + 1]
                key = int(data.true_key[row, i])
                if present:
                    assert seq[key] == trig_of[tok] and key < i
                else:
                    assert key == -1
            elif tok in (yes, no):
                assert seq[i - 1] in trig_of                    # answers only after probes
            else:
                assert not data.rule_mask[row, i]
            if tok in triggers or tok in trig_of:
                assert seq.count(tok) == 1                      # each rule at most once a row
        assert probes_here == 3
        assert int(data.rule_mask[row].sum()) == 3
        assert int((data.true_key[row] >= 0).sum()) == sum(
            trig_of[t] in seq for t in seq if t in trig_of)
    assert 0.35 < n_present / n_probes < 0.65                   # p_present = 0.5


def test_planted_is_deterministic_under_seed():
    a, b = planted_sequences(50, seed=7), planted_sequences(50, seed=7)
    c = planted_sequences(50, seed=8)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.true_key, b.true_key)
    assert a.meta["rules"] == b.meta["rules"] and a.true_pairs == b.true_pairs
    assert not torch.equal(a.tokens, c.tokens)
    with pytest.raises(ValueError, match="vocab_size"):
        planted_sequences(5, vocab_size=10, n_rules=8)


def test_train_test_split_by_group_is_disjoint_and_deterministic():
    data = planted_sequences(100, seed=1)
    tr, te = train_test_split(data, 0.25, seed=0)
    assert len(tr) + len(te) == 100 and len(te) >= 25
    assert not set(tr.group.tolist()) & set(te.group.tolist())
    tr2, te2 = train_test_split(data, 0.25, seed=0)
    assert torch.equal(te.tokens, te2.tokens) and torch.equal(te.rule_mask, te2.rule_mask)
    assert torch.equal(te.tokens, data.tokens[te.group])         # planted: group = row index


# --------------------------------------------------------------------------- file
def test_file_sequences_tokenises_splits_and_maps_unknown(tmp_path):
    path = tmp_path / "seqs.txt"
    path.write_text("a b c\n\n   \nb b a d e f g\nzz\n")
    data = file_sequences(path, max_len=4)
    # counts: b 3, a 2, then c d e f g zz once each (alphabetical)
    assert data.vocab[:5] == [PAD, UNK, BOS, "b", "a"]
    assert rows_as_strings(data) == [["a", "b", "c"], ["b", "b", "a", "d"], ["e", "f", "g"], ["zz"]]
    assert data.group.tolist() == [0, 1, 1, 2]
    assert data.tokens[0].tolist()[3] == 0 and data.mask.sum(1).tolist() == [3, 4, 3, 1]

    rare = file_sequences(path, max_len=8, min_count=2)
    assert rows_as_strings(rare)[1] == ["b", "b", "a", UNK, UNK, UNK, UNK]
    top1 = file_sequences(path, max_len=8, top_k=1)
    assert rows_as_strings(top1)[0] == [UNK, "b", UNK]

    other = tmp_path / "test.txt"
    other.write_text("a q b\n")
    reused = file_sequences(other, vocab=data.vocab, add_bos=True)
    assert rows_as_strings(reused) == [[BOS, "a", UNK, "b"]] and reused.vocab == data.vocab


def test_file_sequences_empty_file_names_the_path(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("\n  \n")
    with pytest.raises(ValueError, match=re.escape(str(path))):
        file_sequences(path)


# --------------------------------------------------------------------------- user token files: clear errors
def test_read_token_lines_reads_utf8_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes("\ufeffa  b\r\n\n\t\nçé ü\nx\n".encode())        # BOM, CRLF, blank lines, no final newline
    assert read_token_lines(path) == [["a", "b"], ["çé", "ü"], ["x"]]
    path.write_bytes(("𝄞" * 10 + "\r\n").encode() + b"a")                 # exactly max_chars 4-byte characters
    assert read_token_lines(path, max_chars=10) == [["𝄞" * 10], ["a"]]
    assert MAX_LINE_CHARS == 100_000


@pytest.mark.parametrize("content, message", [
    (b"a b\nc \xff d\n", "line 2: not UTF-8 (byte 0xff at byte 3 of the line); save the file as UTF-8 text"),
    (b"a\n" + "é".encode("latin-1") + b"\n", "line 2: not UTF-8 (byte 0xe9 at byte 1 of the line); save the "
                                                "file as UTF-8 text"),
    (b"a\n\n" + "é".encode() * 11 + b"\n", "line 3: longer than 10 characters (one sequence per line, tokens "
                                            "separated by whitespace); is this a token file?"),
    (b"a\n" + b"x" * 5000, "line 2: longer than 10 characters (one sequence per line, tokens separated by "
                           "whitespace); is this a token file?"),        # read no further than 42 bytes
    (b"", ": no sequences (the file is empty or holds only blank lines); expected one sequence per line, "
          "tokens separated by whitespace"),
    (b"\n \t\n\r\n", ": no sequences (the file is empty or holds only blank lines); expected one sequence "
                     "per line, tokens separated by whitespace"),
], ids=["bad-byte", "latin-1", "long-line", "long-unterminated", "empty", "blank"])
def test_read_token_lines_errors_name_file_and_line(tmp_path, content, message):
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    with pytest.raises(DataError) as err:
        read_token_lines(path, what="--tokens", max_chars=10)
    sep = "" if message.startswith(":") else ", "
    assert str(err.value) == f"--tokens: {path}{sep}{message}"


def test_read_token_lines_missing_or_not_a_file(tmp_path):
    with pytest.raises(DataError) as err:
        read_token_lines(tmp_path / "nope.txt")
    assert str(err.value) == f"prepare.path: {tmp_path / 'nope.txt'}: no such file"
    with pytest.raises(DataError) as err:
        read_token_lines(tmp_path)
    assert str(err.value) == f"prepare.path: {tmp_path}: is a directory, expected a text file (one sequence per line)"


def test_file_with_only_unknown_tokens_is_refused(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("q r\ns\n")
    with pytest.raises(DataError) as err:
        file_sequences(path, vocab=[PAD, UNK, BOS, "a", "b"])
    assert str(err.value) == (f"prepare.path: {path}: none of its 3 tokens is in the vocabulary (2 tokens, e.g. "
                              "['a', 'b']): every one would be <unk>; is it the data the model was trained on?")


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "no sequences (the file is empty or holds only blank lines); expected one sequence per line, tokens "
          "separated by whitespace"),
    (b"a b\n\nc \xfe\n", "line 3: not UTF-8 (byte 0xfe at byte 3 of the line); save the file as UTF-8 text"),
    (b"a b\n" + b"c " * 50_001 + b"\n", "line 2: longer than 100,000 characters (one sequence per line, tokens "
                                       "separated by whitespace); is this a token file?"),
], ids=["missing", "empty", "non-utf8", "long-line"])
def test_prepare_stage_on_a_bad_token_file_writes_nothing(tmp_path, monkeypatch, capsys, content, message):
    """Through the stages' entry point in a project directory: exit status 2, one line on
    stderr naming the params key, the file and the line, and no output (the stage's
    temporary directory is removed; no MLflow store)."""
    import yaml

    from attnlab import pipeline

    params = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    params["tokens"]["prepare"].update(source="file", path="tokens.txt")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    if content is not None:
        (tmp_path / "tokens.txt").write_bytes(content)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as exit_:
        pipeline.run("prepare", ["tokens"], progress=False)
    assert exit_.value.code == 2
    sep = ", " if message.startswith("line") else ": "
    assert capsys.readouterr().err.splitlines() == [f"error: prepare.path: tokens.txt{sep}{message}"]
    assert list((tmp_path / "data" / "tokens").iterdir()) == []               # no prepare/, no temporary dir
    files = ["data", "params.yaml"] + (["tokens.txt"] if content is not None else [])
    assert sorted(p.name for p in tmp_path.iterdir()) == files


# --------------------------------------------------------------------------- pydoc
def test_pydoc_vocab_and_sequences():
    from pydoc_data.topics import topics

    data = pydoc_sequences(top_k=100, max_len=32)
    assert len(data.vocab) == 100 + 3
    counts = Counter(w for text in topics.values() for w in re.findall(r"[a-z]+", text.lower()))
    assert data.vocab[3] == counts.most_common(1)[0][0]          # "the"
    assert len(data) > 100 and data.mask[:, 0].all()
    assert data.tokens.shape[1] == 32 and (data.tokens[~data.mask] == 0).all()


# --------------------------------------------------------------------------- bach
def test_bach_small_limit_parses_offline(tmp_path, monkeypatch):
    corpus = pytest.importorskip("music21.corpus", reason="music21 is not installed")
    if not corpus.getComposer("bach"):
        pytest.skip("music21's corpus has no Bach chorales")
    cache = tmp_path / "bach.json"
    data = bach_sequences(limit=3, max_len=16, cache=cache, progress=False)
    assert cache.is_file() and len(data.meta["chorales"]) == 3
    pitch = re.compile(r"^[A-G](#{1,2}|-{1,2})?\d$")
    tokens = set(data.vocab[3:])
    assert tokens and all(pitch.match(t) for t in tokens), tokens
    assert "C5" in tokens or "C4" in tokens
    assert sorted(set(data.group.tolist())) == [0, 1, 2]
    def no_parse(*args, **kwargs):
        raise AssertionError("parsed again despite the cache")

    monkeypatch.setattr(corpus, "parse", no_parse)
    again = bach_sequences(limit=3, max_len=16, cache=cache, progress=False)
    assert torch.equal(again.tokens, data.tokens) and again.vocab == data.vocab
    four = bach_sequences(limit=3, max_len=16, voices="all", rests="token", cache=cache, progress=False)
    assert set(four.group.tolist()) == {0, 1, 2} and len(four) > len(data)


# --------------------------------------------------------------------------- causal LM
@pytest.fixture
def lm():
    torch.manual_seed(0)
    return CausalTransformerLM(11, d_model=16, nhead=2, num_layers=2, dim_feedforward=32,
                               dropout=0.0, max_len=12).eval()


@pytest.mark.parametrize("train_mode", [False, True])
def test_logits_do_not_depend_on_later_tokens(lm, train_mode):
    lm.train(train_mode)
    tokens = torch.randint(3, 11, (3, 10), generator=torch.Generator().manual_seed(1))
    base = lm(tokens)
    for i in range(9):
        changed = tokens.clone()
        changed[:, i + 1:] = torch.randint(3, 11, changed[:, i + 1:].shape)
        out = lm(changed)
        assert torch.allclose(out[:, :i + 1], base[:, :i + 1], atol=1e-5)
        assert not torch.allclose(out[:, i + 1:], base[:, i + 1:], atol=1e-5)


def test_padding_is_ignored_and_never_nan(lm):
    tokens = torch.randint(3, 11, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2] = False                                              # a row that is all padding
    logits = lm(tokens, mask)
    assert logits.shape == (3, 8, 11) and torch.isfinite(logits).all()
    alone = lm(tokens[1:2, :5])                                   # the real prefix alone
    assert torch.allclose(logits[1, :5], alone[0], atol=1e-5)
    junk = tokens.clone()
    junk[1, 5:] = 3                                               # pad content does not matter
    assert torch.allclose(lm(junk, mask)[1, :5], logits[1, :5], atol=1e-5)

    lm.train()
    loss = lm_loss(lm(tokens, mask), tokens, mask)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in lm.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="right-padded"):
        lm(tokens, torch.tensor([[False] + [True] * 7] * 3))


def test_lm_loss_and_metrics_ignore_pads():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(3))
    tokens = torch.tensor([[1, 2, 3, 4, 5], [6, 5, 4, 0, 0]])
    mask = tokens != 0
    terms = [F.cross_entropy(logits[b, i], tokens[b, i + 1], reduction="sum")
             for b in range(2) for i in range(4) if mask[b, i] and mask[b, i + 1]]
    expect = torch.stack(terms).mean()
    assert len(terms) == 6
    assert torch.allclose(lm_loss(logits, tokens, mask), expect)
    garbage = logits.clone()
    garbage[1, 2:] = 1e3 * torch.randn(3, 7)                      # logits at/after the last real token
    assert torch.allclose(lm_loss(garbage, tokens, mask), expect)

    m = lm_metrics(logits, tokens, mask)
    hits = [int(logits[b, i].argmax() == tokens[b, i + 1])
            for b in range(2) for i in range(4) if mask[b, i] and mask[b, i + 1]]
    assert m["n_tokens"] == 6 and math.isclose(m["accuracy"], sum(hits) / 6)
    assert math.isclose(m["perplexity"], math.exp(expect.item()), rel_tol=1e-5)
    only = torch.zeros_like(mask)
    only[0, 3] = True                                             # score tokens[0, 3] only
    m1 = lm_metrics(logits, tokens, mask, target_mask=only)
    assert m1["n_tokens"] == 1
    assert math.isclose(m1["loss"], F.cross_entropy(logits[0, 2], tokens[0, 3]).item(), rel_tol=1e-5)


def test_recall_at_k_counts_true_pairs_among_ranked_pairs():
    import pandas as pd

    from attnlab.experiments.tokens import recall_at_k

    top = pd.DataFrame({"query_token": ["b1", "x", "b2"], "key_token": ["a1", "y", "a9"]})
    assert recall_at_k(top, [("b1", "a1"), ("b2", "a2")]) == 0.5
    assert recall_at_k(top, [["b1", "a1"]]) == 1.0                # pairs read back from JSON are lists


def _faithfulness(model, d, vocab, cfg):
    """The tokens experiment's explain and evaluate steps on one batch: every method's
    importance of the explained predictions, later tokens ranked last, and the curves."""
    from attnlab.attribution import explain_batch
    from attnlab.evaluate import random_importance
    from attnlab.evaluate.summaries import perturbation_curves
    from attnlab.experiments import get_experiment

    exp = get_experiment("tokens")
    ex = exp.explained(cfg, d, {"vocab": vocab})
    imp, batch = explain_batch(cfg.explain.methods, model, ex.x, ex.items, cfg.explain,
                               forward=lambda m, xb: ex.forward(m, xb, slice(None)))
    imp["random"] = random_importance((len(ex), ex.items.n_items), 0).float()
    imp = {m: v.masked_fill(~ex.valid, -1.0) for m, v in imp.items()}
    pert = exp.perturbation(cfg, model, d, {"vocab": vocab}, ex)
    aucs, curves = perturbation_curves(pert.fn, pert.x, imp, pert.masker, target=batch.target, steps=None,
                                       batch_size=cfg.evaluate.batch_size, forward_kwargs=pert.forward_kwargs)
    return ex, aucs, curves


def test_explained_positions_and_faithfulness_of_a_causal_lm():
    """One next-token prediction per planted test sequence: the first probe whose trigger
    is present, with the trigger as evidence (literal loop); the curves track the
    model's own prediction there, and later tokens never count."""
    from attnlab.config import TokensParams
    from attnlab.experiments.tokens import explained_positions, next_token_logits

    data = planted_sequences(40, length=16, n_rules=8, plants_per_seq=2, seed=5)
    d = {"tokens_test": data.tokens, "mask_test": data.mask, "true_key_test": data.true_key}
    rows, position, evidence = explained_positions(d)
    expected = [(r, next(q for q in range(16) if data.true_key[r, q] >= 0))
                for r in range(40) if (data.true_key[r] >= 0).any()]
    assert [(int(r), int(q)) for r, q in zip(rows, position)] == expected
    for i, (r, q) in enumerate(expected):
        assert evidence[i].nonzero().flatten().tolist() == [int(data.true_key[r, q])]

    torch.manual_seed(0)
    model = CausalTransformerLM(len(data.vocab), max_len=16, d_model=16, nhead=2, num_layers=2,
                                dim_feedforward=32).eval()
    cfg = TokensParams.model_validate({"evaluate": {"steps": None}})
    ex, aucs, curves = _faithfulness(model, d, data.vocab, cfg)
    assert len(ex) == len(expected)
    assert set(aucs["deletion_auc"]) == {"raw", "received", "rollout", "grad_rollout", "flow", "random"}
    # the curve starts at the model's own probability of its prediction at the position
    with torch.no_grad():
        p = next_token_logits(model, data.tokens[rows], position, data.mask[rows]).softmax(-1).amax(-1)
    assert curves["deletion"]["raw"][0] == pytest.approx(float(p.mean()), rel=1e-5)
    # later tokens are ranked last: once the first max(position) + 1 are gone, the
    # rest of the curve is flat (removing tokens after the position changes nothing)
    assert curves["deletion"].shape[0] == 17
    first = int(position.max()) + 1
    assert first < 16
    for method in ("raw", "received", "random"):
        values = curves["deletion"][method].to_numpy()
        np.testing.assert_allclose(values[first:], values[first], atol=1e-12)


def test_evidence_gradients_per_layer_match_a_literal_loop():
    """The per-layer diagnostic behind grad_rollout's score: the explained row's attention
    and gradient at the trigger vs the mean over the other allowed keys, per sequence."""
    from attnlab.attribution import record_target
    from attnlab.config import TokensParams
    from attnlab.experiments import get_experiment
    from attnlab.experiments.tokens import evidence_per_layer, explained_positions, next_token_logits

    data = planted_sequences(30, length=12, n_rules=8, plants_per_seq=2, seed=3)
    d = {"tokens_test": data.tokens, "mask_test": data.mask, "true_key_test": data.true_key}
    torch.manual_seed(1)
    model = CausalTransformerLM(len(data.vocab), max_len=12, d_model=16, nhead=2, num_layers=2,
                                dim_feedforward=32).eval()
    cfg = TokensParams.model_validate({"explain": {"batch_size": 7}})   # several batches
    per_layer = evidence_per_layer(cfg, model, get_experiment("tokens").explained(cfg, d, {"vocab": data.vocab}))

    rows, position, evidence = explained_positions(d)
    atts, grads, _ = record_target(model, data.tokens[rows],
                                   forward=lambda m, x: next_token_logits(m, x, position, data.mask[rows]))
    assert len(per_layer) == len(atts) == 2
    for layer in range(2):
        sums = dict.fromkeys(per_layer[str(layer)], 0.0)
        for i in range(len(rows)):
            p, trig = int(position[i]), int(evidence[i].nonzero())
            others = [j for j in range(p + 1) if j != trig]
            a = atts[layer][i].double()[:, p]          # [H, L]: each head's explained row
            g = grads[layer][i].double()[:, p]
            n_heads = a.shape[0]
            edge = [sum(max(float(a[h, j] * g[h, j]), 0.0) for h in range(n_heads)) / n_heads
                    for j in range(a.shape[1])]
            for name, per_key in (("attention", a.mean(0).tolist()), ("gradient", g.mean(0).tolist()),
                                  ("edge", edge)):
                sums[f"{name}_at_evidence"] += per_key[trig]
                sums[f"{name}_at_others"] += sum(per_key[j] for j in others) / len(others)
            sums["dropped_at_evidence"] += sum(float(a[h, trig] * g[h, trig]) <= 0
                                               for h in range(n_heads)) / n_heads
        for key, total in sums.items():
            assert per_layer[str(layer)][key] == pytest.approx(total / len(rows), rel=1e-6, abs=1e-9), (layer, key)
    assert set(per_layer["0"]) == {"attention_at_evidence", "attention_at_others", "gradient_at_evidence",
                                   "gradient_at_others", "edge_at_evidence", "edge_at_others",
                                   "dropped_at_evidence"}
