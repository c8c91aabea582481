"""`pbmd dashboard`: the clinic dashboard page, written to a folder or served locally.

The page (dashboard/ in the source tree, built by `make setup` with npm) is static:
the browser connects to the broker's WebSockets listener itself and reads
``pbm/v1/#`` with read-only credentials, so nothing of pbmd is in its live path
and serving it only hands out files. This command adds the clinic's broker
address and dashboard credentials (``config.js``) to the built page.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import shutil
import sys
import tempfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

BUILT = Path(__file__).resolve().parents[2] / "dashboard" / "dist"
"""Where `make setup` (npm ci && npm run build) puts the page in a source checkout."""

PAGE_FILES = ("index.html", "app.js", "style.css")


class DashboardNotBuilt(Exception):
    pass


def page_config(broker: str, username: str, password: str, topic_root: str = "pbm/v1") -> str:
    """``config.js``: the settings the page reads before it connects (JSON in a script)."""
    settings = {"url": broker, "username": username, "password": password, "topicRoot": topic_root}
    # "</" cannot end the script early: JSON escapes nothing there, so escape it here.
    text = json.dumps(settings).replace("</", "<\\/")
    return (
        "// Written by `pbmd dashboard`: the broker this page reads (read-only credentials).\n"
        f"window.PBM_DASHBOARD = {text};\n"
    )


def write_page(
    out: Path,
    *,
    broker: str = "",
    username: str = "",
    password: str = "",
    topic_root: str = "pbm/v1",
    built: Path = BUILT,
) -> Path:
    """Copy the built page into ``out`` with its ``config.js``; the index file's path."""
    missing = [name for name in PAGE_FILES if not (built / name).is_file()]
    if missing:
        raise DashboardNotBuilt(
            f"the dashboard is not built in {built} (missing {', '.join(missing)}): "
            "run `make setup` with Node.js installed, or `npm ci && npm run build` in dashboard/"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in PAGE_FILES:
        shutil.copyfile(built / name, out / name)
    (out / "config.js").write_text(
        page_config(broker, username, password, topic_root), encoding="utf-8"
    )
    return out / "index.html"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(directory: Path, bind: str, port: int) -> ThreadingHTTPServer:
    """An HTTP server for the written page (static files only; call serve_forever)."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    return ThreadingHTTPServer((bind, port), handler)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "dashboard",
        help="write or serve the clinic dashboard page (live view of every workstation)",
        description="Write the built clinic dashboard into a folder (--out), or serve it on a "
        "local HTTP port (--serve). The page connects to the broker's MQTT WebSockets listener "
        "itself (docs/dashboard.md).",
    )
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--out", type=Path, help="write the page into this folder")
    mode.add_argument("--serve", action="store_true", help="serve the page over HTTP")
    p.add_argument(
        "--broker",
        default="",
        help="the broker's WebSockets URL, e.g. ws://broker.clinic.lan:9001 "
        "(default: ws://<the host the page came from>:9001)",
    )
    p.add_argument("--username", default="", help="the broker's read-only dashboard user")
    p.add_argument("--password-file", type=Path, help="a file holding that user's password")
    p.add_argument("--topic-root", default="pbm/v1", help="the topics' root (pbm/v1)")
    p.add_argument("--bind", default="127.0.0.1", help="address to serve on (127.0.0.1)")
    p.add_argument("--port", type=int, default=8090, help="port to serve on (8090)")
    p.add_argument("--built", type=Path, default=BUILT, help=f"the built page ({BUILT})")
    p.set_defaults(func=_main)


def _main(args: argparse.Namespace) -> int:
    password = ""
    if args.password_file is not None:
        password = args.password_file.read_text(encoding="utf-8").strip()
    settings = {
        "broker": args.broker,
        "username": args.username,
        "password": password,
        "topic_root": args.topic_root,
        "built": args.built,
    }
    try:
        if args.out is not None:
            index = write_page(args.out, **settings)
            print(f"dashboard written: open {index.resolve().as_uri()} in a browser")
            return 0
        with tempfile.TemporaryDirectory(prefix="pbm-dashboard-") as tmp:
            write_page(Path(tmp), **settings)
            with serve(Path(tmp), args.bind, args.port) as server:
                host, port = server.server_address[:2]
                print(f"dashboard at http://{host!s}:{port}/ (Ctrl-C stops)", flush=True)
                with contextlib.suppress(KeyboardInterrupt):
                    server.serve_forever()
        return 0
    except DashboardNotBuilt as exc:
        print(f"pbmd dashboard: {exc}", file=sys.stderr)
        return 1
