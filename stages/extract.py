"""DVC stage `extract`: every layer's per-head attention of the evaluation samples,
streamed to disk -> data/<experiment>/extract/."""
from attnlab.pipeline import stage

if __name__ == "__main__":
    with stage("extract") as s:
        s.experiment.extract(s.cfg, s.dir("prepare"), s.dir("train"), s.out, progress=True)
