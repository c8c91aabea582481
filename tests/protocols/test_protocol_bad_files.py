"""One bad file per rule: each is refused, with a finding a technician can act on."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field

import pytest
from fixtures.protocols import BASE
from protocol_helpers import edit, line_with

from pbmd.protocols.errors import Issue, ProtocolInvalid, Severity
from pbmd.protocols.limits import Limits
from pbmd.protocols.loader import MAX_FILE_BYTES, parse_protocol

PAD_STEP = "[[ports.1.steps]]"
PROBE_STEP = "[[ports.4.steps]]"


def pad(text: str, old: str, new: str) -> str:
    """Edit the pad step (the first occurrence after its header)."""
    head, tail = text.split(PAD_STEP, 1)
    return head + PAD_STEP + edit(tail, old, new)


def probe(text: str, old: str, new: str) -> str:
    head, tail = text.split(PROBE_STEP, 1)
    return head + PROBE_STEP + edit(tail, old, new)


def session_over_90_min() -> str:
    """Port 1: four sites × 1500 s = 100 minutes of emission."""
    text = BASE
    steps = ""
    for n in range(4):
        text = edit(
            text,
            "[sites.point]",
            f'[sites.s{n}]\nlabel = "site {n}"\nregion = "lumbar"\narea_covered_cm2 = 180.0\n\n'
            "[sites.point]",
        )
        steps += (
            f'\n[[ports.1.steps]]\nsite = "s{n}"\nwavelength_nm = 830\nmode = "continuous"\n'
            'technique = "contact"\nirradiance_mw_cm2 = 4.0\nfluence_j_cm2 = 6.0\n'
            "max_time_s = 1800\n"
        )
    return edit(text, "[ports.4.applicator]", steps.lstrip("\n") + "\n[ports.4.applicator]")


@dataclass(frozen=True)
class Bad:
    name: str
    text: str | bytes
    rule: str
    at: str | None  # the finding's field path, None for file-level findings
    message: str  # a fragment of the finding's message
    line_of: str | None = None  # a fragment of the line the finding must point at
    limits: Limits = field(default_factory=Limits)
    also_in_fix: str | None = None
    after: str | None = None  # look for `line_of` only after this fragment


CASES = [
    Bad(
        "toml syntax",
        edit(BASE, 'title = "Base protocol for tests"', 'title = "Base'),
        "toml-syntax",
        None,
        "not valid TOML",
        line_of='title = "Base',
    ),
    Bad(
        "not utf-8",
        BASE.encode().replace(b"Tests only.", b"Tests \xff only."),
        "encoding",
        None,
        "not UTF-8",
        line_of="indication",
    ),
    Bad("too large", BASE + "#" * MAX_FILE_BYTES, "too-large", None, "larger than"),
    Bad(
        "unknown key",
        pad(BASE, "wavelength_nm = 660", "wavelength_nm = 660\ncolour = 1"),
        "unknown-key",
        "ports.1.steps[0].colour",
        "unknown key",
        line_of="colour = 1",
    ),
    Bad(
        "misspelled key",
        pad(BASE, "wavelength_nm = 660", "wavelenght_nm = 660"),
        "unknown-key",
        "ports.1.steps[0].wavelenght_nm",
        "unknown key",
        line_of="wavelenght_nm",
        also_in_fix="did you mean 'wavelength_nm'",
    ),
    Bad(
        "top-level key inside a table",
        edit(BASE, 'cautions = ["Eyewear."]\n', "").replace(
            "interval_days = 2\n", 'interval_days = 2\ncautions = ["Eyewear."]\n'
        ),
        "unknown-key",
        "course.cautions",
        "unknown key",
        line_of="cautions = ",
        also_in_fix="top-level key",
    ),
    Bad(
        "missing key",
        pad(BASE, "max_time_s = 720\n", ""),
        "missing-key",
        "ports.1.steps[0].max_time_s",
        "required key 'max_time_s'",
        line_of=PAD_STEP,
    ),
    Bad(
        "wavelength out of range",
        pad(BASE, "wavelength_nm = 660", "wavelength_nm = 550"),
        "range",
        "ports.1.steps[0].wavelength_nm",
        "out of range",
        line_of="= 550",
        also_in_fix="inside the allowed range",
    ),
    Bad(
        "version zero",
        edit(BASE, "\nversion = 1", "\nversion = 0"),
        "range",
        "version",
        "out of range",
        line_of="version = 0",
    ),
    Bad(
        "port number",
        BASE.replace("ports.4.", "ports.9."),
        "range",
        "ports.9",
        "port number",
        line_of="[ports.9.applicator]",
    ),
    Bad(
        "string for a number",
        edit(BASE, "sessions = 10", 'sessions = "10"'),
        "type",
        "course.sessions",
        "expected an integer",
        line_of="sessions =",
    ),
    Bad(
        "inf is not a number",
        pad(BASE, "irradiance_mw_cm2 = 10.0", "irradiance_mw_cm2 = inf"),
        "type",
        "ports.1.steps[0].irradiance_mw_cm2",
        "inf and nan",
        line_of="= inf",
    ),
    Bad(
        "unknown mode",
        pad(BASE, 'mode = "continuous"', 'mode = "cw"'),
        "choice",
        "ports.1.steps[0].mode",
        "not one of the allowed",
        line_of='mode = "cw"',
    ),
    Bad(
        "bad identifier",
        edit(BASE, 'id = "test-base"', 'id = "Test Base"'),
        "pattern",
        "id",
        "not a valid identifier",
        line_of='id = "Test',
    ),
    Bad(
        "no evidence",
        edit(BASE, '[[evidence]]\nref = "walt-2010"\nrelevance = "Dose figures."\n', "").replace(
            'cautions = ["Eyewear."]', 'cautions = ["Eyewear."]\nevidence = []'
        ),
        "length",
        "evidence",
        "at least 1",
        line_of="evidence = []",
    ),
    Bad(
        "wavelength not a channel",
        pad(BASE, "wavelength_nm = 660", "wavelength_nm = 850"),
        "wavelength-channel",
        "ports.1.steps[0].wavelength_nm",
        "not a channel",
        line_of="wavelength_nm = 850",
    ),
    Bad(
        "905 nm continuous",
        probe(BASE, 'mode = "pulsed"\n', 'mode = "continuous"\n').replace(
            "pulse_hz = 5000\nduty_permille = 1\n", ""
        ),
        "pulsed-only",
        "ports.4.steps[0].mode",
        "emit only pulses",
        line_of='"continuous"',
        after=PROBE_STEP,
    ),
    Bad(
        "pulse parameter on a continuous step",
        pad(BASE, "wavelength_nm = 660", "wavelength_nm = 660\npulse_hz = 10"),
        "pulse-params-continuous",
        "ports.1.steps[0].pulse_hz",
        "step is continuous",
        line_of="pulse_hz = 10",
    ),
    Bad(
        "pulsed without a rate",
        probe(BASE, "pulse_hz = 5000\n", ""),
        "pulse-params-missing",
        "ports.4.steps[0].pulse_hz",
        "repetition rate",
    ),
    Bad(
        "duty and width disagree",
        probe(BASE, "duty_permille = 1", "duty_permille = 1\npulse_width_ns = 500"),
        "duty-consistency",
        "ports.4.steps[0].duty_permille",
        "disagrees",
        line_of="duty_permille",
    ),
    Bad(
        "duty below 1 permille",
        probe(BASE, "duty_permille = 1", "pulse_width_ns = 50"),
        "duty-range",
        "ports.4.steps[0].pulse_width_ns",
        "duty cycle of 0.25",
        line_of="pulse_width_ns = 50",
    ),
    Bad(
        "no setpoint",
        pad(BASE, "irradiance_mw_cm2 = 10.0\n", ""),
        "setpoint-missing",
        "ports.1.steps[0].power_mw",
        "no power or irradiance",
    ),
    Bad(
        "no dose",
        pad(BASE, "fluence_j_cm2 = 6.0\n", ""),
        "dose-missing",
        "ports.1.steps[0].fluence_j_cm2",
        "no dose target",
    ),
    Bad(
        "two doses, no target",
        pad(BASE, "fluence_j_cm2 = 6.0", "fluence_j_cm2 = 6.0\ntime_s = 600"),
        "target-ambiguous",
        "ports.1.steps[0].target",
        "none is named",
    ),
    Bad(
        "target not stated",
        pad(BASE, "fluence_j_cm2 = 6.0", 'fluence_j_cm2 = 6.0\ntarget = "time_s"'),
        "target-not-stated",
        "ports.1.steps[0].target",
        "does not state",
        line_of='target = "time_s"',
    ),
    Bad(
        "pad dosed in joules",
        pad(BASE, "fluence_j_cm2 = 6.0", "energy_j = 1080.0"),
        "target-kind",
        "ports.1.steps[0].energy_j",
        "pads are dosed in J/cm²",
        line_of="energy_j = 1080",
    ),
    Bad(
        "probe dosed in J/cm2",
        probe(BASE, "energy_j = 4.0", "fluence_j_cm2 = 8.0"),
        "target-kind",
        "ports.4.steps[0].fluence_j_cm2",
        "probes are dosed in J per point",
        line_of="fluence_j_cm2 = 8.0",
    ),
    Bad(
        "power disagrees with irradiance × area",
        pad(BASE, "irradiance_mw_cm2 = 10.0", "irradiance_mw_cm2 = 10.0\npower_mw = 2000.0"),
        "power-irradiance",
        "ports.1.steps[0].power_mw",
        "disagrees",
        line_of="power_mw = 2000",
    ),
    Bad(
        "time disagrees with fluence",
        pad(
            BASE,
            "fluence_j_cm2 = 6.0",
            'fluence_j_cm2 = 6.0\ntime_s = 500\ntarget = "fluence_j_cm2"',
        ),
        "dose-consistency",
        "ports.1.steps[0].time_s",
        "disagrees",
        line_of="time_s = 500",
    ),
    Bad(
        "peak power disagrees with average / duty",
        probe(BASE, "power_mw = 50.0", "power_mw = 50.0\npeak_power_mw = 10000.0"),
        "peak-consistency",
        "ports.4.steps[0].peak_power_mw",
        "peak power × duty",
        line_of="peak_power_mw",
    ),
    Bad(
        "irradiance above the skin MPE",
        pad(BASE, "irradiance_mw_cm2 = 10.0", "irradiance_mw_cm2 = 250.0"),
        "irradiance-ceiling",
        "ports.1.steps[0].irradiance_mw_cm2",
        "skin MPE at 660 nm",
        line_of="= 250.0",
    ),
    Bad(
        "irradiance above the site ceiling",
        BASE,
        "irradiance-ceiling",
        "ports.1.steps[0].irradiance_mw_cm2",
        "site irradiance ceiling",
        limits=Limits(irradiance_ceiling_mw_cm2=5.0),
    ),
    Bad(
        "irradiance above a site ceiling at one wavelength",
        BASE,
        "irradiance-ceiling",
        "ports.4.steps[0].power_mw",
        "site irradiance ceiling at 905 nm",
        limits=Limits(irradiance_ceiling_by_wavelength_mw_cm2={905: 50.0}),
    ),
    Bad(
        "one pulse above the single-pulse MPE",
        probe(BASE, "power_mw = 50.0", "power_mw = 255.0").replace(
            "pulse_hz = 5000", "pulse_hz = 1"
        ),
        "pulse-mpe",
        "ports.4.steps[0].pulse_hz",
        "single-pulse",
        line_of="pulse_hz = 1",
    ),
    Bad(
        "step longer than 1800 s",
        pad(BASE, "irradiance_mw_cm2 = 10.0", "irradiance_mw_cm2 = 3.0"),
        "step-time",
        "ports.1.steps[0].fluence_j_cm2",
        "takes 2000 s",
        line_of="fluence_j_cm2",
    ),
    Bad(
        "max time leaves no backstop margin",
        pad(BASE, "max_time_s = 720", "max_time_s = 650"),
        "max-time",
        "ports.1.steps[0].max_time_s",
        "no room",
        line_of="max_time_s = 650",
        also_in_fix="max_time_s = 720",
    ),
    Bad(
        "fluence per site per wavelength above 10 J/cm²",
        edit(
            BASE,
            "[ports.4.applicator]",
            '[[ports.1.steps]]\nsite = "back"\nwavelength_nm = 660\nmode = "continuous"\n'
            'technique = "contact"\nirradiance_mw_cm2 = 10.0\nfluence_j_cm2 = 6.0\n'
            "max_time_s = 720\n\n[ports.4.applicator]",
        ),
        "fluence-ceiling",
        "ports.1.steps[1].fluence_j_cm2",
        "receives 12 J/cm² at 660 nm",
    ),
    Bad(
        "fluence above a site's lower ceiling",
        BASE,
        "fluence-ceiling",
        "ports.1.steps[0].fluence_j_cm2",
        "receives 6 J/cm²",
        limits=Limits(fluence_ceiling_j_cm2=5.0),
    ),
    Bad(
        "session over 90 minutes",
        session_over_90_min(),
        "session-time",
        "ports.1",
        "110 min",
        line_of="[ports.1.applicator]",
    ),
    Bad(
        "pulsed red at 10 Hz without the epilepsy screen",
        pad(BASE, 'mode = "continuous"', 'mode = "pulsed"\npulse_hz = 10\nduty_permille = 500'),
        "epilepsy",
        "ports.1.steps[0].pulse_hz",
        "can trigger seizures",
        line_of="pulse_hz = 10",
    ),
    Bad(
        "unknown site",
        pad(BASE, 'site = "back"', 'site = "nowhere"'),
        "unknown-site",
        "ports.1.steps[0].site",
        "not defined in [sites]",
        line_of='"nowhere"',
    ),
    Bad(
        "probe without contact gating",
        probe(BASE, "gating = { confirm_placement = true, skin_contact = true }\n", ""),
        "probe-gating",
        "ports.4.steps[0].gating.confirm_placement",
        "confirm the point",
    ),
    Bad(
        "pad gated on skin contact",
        pad(BASE, "max_time_s = 720", "max_time_s = 720\ngating = { skin_contact = true }"),
        "pad-contact-gating",
        "ports.1.steps[0].gating.skin_contact",
        "no skin-contact sensor",
        line_of="gating = { skin",
    ),
    Bad(
        "probe in projection",
        probe(BASE, 'technique = "contact"', 'technique = "projection"'),
        "probe-technique",
        "ports.4.steps[0].technique",
        "only in skin contact",
        line_of='"projection"',
    ),
    Bad(
        "low back without the pregnancy screen",
        edit(BASE, '["cancer", "pregnancy"]', '["cancer"]'),
        "contraindication-missing",
        "contraindications",
        "'pregnancy'",
        line_of="contraindications =",
    ),
    Bad(
        "no cancer screen",
        edit(BASE, '["cancer", "pregnancy"]', '["pregnancy"]'),
        "contraindication-missing",
        "contraindications",
        "'cancer'",
    ),
    Bad(
        "neck without the thyroid screen",
        edit(BASE, 'region = "lumbar"', 'region = "cervical"'),
        "contraindication-missing",
        "contraindications",
        "'hyperthyroidism'",
    ),
    Bad(
        "unverified reference",
        edit(BASE, 'ref = "walt-2010"', 'ref = "cochrane-2021"'),
        "unknown-reference",
        "evidence[0].ref",
        "not a verified reference",
        line_of='ref = "cochrane',
    ),
    Bad(
        "unverifiable claim in a comment",
        edit(BASE, "[course]", "# as the 2021 Cochrane review of 22 RCTs showed\n[course]"),
        "unverifiable-claim",
        None,
        "2021 Cochrane",
        line_of="# as the 2021",
    ),
    Bad(
        "unverifiable J/cm² figure",
        edit(BASE, 'relevance = "Dose figures."', 'relevance = "At least 4 J/cm² per point."'),
        "unverifiable-claim",
        None,
        "per point, not per cm²",
        line_of="At least 4 J/cm²",
        also_in_fix="walt-2010",
    ),
]


def refuse(case: Bad) -> ProtocolInvalid:
    with pytest.raises(ProtocolInvalid) as caught:
        parse_protocol(case.text, source="bad.toml", limits=case.limits)
    return caught.value


def test_the_table_covers_at_least_25_rules() -> None:
    assert len({c.rule for c in CASES}) >= 25
    assert len(CASES) >= 40


def test_the_base_file_is_valid() -> None:
    loaded = parse_protocol(BASE, source="base.toml")
    assert loaded.warnings == ()


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_file_is_refused_with_an_actionable_finding(case: Bad) -> None:
    refused = refuse(case)
    assert case.rule in refused.rules, str(refused)
    matching: list[Issue] = [
        i for i in refused.errors if i.rule == case.rule and (case.at is None or i.field == case.at)
    ]
    assert matching, f"no {case.rule} finding at {case.at}: {refused}"
    issue = next((i for i in matching if case.message in i.message), None)
    assert issue is not None, f"{case.message!r} not in {[i.message for i in matching]}"
    assert issue.severity is Severity.ERROR
    assert issue.file == "bad.toml"
    assert issue.fix, "every finding says how to fix it"
    text = str(issue)
    assert text.startswith("bad.toml")
    assert case.message in text
    if case.also_in_fix:
        assert case.also_in_fix in issue.fix
    if case.line_of is not None:
        source = case.text.decode("utf-8", "replace") if isinstance(case.text, bytes) else case.text
        start = line_with(source, case.after) if case.after else 1
        assert issue.line == line_with(source, case.line_of, start), text
    # the exception's own message lists every error, one per line
    assert str(refused).count("\n") == len(refused.errors)


def test_value_findings_name_the_value_and_the_allowed_range() -> None:
    refused = refuse(CASES[[c.name for c in CASES].index("wavelength out of range")])
    (issue,) = [i for i in refused.errors if i.rule == "range"]
    assert issue.value == "550 nm"
    assert issue.allowed == "600 ≤ value ≤ 1100 nm"
    assert "ports.1.steps[0].wavelength_nm = 550 nm" in str(issue)


def test_every_error_of_a_file_is_reported_at_once() -> None:
    text = pad(BASE, "irradiance_mw_cm2 = 10.0", "irradiance_mw_cm2 = 250.0")
    text = pad(text, "wavelength_nm = 660", "wavelength_nm = 660\ncolour = 1")
    text = probe(text, 'technique = "contact"', 'technique = "projection"')
    text = edit(text, "\nversion = 1", "\nversion = 0")
    text = edit(text, '["cancer", "pregnancy"]', '["cancer"]')
    refused = parse_or_refuse(text)
    assert {
        "irradiance-ceiling",
        "unknown-key",
        "probe-technique",
        "range",
        "contraindication-missing",
    } <= refused.rules
    lines = [i.line or 0 for i in refused.errors]
    assert lines == sorted(lines), "findings come in file order"


def parse_or_refuse(text: str) -> ProtocolInvalid:
    with pytest.raises(ProtocolInvalid) as caught:
        parse_protocol(text, source="bad.toml")
    return caught.value


def test_epilepsy_screen_turns_the_error_into_a_warning() -> None:
    text = pad(BASE, 'mode = "continuous"', 'mode = "pulsed"\npulse_hz = 10\nduty_permille = 500')
    text = edit(text, '["cancer", "pregnancy"]', '["cancer", "pregnancy", "epilepsy"]')
    loaded = parse_protocol(text, source="ok.toml")
    assert [w.rule for w in loaded.warnings] == ["epilepsy"]


def test_pulsed_red_above_30_hz_carries_no_epilepsy_finding() -> None:
    text = pad(BASE, 'mode = "continuous"', 'mode = "pulsed"\npulse_hz = 40\nduty_permille = 500')
    assert parse_protocol(text).warnings == ()


def test_irradiance_above_100_mw_cm2_is_a_warning_only() -> None:
    text = pad(BASE, "irradiance_mw_cm2 = 10.0", "irradiance_mw_cm2 = 150.0")
    text = pad(text, "max_time_s = 720", "max_time_s = 60")
    loaded = parse_protocol(text)
    (warning,) = loaded.warnings
    assert warning.rule == "irradiance-warning"
    assert warning.severity is Severity.WARNING


def test_consistent_redundant_values_are_accepted() -> None:
    text = pad(
        BASE,
        "fluence_j_cm2 = 6.0",
        'fluence_j_cm2 = 6.0\ntime_s = 600.0\npower_mw = 1800.0\ntarget = "fluence_j_cm2"',
    )
    text = probe(
        text, "power_mw = 50.0", "power_mw = 50.0\npeak_power_mw = 50000\npulse_width_ns = 200"
    )
    loaded = parse_protocol(text)
    pad_dose = loaded.doses[0]
    assert pad_dose.time_s == pytest.approx(600.0)
    assert pad_dose.energy_j == pytest.approx(1080.0)


def test_time_target_is_accepted_for_pads_and_probes() -> None:
    text = pad(BASE, "fluence_j_cm2 = 6.0", "time_s = 600")
    text = probe(text, "energy_j = 4.0", "time_s = 80")
    loaded = parse_protocol(text)
    assert [round(d.fluence_j_cm2, 6) for d in loaded.doses] == [6.0, 8.0]


def test_hard_ceilings_cannot_be_raised_by_configuration() -> None:
    with pytest.raises(ValueError, match="less than or equal to 20"):
        Limits(fluence_ceiling_j_cm2=25.0)
    with pytest.raises(ValueError, match="less than or equal to 1800"):
        Limits(step_time_max_s=3600.0)
    with pytest.raises(ValueError, match="less than or equal to 5400"):
        Limits(session_time_max_s=7200.0)
    with pytest.raises(ValueError, match="skin MPE"):
        Limits(irradiance_ceiling_by_wavelength_mw_cm2={660: 300.0})


def test_limits_read_from_a_toml_configuration() -> None:
    config = tomllib.loads(
        "fluence_ceiling_j_cm2 = 8\nirradiance_ceiling_mw_cm2 = 150.0\n"
        '[irradiance_ceiling_by_wavelength_mw_cm2]\n"905" = 100.0\n'
    )
    limits = Limits.model_validate(config)
    assert limits.irradiance_ceiling_at(905) == (100.0, "site irradiance ceiling at 905 nm")
    assert limits.irradiance_ceiling_at(660)[0] == 150.0
    assert Limits.model_validate(limits.model_dump(mode="json")) == limits
    with pytest.raises(ValueError, match="Extra inputs"):
        Limits.model_validate({"fluence_ceiling": 8})
