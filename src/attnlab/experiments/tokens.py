"""``tokens``: next-token prediction with a causal TransformerEncoder, and the
vocabulary x vocabulary attention of the whole test set (``VocabAttention``).

Stages: prepare (one of the sources of :mod:`attnlab.data.tokens`), train (perplexity,
accuracy), extract (every layer's per-head attention, causal + padding masks),
aggregate (``VocabAttention`` over the stored attention: sum/count/expected/mean/lift
per layer and head, the long table, top pairs), explain (every method's importance of
the tokens behind one next-token prediction per test sequence), evaluate
(deletion/insertion, evidence AUROC and recall@K of the planted pairs, head
diagnostics), report, track.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, model_validator

from attnlab.experiments.base import Experiment, Explained, Perturbation, Prepared
from attnlab.schema import (Aggregate, Evaluate, Extract, HeadsDivideWidth, Knockout, Report, Section, TokensExplain,
                            Train, aggregate_fits_store)

if TYPE_CHECKING:
    import pandas as pd
    import torch

FACTORY = "attnlab.models.causal:CausalTransformerLM"


# --------------------------------------------------------------------------- params
class TokensPrepare(Section):
    source: Literal["planted", "bach", "pydoc", "file"] = "planted"
    path: str | None = None                    # file: one sequence per line, whitespace-separated tokens
    max_len: int = Field(32, gt=1)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    seed: int = 0
    n: int = Field(6000, gt=0)                 # planted: number of sequences
    vocab_size: int = Field(40, gt=3)          # planted: tokens including the 3 specials
    n_rules: int = Field(8, gt=0)              # planted: trigger -> probe rules
    top_k: int = Field(500, gt=0)              # pydoc / file: keep the most frequent words
    voices: Literal["soprano", "all"] = "soprano"   # bach
    limit: int | None = Field(None, gt=0)      # bach: parse only this many chorales

    @model_validator(mode="after")
    def _file_needs_path(self) -> "TokensPrepare":
        if self.source == "file" and not self.path:
            raise ValueError("source 'file' needs 'path' (a text file, one sequence per line)")
        return self


class CausalModel(HeadsDivideWidth):
    d_model: int = Field(64, gt=0)
    nhead: int = Field(4, gt=0)
    num_layers: int = Field(2, gt=0)
    dim_feedforward: int = Field(128, gt=0)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    positional: Literal["learned", "sinusoidal"] = "learned"
    norm_first: bool = False


class TokensEvaluate(Evaluate):
    steps: int | None = Field(9, gt=1)         # points on the curves (None: one per token)
    batch_size: int = Field(256, gt=0)
    knockout: Knockout = Knockout()            # does the attention the explanation points at carry the prediction?


class TokensReport(Report):
    examples: int = Field(2, gt=0)
    heatmap_tokens: int = Field(30, gt=1)      # most frequent tokens in the clustered heatmap


class TokensParams(Section):
    prepare: TokensPrepare = TokensPrepare()
    model: CausalModel = CausalModel()
    train: Train = Train()
    extract: Extract = Extract()
    aggregate: Aggregate = Aggregate()
    explain: TokensExplain = TokensExplain()
    evaluate: TokensEvaluate = TokensEvaluate()
    report: TokensReport = TokensReport()

    @model_validator(mode="after")
    def _store_holds_aggregation(self) -> "TokensParams":
        aggregate_fits_store(self.aggregate, self.extract)
        # the report shows the head diagnostics, which take whole maps of every head
        self.extract.selection().require("evaluate (its head diagnostics, in the report)", layers=None, rows="all",
                                        heads="all")
        return self


# --------------------------------------------------------------------------- the kind
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
    import torch

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
    weight 0 there (``∇A ⊙ A <= 0``). Computed on the attention's device."""
    import torch

    device = atts[0].device
    position, evidence = position.to(device), evidence.to(device)
    rows = torch.arange(len(position), device=device)
    key = torch.arange(evidence.shape[1], device=device)[None, :]
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
    """The logits ``[B, V]`` of the next token at ``position [B]`` of each sequence (on the
    device of ``tokens``, where ``mask`` and ``position`` are moved)."""
    import torch

    logits = model(tokens, mask.to(tokens.device))
    return logits[torch.arange(len(tokens), device=logits.device), position.to(logits.device)]


class TokensExperiment(Experiment):
    name = "tokens"
    params = TokensParams
    order = 20
    item_name = "token"
    report_kind = "tokens"

    def write_report(self, cfg: Any, lay: Any) -> Any:
        from attnlab.report.tokens import write_tokens_report

        return write_tokens_report(self, cfg, lay)

    def prepare(self, cfg: TokensParams) -> Prepared:
        from attnlab.data.tokens import train_test_split

        data = load_source(cfg)
        train, test = train_test_split(data, cfg.prepare.test_fraction, cfg.prepare.seed)
        arrays = {"tokens_train": train.tokens, "mask_train": train.mask,
                  "tokens_test": test.tokens, "mask_test": test.mask}
        if test.rule_mask is not None:
            arrays |= {"rule_mask_test": test.rule_mask, "true_key_test": test.true_key}
        return Prepared({k: v.numpy() for k, v in arrays.items()}, {
            "source": cfg.prepare.source, "vocab": data.vocab, "n_train": len(train), "n_test": len(test),
            "n_items": data.tokens.shape[1], "true_pairs": [list(p) for p in data.true_pairs or []],
            "source_meta": data.meta})

    def model_spec(self, cfg: TokensParams, meta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return FACTORY, {"vocab_size": len(meta["vocab"]), "max_len": meta["n_items"], **cfg.model.model_dump()}

    def forward(self, model, batch):
        tokens, mask = batch
        return model(tokens, mask)

    def fit(self, cfg, model, data, *, progress=False):
        from attnlab.training import fit_lm

        history = fit_lm(model, (data["tokens_train"], data["mask_train"]), (data["tokens_test"], data["mask_test"]),
                         cfg.train, test_target_mask=data.get("rule_mask_test"), progress=progress)
        final = history.iloc[-1]
        return history, {k: float(final[k]) for k in history.columns if k != "epoch"} | {"epochs": int(final["epoch"])}

    def test_inputs(self, data):
        return data["tokens_test"], data["mask_test"]

    def explained(self, cfg, data, meta):
        """One next-token prediction per test sequence (:func:`explained_positions`); only
        the tokens at or before its position can matter to a causal model."""
        import torch

        from attnlab.items import SequenceItems

        rows, position, evidence = explained_positions(data)
        tokens, mask = data["tokens_test"][rows], data["mask_test"][rows]
        later = torch.arange(tokens.shape[1])[None, :] > position[:, None]
        return Explained(x=tokens, items=SequenceItems(tokens.shape[1], how=position, token_ids=True),
                         forward=lambda model, xb, sl: next_token_logits(model, xb, position[sl], mask[sl]),
                         evidence=evidence, valid=~later,
                         saved={"rows": rows.numpy(), "position": position.numpy()})

    def perturbation(self, cfg, model, data, meta, explained):
        """A removed token becomes ``<unk>``."""
        from attnlab.data.tokens import UNK
        import torch

        from attnlab.evaluate import sequence_masker

        rows = torch.from_numpy(explained.saved["rows"])
        return Perturbation(lambda x, position, mask: next_token_logits(model, x, position, mask), explained.x,
                            sequence_masker(meta["vocab"].index(UNK)),
                            forward_kwargs={"position": explained.items.how, "mask": data["mask_test"][rows]})

    def head_masks(self, cfg, data):
        return True, data["mask_test"]

    def ground_truth(self, cfg, lay, model, data, meta, explained):
        """On planted data: recall@K of the planted pairs among the aggregate's top pairs
        (head mean and per head), and per layer the attention and gradient at the trigger
        (:func:`evidence_gradients`)."""
        if not meta["true_pairs"]:
            return {}
        return {"planted": planted_recall(cfg, lay, meta),
                "evidence": {"per_layer": evidence_per_layer(cfg, model, explained)}}


def planted_recall(cfg: TokensParams, lay: Any, meta: dict[str, Any]) -> dict[str, Any]:
    import attnlab.io as io
    from attnlab.aggregate import VocabAttention

    a, itos, true = cfg.aggregate, meta["vocab"], meta["true_pairs"]
    view = io.read_json(lay.aggregate_summary)["headline"]
    top = VocabAttention.load(lay.vocab(view)).top_pairs(a.top_k, min_count=a.min_count, itos=itos)
    out: dict[str, Any] = {"recall_at_k": recall_at_k(top, true), "k": a.top_k, "n_true_pairs": len(true)}
    if lay.vocab(view, kind="head_matrices").exists():
        heads = VocabAttention.load(lay.vocab(view, kind="head_matrices"))
        per_head = [recall_at_k(heads.top_pairs(a.top_k, min_count=a.min_count, itos=itos, head=h), true)
                    for h in range(heads.nhead)]
        out["recall_at_k_per_head"] = {str(h): r for h, r in enumerate(per_head)}
        out["recall_at_k_best_head"] = max(per_head)
    return out


def evidence_per_layer(cfg: TokensParams, model: torch.nn.Module, explained: Explained) -> dict[str, dict[str, float]]:
    """:func:`evidence_gradients` over the explained sequences, in explain's batches: means
    per layer."""
    from attnlab.attribution import record_target

    sums = []
    for i in range(0, len(explained), cfg.explain.batch_size):
        sl = slice(i, i + cfg.explain.batch_size)
        atts, grads, _ = record_target(model, explained.x[sl],
                                       forward=lambda m, xb, sl=sl: explained.forward(m, xb, sl))
        sums.append(evidence_gradients(atts, grads, explained.items.how[sl], explained.evidence[sl]))
    return {str(layer): {k: sum(batch[layer][k] for batch in sums) / len(explained) for k in sums[0][layer]}
            for layer in range(len(sums[0]))}
