"""The shipped library: every program validates, is v2 (pads first, then the probe),
traces each dose to a source or says why not, stays within the skin limits, plans on
its applicators and is signed with the TEST key."""

from __future__ import annotations

import math
import tomllib
from collections import defaultdict
from pathlib import Path

import pytest
from fixtures.signing import run_minisign
from protocol_helpers import icd_applicators, sim_applicators

from pbmd.drivers import codec
from pbmd.protocols import library
from pbmd.protocols.body_map import body_map
from pbmd.protocols.evidence import REFERENCES, find_unverifiable
from pbmd.protocols.limits import DEFAULT_LIMITS, skin_mpe_mw_cm2
from pbmd.protocols.loader import LoadedProtocol, load_protocol
from pbmd.protocols.model import ApplicatorKind, Mode, Region
from pbmd.protocols.plan import Plan, plan, verify_plan
from pbmd.protocols.signing import PublicKey, verify

FILES = library.protocol_files()
EXPECTED_IDS = {
    "lumbar-chronic-nonspecific",
    "lumbar-acute",
    "lumbar-disc-radicular",
    "lumbar-disc-multilevel",
    "lumbar-facet",
    "lumbar-spinal-stenosis",
    "lumbar-post-surgical",
    "cervical-lumbar-combined",
}
APPLICATOR_SOURCES = {"icd-appendix-a": icd_applicators, "hw-sim-catalog": sim_applicators}
PROBE_J_PER_POINT = 3.0  # Glazov et al. 2016: benefit at 3 J per point or more
WALT_TOTAL_J = 16.0  # WALT 780–860 nm: lumbar spine and cervical spine, 16 J in total
WALT_POINTS = {Region.LUMBAR: (4, 8), Region.CERVICAL: (4, 12)}
INSTRUMENTED_LEVELS = ("l3-l4", "l4-l5", "l5-s1")  # what post-surgical probe points avoid


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


@pytest.fixture(scope="module", params=FILES, ids=ids(FILES))
def loaded(request: pytest.FixtureRequest) -> LoadedProtocol:
    path: Path = request.param
    return load_protocol(path)


def _kind(loaded: LoadedProtocol, port: int) -> ApplicatorKind:
    return loaded.protocol.ports[port].applicator.kind


def _region(loaded: LoadedProtocol, port: int, index: int) -> str:
    protocol = loaded.protocol
    region = protocol.sites[protocol.ports[port].steps[index].site].body_region
    assert region is not None
    return region


def _applicators(loaded: LoadedProtocol) -> dict[int, codec.PortInfo]:
    """The default wiring (ICD appendix A), with a DUO pad on any other port that needs one."""
    wiring = icd_applicators()
    for number, port in loaded.protocol.ports.items():
        if (
            port.applicator.kind is ApplicatorKind.PAD
            and wiring[number].applicator_kind != codec.ApplicatorKind.PAD
        ):
            pad = wiring[1]
            wiring[number] = codec.PortInfo(
                number, pad.applicator_kind, f"DUO-{number}", pad.area_mm2, pad.channels
            )
    return wiring


def test_the_library_has_the_eight_programs() -> None:
    assert {p.stem for p in FILES} == EXPECTED_IDS


def test_file_name_is_the_protocol_id(loaded: LoadedProtocol) -> None:
    assert Path(loaded.source).stem == loaded.protocol.id


def test_validates_as_v2_without_warnings(loaded: LoadedProtocol) -> None:
    assert loaded.protocol.schema_version == 2
    assert loaded.warnings == ()
    assert loaded.v1_reading == []


def test_pads_run_660_then_830_nm(loaded: LoadedProtocol) -> None:
    pads = [n for n in loaded.protocol.ports if _kind(loaded, n) is ApplicatorKind.PAD]
    assert len(pads) >= 2
    for number in pads:
        steps = loaded.protocol.ports[number].steps
        assert [s.wavelength_nm for s in steps] == [660, 830], "660 nm, then 830 nm"
        assert steps[0].gating.confirm_placement, "the operator places the pad first"


def test_the_probe_starts_only_after_every_pad_has_finished(loaded: LoadedProtocol) -> None:
    """Pads first, then the probe: no probe step shares a phase with a pad step, and the
    timeline puts the probe's first step after the last pad step has ended."""
    pad_phases = {d.phase for d in loaded.doses if _kind(loaded, d.port) is ApplicatorKind.PAD}
    probe_phases = {d.phase for d in loaded.doses if _kind(loaded, d.port) is ApplicatorKind.PROBE}
    if loaded.protocol.id == "lumbar-disc-multilevel":
        assert not probe_phases and len(loaded.protocol.ports) == 4, "four arrays at once"
        assert [p.ports for p in loaded.timeline().phases] == [(1, 2, 3, 4)]
        return
    assert probe_phases and min(probe_phases) > max(pad_phases)
    slots = loaded.timeline().slots
    pads_end = max(s.end_s for s in slots if _kind(loaded, s.item.port) is ApplicatorKind.PAD)
    probe_start = min(
        s.start_s for s in slots if _kind(loaded, s.item.port) is ApplicatorKind.PROBE
    )
    assert probe_start >= pads_end


def test_probe_points_are_gated_pulsed_905_nm_at_3_j(loaded: LoadedProtocol) -> None:
    for dose in loaded.doses:
        if _kind(loaded, dose.port) is not ApplicatorKind.PROBE:
            continue
        step = loaded.protocol.ports[dose.port].steps[dose.index]
        assert step.gating.confirm_placement and step.gating.skin_contact
        assert step.mode is Mode.PULSED and step.wavelength_nm == 905
        assert dose.energy_j == pytest.approx(PROBE_J_PER_POINT)
        assert 20 <= dose.time_s <= 300, "WALT: 20–300 s per point"


def test_lumbar_probe_points_are_at_the_segmental_levels(loaded: LoadedProtocol) -> None:
    protocol = loaded.protocol
    if protocol.id in ("lumbar-disc-multilevel", "lumbar-post-surgical"):
        pytest.skip("no probe (multilevel) / probe kept off the operated levels (post-surgical)")
    steps = [s for p in protocol.ports.values() for s in p.steps]
    labels = " ".join(protocol.sites[s.site].label for s in steps)
    for level in ("L4–5", "L5–S1"):
        assert f"{level}, left" in labels and f"{level}, right" in labels


def test_post_surgical_probe_avoids_the_instrumented_levels() -> None:
    loaded = load_protocol(library.DIRECTORY / "lumbar-post-surgical.toml")
    protocol = loaded.protocol
    probe_regions = [
        _region(loaded, d.port, d.index)
        for d in loaded.doses
        if _kind(loaded, d.port) is ApplicatorKind.PROBE
    ]
    assert probe_regions
    for region in probe_regions:
        assert not region.startswith(INSTRUMENTED_LEVELS), region
        assert "-lateral-" in region, "lateral of the line of pedicle screws and rods"
    text = " ".join([protocol.indication, *protocol.cautions])
    assert "hardware" in text.lower() and "operative record" in text
    assert "surgeon" in text


def test_every_dose_names_its_source_or_says_why_not(loaded: LoadedProtocol) -> None:
    protocol = loaded.protocol
    cited = {e.ref for e in protocol.evidence}
    assert cited <= set(REFERENCES)
    for port in protocol.ports.values():
        for step in port.steps:
            assert step.sources or step.assumption
            if step.sources:
                assert set(step.sources) <= cited and step.basis
    for total in protocol.totals:
        assert set(total.sources) <= cited
        assert (total.sources and total.basis) or total.assumption


def test_the_905_nm_probe_is_not_dosed_from_the_780_860_nm_table(
    loaded: LoadedProtocol,
) -> None:
    """WALT's 904 nm table could not be found: the probe's J per point comes from Glazov
    2016, and each probe step says that using it at 905 nm is an assumption."""
    for port in loaded.protocol.ports.values():
        for step in port.steps:
            if step.wavelength_nm != 905:
                continue
            assert step.sources == ["glazov-2016"]
            assert step.assumption is not None and "904 nm" in step.assumption


def test_probe_totals_agree_with_what_they_cite(loaded: LoadedProtocol) -> None:
    """The stated totals add up, and per spine region the probe stays within WALT's
    point range and under its 16 J total (the only total found)."""
    the_map = body_map()
    probe = [d for d in loaded.doses if _kind(loaded, d.port) is ApplicatorKind.PROBE]
    if not probe:
        assert not loaded.protocol.totals
        return
    stated = [t for t in loaded.protocol.totals if t.ports == [4]]
    assert len(stated) == 1
    assert stated[0].energy_j == pytest.approx(sum(d.energy_j for d in probe))
    assert stated[0].points == len({d.site for d in probe})
    by_zone: dict[Region, list[float]] = defaultdict(list)
    for d in probe:
        by_zone[the_map.regions[_region(loaded, d.port, d.index)].zone].append(d.energy_j)
    for zone, energies in by_zone.items():
        low, high = WALT_POINTS[zone]
        assert low <= len(energies) <= high, zone
        assert sum(energies) <= WALT_TOTAL_J, zone


def test_every_patch_of_skin_is_within_the_session_ceilings(loaded: LoadedProtocol) -> None:
    """Counted here on the skin each applicator really lies on: a step on region S
    doses S and every region inside S, whatever the sites are called."""
    the_map = body_map()
    used = {_region(loaded, d.port, d.index) for d in loaded.doses}
    for patch in used:
        covering = {patch} | set(the_map.containers[patch])
        here = [d for d in loaded.doses if _region(loaded, d.port, d.index) in covering]
        per_wavelength: dict[int, float] = defaultdict(float)
        for d in here:
            per_wavelength[d.wavelength_nm] += d.fluence_j_cm2
        assert max(per_wavelength.values()) <= DEFAULT_LIMITS.fluence_ceiling_j_cm2, patch
        assert sum(per_wavelength.values()) <= DEFAULT_LIMITS.total_fluence_ceiling_j_cm2, patch
        # what reaches this skin at the same time adds as fractions of the skin MPE
        for phase in {d.phase for d in here}:
            worst: dict[int, float] = defaultdict(float)
            for d in here:
                if d.phase == phase:
                    fraction = d.irradiance_mw_cm2 / skin_mpe_mw_cm2(d.wavelength_nm)
                    worst[d.port] = max(worst[d.port], fraction)
            assert sum(worst.values()) <= 1.0, (patch, phase)


def test_every_dose_is_within_every_step_limit(loaded: LoadedProtocol) -> None:
    for dose in loaded.doses:
        assert dose.irradiance_mw_cm2 <= min(100.0, skin_mpe_mw_cm2(dose.wavelength_nm))
        assert 1 <= dose.time_s <= 1800
        assert dose.max_time_s >= dose.time_s * 1.2 - 1e-9


def test_cites_only_verified_sources_and_marks_the_test_key(loaded: LoadedProtocol) -> None:
    text = Path(loaded.source).read_text(encoding="utf-8")
    assert "NOT FOR CLINICAL USE" in text
    assert find_unverifiable(text) == []
    assert loaded.protocol.evidence, "every program names its sources"
    shown = loaded.as_dict()
    assert [e["ref"] for e in shown["evidence"]] == [e.ref for e in loaded.protocol.evidence]
    for port in shown["ports"]:
        for step in port["steps"]:
            assert step["sources"] or step["assumption"]


def test_plans_on_its_applicators(loaded: LoadedProtocol) -> None:
    applicators = _applicators(loaded)
    result = plan(loaded.protocol, applicators)
    verify_plan(result)
    assert result.warnings == ()
    assert 20 * 60_000 <= result.expected_duration_ms <= 60 * 60_000
    for port in result.ports:
        info = applicators[port.port]
        assert port.area_mm2 == info.area_mm2
        for emission in port.emissions:
            channel = info.channel(emission.wavelength_nm)
            assert channel is not None
            assert 0 < emission.power_uw <= channel.max_power_uw
            assert emission.energy_budget_uj == math.ceil(emission.target_energy_uj * 1.05)
            assert emission.max_duration_ms == math.ceil(emission.expected_duration_ms * 1.2)
            assert emission.max_duration_ms <= emission.backup_time_s * 1000
            # every EMIT_START fits its wire fields and survives a round trip
            request = emission.emit_start()
            frame = codec.iter_frames([codec.encode_frame(request, 1)])[0]
            assert frame.message() == request


@pytest.mark.parametrize("source", APPLICATOR_SOURCES, ids=list(APPLICATOR_SOURCES))
def test_default_wiring_runs_every_program_but_the_four_pad_one(source: str) -> None:
    applicators = APPLICATOR_SOURCES[source]()
    for path in FILES:
        protocol = load_protocol(path).protocol
        if protocol.id == "lumbar-disc-multilevel":
            continue  # needs a DUO pad on port 4, where the default wiring has the probe
        assert plan(protocol, applicators).warnings == (), protocol.id


def test_plan_hash_is_stable(loaded: LoadedProtocol) -> None:
    first = plan(loaded.protocol, _applicators(loaded))
    reordered = dict(reversed(list(_applicators(loaded).items())))
    second = plan(loaded.protocol, reordered)
    assert first.content_hash == second.content_hash
    assert Plan.model_validate_json(first.model_dump_json()).verify()


def test_signatures_verify_in_python(loaded: LoadedProtocol) -> None:
    key = PublicKey.from_file(library.TEST_KEY_FILE)
    path = Path(loaded.source)
    verified = verify(path.read_bytes(), Path(str(path) + ".minisig").read_bytes(), [key])
    assert verified.prehashed
    assert "NOT FOR CLINICAL USE" in verified.trusted_comment
    assert f"{loaded.protocol.id} v{loaded.protocol.version}" in verified.trusted_comment


def test_signatures_verify_with_minisign(loaded: LoadedProtocol) -> None:
    result = run_minisign("-V", "-p", str(library.TEST_KEY_FILE), "-m", loaded.source)
    assert "Signature and comment signature verified" in result.stdout


def test_test_key_is_marked_not_for_clinical_use() -> None:
    text = library.TEST_KEY_FILE.read_text(encoding="utf-8")
    assert "TEST" in text and "NOT FOR CLINICAL USE" in text
    key = PublicKey.parse(text)
    assert key.id_hex in text


def test_files_are_plain_toml() -> None:
    for path in FILES:
        with path.open("rb") as handle:
            assert tomllib.load(handle)["schema_version"] == 2
