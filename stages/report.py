"""DVC stage `report`: a self-contained HTML report -> data/<experiment>/report/."""
from attnlab.pipeline import run

if __name__ == "__main__":
    run("report")
