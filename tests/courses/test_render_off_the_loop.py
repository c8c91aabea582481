"""Course plots and PDFs never load their libraries on the event loop.

matplotlib and fpdf2 take about 2 s to import the first time (measured with
``python -X importtime``); on the daemon's loop that would silence the controller's
heartbeat past its 250 ms watchdog mid-session (E401). The API imports them in a
worker thread (`api/courses._load_renderers`) before it uses them.
"""

from __future__ import annotations

import subprocess
import sys
import threading

from pbmd.daemon.services.api import courses as courses_api

_FRESH = """
import sys
import pbmd.daemon.services.service, pbmd.daemon.services.api
heavy = sorted(m for m in ("matplotlib", "fpdf") if m in sys.modules)
print(",".join(heavy) or "none")
"""


def test_the_daemon_and_its_api_start_without_the_rendering_libraries() -> None:
    out = subprocess.run(
        [sys.executable, "-c", _FRESH], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == "none"


def test_the_rendering_libraries_load_in_the_calling_worker_thread() -> None:
    loaded_in: list[str] = []

    def worker() -> None:
        courses_api._load_renderers()
        loaded_in.append(threading.current_thread().name)

    t = threading.Thread(target=worker, name="render-loader")
    t.start()
    t.join()
    assert loaded_in == ["render-loader"]
    assert "matplotlib" in sys.modules and "fpdf" in sys.modules
