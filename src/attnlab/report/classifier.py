"""The report of a sequence-classification experiment (``motion`` and friends)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from attnlab import io
from attnlab.layout import Layout
from attnlab.report import figures
from attnlab.report.html import HtmlReport


def methods_paragraph(methods: list[str], item: str) -> str:
    """One sentence per method, from the method registry."""
    from attnlab.methods import get

    return "; ".join(f"{m} = {get(m).summary}" for m in methods) + f"; random = {item}s ranked at random."


def write_classifier_report(experiment: Any, cfg: Any, lay: Layout) -> Path:
    from attnlab.store import AttentionReader

    meta = io.read_json(lay.meta)
    preds = io.load_arrays(lay.predictions)
    classes, item, n_items = meta["classes"], experiment.item_name, meta["n_items"]
    reference = experiment.model_reference(cfg, lay)

    rep = HtmlReport(f"attnlab — {lay.root.name}" + (f" ({experiment.name})" if experiment.name != lay.root.name else ""))
    split = f"{meta['n_train']} training, " if "n_train" in meta else ""
    rep.paragraph(f"Data: {meta['source']} ({split}{meta['n_test']} test sequences, "
                  f"{n_items} {item}s each, classes: {', '.join(classes)}).")
    if reference:                              # a model trained elsewhere
        rep.heading("Model")
        rep.paragraph(f"Built by {reference['factory']} with {reference['kwargs'] or 'no arguments'}; weights: "
                      f"{reference['weights'] or 'as built'}" +
                      (f" (SHA-256 {reference['weights_sha256']})" if reference["weights"] else "") +
                      (f". Accuracy on these inputs: {float((preds['pred'] == preds['y']).mean()):.3f}." if "y" in preds
                       else ". No labels were given: the predicted class is explained."))
    else:
        rep.heading("Training")
        rep.table(pd.DataFrame([{"metric": k, "value": v} for k, v in io.read_json(lay.train_metrics).items()]))
        rep.figure(figures.training_curves(pd.read_csv(lay.history)), "training_curves", "Loss and accuracy per epoch.")

    labels = preds["y"] if "y" in preds else preds["pred"]      # attnlab explain without --labels: by prediction
    examples = figures.pick_examples(labels, cfg.report.examples)
    with AttentionReader(lay.attention) as reader:
        names = list(reader.names)
        samples = {i: [a.numpy() for a in reader.sample(i)] for i in examples}

    rep.heading("Attention per layer and head")
    rep.paragraph("Softmax probabilities before dropout, recorded from every attention call "
                  "(rows: layers, columns: heads; bright = high). Vertical stripes mean every query "
                  f"attends to the same {item}s. Factorised attention (one map per frame or per patch) "
                  "shows its first map.")
    for i in examples:
        label = (f"sample {i}: true {classes[preds['y'][i]]}, " if "y" in preds else f"sample {i}: ") + \
            f"predicted {classes[preds['pred'][i]]}"
        maps = [m[0] if m.ndim == 4 else m for m in samples[i]]
        for shape in dict.fromkeys(m.shape for m in maps):        # entries of one shape share a grid
            group = [k for k, m in enumerate(maps) if m.shape == shape]
            pages = figures.head_grid_pages(np.stack([maps[k] for k in group]), [names[k] for k in group],
                                            label, item)
            for p, fig in enumerate(pages):
                rep.figure(fig, f"heads_sample{i}_{shape[-1]}" + (f"_{p}" if p else ""),
                           f"{label}: attention probabilities, query {item}s (rows) x key {item}s (columns)"
                           + (f", page {p + 1} of {len(pages)}" if len(pages) > 1 else "") + ".")

    explained = io.load_arrays(lay.importance)
    methods = list(cfg.explain.methods)
    rep.heading(f"Which {item}s the model looks at")
    rep.paragraph(f"Importance of each {item} for the predicted class, by method: "
                  f"{methods_paragraph(methods, item)} Mean ± one standard deviation over the test samples of "
                  f"each class; the dotted line is uniform importance (1/{n_items}).")
    by = explained["y"] if "y" in explained else explained["target"]    # no labels: by predicted class
    rep.figure(figures.importance_by_class({m: explained[m] for m in methods}, by, classes, item),
               "importance_by_class", "Per-class importance of every method (test set).")
    for png in sorted(lay.explain_figures.glob("*.png"), key=lambda p: int(p.stem[6:])):
        rep.image(png.read_bytes(), f"explain_{png.stem}", f"{png.stem}: every method's importance "
                  f"(each band scaled to its maximum).")
    aggregated = io.read_json(lay.aggregate_summary)
    if aggregated["vocabulary"]:
        view = aggregated["headline"]
        rep.heading(f"Which token attends to which ({view})")
        rep.paragraph("Token pairs (query token, key token) ranked by lift: the attention between them over all "
                      "test sequences divided by what their frequencies alone would give.")
        rep.table(pd.read_csv(lay.vocab(view, kind="top_pairs")))
    add_evaluation(rep, lay, item)
    return rep.write(lay.dir("report"))


def _interval(ci: dict[str, Any] | None, method: str) -> str:
    c = (ci or {}).get(method)
    return f"[{c['lo']:.3f}, {c['hi']:.3f}]" if c and c["lo"] == c["lo"] else "–"


def _p_value(tests: dict[str, Any] | None, method: str) -> str:
    t = (tests or {}).get(method)
    return f"{t['p']:.2g}" if t and t["p"] == t["p"] else "–"


def method_table(metrics: dict[str, Any]) -> pd.DataFrame:
    """Methods ranked by deletion AUC (lower = more faithful), with every other score and,
    where evaluate computed them, each score's 95% bootstrap interval over samples and the
    p-value of the one-sided paired test against random."""
    faith = metrics["faithfulness"]
    evidence = metrics.get("evidence", {})
    rows = []
    for method, deletion in faith["deletion_auc"].items():
        row = {"method": method, "deletion AUC (lower better)": deletion}
        if "deletion_auc_ci" in faith:
            row["deletion 95% CI"] = _interval(faith["deletion_auc_ci"], method)
            row["deletion p vs random"] = _p_value(faith.get("deletion_auc_vs_random"), method)
        row["insertion AUC (higher better)"] = faith["insertion_auc"][method]
        if "insertion_auc_ci" in faith:
            row["insertion 95% CI"] = _interval(faith["insertion_auc_ci"], method)
            row["insertion p vs random"] = _p_value(faith.get("insertion_auc_vs_random"), method)
        for score, title in (("auroc", "evidence AUROC"), ("pointing_game", "pointing game")):
            if score in evidence:
                row[title] = evidence[score][method]
                if score in metrics.get("evidence_ci", {}):
                    row[f"{title} 95% CI"] = _interval(metrics["evidence_ci"][score], method)
                    row[f"{title} p vs random"] = _p_value(metrics.get("evidence_vs_random", {}).get(score), method)
        rows.append(row)
    return pd.DataFrame(rows).sort_values("deletion AUC (lower better)", kind="stable").reset_index(drop=True)


def random_sentence(scores: dict[str, Any], alpha: float, what: str = "deletion") -> tuple[str, bool]:
    """Which methods beat random on ``what`` (``scores``: a faithfulness dict), claiming only
    what the paired test supports at ``alpha``; and whether every method did. Without
    tests (older metrics) it compares the means and says so."""
    aucs, tests = scores[f"{what}_auc"], scores.get(f"{what}_auc_vs_random")
    lower = what == "deletion"
    methods = [m for m in aucs if m != "random"]
    ahead = [m for m in methods if (aucs[m] < aucs["random"] if lower else aucs[m] > aucs["random"])]
    if tests is None:
        beaten = ahead
        text = f"Beat the random baseline on {what} (mean AUC, no test): {', '.join(beaten) or 'none'}. "
    else:
        beaten = [m for m in methods if tests[m]["better"]]
        n = max((t["n"] for t in tests.values()), default=0)
        text = (f"Beat the random baseline on {what} (one-sided paired Wilcoxon signed-rank test over {n} samples, "
                f"p < {alpha:g}): " + (", ".join(f"{m} (p = {tests[m]['p']:.2g})" for m in beaten) or "none") + ". ")
        unsupported = [m for m in ahead if m not in beaten]
        if unsupported:
            text += (f"{'Lower' if lower else 'Higher'} mean AUC than random but not significant at {alpha:g}: "
                     + ", ".join(f"{m} (p = {tests[m]['p']:.2g})" for m in unsupported) + ". ")
    failed = [m for m in methods if m not in ahead]
    text += f"No better than random: {', '.join(failed) or 'none'}."
    return text, len(beaten) == len(methods)


def road_paragraph(constant: dict[str, Any], road: dict[str, Any]) -> str:
    """One sentence per mode: the ranking by deletion (insertion) AUC with the constant
    baseline and with ROAD."""
    def order(aucs: dict[str, float], lower: bool) -> str:
        return (" < " if lower else " > ").join(sorted(aucs, key=aucs.get, reverse=not lower))

    text = []
    for mode in ("deletion", "insertion"):
        if f"{mode}_auc" not in road:
            continue
        same, tau = road["same_ranking"], road["rank_correlation"]
        if mode == "insertion":
            same, tau = road["same_ranking_insertion"], road["rank_correlation_insertion"]
        text.append(f"Ranking by {mode} AUC with the constant baseline: "
                    f"{order(constant[f'{mode}_auc'], mode == 'deletion')}; with ROAD: "
                    f"{order(road[f'{mode}_auc'], mode == 'deletion')} — the ranking "
                    f"{'is the same' if same else 'CHANGES'} (Kendall's τ between the two = {tau:.2f}).")
    return " ".join(text)


def road_table(constant: dict[str, Any], road: dict[str, Any]) -> pd.DataFrame:
    """Per method: deletion AUC and rank with the constant baseline and with ROAD, and
    ROAD's interval and test against random."""
    rank_c = {m: i + 1 for i, m in enumerate(sorted(constant["deletion_auc"], key=constant["deletion_auc"].get))}
    rank_r = {m: i + 1 for i, m in enumerate(sorted(road["deletion_auc"], key=road["deletion_auc"].get))}
    return pd.DataFrame([{"method": m, "deletion AUC (constant)": constant["deletion_auc"][m], "rank (constant)": rank_c[m],
                          "deletion AUC (ROAD)": road["deletion_auc"][m], "rank (ROAD)": rank_r[m],
                          "ROAD deletion 95% CI": _interval(road.get("deletion_auc_ci"), m),
                          "ROAD deletion p vs random": _p_value(road.get("deletion_auc_vs_random"), m),
                          **({"insertion AUC (constant)": constant["insertion_auc"][m],
                              "insertion AUC (ROAD)": road["insertion_auc"][m],
                              "ROAD insertion p vs random": _p_value(road.get("insertion_auc_vs_random"), m)}
                             if "insertion_auc" in road else {})}
                         for m in sorted(rank_r, key=rank_r.get)])


def sanity_sentences(sanity: dict[str, Any]) -> list[tuple[str, bool]]:
    """One sentence per method on the randomisation test, and whether it passed."""
    out = []
    for m, final in sanity["final"].items():
        curve = sanity["cascading"][m]
        if final != final:
            text = f"{m}: its trained importance is constant on every sample, so nothing can be compared; fails."
        elif sanity["passed"][m]:
            text = (f"{m}: passes — with every block re-initialised its ranking keeps mean |ρ| = {final:.2f} "
                    f"(< {sanity['threshold']:g}) of the trained one: it depends on the weights.")
        else:
            text = (f"{m}: FAILS — with every block re-initialised its ranking still has mean |ρ| = {final:.2f} "
                    f"(≥ {sanity['threshold']:g}) with the trained one: it shows the input (or the architecture) "
                    "more than what the model learned.")
        if len(curve) > 1:
            text += f" After the last block alone: {curve['1']:.2f}."
        out.append((text, bool(sanity["passed"][m])))
    return out


def add_sanity(rep: HtmlReport, lay: Layout, sanity: dict[str, Any], item: str) -> None:
    rep.heading("Does the explanation depend on the model?")
    measure = ("per sample, over its " + item + "s" if sanity["measure"] == "per sample" else
               f"across samples, of the last {item}'s share (two {item}s: a per-sample rank correlation is ±1)")
    rep.paragraph(f"Model-parameter randomisation test (Adebayo et al., 2018): the trained model's blocks "
                  f"({', '.join(sanity['blocks'])}, input to output) are re-initialised from the output back "
                  f"(cascading){' and one at a time (independent)' if sanity['independent'] else ''}, "
                  f"{sanity['samples']} explained samples spread over the test set are explained again for the same class, and the "
                  f"Spearman rank correlation ρ between trained and randomised importance is taken ({measure}). "
                  f"A method passes when mean |ρ| with every block random is below {sanity['threshold']:g}.")
    for text, ok in sanity_sentences(sanity):
        rep.paragraph(text, css="ok" if ok else "warn")
    rep.image((lay.results / "figures" / "sanity.png").read_bytes(), "sanity",
              "Mean |Spearman ρ| between trained and randomised importance: cascading from the output (left), "
              "one block at a time (right); dashed: the pass threshold.")


def knockout_table(knockout: dict[str, Any]) -> pd.DataFrame:
    """Per layer (all heads): the mean drop of the explained logit with the top-k / random
    edges blocked, with 95% intervals, and the paired test's p."""
    rows = []
    for layer, r in knockout["layers"].items():
        rows.append({"layer": layer, f"top-{knockout['k']} drop": f"{r['topk']:.3f} [{r['topk_lo']:.3f}, {r['topk_hi']:.3f}]",
                     "random drop": f"{r['random']:.3f} [{r['random_lo']:.3f}, {r['random_hi']:.3f}]",
                     "p (top-k > random)": "n/a" if r["p"] != r["p"] else f"{r['p']:.3g}",
                     "carries": "yes" if r["carries"] else "no"})
    return pd.DataFrame(rows)


def add_knockout(rep: HtmlReport, knockout: dict[str, Any], item: str) -> None:
    rep.heading("Does the attention the explanation points at carry the prediction?")
    carrying = [l for l, r in knockout["layers"].items() if r["carries"]]
    rep.paragraph(f"Attention knockout (Geva et al., 2023) as a check of {knockout['method']}: in one layer at a time, "
                  f"the explained output's attention to the {knockout['k']} {item}s {knockout['method']} ranks highest "
                  f"is blocked (their scores set to -inf before the softmax), and the explained logit's drop is "
                  f"compared with blocking {knockout['k']} random {item}s, on {knockout['samples']} samples "
                  "(95% bootstrap intervals; p: one-sided paired Wilcoxon test). "
                  + (f"Layers where the top-k attention carries more of the prediction than random: "
                     f"{', '.join(carrying)}." if carrying else
                     "In no layer does blocking the top-k attention lower the logit more than random edges.")
                  + f" Per head: knockout.csv ({knockout['units_carrying']} of {knockout['units']} units carry).",
                  css="ok" if carrying else "warn")
    rep.table(knockout_table(knockout))


def heads_paragraph(heads: dict[str, Any]) -> str:
    v, d = heads["strongest_sink"], heads["most_diffuse"]
    text = (f"The head with the strongest sink is {v['module']} head {v['head']}: on average its queries put "
            f"{v['sink']:.0%} of their attention on the same few keys (its sink score; uniform attention would "
            f"give far less), which is what vertical stripes in its map mean. The most diffuse is "
            f"{d['module']} head {d['head']} (normalised entropy {d['entropy']:.2f}, 1 = uniform). ")
    if "most_important" in heads:
        m = heads["most_important"]
        text += (f"Zeroing {m['module']} head {m['head']} costs the most: the predicted class's probability "
                 f"drops by {m['prob_drop']:.3f} on average.")
    return text


def add_evaluation(rep: HtmlReport, lay: Layout, item: str) -> None:
    metrics = io.read_json(lay.metrics)
    add_faithfulness(rep, lay, metrics, item)
    if "heads" not in metrics:
        return
    rep.heading("What the heads do")
    rep.paragraph(heads_paragraph(metrics["heads"]))
    rep.image((lay.results / "figures" / "heads.png").read_bytes(), "heads",
              "Per head: normalised entropy (1 = uniform), sink score (share of attention on the top keys, "
              "averaged over queries: high = vertical stripes), locality (mean |i - j| / N), and the drop in "
              "the predicted class's probability / in accuracy when the head is zeroed.")


def add_faithfulness(rep: HtmlReport, lay: Layout, metrics: dict[str, Any], item: str) -> None:
    """The methods ranked by deletion AUC beside the random baseline, and the curves."""
    table = method_table(metrics)
    rep.heading("Is the explanation faithful?")
    rep.paragraph(f"Deletion: remove {item}s most important first and watch the probability of the explained "
                  f"class fall (a faithful method makes it fall fast: small area). Insertion: start from "
                  f"nothing and add {item}s most important first (large area is better). 'random' ranks "
                  "items at random: a method that does not beat it explains nothing.")
    rep.table(table)
    alpha = metrics.get("significance", {}).get("alpha", 0.05)
    text, all_beat = random_sentence(metrics["faithfulness"], alpha)
    rep.paragraph(text, css="ok" if all_beat else "warn")
    if "deletion_auc_ci" in metrics["faithfulness"]:
        rep.paragraph(f"Intervals: 95% percentile bootstrap over the samples "
                      f"({metrics.get('significance', {}).get('resamples', '?')} resamples); p: one-sided paired "
                      "Wilcoxon signed-rank test of the per-sample score against random's on the same samples.")
    if "road" in metrics:
        rep.paragraph(f"Debiased deletion and insertion (ROAD, Rong et al., 2022): a removed {item} is imputed by linear "
                      f"interpolation between the nearest kept {item}s plus Gaussian noise, instead of the constant "
                      "baseline, so the model does not see inputs unlike any it was trained on. "
                      + road_paragraph(metrics["faithfulness"], metrics["road"]),
                      css="ok" if metrics["road"]["same_ranking"] else "warn")
        rep.table(road_table(metrics["faithfulness"], metrics["road"]))
        for mode in ("deletion", "insertion"):
            if f"{mode}_auc" in metrics["road"]:
                rep.paragraph(random_sentence(metrics["road"], alpha, mode)[0]
                              .replace("random baseline", "random baseline under ROAD"))
    if "sanity" in metrics:
        add_sanity(rep, lay, metrics["sanity"], item)
    if "knockout" in metrics:
        add_knockout(rep, metrics["knockout"], item)
    if "evidence" in metrics:
        rep.paragraph("Evidence AUROC: how well each method's importance separates the items that carry the "
                      "planted evidence from the others (0.5 = chance); pointing game: how often the top item "
                      "is evidence.")
    rep.image((lay.results / "figures" / "faithfulness.png").read_bytes(), "faithfulness",
              "Mean probability of the explained class along the deletion and insertion curves.")
