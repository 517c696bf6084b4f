"""DVC stage `track`: record this pipeline state as one MLflow run -> data/<experiment>/track/."""
from attnlab.pipeline import run

if __name__ == "__main__":
    run("track")
