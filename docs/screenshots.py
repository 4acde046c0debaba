"""Open the built site in a real browser engine and take screenshots (issue 17's browser check).

Usage, from the repository root, after ``mkdocs build --strict`` (or with ``--build``)::

    python docs/screenshots.py [--site site] [--out screenshots] [--build] [--chromium PATH]

The site is served over HTTP on a free local port (``python -m http.server``), as a reader
would get it (Material's search runs in a web worker, which browsers do not start from
``file://``). For the index page, the gallery and one guide, Chromium (headless, from the
system: Debian's ``apt-get install chromium``) writes a PNG screenshot and the page's DOM after
its scripts ran.
The script checks in the DOM that the page has Material's navigation (tabs and the side
navigation), the search box, and that every ``<img>`` of the page points to a file the site
holds; it exits 1 with the list of what is missing. Look at the PNGs to see how the pages render.

This is a script and not a test because CI has no Chromium; ``tests/test_docs.py`` checks the
same structure in the built HTML without a browser.
"""

from __future__ import annotations

import argparse
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

PAGES = {"index": "index.html", "gallery": "gallery.html", "guide": "how-to/linen.html"}
CHECKS = {
    "navigation tabs": r'class="md-tabs',
    "side navigation": r'class="md-nav md-nav--primary',
    "search box": r'<input[^>]+class="md-search__input',
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def chromium_path(given: str | None) -> str:
    for name in [given, "chromium", "chromium-browser", "google-chrome"]:
        if name and shutil.which(name):
            return shutil.which(name)
    sys.exit("no Chromium found: apt-get install chromium (or pass --chromium PATH)")


def run_chromium(chromium: str, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1000"]
    return subprocess.run([chromium, *flags, *args], capture_output=True, text=True, timeout=120)


def missing_images(dom: str, page: Path) -> list[str]:
    missing = []
    for src in re.findall(r'<img[^>]+src="([^"]+)"', dom):
        url = urlparse(src)
        if url.scheme in ("data", "http", "https", "file"):
            continue
        target = page.parent / unquote(url.path)
        if not target.is_file():
            missing.append(src)
    return missing


def check_page(chromium: str, site: Path, name: str, relative: str, out: Path, base: str) -> list[str]:
    page = (site / relative).resolve()
    url = f"{base}/{relative}"
    shot = out / f"{name}.png"
    run_chromium(chromium, f"--screenshot={shot}", url)
    dom = run_chromium(chromium, "--virtual-time-budget=3000", "--dump-dom", url).stdout
    problems = [f"{name}: no {what}" for what, pattern in CHECKS.items() if not re.search(pattern, dom)]
    problems += [f"{name}: image not in the site: {src}" for src in missing_images(dom, page)]
    images = len(re.findall(r"<img ", dom))
    print(
        f"{name}: {relative} -> {shot} ({shot.stat().st_size if shot.exists() else 0} bytes, {images} images)"
    )
    if not shot.exists():
        problems.append(f"{name}: no screenshot written")
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--site", default="site", help="the built site (default: site)")
    parser.add_argument("--out", default="screenshots", help="where the PNGs go (default: screenshots)")
    parser.add_argument("--build", action="store_true", help="run mkdocs build --strict into --site first")
    parser.add_argument("--chromium", help="the browser's executable (default: found on PATH)")
    args = parser.parse_args(argv)
    site, out = Path(args.site), Path(args.out)
    if args.build:
        subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)], check=True
        )
    out.mkdir(parents=True, exist_ok=True)
    chromium = chromium_path(args.chromium)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(site)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.0)
        base = f"http://127.0.0.1:{port}"
        problems = [
            p for name, rel in PAGES.items() for p in check_page(chromium, site, name, rel, out, base)
        ]
    finally:
        server.terminate()
        server.wait()
    for problem in problems:
        print("MISSING", problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
