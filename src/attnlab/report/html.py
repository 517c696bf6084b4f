"""A self-contained HTML document: images embedded as base64 PNG, no network access."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import pandas as pd

_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{border-bottom:2px solid #444}h2{margin-top:2em;border-bottom:1px solid #ccc}
figure{margin:1em 0}figcaption{color:#555;font-size:.9em}img{max-width:100%}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}.warn{color:#a40000;font-weight:bold}.ok{color:#176b00;font-weight:bold}
"""


def figure_png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path: Path) -> None:
    Path(path).write_bytes(figure_png(fig))


class HtmlReport:
    """Collects sections, writes one HTML file; figures are saved beside it as PNG too."""

    def __init__(self, title: str):
        self.title = title
        self.parts: list[str] = []
        self.figures: dict[str, bytes] = {}

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, css: str | None = None) -> None:
        cls = f' class="{css}"' if css else ""
        self.parts.append(f"<p{cls}>{html.escape(text)}</p>")

    def figure(self, fig, name: str, caption: str = "") -> None:
        self.image(figure_png(fig), name, caption)

    def image(self, png: bytes, name: str, caption: str = "") -> None:
        self.figures[name] = png
        data = base64.b64encode(png).decode()
        self.parts.append(f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,{data}">'
                          f"<figcaption>{html.escape(caption)}</figcaption></figure>")

    def table(self, frame: pd.DataFrame, float_format: str = "{:.3f}") -> None:
        self.parts.append(frame.to_html(index=False, float_format=float_format.format, border=0))

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures").mkdir(exist_ok=True)
        for name, png in self.figures.items():
            (out / "figures" / f"{name}.png").write_bytes(png)
        doc = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(self.title)}"
               f"</title><style>{_STYLE}</style></head><body><h1>{html.escape(self.title)}</h1>"
               + "\n".join(self.parts) + "</body></html>\n")
        path = out / "report.html"
        path.write_text(doc)
        return path
