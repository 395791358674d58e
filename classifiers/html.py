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

CSS = """
body{font-family:system-ui,sans-serif;margin:2em auto;max-width:72em;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f4f4f4}tr.tied td{background:#eef7ee}.note{color:#555;font-size:.9em}
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
    """An HTML table of `frame` (numbers rounded, missing values as '–'); `row_classes` marks rows (CSS)."""
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for i, row in enumerate(frame.itertuples(index=False)):
        cells = "".join(f"<td>{html.escape(_cell(v, digits))}</td>" for v in row)
        css = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


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
    return f'<div class="{css}">{"".join(cards)}</div>'


def section(title: str, *parts: str, anchor: str = "") -> str:
    ident = f' id="{anchor}"' if anchor else ""
    return f"<section{ident}><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


def note(text: str) -> str:
    return f'<p class="note">{html.escape(text)}</p>'


def page(title: str, sections: list[str]) -> str:
    """The whole document: inline CSS, no script, no external resource."""
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")


def write_page(path: Path, title: str, sections: list[str]) -> Path:
    """Write atomically: a crash never leaves a half page that looks complete."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page(title, sections), encoding="utf-8")
    tmp.replace(path)
    return path
