"""DVC stage `evaluate`: faithfulness of every explanation, ground-truth scores where
the data has evidence, head diagnostics -> data/<experiment>/evaluate/."""
from attnlab.pipeline import stage

if __name__ == "__main__":
    with stage("evaluate") as s:
        s.experiment.evaluate(s.cfg, s.root, s.out, progress=True)
