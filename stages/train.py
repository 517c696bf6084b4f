"""DVC stage `train`: fit the model -> data/<experiment>/train/ (model, metrics, curve)."""
from attnlab.pipeline import run

if __name__ == "__main__":
    run("train")
