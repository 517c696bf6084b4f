"""DVC stage `train`: fit the model -> data/<experiment>/train/ (model, metrics, curve)."""
from attnlab.pipeline import stage

if __name__ == "__main__":
    with stage("train") as s:
        s.experiment.train(s.cfg, s.dir("prepare"), s.out, progress=True)
