"""``tokens``: next-token prediction with a causal TransformerEncoder, and the
vocabulary x vocabulary attention of the whole test set (``VocabAttention``).

Stages: prepare (one of the sources of :mod:`attnlab.data.tokens`), train (perplexity,
accuracy), extract (every layer's per-head attention, causal + padding masks),
explain (``VocabAttention`` over the test set from a chosen layer, the mean of the
layers or the rollout: sum/count/expected/mean/lift, the long table, top pairs,
clustered heatmap), evaluate (recall@K of the planted pairs, head diagnostics),
report, track.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch

from attnlab import io
from attnlab.config import TokensParams
from attnlab.experiments.base import ClassifierExperiment
from attnlab.models import load_checkpoint, save_checkpoint

FACTORY = "attnlab.models.causal:CausalTransformerLM"


def load_source(cfg: TokensParams):
    from attnlab.data import tokens as src

    p = cfg.prepare
    if p.source == "planted":
        return src.planted_sequences(p.n, vocab_size=p.vocab_size, length=p.max_len, n_rules=p.n_rules, seed=p.seed)
    if p.source == "bach":
        return src.bach_sequences(voices=p.voices, max_len=p.max_len, limit=p.limit, progress=False)
    if p.source == "pydoc":
        return src.pydoc_sequences(top_k=p.top_k, max_len=p.max_len)
    return src.file_sequences(p.path, max_len=p.max_len, top_k=p.top_k)


def recall_at_k(top: pd.DataFrame, true_pairs: list[tuple[str, str]]) -> float:
    """Share of the true (query, key) token pairs found among the ranked pairs ``top``."""
    found = set(zip(top["query_token"], top["key_token"]))
    return sum(tuple(p) in found for p in true_pairs) / max(len(true_pairs), 1)


def explained_positions(data: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Which next-token prediction of each test sequence the faithfulness test explains:
    ``(rows [M], position [M], evidence [M, L] | None)``. Planted data: the first probe
    whose trigger is present (its answer is the prediction at the probe), with the
    trigger's position as evidence; otherwise the last real token of every sequence of
    at least two tokens."""
    tokens, mask = data["tokens_test"], data["mask_test"]
    if "true_key_test" in data:
        key = data["true_key_test"]
        rows = (key >= 0).any(1).nonzero().squeeze(1)
        position = (key[rows] >= 0).int().argmax(1)
        evidence = torch.zeros(len(rows), tokens.shape[1], dtype=torch.bool)
        evidence[torch.arange(len(rows)), key[rows, position]] = True
        return rows, position, evidence
    length = mask.sum(1)
    rows = (length >= 2).nonzero().squeeze(1)
    return rows, length[rows] - 1, None


def evidence_gradients(atts: list[torch.Tensor], grads: list[torch.Tensor], position: torch.Tensor,
                       evidence: torch.Tensor) -> list[dict[str, float]]:
    """Per layer, summed over the sequences (divide by their number for means), in the
    explained row: the attention weight and its gradient (heads averaged), and
    grad_rollout's edge weight ``mean_h(max(∇A ⊙ A, 0))``, at the evidence key and,
    averaged, at the other keys at or before the explained position; and
    ``dropped_at_evidence``, the share of heads whose edge to the evidence key gets
    weight 0 there (``∇A ⊙ A <= 0``)."""
    rows = torch.arange(len(position))
    key = torch.arange(evidence.shape[1])[None, :]
    others = (key <= position[:, None]) & ~evidence
    n_others = others.sum(1).clamp_min(1)
    out = []
    for a, g in zip(atts, grads):
        a, g = (t.double() if t.dim() == 4 else t.double()[:, None] for t in (a, g))     # [M, H, L, L]
        a_hl, g_hl = a[rows, :, position], g[rows, :, position]                           # [M, H, L]
        edge_hl = (a_hl * g_hl).clamp_min(0)
        sums = {}
        for name, value_l in (("attention", a_hl.mean(1)), ("gradient", g_hl.mean(1)), ("edge", edge_hl.mean(1))):
            sums[f"{name}_at_evidence"] = float((value_l * evidence).sum())
            sums[f"{name}_at_others"] = float(((value_l * others).sum(1) / n_others).sum())
        dropped_h = ((a_hl * g_hl) <= 0) & evidence[:, None, :]
        sums["dropped_at_evidence"] = float(dropped_h.any(-1).double().mean(1).sum())
        out.append(sums)
    return out


def next_token_logits(model: torch.nn.Module, tokens: torch.Tensor, position: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """The logits ``[B, V]`` of the next token at ``position [B]`` of each sequence."""
    return model(tokens, mask)[torch.arange(len(tokens)), position]


def faithfulness(model: torch.nn.Module, data: dict[str, torch.Tensor], vocab: list[str], cfg: Any,
                 ) -> tuple[dict[str, Any], dict[str, pd.DataFrame]]:
    """Deletion/insertion AUC (and, on planted data, evidence AUROC and pointing game)
    of each attention method's importance for one next-token prediction per sequence.

    Only the tokens at or before the explained position can matter to a causal model;
    every method (the random baseline too) ranks later positions last. A removed token
    becomes ``<unk>``."""
    from attnlab.attribution import importance_from_records, record_target
    from attnlab.data.tokens import UNK
    from attnlab.evaluate import evidence_auroc, pointing_game, random_importance, sequence_masker
    from attnlab.experiments.evaluation import perturbation_curves

    ev = cfg.evaluate
    rows, position, evidence = explained_positions(data)
    tokens, mask = data["tokens_test"][rows], data["mask_test"][rows]
    n_items = tokens.shape[1]
    parts: dict[str, list[torch.Tensor]] = {m: [] for m in ev.methods}
    targets, layer_sums = [], []
    for i in range(0, len(rows), ev.batch_size):
        sl = slice(i, i + ev.batch_size)
        fwd = lambda m, x, sl=sl: next_token_logits(m, x, position[sl], mask[sl])  # noqa: E731
        atts, grads, target = record_target(model, tokens[sl], forward=fwd,
                                            keep_grad="grad_rollout" in ev.methods or evidence is not None)
        imp = importance_from_records(atts, grads, n_items=n_items, methods=ev.methods, how=position[sl])
        for m in ev.methods:
            parts[m].append(imp[m])
        targets.append(target)
        if evidence is not None:
            layer_sums.append(evidence_gradients(atts, grads, position[sl], evidence[sl]))
    importance = {m: torch.cat(v) for m, v in parts.items()}
    importance["random"] = random_importance((len(rows), n_items), ev.seed).float()
    later = torch.arange(n_items)[None, :] > position[:, None]
    importance = {m: v.masked_fill(later, -1.0) for m, v in importance.items()}
    aucs, curves = perturbation_curves(
        lambda x, position, mask: next_token_logits(model, x, position, mask), tokens, importance,
        sequence_masker(vocab.index(UNK)), target=torch.cat(targets), steps=ev.steps,
        batch_size=4 * ev.batch_size, forward_kwargs={"position": position, "mask": mask})
    metrics: dict[str, Any] = {"n_explained": len(rows), **aucs}
    if evidence is not None:
        metrics["evidence"] = {
            "auroc": {m: float(evidence_auroc(imp, evidence, valid=~later).mean) for m, imp in importance.items()},
            "pointing_game": {m: float(pointing_game(imp, evidence, valid=~later)) for m, imp in importance.items()},
            # Means over the explained sequences.
            "per_layer": {str(layer): {k: sum(batch[layer][k] for batch in layer_sums) / len(rows)
                                       for k in layer_sums[0][layer]} for layer in range(len(layer_sums[0]))}}
    return metrics, curves


class TokensExperiment(ClassifierExperiment):
    name = "tokens"
    item_name = "token"

    def prepare(self, cfg: TokensParams, out: Path) -> None:
        from attnlab.data.tokens import train_test_split

        data = load_source(cfg)
        train, test = train_test_split(data, cfg.prepare.test_fraction, cfg.prepare.seed)
        arrays = {"tokens_train": train.tokens, "mask_train": train.mask,
                  "tokens_test": test.tokens, "mask_test": test.mask}
        if test.rule_mask is not None:
            arrays |= {"rule_mask_test": test.rule_mask, "true_key_test": test.true_key}
        io.save_arrays(out / "dataset.npz", **{k: v.numpy() for k, v in arrays.items()})
        io.write_json(out / "meta.json", {
            "source": cfg.prepare.source, "vocab": data.vocab, "n_train": len(train), "n_test": len(test),
            "n_items": data.tokens.shape[1], "true_pairs": [list(p) for p in data.true_pairs or []],
            "source_meta": data.meta})

    def model_spec(self, cfg: TokensParams, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return FACTORY, {"vocab_size": len(meta["vocab"]), "max_len": meta["n_items"], **cfg.model.model_dump()}

    def forward(self, model, batch):
        tokens, mask = batch
        return model(tokens, mask)

    def train(self, cfg: TokensParams, prepared: Path, out: Path, *, progress: bool = False) -> None:
        from attnlab.models import build_model
        from attnlab.training import fit_lm

        data, meta = self.load_dataset(prepared)
        factory, kwargs = self.model_spec(cfg, meta)
        torch.manual_seed(cfg.train.seed)
        model = build_model(factory, kwargs)
        history = fit_lm(model, (data["tokens_train"], data["mask_train"]), (data["tokens_test"], data["mask_test"]),
                         cfg.train, test_target_mask=data.get("rule_mask_test"), progress=progress)
        save_checkpoint(out / "model.pt", model, factory, kwargs)
        history.to_csv(out / "history.csv", index=False)
        final = history.iloc[-1]
        io.write_json(out / "metrics.json", {k: float(final[k]) for k in history.columns if k != "epoch"}
                      | {"epochs": int(final["epoch"])})

    def _batches(self, data: dict[str, torch.Tensor], batch_size: int):
        tokens, mask = data["tokens_test"], data["mask_test"]
        return ((tokens[i:i + batch_size], mask[i:i + batch_size]) for i in range(0, len(tokens), batch_size))

    def extract(self, cfg: TokensParams, prepared: Path, trained: Path, out: Path, *, progress: bool = False) -> None:
        from attnlab.store import extract_attention

        data, _ = self.load_dataset(prepared)
        model = load_checkpoint(trained / "model.pt")
        extract_attention(model, self._batches(data, cfg.extract.batch_size), out / "attention.h5", progress=progress)

    def explain(self, cfg: TokensParams, prepared: Path, trained: Path, out: Path, *, progress: bool = False) -> None:
        """VocabAttention over the test set, streamed from the extracted attention."""
        from attnlab.aggregate import VocabAttention
        from attnlab.explain import rollout
        from attnlab.report import figures
        from attnlab.report.html import save_figure
        from attnlab.store import AttentionReader

        e = cfg.explain
        data, meta = self.load_dataset(prepared)
        itos = meta["vocab"]
        tokens, mask = data["tokens_test"], data["mask_test"]
        agg, heads = VocabAttention(len(itos)), None
        with AttentionReader(out.parent / "extract" / "attention.h5") as reader:
            n_layers = len(reader.names)
            if not -n_layers <= e.layer < n_layers:
                raise ValueError(f"explain.layer={e.layer}: the model has {n_layers} layers")
            start = 0
            for batch in reader.batches(e.batch_size):
                stop = start + batch[0].shape[0]
                t, m = tokens[start:stop], mask[start:stop]
                if e.attention == "layer":
                    att = batch[e.layer]                               # [B, H, N, N]
                elif e.attention == "mean":
                    att = torch.stack(batch).mean(0)
                else:
                    att = rollout(batch, padding_mask=~m)              # [B, N, N]
                agg.update(t, att, mask=m, causal=True)
                if e.per_head and att.ndim == 4:
                    heads = heads or VocabAttention(len(itos), n_heads=att.shape[1])
                    heads.update(t, att, mask=m, causal=True)
                start = stop
        agg.save(out / "vocab.npz")
        agg.to_frame(itos).to_csv(out / "pairs.csv.gz", index=False, float_format="%.6g",
                                  compression={"method": "gzip", "mtime": 0})   # reproducible bytes
        agg.top_pairs(e.top_k, min_count=e.min_count, itos=itos).to_csv(out / "top_pairs.csv", index=False)
        if heads is not None:
            heads.save(out / "vocab_heads.npz")
            per_head = pd.concat([heads.top_pairs(e.top_k, min_count=e.min_count, itos=itos, head=h).assign(head=h)
                                  for h in range(heads.sum.shape[0])])
            per_head.to_csv(out / "top_pairs_per_head.csv", index=False)
        (out / "figures").mkdir()
        save_figure(figures.vocab_clustermap(agg, itos, e.heatmap_tokens, min_count=e.min_count),
                    out / "figures" / "vocab_lift.png")

    def evaluate(self, cfg: TokensParams, root: Path, out: Path, *, progress: bool = False) -> None:
        from attnlab.aggregate import VocabAttention
        from attnlab.experiments.evaluation import head_summary, head_table, write_curves
        from attnlab.report import figures
        from attnlab.report.html import save_figure
        from attnlab.store import AttentionReader

        e, meta = cfg.explain, io.read_json(root / "prepare" / "meta.json")
        metrics: dict[str, Any] = {"n_sequences": meta["n_test"]}
        if meta["true_pairs"]:
            itos = meta["vocab"]
            agg = VocabAttention.load(root / "explain" / "vocab.npz")
            top = agg.top_pairs(e.top_k, min_count=e.min_count, itos=itos)
            metrics["planted"] = {"recall_at_k": recall_at_k(top, meta["true_pairs"]), "k": e.top_k,
                                  "n_true_pairs": len(meta["true_pairs"])}
            if (root / "explain" / "vocab_heads.npz").exists():
                heads = VocabAttention.load(root / "explain" / "vocab_heads.npz")
                per_head = [recall_at_k(heads.top_pairs(e.top_k, min_count=e.min_count, itos=itos, head=h),
                                        meta["true_pairs"]) for h in range(heads.sum.shape[0])]
                metrics["planted"]["recall_at_k_per_head"] = {str(h): r for h, r in enumerate(per_head)}
                metrics["planted"]["recall_at_k_best_head"] = max(per_head)
        data, _ = self.load_dataset(root / "prepare")
        model = load_checkpoint(root / "train" / "model.pt")
        faith, curves = faithfulness(model, data, meta["vocab"], cfg)
        metrics["faithfulness"] = {k: faith.pop(k) for k in ("deletion_auc", "insertion_auc")}
        metrics |= faith
        with AttentionReader(root / "extract" / "attention.h5") as reader:
            heads = head_table(reader, k=cfg.evaluate.sink_k, batch_size=cfg.evaluate.batch_size,
                               causal=True, padding=~data["mask_test"])
        res = out / "results"
        (res / "figures").mkdir(parents=True)
        write_curves(curves, res)
        heads.to_csv(res / "heads.csv", index=False, float_format="%.6g")
        metrics["heads"] = head_summary(heads)
        io.write_json(out / "metrics.json", metrics)
        save_figure(figures.head_heatmaps(heads, ["entropy", "sink", "locality_norm"]), res / "figures" / "heads.png")

    def report(self, cfg: TokensParams, root: Path, out: Path) -> None:
        from attnlab.report.tokens import write_tokens_report

        write_tokens_report(self, cfg, root, out)
