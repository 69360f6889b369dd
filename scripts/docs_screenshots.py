"""Build the documentation site, serve it locally and screenshot pages with headless Chromium, to check
the site as a reader sees it (formulas rendered, tables fitting, code blocks with their copy button).

    python scripts/docs_screenshots.py --out shots/        # needs mkdocs (the docs extra) and chromium

Writes `index.png`, `method-all4one.png`, `config-reference.png` and `getting-started.png` (1280 px wide)
to --out. Chromium is
Debian's `chromium` package (`apt-get install chromium`); --chromium names another binary. Formulas
render in the first math font of docs/stylesheets/extra.css that is installed (Debian: `fonts-lmodern`
or the DejaVu math font that comes with `fonts-dejavu-extra`).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PAGES = {"index": "index.html", "method-all4one": "methods/all4one.html",
         "config-reference": "reference/config.html", "getting-started": "getting-started.html"}


def build_site(site: Path) -> None:
    subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                   cwd=REPO, check=True)


def serve(site: Path) -> tuple[http.server.ThreadingHTTPServer, int]:
    """An HTTP server on a free local port for `site`, in a daemon thread."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, server.server_address[1]


def screenshot(chromium: str, url: str, out: Path, height: int) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    f"--window-size=1280,{height}", f"--screenshot={out}", url],
                   check=True, capture_output=True, timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "chromium")
    parser.add_argument("--height", type=int, default=2000, help="window height in pixels")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        build_site(site)
        server, port = serve(site)
        try:
            for name, page in PAGES.items():
                screenshot(args.chromium, f"http://127.0.0.1:{port}/{page}", args.out / f"{name}.png",
                           args.height)
                print(args.out / f"{name}.png")
        finally:
            server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
