"""Building blocks of a self-contained HTML page: tables, embedded PNG plots and JPEG thumbnails, no script.

Why self-contained: a report is mailed, attached to a ticket or opened on a machine without the data; every
picture is a base64 data URI (small JPEG thumbnails), and nothing is fetched from the network.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

THUMB_SIDE = 128  # pixels of a thumbnail's longer side
JPEG_QUALITY = 70

NONE_FOUND = "none found"
# no element may widen the page: wide tables scroll inside their own box (.scroll), long words and paths wrap
CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222;overflow-wrap:anywhere}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
h3{font-size:1.05em;margin:1.2em 0 .3em}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f4f4f4}tr.tied td{background:#eef7ee}.note{color:#555;font-size:.9em}
tr.chosen td{background:#fff1c2;font-weight:600}tr.chosen td:first-child{box-shadow:inset 4px 0 #c98a00}
code{font-family:ui-monospace,monospace;font-size:.92em;background:#f4f4f4;padding:0 .2em;border-radius:3px}
.summary{border:2px solid #3a7;border-radius:6px;padding:.2em 1.2em .8em;background:#f6fbf7}
.summary h2{border:none;margin-top:.6em}.summary dl{display:grid;grid-template-columns:max-content 1fr;gap:.3em 1em;margin:.5em 0}
.summary dt{font-weight:600}.summary dd{margin:0;min-width:0}.summary .reduced{color:#8a2b17}
pre.cmd{white-space:pre-wrap;background:#f4f4f4;padding:.4em .6em;margin:0;border-radius:3px}pre.cmd code{padding:0}
.warnings{list-style:none;padding:0;margin:0;display:flex;flex-wrap:wrap;gap:.3em .6em}
.warnings a{display:inline-block;border-radius:1em;padding:.1em .7em;text-decoration:none;border:1px solid #ccc;color:#555}
.warnings a.warn{background:#fde8e4;border-color:#d9735f;color:#8a2b17}
.gallery{display:flex;flex-wrap:wrap;gap:.6em}.card{width:140px;font-size:.75em;border:1px solid #ddd;padding:4px;overflow-wrap:anywhere}
.card img{max-width:128px;max-height:128px;display:block;margin:auto}.pair{display:flex;gap:4px}
.pair .card{width:132px}img.plot{max-width:100%}.missing{width:128px;height:96px;background:#eee;color:#888}
"""


def thumbnail_uri(path: Path, side: int = THUMB_SIDE) -> str | None:
    """A small JPEG of an image file as a data URI; None when the file is missing or unreadable."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        return None
    scale = side / max(image.shape[:2])
    if scale < 1:
        image = cv2.resize(image, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    return "data:image/jpeg;base64," + base64.b64encode(encoded.tobytes()).decode() if ok else None


def plot(path: Path, alt: str) -> str:
    """A PNG file embedded as an image (nothing when the file is absent)."""
    if not path.exists():
        return ""
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img class="plot" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table(frame: pd.DataFrame, row_classes: list[str] | None = None, digits: int = 4) -> str:
    """An HTML table of `frame` (numbers rounded, missing values as '–') in a box that scrolls sideways when it is
    wider than the page; `row_classes` marks rows (CSS). A frame without rows says "none found" instead."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for i, row in enumerate(frame.itertuples(index=False)):
        cells = "".join(f"<td>{html.escape(_cell(v, digits))}</td>" for v in row)
        css = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{css}>{cells}</tr>")
    if not body:
        return note(NONE_FOUND)
    return f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _cell(value, digits: int) -> str:
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else f"{value:.{digits}g}" if abs(value) >= 10 else f"{value:.{digits}f}"
    return str(value)


def card(uri: str | None, lines: list[str], css: str = "card") -> str:
    """One thumbnail with caption lines; a grey box when the image could not be read."""
    picture = (f'<img class="thumb" alt="{html.escape(lines[0] if lines else "")}" src="{uri}">' if uri
               else '<div class="missing">image not found</div>')
    caption = "<br>".join(html.escape(line) for line in lines)
    return f'<div class="{css}">{picture}{caption}</div>'


def gallery(cards: list[str], css: str = "gallery") -> str:
    """Cards side by side, wrapping; "none found" when there are none."""
    return f'<div class="{css}">{"".join(cards)}</div>' if cards else note(NONE_FOUND)


def section(title: str, *parts: str, anchor: str = "") -> str:
    ident = f' id="{anchor}"' if anchor else ""
    return f"<section{ident}><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def text(plain: str) -> str:
    """Escaped text in which `code` spans (the markdown of notes and report.md) become <code> elements, so no
    backtick is left on the page.

    >>> text("run `make merge` & <retry>")
    'run <code>make merge</code> &amp; &lt;retry&gt;'
    """
    parts = html.escape(plain, quote=False).split("`")
    if len(parts) % 2 == 0:  # an unpaired backtick: not code, drop it
        parts = [*parts[:-2], parts[-2] + parts[-1]]
    return "".join(f"<code>{part}</code>" if i % 2 else part for i, part in enumerate(parts))


def subsection(title: str, *parts: str, anchor: str) -> str:
    return f'<div id="{anchor}"><h3>{html.escape(title)}</h3>{"".join(parts)}</div>'


def note(plain: str) -> str:
    return f'<p class="note">{text(plain)}</p>'


def page(title: str, sections: list[str]) -> str:
    """The whole document: inline CSS, no script, no external resource."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")


def write_page(path: Path, title: str, sections: list[str]) -> Path:
    """Write atomically: a crash never leaves a half page that looks complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page(title, sections), encoding="utf-8")
    tmp.replace(path)
    return path
