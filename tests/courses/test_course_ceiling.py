"""The course ceiling on the simulator: a course may put at most
``course_fluence_ceiling_j_cm2`` on a patch of skin at one wavelength, summed over
its sessions; the session that would pass it is refused, and no written reason
overrides that. The sessions are started with pbmctl, as a clinician would."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.harness import RawClient, pbmctl

from .rig import (
    STEP_FLUENCE_J_CM2,
    ManualClock,
    error_of,
    install,
    make_home,
    run_service,
)


async def test_the_course_ceiling_refuses_the_session_that_would_pass_it(workdir: Path) -> None:
    home = make_home(workdir, "course_fluence_ceiling_j_cm2 = 1.5")
    clock = ManualClock(datetime(2026, 3, 2, 8, 0, tzinfo=UTC))

    def scenario() -> dict[str, Any]:
        with RawClient(home.socket) as c:
            install(c, home.protocols / "course-v1.toml")
        added = pbmctl(
            home.socket,
            "patient",
            "add",
            "P-5",
            "--skin-type",
            "iv",
            "--contraindication",
            "cancer=no",
            "--contraindication",
            "pregnancy=no",
        )
        assert added.returncode == 0, added.stderr
        opened = pbmctl(
            home.socket,
            "--json",
            "course",
            "start",
            "--patient",
            "P-5",
            "--protocol",
            "course-lumbar",
            "--diagnosis",
            "LBP",
            "--sessions",
            "4",
            "--min-interval-days",
            "1",
        )
        assert opened.returncode == 0, opened.stderr
        course_id = json.loads(opened.stdout)["course"]["id"]
        first = pbmctl(home.socket, "session", "start", "--course", course_id, "--watch")
        clock.advance(days=2)
        with RawClient(home.socket) as c:
            err = error_of(
                c, "course.session_start", {"course_id": course_id, "override_reason": "try"}
            )
            summary = c.call("course.show", {"course_id": course_id})["summary"]
        return {"first": first, "err": err, "summary": summary}

    out = await run_service(home, clock, scenario)
    assert out["first"].returncode == 0, out["first"].stdout + out["first"].stderr
    (refusal,) = out["err"]["data"]["refusals"]
    assert refusal["code"] == "course_ceiling" and not refusal["overridable"]
    assert "ceiling of 1.5 J/cm²" in refusal["message"]
    summary = out["summary"]
    assert summary["sessions_given"] == 1 and summary["course_ceiling_j_cm2"] == 1.5
    doses = {d["wavelength_nm"]: d["delivered_j_cm2"] for d in summary["cumulative_dose"]}
    assert set(doses) == {660, 830}
    assert all(abs(v - STEP_FLUENCE_J_CM2) < 0.05 * STEP_FLUENCE_J_CM2 for v in doses.values())
