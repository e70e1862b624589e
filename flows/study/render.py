"""How a study's numbers and report are written: numbers, intervals with their n, markdown tables, and the
report with its figures embedded, as markdown (for Prefect's markdown artifact) and as one HTML file (for
MLflow's artifact view and a browser).

A report's markdown links its figures by file name (``![...](name.png)``), as the
exported folder under docs/studies holds them side by side. Where the figures cannot
sit beside it (an MLflow artifact viewed alone, a Prefect artifact), embedded_markdown
and report_html put each figure in the page itself as a PNG data URI.
"""

from __future__ import annotations

import base64
import html
import io
import math
import re

import pandas as pd
from matplotlib.figure import Figure

FIGURE_DPI = 110  # the PNGs logged and embedded: about 60-90 KB each at 7 x 4.5 inches


def number(x: float, signed: bool = False) -> str:
    """x to 2 decimals ('+' when signed), or an em dash for NaN."""
    return "—" if math.isnan(x) else f"{x:+.2f}" if signed else f"{x:.2f}"


def interval_text(low: float, high: float) -> str:
    """[low, high] to 2 decimals, or "—" where there is no interval (one seed)."""
    return "—" if math.isnan(low) else f"[{low:.2f}, {high:.2f}]"


def seeds_text(n: int) -> str:
    return f"{n} seed{'s' * (n != 1)}"


def estimate_text(mean: float, low: float, high: float, n: int, signed: bool = False) -> str:
    """'2.36 [1.88, 2.84], n=8': a mean, its 95% interval and how many seeds it is over (every interval shows
    its n); with one seed, the value and n=1."""
    if math.isnan(mean):
        return "—"
    interval = interval_text(low, high)
    return f"{number(mean, signed)}{'' if interval == '—' else ' ' + interval}, n={n}"


def markdown_table(frame: pd.DataFrame) -> str:
    """frame as a GitHub markdown table; floats from 100 up as whole numbers, below with 3 significant digits,
    NaN as an em dash."""
    def cell(v) -> str:
        if isinstance(v, float):  # counts in the thousands in full; the rest to 3 digits
            return "—" if math.isnan(v) else f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"
        return "—" if v is pd.NA else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def figure_png(figure: Figure) -> bytes:
    """The figure as PNG bytes, at the resolution the study logs."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


_FIGURE_LINK = re.compile(r"!\[([^\]]*)\]\(([A-Za-z0-9_.-]+)\.png\)")


def embedded_markdown(markdown: str, pngs: dict[str, bytes]) -> str:
    """markdown with every link to one of the figures (``![text](name.png)``) replaced by its PNG (figure_png,
    rendered once by the caller for every place that shows it) as a data URI, so the report shows its figures
    wherever the markdown alone is rendered (Prefect's markdown artifact). Links to figures not given are left
    as they are."""
    uris = {name: data_uri(png) for name, png in pngs.items()}
    return _FIGURE_LINK.sub(lambda m: f"![{m[1]}]({uris[m[2]]})" if m[2] in uris else m[0], markdown)


_STYLE = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #1f2328;
       max-width: 1100px; margin: 24px auto; padding: 0 24px; }
h1 { font-size: 1.6em; border-bottom: 1px solid #d1d9e0; padding-bottom: .3em; }
h2 { font-size: 1.3em; border-bottom: 1px solid #d1d9e0; padding-bottom: .3em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 12px 0; font-size: 13px; display: block; overflow-x: auto; }
th, td { border: 1px solid #d1d9e0; padding: 4px 10px; text-align: left; white-space: nowrap; }
th { background: #f6f8fa; }
tr:nth-child(2n) td { background: #fafbfc; }
code { background: #f6f8fa; padding: 1px 4px; border-radius: 4px; font-size: 85%; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
"""


def report_html(markdown: str, pngs: dict[str, bytes], title: str | None = None) -> str:
    """The report as one self-contained HTML page: the markdown rendered (CommonMark and tables, raw HTML in
    the markdown escaped), each figure's PNG embedded as a data URI, no external request of any kind."""
    from markdown_it import MarkdownIt  # rich's markdown parser, loaded only when a page is made

    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(embedded_markdown(markdown, pngs))
    heading = title or next((line[2:] for line in markdown.splitlines() if line.startswith("# ")), "Study report")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(heading)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")
