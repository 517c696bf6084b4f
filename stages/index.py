"""DVC stage `index`: one page over every experiment of this pipeline state -> reports/index.html,
logged to MLflow as an artifact of every run it covers (see attnlab.report.index)."""
from attnlab.io import exit_now
from attnlab.report.index import main

if __name__ == "__main__":
    exit_now(main())      # without Python's teardown of torch and MLflow (about a second)
