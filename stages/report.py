"""DVC stage `report`: a self-contained HTML report -> data/<experiment>/report/."""
from attnlab.pipeline import stage

if __name__ == "__main__":
    with stage("report") as s:
        s.experiment.report(s.cfg, s.root, s.out)
