"""A tiny structured document rendered to both Markdown and self-contained HTML.

The report is built as blocks (headings, paragraphs, tables, figures) rather
than as Markdown text, so the HTML is rendered from the same structure, with
figures embedded as base64 and no Markdown parser needed.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, Union


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: str


@dataclass
class Table:
    header: Sequence[str]
    rows: Sequence[Sequence[object]]
    css: str = ""  # an HTML class, e.g. "compact" for the one-screen summary


@dataclass
class Figure:
    path: Path
    caption: str


@dataclass
class Details:
    """Blocks folded away under a one-line summary (HTML ``<details>``; GitHub renders it in Markdown too):
    the evidence a reader opens on demand, so the page answers first."""

    summary: str
    blocks: list["Block"] = field(default_factory=list)


Block = Union[Heading, Para, Table, Figure, Details]

_CSS = """body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}td,th{border:1px solid #bbb;padding:4px 8px}
th{background:#f0f0f0}figure{margin:1em 0}img{max-width:100%}figcaption{color:#555;font-size:13px}
details{margin:.6em 0;border-left:3px solid #ddd;padding-left:.8em}summary{cursor:pointer;color:#333;font-weight:600}
h1{font-size:1.4em;margin:.2em 0}table.compact{font-size:12.5px;margin:.4em 0}table.compact td,table.compact th{padding:2px 6px}
body>p:first-of-type{font-size:13px;color:#444;margin:.2em 0}h2{margin:.5em 0 .2em}figure.summary{margin:.3em 0}
.reproduced{color:#0a7a25;font-weight:bold}.not-reproduced{color:#b00020;font-weight:bold}
.inconclusive{color:#a66b00;font-weight:bold}"""

_IMG_CHECK = """<script>window.addEventListener('load',()=>{const im=[...document.images];
document.body.dataset.imagesLoaded=im.filter(i=>i.complete&&i.naturalWidth>0).length+'/'+im.length;});</script>"""


@dataclass
class Document:
    title: str
    blocks: list[Block] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Heading(level, text))

    def para(self, text: str) -> None:
        self.blocks.append(Para(text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]], css: str = "") -> None:
        self.blocks.append(Table(header, rows, css))

    def figure(self, path: str | Path, caption: str) -> None:
        self.blocks.append(Figure(Path(path), caption))

    def details(self, summary: str) -> "Document":
        """A folded block; returns a document whose blocks go inside it (``sub.para(...)``, ``sub.table(...)``)."""
        inner = Document("")
        self.blocks.append(Details(summary, inner.blocks))
        return inner

    def to_markdown(self, base: Path) -> str:
        """Markdown with figure links relative to ``base`` (the report's folder)."""
        return "\n".join([f"# {self.title}", ""] + _md_blocks(self.blocks, base))

    def to_html(self) -> str:
        """A single self-contained HTML page (figures embedded as data URIs)."""
        e = html.escape
        body = [f"<h1>{e(self.title)}</h1>"] + _html_blocks(self.blocks)
        return (f"<!doctype html><html><head><meta charset='utf-8'><title>{e(self.title)}</title>"
                f"<style>{_CSS}</style></head><body>{''.join(body)}{_IMG_CHECK}</body></html>")


def _md_blocks(blocks: Sequence[Block], base: Path) -> list[str]:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Details):
            out += [f"<details><summary>{html.escape(b.summary)}</summary>", ""] + _md_blocks(b.blocks, base) \
                + ["</details>", ""]
        elif isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Table):
            out += ["| " + " | ".join(map(str, b.header)) + " |", "|" + "---|" * len(b.header)]
            out += ["| " + " | ".join(_cell(c) for c in r) + " |" for r in b.rows] + [""]
        else:
            out += [f"![{b.caption}]({b.path.relative_to(base).as_posix()})", "", f"*{b.caption}*", ""]
    return out


def _html_blocks(blocks: Sequence[Block]) -> list[str]:
    e = html.escape
    body: list[str] = []
    for b in blocks:
        if isinstance(b, Details):
            body.append(f"<details><summary>{e(b.summary)}</summary>{''.join(_html_blocks(b.blocks))}</details>")
        elif isinstance(b, Heading):
            body.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            body.append(f"<p>{_inline_html(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(str(h))}</th>" for h in b.header)
            rows = "".join("<tr>" + "".join(f"<td>{_verdict_html(_cell(c))}</td>" for c in r) + "</tr>"
                           for r in b.rows)
            cls = f' class="{e(b.css)}"' if b.css else ""
            body.append(f"<table{cls}><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        else:
            data = base64.b64encode(b.path.read_bytes()).decode()
            body.append(f'<figure><img alt="{e(b.caption)}" src="data:image/png;base64,{data}">'
                        f"<figcaption>{e(b.caption)}</figcaption></figure>")
    return body


def _cell(c: object) -> str:
    if isinstance(c, float):
        return f"{c:.4g}"
    return str(c).replace("|", "\\|")


def _inline_html(text: str) -> str:
    """Escape, then honour the one Markdown idiom the report uses in prose: `code`."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _verdict_html(text: str) -> str:
    t = html.escape(text)
    for v in ("not reproduced", "reproduced", "inconclusive"):
        if t.startswith(v.upper()) or t == v:
            return f'<span class="{v.replace(" ", "-")}">{t}</span>'
    return t
