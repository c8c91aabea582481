"""The shipped library: every file validates, plans on the default applicators, is signed."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest
from fixtures.signing import run_minisign
from protocol_helpers import icd_applicators, sim_applicators

from pbmd.drivers import codec
from pbmd.protocols import library
from pbmd.protocols.limits import DEFAULT_LIMITS, skin_mpe_mw_cm2
from pbmd.protocols.loader import LoadedProtocol, load_protocol
from pbmd.protocols.model import ApplicatorKind, Mode
from pbmd.protocols.plan import Plan, plan, verify_plan
from pbmd.protocols.signing import PublicKey, verify

FILES = library.protocol_files()
EXPECTED_IDS = {
    "lumbar-chronic-nonspecific",
    "lumbar-acute",
    "lumbar-disc-radicular",
    "lumbar-facet",
    "lumbar-spinal-stenosis",
    "lumbar-post-surgical",
    "cervical-lumbar-combined",
}
APPLICATOR_SOURCES = {"icd-appendix-a": icd_applicators, "hw-sim-catalog": sim_applicators}


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


@pytest.fixture(scope="module", params=FILES, ids=ids(FILES))
def loaded(request: pytest.FixtureRequest) -> LoadedProtocol:
    path: Path = request.param
    return load_protocol(path)


def test_the_library_has_the_seven_programs() -> None:
    assert {p.stem for p in FILES} == EXPECTED_IDS


def test_file_name_is_the_protocol_id(loaded: LoadedProtocol) -> None:
    assert Path(loaded.source).stem == loaded.protocol.id


def test_validates_without_warnings(loaded: LoadedProtocol) -> None:
    assert loaded.warnings == ()


def test_four_ports_at_once_for_45_to_60_minutes(loaded: LoadedProtocol) -> None:
    protocol = loaded.protocol
    assert sorted(protocol.ports) == [1, 2, 3, 4]
    assert 45 * 60 <= loaded.session_time_s <= 60 * 60
    for number in (1, 2, 3):
        port = protocol.ports[number]
        assert port.applicator.kind is ApplicatorKind.PAD
        assert [s.wavelength_nm for s in port.steps] == [660, 830], "660 nm, then 830 nm"
    probe = protocol.ports[4]
    assert probe.applicator.kind is ApplicatorKind.PROBE
    labels = " ".join(protocol.sites[s.site].label for s in probe.steps)
    for level in ("L3–4", "L4–5", "L5–S1"):
        assert level in labels


def test_probe_steps_are_gated_on_placement_and_contact(loaded: LoadedProtocol) -> None:
    for step in loaded.protocol.ports[4].steps:
        assert step.gating.confirm_placement and step.gating.skin_contact
        assert step.mode is Mode.PULSED and step.wavelength_nm == 905


def test_every_dose_is_within_every_ceiling(loaded: LoadedProtocol) -> None:
    per_site: dict[tuple[str, int], float] = {}
    for dose in loaded.doses:
        key = (dose.site, dose.wavelength_nm)
        per_site[key] = per_site.get(key, 0.0) + dose.fluence_j_cm2
        assert dose.irradiance_mw_cm2 <= min(100.0, skin_mpe_mw_cm2(dose.wavelength_nm))
        assert 1 <= dose.time_s <= 1800
        assert dose.max_time_s >= dose.time_s * 1.2 - 1e-9
    assert max(per_site.values()) <= DEFAULT_LIMITS.fluence_ceiling_j_cm2


def test_cites_only_verified_sources_and_marks_the_test_key(loaded: LoadedProtocol) -> None:
    text = Path(loaded.source).read_text(encoding="utf-8")
    assert "NOT FOR CLINICAL USE" in text
    assert "Cochrane review of 22" not in text
    assert "Pain Physician" not in text
    assert loaded.protocol.evidence, "every program names its sources"


@pytest.mark.parametrize("source", APPLICATOR_SOURCES, ids=list(APPLICATOR_SOURCES))
def test_plans_on_the_default_applicators(loaded: LoadedProtocol, source: str) -> None:
    applicators = APPLICATOR_SOURCES[source]()
    result = plan(loaded.protocol, applicators)
    verify_plan(result)
    assert result.warnings == ()
    assert 45 * 60_000 <= result.expected_duration_ms <= 60 * 60_000
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


def test_plan_hash_is_stable(loaded: LoadedProtocol) -> None:
    first = plan(loaded.protocol, icd_applicators())
    reordered = dict(reversed(list(icd_applicators().items())))
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
            assert tomllib.load(handle)["schema_version"] == 1
