"""DVC stage `explain`: every method's per-item importance for each explained sample, and figures -> data/<experiment>/explain/."""
from attnlab.pipeline import run

if __name__ == "__main__":
    run("explain")
