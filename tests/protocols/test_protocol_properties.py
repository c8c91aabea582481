"""Property tests: whatever the input, the loader answers with a protocol or ProtocolInvalid.

And whatever it accepts, the planner either refuses with PlanError or yields
EMIT_START requests that fit the wire and stay within every ceiling.
"""

from __future__ import annotations

import json
import math
import tomllib
from typing import Any

from fixtures.protocols import BASE
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from protocol_helpers import icd_applicators

from pbmd.drivers import codec
from pbmd.protocols.errors import PlanError, ProtocolInvalid
from pbmd.protocols.limits import DEFAULT_LIMITS, skin_mpe_mw_cm2
from pbmd.protocols.loader import LoadedProtocol, parse_protocol
from pbmd.protocols.locate import key_lines
from pbmd.protocols.model import Protocol, Step
from pbmd.protocols.plan import plan

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BASE_DOC: dict[str, Any] = tomllib.loads(BASE)
APPLICATORS = icd_applicators()

KEYS = sorted(
    set(Protocol.model_fields) | set(Step.model_fields) | {"applicator", "kind", "label", "ref"}
)


def toml_value(value: Any) -> str:
    """Render data as inline TOML (enough for the property tests)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_value(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def toml_document(doc: dict[str, Any]) -> str:
    return "".join(f"{toml_value(k)} = {toml_value(v)}\n" for k, v in doc.items())


def accept_or_refuse(text: str | bytes) -> LoadedProtocol | None:
    try:
        loaded = parse_protocol(text, source="fuzz.toml")
    except ProtocolInvalid as exc:
        event("refused: " + ",".join(sorted(exc.rules)[:2]))
        assert exc.errors, "a refusal always has a reason"
        for issue in exc.errors:
            assert issue.message and issue.file == "fuzz.toml"
            str(issue)
        return None
    event("accepted")
    return loaded


def check_plan(loaded: LoadedProtocol) -> None:
    """An accepted protocol plans or is refused, and a plan never exceeds a ceiling."""
    try:
        result = plan(loaded.protocol, APPLICATORS)
    except PlanError as exc:
        assert exc.errors
        event("plan refused")
        return
    event("planned")
    assert result.verify()
    per_site: dict[tuple[str, int], float] = {}
    for port in result.ports:
        for emission in port.emissions:
            codec.encode_frame(emission.emit_start(), 0)  # fits every wire field
            assert emission.irradiance_mw_cm2 <= skin_mpe_mw_cm2(emission.wavelength_nm) * 1.0001
            assert 1 <= emission.expected_duration_ms <= 1_800_000
            assert emission.expected_energy_uj < emission.energy_budget_uj
            assert emission.expected_duration_ms < emission.max_duration_ms
            key = (emission.site_id, emission.wavelength_nm)
            per_site[key] = per_site.get(key, 0.0) + emission.expected_fluence_j_cm2
    assert all(v <= DEFAULT_LIMITS.fluence_ceiling_j_cm2 * 1.0001 for v in per_site.values())


scalars = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(
        ["pad", "probe", "pulsed", "continuous", "contact", "lumbar", "cancer", "back"]
    ),
)
toml_values = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), children, max_size=4),
    ),
    max_leaves=12,
)


@SETTINGS
@given(st.text(max_size=400))
def test_arbitrary_text_never_crashes(text: str) -> None:
    accept_or_refuse(text)
    key_lines(text)


@SETTINGS
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    accept_or_refuse(data)


@SETTINGS
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(KEYS), toml_values).map(
                lambda kv: f"{kv[0]} = {toml_value(kv[1])}"
            ),
            st.sampled_from(
                [
                    "[course]",
                    "[[evidence]]",
                    "[sites.back]",
                    "[ports.1]",
                    "[ports.1.applicator]",
                    "[[ports.1.steps]]",
                    "[ports.4.applicator]",
                    "[[ports.4.steps]]",
                    "# comment",
                    '"""',
                    "[ports.x]",
                    "[[ports.1.steps.gating]]",
                ]
            ),
        ),
        max_size=30,
    )
)
def test_toml_ish_documents_never_crash(lines: list[str]) -> None:
    text = "\n".join(lines)
    key_lines(text)
    loaded = accept_or_refuse(text)
    if loaded is not None:
        check_plan(loaded)


def paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += paths(v, (*prefix, i))
    return out


BASE_PATHS = [p for p in paths(BASE_DOC) if p]


def mutate(doc: Any, path: tuple[Any, ...], value: Any, delete: bool) -> Any:
    doc = json.loads(json.dumps(doc))
    target = doc
    for part in path[:-1]:
        target = target[part]
    if delete:
        if isinstance(target, dict):
            del target[path[-1]]
        else:
            target.pop(path[-1])
    else:
        target[path[-1]] = value
    return doc


@SETTINGS
@given(
    st.lists(
        st.tuples(st.sampled_from(BASE_PATHS), toml_values, st.booleans()), min_size=1, max_size=4
    )
)
def test_mutated_valid_protocols_are_accepted_safely_or_refused(
    edits: list[tuple[tuple[Any, ...], Any, bool]],
) -> None:
    doc: Any = BASE_DOC
    for path, value, delete in edits:
        try:
            doc = mutate(doc, path, value, delete)
        except (KeyError, IndexError, TypeError, AttributeError):
            continue  # an earlier edit removed that path or replaced its parent by a scalar
    loaded = accept_or_refuse(toml_document(doc))
    if loaded is not None:
        check_plan(loaded)


wild = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False),
    st.integers(min_value=-(2**40), max_value=2**40),
)
PERTURBABLE = [
    ("1", "irradiance_mw_cm2"),
    ("1", "fluence_j_cm2"),
    ("1", "max_time_s"),
    ("1", "power_mw"),
    ("1", "time_s"),
    ("4", "energy_j"),
    ("4", "power_mw"),
    ("4", "pulse_hz"),
    ("4", "duty_permille"),
    ("4", "max_time_s"),
]


@SETTINGS
@given(
    irradiance=st.floats(min_value=1, max_value=120),
    fluence=st.floats(min_value=0.1, max_value=11),
    margin=st.floats(min_value=1.1, max_value=1.6),
    probe_energy=st.floats(min_value=0.1, max_value=6),
    probe_power=st.floats(min_value=1, max_value=300),
    pulse_hz=st.integers(min_value=500, max_value=10_000),
    duty=st.integers(min_value=1, max_value=3),
    perturb=st.none() | st.tuples(st.sampled_from(PERTURBABLE), wild),
)
def test_numeric_values_are_checked_not_crashed_on(
    irradiance: float,
    fluence: float,
    margin: float,
    probe_energy: float,
    probe_power: float,
    pulse_hz: int,
    duty: int,
    perturb: tuple[tuple[str, str], float] | None,
) -> None:
    """Plausible prescriptions (some pass, some break a ceiling), sometimes one wild value."""
    doc = json.loads(json.dumps(BASE_DOC))
    pad = doc["ports"]["1"]["steps"][0]
    pad_time = fluence / irradiance * 1000
    pad.update(
        irradiance_mw_cm2=irradiance,
        fluence_j_cm2=fluence,
        max_time_s=min(1800.0, max(1.0, pad_time * margin)),
    )
    probe = doc["ports"]["4"]["steps"][0]
    probe_time = probe_energy / probe_power * 1000
    probe.update(
        energy_j=probe_energy,
        power_mw=probe_power,
        pulse_hz=pulse_hz,
        duty_permille=duty,
        max_time_s=min(1800.0, max(1.0, probe_time * margin)),
    )
    if perturb is not None:
        (port, key), value = perturb
        doc["ports"][port]["steps"][0][key] = value
    loaded = accept_or_refuse(toml_document(doc))
    if loaded is not None:
        check_plan(loaded)


def test_the_inline_renderer_round_trips_the_base() -> None:
    assert tomllib.loads(toml_document(BASE_DOC)) == BASE_DOC
    assert parse_protocol(toml_document(BASE_DOC)).protocol == parse_protocol(BASE).protocol
