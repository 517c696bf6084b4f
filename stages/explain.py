"""DVC stage `explain`: every attention method's per-item importance for each
evaluation sample, and figures -> data/<experiment>/explain/."""
from attnlab.pipeline import stage

if __name__ == "__main__":
    with stage("explain") as s:
        s.experiment.explain(s.cfg, s.dir("prepare"), s.dir("train"), s.out, progress=True)
