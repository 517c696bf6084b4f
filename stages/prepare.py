"""DVC stage `prepare`: build the experiment's dataset -> data/<experiment>/prepare/."""
from attnlab.pipeline import stage

if __name__ == "__main__":
    with stage("prepare") as s:
        s.experiment.prepare(s.cfg, s.out)
