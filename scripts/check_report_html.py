#!/usr/bin/env python3
"""Render a report.html in headless Chromium: screenshot it and check every image loaded.

Usage: check_report_html.py REPORT_HTML [SCREENSHOT_PNG]
Prints "images loaded: k/n" and exits non-zero unless k == n > 0. Needs Debian's
`chromium` (apt-get install chromium); flags keep it off the network.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--hide-scrollbars", "--virtual-time-budget=5000"]


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def render(html: Path, screenshot: Path | None = None) -> tuple[int, int]:
    exe = chromium()
    if exe is None:
        raise FileNotFoundError("chromium not found (apt-get install chromium)")
    url = html.resolve().as_uri()
    with tempfile.TemporaryDirectory() as prof:
        base = [exe, *FLAGS, f"--user-data-dir={prof}"]
        dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
        if screenshot is not None:
            subprocess.run([*base, f"--screenshot={screenshot.resolve()}", "--window-size=1100,2400", url],
                           capture_output=True, timeout=120, check=True)
    m = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    if not m:
        raise RuntimeError("the page's load check did not run (no data-images-loaded attribute)")
    return int(m.group(1)), int(m.group(2))


def main() -> int:
    html = Path(sys.argv[1])
    shot = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    ok, total = render(html, shot)
    print(f"images loaded: {ok}/{total}" + (f"; screenshot {shot}" if shot else ""))
    return 0 if ok == total > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
