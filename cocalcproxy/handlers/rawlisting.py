"""Pure rendering of folder listings for the raw file server: HTML for people, JSON for programs.

Every name is escaped for HTML and percent-encoded (every byte but unreserved ones) for links,
so a file called ``<script>``, ``a:b`` or ``?x#y`` is shown and linked as itself. Links are
relative to the folder's own URL (which always ends in ``/``), so the same page is right under
``/<pid>/raw/`` and on a project subdomain. No Twisted imports.
"""

from __future__ import annotations

import json
import time
from html import escape
from urllib.parse import quote

from cocalcproxy import pages
from cocalcproxy.handlers.rawfs import Entry, Listing


def href(entry: Entry) -> str:
    return quote(entry.name, safe="") + ("/" if entry.kind == "directory" else "")


def display_name(name: bytes) -> str:
    return name.decode("utf-8", "replace")


def _when(mtime: float | None) -> str:
    if mtime is None:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mtime))


def _iso(mtime: float | None) -> str | None:
    if mtime is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(mtime))


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def title_for(segments: tuple[bytes, ...]) -> str:
    return "/" + "".join(display_name(s) + "/" for s in segments)


def render_html(segments: tuple[bytes, ...], listing: Listing) -> bytes:
    depth = len(segments)
    crumbs = [f'<a href="{"../" * depth or "./"}">files</a>']
    for i, segment in enumerate(segments):
        up = depth - i - 1
        link = "../" * up or "./"
        crumbs.append(f'<a href="{link}">{escape(display_name(segment))}</a>')
    rows = []
    if depth:
        rows.append('<tr><td><a href="../">../</a></td><td></td><td></td></tr>')
    for entry in listing.entries:
        label = display_name(entry.name) + ("/" if entry.kind == "directory" else "")
        size = ""
        if entry.size is not None:
            size = f'<span title="{entry.size} bytes">{escape(human_size(entry.size))}</span>'
        note = ' <span class="kind">(link)</span>' if entry.kind == "symlink" else ""
        rows.append(
            f'<tr class="{entry.kind}"><td><a href="{escape(href(entry))}">{escape(label)}</a>'
            f"{note}</td><td>{size}</td><td>{_when(entry.mtime)}</td></tr>"
        )
    more = ""
    if listing.total > len(listing.entries):
        more = f"<p>Showing the first {len(listing.entries)} of {listing.total} entries.</p>"
    body = (
        f'<nav class="crumbs">{" / ".join(crumbs)}</nav>'
        '<table class="listing"><thead><tr><th>Name</th><th>Size</th>'
        "<th>Modified (UTC)</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>" + more
    )
    return pages.page("Files " + title_for(segments), body)


def render_json(segments: tuple[bytes, ...], listing: Listing) -> bytes:
    document = {
        "path": title_for(segments),
        "entries": [
            {
                "name": display_name(e.name),
                "href": href(e),
                "type": e.kind,
                "size": e.size,
                "mtime": e.mtime,
                "modified": _iso(e.mtime),
            }
            for e in listing.entries
        ],
        "total": listing.total,
        "truncated": listing.total > len(listing.entries),
    }
    return json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n"
