"""DVC stage `evaluate`: faithfulness of every explanation, ground-truth scores where the data have evidence, head diagnostics -> data/<experiment>/evaluate/."""
from attnlab.pipeline import run

if __name__ == "__main__":
    run("evaluate")
