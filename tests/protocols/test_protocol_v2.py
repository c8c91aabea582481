"""Format version 2: phases, the body map, dose sources, and the ceilings on the skin.

Each refusal is a small v2 protocol with one thing wrong; the checks must name the
rule, the place in the file and how to fix it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from fixtures.protocols import (
    BASE,
    V2_SITES,
    pad_step,
    pads_then_probe,
    probe_step,
    protocol_v2,
    site_v2,
)
from protocol_helpers import icd_applicators

from pbmd.protocols.body_map import BodyMapError, body_map, parse_body_map
from pbmd.protocols.cli import schema
from pbmd.protocols.errors import ProtocolInvalid, Severity
from pbmd.protocols.limits import Limits
from pbmd.protocols.loader import load_protocol, parse_protocol
from pbmd.protocols.plan import plan

EXAMPLE = Path(__file__).resolve().parent / "v2-example.toml"
PHASES = [("pads", "Pads"), ("probe", "Probe after the pads")]


def rules(text: str, limits: Limits | None = None) -> dict[str, list[str]]:
    """The refused file's errors by rule (messages), or {} when it is valid."""
    try:
        parse_protocol(text, limits=limits or Limits())
    except ProtocolInvalid as exc:
        out: dict[str, list[str]] = {}
        for issue in exc.errors:
            out.setdefault(issue.rule, []).append(str(issue))
        return out
    return {}


def test_the_example_in_the_docs_and_notes_is_valid_and_runs_in_two_phases() -> None:
    loaded = load_protocol(EXAMPLE)
    timeline = loaded.timeline()
    assert [p.id for p in timeline.phases] == ["pads", "probe"]
    pads, probe = timeline.phases
    assert probe.start_s == pads.end_s == pytest.approx(2000.0)
    assert loaded.session_time_s == pytest.approx(2060.0)
    assert loaded.v1_reading == []


def test_pads_then_probe_plans_with_phases_patches_and_critical_path() -> None:
    loaded = parse_protocol(pads_then_probe())
    the_plan = plan(loaded.protocol, icd_applicators())
    assert [(p.id, p.ports) for p in the_plan.phases] == [("pads", (1, 2, 3)), ("probe", (4,))]
    assert the_plan.expected_duration_ms == 80_000  # 60 s of pads, then 2 × 10 s of probe
    assert the_plan.phases[1].expected_start_ms == 60_000
    point = the_plan.port(4).emissions[0]
    assert point.phase == 1 and point.body_region == "l4-l5-facet-left"
    # the left pad's light reaches the point: its fluence counts on the point's skin
    assert "l4-l5-facet-left" in the_plan.port(1).emissions[0].patches
    assert "l4-l5-facet-left" not in the_plan.port(2).emissions[0].patches


def test_probe_over_a_running_pad_is_refused() -> None:
    text = pads_then_probe().replace('phase = "probe"', 'phase = "pads"')
    text = text.replace('[[phases]]\nid = "probe"\ntitle = "Probe points, after the pads"\n', "")
    found = rules(text)
    assert "probe-over-pad" in found, found
    assert "port 4" in found["probe-over-pad"][0] and "port 1" in found["probe-over-pad"][0]
    assert "later phase" in found["probe-over-pad"][0]


def test_probe_on_skin_no_pad_covers_may_run_with_the_pads() -> None:
    sites = V2_SITES + site_v2("r-point", "L4-5 right", "l4-l5-facet-right")
    text = protocol_v2(
        [("all", "Everything at once")],
        {
            1: [pad_step(site="left", phase="all", assumption="Tests.")],
            4: [probe_step(site="r-point", phase="all", assumption="Tests.")],
        },
        sites,
    )
    assert rules(text) == {}


def test_cumulative_fluence_over_differently_named_sites_on_one_patch_is_refused() -> None:
    """Two site names on the same skin: 6 + 6 J/cm² at 660 nm is 12 on one patch."""
    sites = V2_SITES + site_v2("left-again", "Lumbar muscles, left (2)", "lumbar-paraspinal-left")
    text = protocol_v2(
        PHASES,
        {
            1: [
                pad_step(
                    site="left", irradiance=10.0, fluence=6.0, phase="pads", assumption="Tests."
                )
            ],
            2: [
                pad_step(
                    site="left-again",
                    irradiance=10.0,
                    fluence=6.0,
                    phase="probe",
                    assumption="Tests.",
                )
            ],
        },
        sites,
    )
    found = rules(text)
    assert "patch-fluence" in found, found
    assert "12 J/cm² at 660 nm" in found["patch-fluence"][0]
    assert "assumed" in found["patch-fluence"][0]  # the ceiling's source is said


def test_cumulative_fluence_of_a_probe_point_inside_a_pad_adds_all_wavelengths() -> None:
    """Pad 660 + 830 nm at 6 J/cm² each and a 905 nm point at 10 J/cm² inside the pad:
    each wavelength is within 10 J/cm², the patch's total of 22 is over 20."""
    text = protocol_v2(
        PHASES,
        {
            1: [
                pad_step(
                    site="left",
                    nm=nm,
                    irradiance=10.0,
                    fluence=6.0,
                    phase="pads",
                    assumption="Tests.",
                )
                for nm in (660, 830)
            ],
            4: [probe_step(site="l4-left", energy_j=5.0, phase="probe", assumption="Tests.")],
        },
        V2_SITES,
    )
    found = rules(text)
    assert list(found) == ["patch-fluence-total"], found
    assert "'l4-l5-facet-left'" in found["patch-fluence-total"][0]
    assert "22 J/cm²" in found["patch-fluence-total"][0]
    # the same file passes where the site configures a higher total ceiling
    assert rules(text, Limits(total_fluence_ceiling_j_cm2=25.0)) == {}


def test_mpe_sum_over_one_is_refused() -> None:
    """Two pads on overlapping skin at once, 150 mW/cm² at 660 nm (0.75 of the MPE) and
    150 at 830 nm (0.41): 1.16 × the MPE on the shared skin."""
    sites = V2_SITES + site_v2("thl", "Thoracolumbar", "thoracolumbar")
    text = protocol_v2(
        [("pads", "Pads")],
        {
            1: [
                pad_step(site="left", irradiance=150.0, fluence=1.5, phase="pads", assumption="T.")
            ],
            2: [
                pad_step(
                    site="thl", nm=830, irradiance=150.0, fluence=1.5, phase="pads", assumption="T."
                )
            ],
        },
        sites,
    )
    found = rules(text)
    assert "mpe-sum" in found, found
    assert "1.16" in found["mpe-sum"][0]
    # one after the other, the same steps are within the limit
    later = protocol_v2(
        [("pads", "Pads"), ("later", "Later")],
        {
            1: [
                pad_step(site="left", irradiance=150.0, fluence=1.5, phase="pads", assumption="T.")
            ],
            2: [
                pad_step(
                    site="thl",
                    nm=830,
                    irradiance=150.0,
                    fluence=1.5,
                    phase="later",
                    assumption="T.",
                )
            ],
        },
        sites,
    )
    assert "mpe-sum" not in rules(later)


@pytest.mark.parametrize(
    ("edit", "rule"),
    [
        (lambda t: t.replace('phase = "probe"', 'phase = "nope"', 1), "phase-unknown"),
        (lambda t: t.replace('assumption = "Tests only."\n', "", 1), "dose-unsourced"),
        (
            lambda t: t.replace('assumption = "Tests only."', 'sources = ["huang-2015"]', 1),
            "unknown-source",
        ),
        (
            lambda t: t.replace('body_region = "l4-l5-facet-left"', 'body_region = "l4-l5-left"'),
            "body-region-unknown",
        ),
        (lambda t: t.replace('body_map = "pbmd-body-map"', 'body_map = "other"'), "body-map"),
        (
            lambda t: t.replace(
                'body_region = "lumbar-paraspinal-left"', 'body_region = "l2-l3-facet-left"'
            ),
            "site-area",
        ),
        (
            lambda t: (
                t + '\n[[totals]]\nlabel = "Probe"\nphase = "probe"\nenergy_j = 16.0\n'
                'assumption = "Tests."\n'
            ),
            "totals-mismatch",
        ),
        (
            lambda t: t.replace('body_region = "l4-l5-facet-left"', 'region = "lumbar"'),
            "v1-key-in-v2",
        ),
    ],
)
def test_v2_refusals_name_the_rule(edit, rule: str) -> None:  # type: ignore[no-untyped-def]
    found = rules(edit(pads_then_probe()))
    assert rule in found, found


def test_a_port_listing_a_later_phase_first_is_refused() -> None:
    text = protocol_v2(
        PHASES,
        {
            1: [
                pad_step(site="left", phase="probe", assumption="T."),
                pad_step(site="left", nm=830, phase="pads", assumption="T."),
            ]
        },
        V2_SITES,
    )
    assert "phase-order" in rules(text)


def test_a_stated_total_that_agrees_is_accepted() -> None:
    text = pads_then_probe() + (
        '\n[[totals]]\nlabel = "Probe energy"\nphase = "probe"\nports = [4]\nenergy_j = 1.0\n'
        'points = 2\nsources = ["walt-2010"]\nbasis = "Tests."\n'
    )
    assert rules(text) == {}


def test_v1_files_load_as_one_phase_and_say_what_they_mean_in_v2() -> None:
    loaded = parse_protocol(BASE)
    assert loaded.phases == [("all", "every port at once (a version 1 file)")]
    the_plan = plan(loaded.protocol, icd_applicators())
    assert [p.ports for p in the_plan.phases] == [(1, 4)]
    assert all(e.phase == 0 for p in the_plan.ports for e in p.emissions)
    reading = " ".join(loaded.v1_reading)
    assert "one phase" in reading and "probe on port 4 runs while the pads" in reading
    assert "per site name" in reading


def test_v2_keys_in_a_v1_file_are_refused() -> None:
    text = BASE.replace('site = "back"', 'site = "back"\nphase = "pads"', 1)
    assert "v2-key-in-v1" in rules(text)


def test_pad_overlap_is_a_warning() -> None:
    sites = V2_SITES + site_v2("thl", "Thoracolumbar", "thoracolumbar")
    text = protocol_v2(
        [("pads", "Pads")],
        {
            1: [pad_step(site="left", phase="pads", assumption="T.")],
            2: [pad_step(site="thl", phase="pads", assumption="T.")],
        },
        sites,
    )
    loaded = parse_protocol(text)
    assert [w.rule for w in loaded.warnings] == ["pad-overlap"]
    assert loaded.warnings[0].severity is Severity.WARNING


def test_skin_type_derating_lowers_the_ceiling_only_where_configured() -> None:
    loaded = parse_protocol(pads_then_probe())
    plain = plan(loaded.protocol, icd_applicators(), Limits(), skin_type="VI")
    assert plain.skin_type == "VI" and plain.irradiance_derating == 1.0
    derated = Limits(irradiance_derating_by_skin_type={"VI": 0.1})
    with pytest.raises(Exception, match="skin type VI"):
        plan(loaded.protocol, icd_applicators(), derated, skin_type="VI")
    assert plan(loaded.protocol, icd_applicators(), derated, skin_type="II").skin_type == "II"
    with pytest.raises(ValueError, match="skin type"):
        Limits(irradiance_derating_by_skin_type={"VII": 0.5})


def test_the_body_map_is_consistent_and_relations_are_closed() -> None:
    the_map = body_map()
    assert the_map.regions["l4-l5-facet-left"].zone.value == "lumbar"
    reach = the_map.reaching("l4-l5-facet-left")
    assert {"lumbar-paraspinal-left", "lumbosacral"} <= reach
    assert "lumbar-paraspinal-right" not in reach  # overlaps are not inherited
    assert the_map.share_skin("lumbar-paraspinal-left", "thoracolumbar")
    assert not the_map.share_skin("lumbar-paraspinal-left", "lumbar-paraspinal-right")
    loop = b'id = "m-x"\nversion = 1\n[regions.aaa]\nlabel = "a"\nzone = "lumbar"\narea_cm2 = 1.0\n'
    loop += b'area_basis = "x"\ninside = ["bbb"]\n[regions.bbb]\nlabel = "b"\nzone = "lumbar"\n'
    loop += b'area_cm2 = 1.0\narea_basis = "x"\ninside = ["aaa"]\n'
    with pytest.raises(BodyMapError, match="loop"):
        parse_body_map(loop)


def test_the_json_schema_describes_version_2() -> None:
    doc = schema()
    assert doc["properties"]["schema_version"]["enum"] == [1, 2]
    assert {"phases", "body_map", "totals"} <= set(doc["properties"])
    defs = doc["$defs"]
    assert "body_region" in defs["Site"]["properties"]
    assert {"phase", "sources", "basis", "assumption"} <= set(defs["Step"]["properties"])
    assert "Phase" in defs and "Total" in defs


def test_patches_add_only_regions_that_may_share_skin() -> None:
    """Both paraspinal pads overlap the segment bands and the lumbosacral footprint,
    not each other: no patch carries both; the bands, which pairwise overlap, share one."""
    the_map = body_map()
    both = {"lumbar-paraspinal-left", "lumbar-paraspinal-right"}
    assert not any(both <= regions for regions in the_map.patches.values())
    bands = {f"lumbar-segment-{lvl}" for lvl in ("l3-l4", "l4-l5", "l5-s1")}
    assert any(bands <= regions for regions in the_map.patches.values())
    quadrants = {
        f"lumbar-multilevel-{h}-{s}" for h in ("upper", "lower") for s in ("left", "right")
    }
    assert not any(
        len(quadrants & regions) > 1 for regions in the_map.patches.values()
    )  # four pads side by side
    text = protocol_v2(
        PHASES,
        {
            1: [pad_step(site="left", irradiance=10.0, fluence=6.0, phase="pads", assumption="T.")],
            2: [
                pad_step(site="right", irradiance=10.0, fluence=6.0, phase="probe", assumption="T.")
            ],
        },
        V2_SITES,
    )
    assert rules(text) == {}


def test_a_map_with_a_region_inside_two_unrelated_ones_is_refused() -> None:
    text = b'id = "m-x"\nversion = 1\n'
    for name, extra in (("aaa", ""), ("bbb", ""), ("ccc", 'inside = ["aaa", "bbb"]\n')):
        text += f'[regions.{name}]\nlabel = "x"\nzone = "lumbar"\narea_cm2 = 1.0\n'.encode()
        text += f'area_basis = "x"\n{extra}'.encode()
    with pytest.raises(BodyMapError, match="declare the overlap"):
        parse_body_map(text)
