"""DVC stage `track`: record this pipeline state as one MLflow run -> data/<experiment>/track/."""
from attnlab.pipeline import stage

if __name__ == "__main__":
    with stage("track") as s:
        s.experiment.track(s.cfg, s.root, s.out)
