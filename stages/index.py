"""DVC stage `index`: one page over every experiment of this pipeline state -> reports/index.html,
logged to MLflow as an artifact of every run it covers (see attnlab.report.index)."""
from attnlab.report.index import main

if __name__ == "__main__":
    raise SystemExit(main())
