"""DVC stage `aggregate`: vocabulary x vocabulary attention from the stored attention (no model run) -> data/<experiment>/aggregate/."""
from attnlab.pipeline import run

if __name__ == "__main__":
    run("aggregate")
