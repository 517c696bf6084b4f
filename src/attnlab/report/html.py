"""A self-contained HTML document: images embedded as base64 PNG, no network access."""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Iterable, Mapping, Sequence

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


def table_html(frame: pd.DataFrame, float_format: str = "{:.3f}", *,
               marked: Iterable[tuple[int, str]] = (), links: Mapping[str, Sequence[str | None]] | None = None) -> str:
    """``frame`` as an HTML table (no index) of escaped text, for what pandas' ``to_html``
    cannot do: the ``marked`` cells (``(row position, column)``) get ``class="best"`` and a
    star, and each column of ``links`` (``{column: one href or None per row}``) links its
    cells. Floats are written with ``float_format``; NaN and None as "–"."""
    marked, links = set(marked), links or {}

    def text(value: object) -> str:
        if value is None or (isinstance(value, float) and value != value):
            return "–"
        return float_format.format(value) if isinstance(value, float) else str(value)

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    rows = []
    for r, values in enumerate(frame.itertuples(index=False, name=None)):
        cells = []
        for column, value in zip(frame.columns, values):
            cell = html.escape(text(value))
            href = links.get(column, [None] * len(frame))[r]
            if href is not None:
                cell = f'<a href="{html.escape(href)}">{cell}</a>'
            if (r, column) in marked:
                cells.append(f'<td class="best">{cell} <span title="best of the column">★</span></td>')
            else:
                cells.append(f"<td>{cell}</td>")
        rows.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>" + "".join(rows) + "</tbody></table>"


class HtmlReport:
    """Collects sections, writes one HTML file; figures are saved beside it as PNG too.
    ``style``: CSS added to the common style sheet."""

    def __init__(self, title: str, style: str = ""):
        self.title = title
        self.style = style
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

    def table(self, frame: pd.DataFrame, float_format: str = "{:.3f}", *,
              marked: Iterable[tuple[int, str]] = (), links: Mapping[str, Sequence[str | None]] | None = None) -> None:
        """``frame`` as a table; with ``marked`` cells or ``links``, see :func:`table_html`."""
        if marked or links:
            self.parts.append(table_html(frame, float_format, marked=marked, links=links))
        else:
            self.parts.append(frame.to_html(index=False, float_format=float_format.format, border=0))

    def link(self, text: str, href: str) -> None:
        self.parts.append(f'<p><a href="{html.escape(href)}">{html.escape(text)}</a></p>')

    def details(self, summary: str, text: str) -> None:
        """A collapsed block of preformatted ``text`` (e.g. YAML) under ``summary``."""
        self.parts.append(f"<details><summary>{html.escape(summary)}</summary><pre>{html.escape(text)}</pre></details>")

    def html(self) -> str:
        """The whole document."""
        return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(self.title)}"
                f"</title><style>{_STYLE}{self.style}</style></head><body><h1>{html.escape(self.title)}</h1>"
                + "\n".join(self.parts) + "</body></html>\n")

    def write(self, out: Path) -> Path:
        out.mkdir(parents=True, exist_ok=True)
        (out / "figures").mkdir(exist_ok=True)
        for name, png in self.figures.items():
            (out / "figures" / f"{name}.png").write_bytes(png)
        path = out / "report.html"
        path.write_text(self.html())
        return path
