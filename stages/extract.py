"""DVC stage `extract`: every layer's per-head attention of the test samples, streamed to disk -> data/<experiment>/extract/."""
from attnlab.pipeline import run

if __name__ == "__main__":
    run("extract")
