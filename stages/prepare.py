"""DVC stage `prepare`: build the experiment's dataset -> data/<experiment>/prepare/."""
from attnlab.pipeline import run

if __name__ == "__main__":
    run("prepare")
