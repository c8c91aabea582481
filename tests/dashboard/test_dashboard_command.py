"""`pbmd dashboard`: the built page written with the clinic's broker, or served."""

from __future__ import annotations

import json
import subprocess
import urllib.request
from pathlib import Path

import pytest
from mqtt.broker import free_port
from service.harness import PBMD

from pbmd.daemon.clients.dashboard import DashboardNotBuilt, page_config, write_page

from .browser import DIST


def config_of(text: str) -> dict[str, str]:
    body = text.split("window.PBM_DASHBOARD = ", 1)[1].rsplit(";", 1)[0]
    settings: dict[str, str] = json.loads(body)
    return settings


def test_config_is_json_that_cannot_close_the_script() -> None:
    text = page_config("ws://b:9001", "dash</script>", 'p"w', "pbm/v1")
    assert "</script>" not in text
    assert config_of(text) == {
        "url": "ws://b:9001",
        "username": "dash</script>",
        "password": 'p"w',
        "topicRoot": "pbm/v1",
    }


def test_unbuilt_page_is_refused_with_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(DashboardNotBuilt, match="make setup"):
        write_page(tmp_path / "out", built=tmp_path / "nothing")


@pytest.mark.skipif(not (DIST / "app.js").exists(), reason="dashboard not built (no node)")
def test_out_writes_the_page_and_serve_serves_it(tmp_path: Path) -> None:
    secret = tmp_path / "pw"
    secret.write_text("read-only\n", encoding="utf-8")
    out = tmp_path / "page"
    argv = [*PBMD, "dashboard", "--broker", "ws://broker.clinic.lan:9001"]
    argv += ["--username", "dashboard", "--password-file", str(secret)]
    done = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "app.js", "config.js", "index.html", "style.css",
    ]  # fmt: skip
    settings = config_of((out / "config.js").read_text(encoding="utf-8"))
    assert settings["url"] == "ws://broker.clinic.lan:9001"
    assert settings["password"] == "read-only"

    port = free_port()
    server = subprocess.Popen(
        [*argv, "--serve", "--port", str(port)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert server.stdout is not None
        assert f"http://127.0.0.1:{port}/" in server.stdout.readline()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as r:
            assert b'<script src="app.js">' in r.read()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/config.js", timeout=10) as r:
            assert config_of(r.read().decode())["username"] == "dashboard"
    finally:
        server.terminate()
        server.wait(10)
