"""Render pages of the built documentation site to PNG with headless Chromium.

Looks at the site as a reader would: layout, figures and the MathML equations. Build the
site first (``mkdocs build --strict``), install Chromium from the Debian packages
(``apt-get install chromium``), then::

    python scripts/screenshot_docs.py                       # home page and spectra guide
    python scripts/screenshot_docs.py guides/bptt.html --height 4000 --out /tmp/shots

Each page is written to ``<out>/<page path with / replaced by _>.png`` at the given window
size (the whole height is captured, so pick one tall enough for the part you want to see).
The pages are opened from disk (``file://``); the site needs no network (no CDN scripts:
maths is MathML made at build time).
"""

from __future__ import annotations

import argparse
import pathlib
import shutil
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
DEFAULT_PAGES = ["index.html", "guides/spectra.html"]


def browser() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    raise SystemExit("no Chromium found: install it with `apt-get install chromium`")


def screenshot(page: pathlib.Path, png: pathlib.Path, width: int, height: int) -> None:
    cmd = [
        browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--allow-file-access-from-files",
        f"--window-size={width},{height}",
        f"--screenshot={png}",
        page.as_uri(),
    ]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    if not png.exists():
        raise SystemExit(f"Chromium wrote no screenshot for {page}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pages", nargs="*", default=DEFAULT_PAGES, help="pages, relative to the site")
    parser.add_argument("--site", type=pathlib.Path, default=ROOT / "site", help="the built site")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "site-screenshots")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=2400)
    args = parser.parse_args(argv)
    if not (args.site / "index.html").exists():
        raise SystemExit(f"no built site at {args.site}: run `mkdocs build --strict` first")
    args.out.mkdir(parents=True, exist_ok=True)
    for rel in args.pages:
        page = args.site / rel
        if not page.exists():
            raise SystemExit(f"{page} does not exist in the built site")
        png = args.out / (rel.replace("/", "_").removesuffix(".html") + ".png")
        screenshot(page, png, args.width, args.height)
        print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
