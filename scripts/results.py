"""Print the methods' ranking of a pipeline state as Markdown, for docs/results.md.

Reads ``data/<experiment>/evaluate/metrics.json`` of every experiment in params.yaml and
``.timings`` of its stages, and prints per experiment one table: each method's deletion
and insertion AUC with their 95% intervals and rank, evidence AUROC with its interval
where the data have ground truth, its p-value against random (one-sided Wilcoxon,
deletion), and its sanity-check verdict; then each stage's wall time and evaluate/train.

    python scripts/results.py [--root .] [--params params.yaml]
"""
from __future__ import annotations

import argparse
import json
import subprocess
from datetime import date
from pathlib import Path

import yaml


def _ci(ci: dict, key: str) -> str:
    c = ci.get(key) or {}
    return f" [{c['lo']:.3f}, {c['hi']:.3f}]" if "lo" in c else ""


def table(name: str, metrics: dict) -> list[str]:
    f = metrics["faithfulness"]
    deletion, insertion = f["deletion_auc"], f["insertion_auc"]
    evidence = metrics.get("evidence", {}).get("auroc")
    evidence_ci = metrics.get("evidence_ci", {}).get("auroc", {})
    sanity = metrics.get("sanity", {})
    passed, rho = sanity.get("passed", {}), sanity.get("final", sanity.get("score", {}))
    methods = sorted(deletion, key=lambda m: deletion[m])
    rank = {m: i + 1 for i, m in enumerate(m for m in methods if m != "random")}
    head = ["method", "deletion AUC [95%]", "rank", "p vs random", "insertion AUC [95%]"]
    head += ["evidence AUROC [95%]"] if evidence else []
    head += ["sanity check"]
    lines = [f"### {name}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        test = f.get("deletion_auc_vs_random", {}).get(m, {})
        row = [m, f"{deletion[m]:.3f}{_ci(f.get('deletion_auc_ci', {}), m)}", str(rank.get(m, "–")),
               f"{test['p']:.2g}" if "p" in test else "–",
               f"{insertion[m]:.3f}{_ci(f.get('insertion_auc_ci', {}), m)}"]
        if evidence:
            row.append(f"{evidence[m]:.3f}{_ci(evidence_ci, m)}" if m in evidence else "–")
        verdict = passed.get(m)
        score = rho.get(m) if isinstance(rho, dict) else None
        row.append("–" if verdict is None else ("passes" if verdict else "FAILS")
                   + (f" ({score:.2f})" if isinstance(score, (int, float)) else ""))
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def stage_times(data: Path, experiments: list[str]) -> list[str]:
    stages = ["prepare", "train", "extract", "aggregate", "explain", "evaluate", "report", "track"]
    lines = ["| experiment | " + " | ".join(stages) + " | evaluate / train |", "|" + "---|" * (len(stages) + 2)]
    for name in experiments:
        seconds = {}
        for s in stages:
            path = data / name / ".timings" / f"{s}.json"
            if path.exists():
                t = json.loads(path.read_text())
                seconds[s] = (t["end_ms"] - t["start_ms"]) / 1000
        ratio = seconds["evaluate"] / seconds["train"] if {"evaluate", "train"} <= set(seconds) else None
        lines.append(f"| {name} | " + " | ".join(f"{seconds[s]:.1f}" if s in seconds else "–" for s in stages)
                     + f" | {ratio:.2f} |" if ratio is not None else " | – |")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=".")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args()
    root = Path(args.root)
    params = yaml.safe_load((root / args.params).read_text())
    experiments = [e for e in params["experiments"] if (root / "data" / e / "evaluate" / "metrics.json").exists()]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                            text=True).stdout.strip()
    print(f"Measured at commit `{commit}`, {date.today()}, `{args.params}` as shipped.\n")
    for name in experiments:
        print("\n".join(table(name, json.loads((root / "data" / name / "evaluate" / "metrics.json").read_text()))))
    print("Stage wall times (s):\n")
    print("\n".join(stage_times(root / "data", experiments)))


if __name__ == "__main__":
    main()
