"""Planning: setpoints from what PORT_INFO reports, clear refusals, a hash that holds."""

from __future__ import annotations

import dataclasses
import math

import pytest
from fixtures.protocols import BASE
from protocol_helpers import edit, icd_applicators, probe_830

from pbmd.drivers import codec
from pbmd.protocols.errors import PlanError
from pbmd.protocols.limits import Limits
from pbmd.protocols.loader import parse_protocol
from pbmd.protocols.model import Mode, Protocol, Target
from pbmd.protocols.plan import Plan, PlanIntegrityError, content_hash, plan, verify_plan


def base() -> Protocol:
    return parse_protocol(BASE).protocol


def refuse(protocol: Protocol, applicators: dict[int, codec.PortInfo]) -> PlanError:
    with pytest.raises(PlanError) as caught:
        plan(protocol, applicators)
    return caught.value


def test_setpoints_in_controller_units() -> None:
    result = plan(base(), icd_applicators())
    pad = result.port(1).emissions[0]
    assert pad.mode is codec.EmitMode.CONTINUOUS
    assert (pad.power_uw, pad.pulse_hz, pad.duty_permille) == (1_800_000, 0, 1000)
    assert pad.irradiance_mw_cm2 == pytest.approx(10.0)
    assert pad.target is Target.FLUENCE
    assert pad.target_energy_uj == 1_080_000_000  # 6 J/cm² × 180 cm²
    assert pad.expected_duration_ms == 600_000
    assert pad.expected_fluence_j_cm2 == pytest.approx(6.0)
    assert pad.energy_budget_uj == 1_134_000_000  # +5 %
    assert pad.max_duration_ms == 720_000  # +20 %
    assert pad.backup_time_s == 720
    probe = result.port(4).emissions[0]
    assert probe.mode is codec.EmitMode.PULSED
    assert (probe.power_uw, probe.pulse_hz, probe.duty_permille) == (50_000, 5000, 1)
    assert probe.peak_power_mw == pytest.approx(50_000)
    assert probe.target is Target.ENERGY
    assert probe.target_energy_uj == 4_000_000
    assert probe.expected_duration_ms == 80_000
    assert probe.energy_budget_uj == 4_200_000
    assert probe.max_duration_ms == 96_000
    assert probe.gating.skin_contact and probe.gating.confirm_placement
    assert result.expected_duration_ms == 600_000
    assert result.port(4).points == 1


def test_emit_start_carries_the_plan() -> None:
    emission = plan(base(), icd_applicators()).port(4).emissions[0]
    assert emission.emit_start() == codec.EmitStart(4, 905, 1, 50_000, 5000, 1, 4_200_000, 96_000)
    assert emission.emit_start(port=2).port == 2


def test_uses_the_reported_area_not_the_catalogue() -> None:
    applicators = icd_applicators()
    applicators[1] = dataclasses.replace(applicators[1], area_mm2=17_500)  # 175 cm², −2.8 %
    pad = plan(base(), applicators).port(1).emissions[0]
    assert pad.area_mm2 == 17_500
    assert pad.power_uw == 1_750_000  # 10 mW/cm² × 175 cm²
    assert pad.target_energy_uj == 1_050_000_000  # 6 J/cm² × 175 cm²
    assert pad.expected_duration_ms == 600_000


def test_time_targets_plan_by_time() -> None:
    text = edit(BASE, "fluence_j_cm2 = 6.0", "time_s = 300")
    pad = plan(parse_protocol(text).protocol, icd_applicators()).port(1).emissions[0]
    assert pad.target is Target.TIME
    assert pad.expected_duration_ms == 300_000
    assert pad.target_energy_uj == 540_000_000
    assert pad.max_duration_ms == 360_000


def test_hash_is_stable_and_detects_any_change() -> None:
    first = plan(base(), icd_applicators())
    again = plan(base(), icd_applicators())
    assert first.content_hash == again.content_hash
    assert len(first.content_hash) == 64
    verify_plan(first, expected_hash=again.content_hash)
    assert first.verify()
    emission = first.ports[0].emissions[0]
    louder = emission.model_copy(update={"power_uw": emission.power_uw + 1})
    port = first.ports[0].model_copy(update={"emissions": (louder,)})
    altered = first.model_copy(update={"ports": (port, *first.ports[1:])})
    assert not altered.verify()
    with pytest.raises(PlanIntegrityError, match="altered"):
        verify_plan(altered)
    with pytest.raises(PlanIntegrityError, match="not the confirmed one"):
        verify_plan(first, expected_hash="0" * 64)


def test_plan_is_frozen() -> None:
    result = plan(base(), icd_applicators())
    with pytest.raises(ValueError, match="frozen"):
        result.ports[0].emissions[0].power_uw = 1
    with pytest.raises(ValueError, match="frozen"):
        result.content_hash = ""


def test_plan_survives_json_and_keeps_its_hash() -> None:
    result = plan(base(), icd_applicators())
    copy = Plan.model_validate_json(result.model_dump_json())
    assert copy == result
    assert content_hash(copy) == result.content_hash


def test_plan_carries_the_protocol_and_limits_it_was_made_with() -> None:
    limits = Limits(fluence_ceiling_j_cm2=9.0)
    result = plan(base(), icd_applicators(), limits)
    assert result.limits == limits
    assert (result.protocol_id, result.protocol_version) == ("test-base", 1)
    assert (
        result.protocol_sha256
        != plan(
            parse_protocol(edit(BASE, "sessions = 10", "sessions = 11")).protocol, icd_applicators()
        ).protocol_sha256
    )


def test_missing_applicator() -> None:
    applicators = icd_applicators()
    del applicators[4]
    refused = refuse(base(), applicators)
    assert refused.rules == {"no-applicator"}
    assert "port 4 has no applicator" in str(refused)
    assert "plug a probe (905 nm) into port 4" in str(refused)


def test_applicator_unplugged() -> None:
    applicators = icd_applicators()
    applicators[1] = codec.PortInfo(1, codec.ApplicatorKind.NONE, "", 0, ())
    assert refuse(base(), applicators).rules == {"no-applicator"}


def test_wrong_kind() -> None:
    applicators = icd_applicators()
    applicators[1] = probe_830(1)
    refused = refuse(base(), applicators)
    assert refused.rules == {"applicator-kind"}
    assert "reports a probe" in str(refused) and "needs a pad" in str(refused)


def test_channel_missing() -> None:
    applicators = icd_applicators()
    applicators[4] = probe_830(4)
    refused = refuse(base(), applicators)
    assert refused.rules == {"channel-missing"}
    assert "no 905 nm channel" in str(refused)
    assert "reported channels: 830 nm" in str(refused)


def test_mode_unavailable() -> None:
    applicators = icd_applicators()
    cw_only = codec.Channel(905, 200_000, int(codec.ChannelMode.CONTINUOUS), 0)
    applicators[4] = dataclasses.replace(applicators[4], channels=(cw_only,))
    refused = refuse(base(), applicators)
    assert refused.rules == {"mode-unavailable"}
    assert "does not offer pulsed emission" in str(refused)


def test_power_above_the_reported_maximum() -> None:
    applicators = icd_applicators()
    weak = (codec.Channel(660, 1_000_000, 3, 0), codec.Channel(830, 2_700_000, 3, 0))
    applicators[1] = dataclasses.replace(applicators[1], channels=weak)
    refused = refuse(base(), applicators)
    assert refused.rules == {"power-above-max"}
    assert "1800 mW at 660 nm" in str(refused) and "1000 mW" in str(refused)


def test_peak_power_above_the_reported_peak() -> None:
    applicators = icd_applicators()
    low_peak = (codec.Channel(905, 200_000, int(codec.ChannelMode.PULSED), 25_000),)
    applicators[4] = dataclasses.replace(applicators[4], channels=low_peak)
    refused = refuse(base(), applicators)
    assert refused.rules == {"peak-power"}
    assert "50000 mW peak" in str(refused)


def test_a_different_applicator_area_is_refused() -> None:
    applicators = icd_applicators()
    applicators[1] = dataclasses.replace(applicators[1], area_mm2=9_000)
    refused = refuse(base(), applicators)
    assert refused.rules == {"applicator-area"}
    assert "90 cm²" in str(refused) and "180 cm²" in str(refused)


def test_ceilings_are_checked_again_with_reported_figures() -> None:
    # 35 W on the declared 180 cm² is 194 mW/cm², under the 200 mW/cm² MPE at 660 nm;
    # on the 172.8 cm² the pad reports (4 % smaller, so accepted) it is 203 mW/cm².
    text = edit(BASE, "irradiance_mw_cm2 = 10.0", "power_mw = 35000.0")
    text = edit(text, "fluence_j_cm2 = 6.0", "fluence_j_cm2 = 3.0")
    loaded = parse_protocol(text)
    assert [w.rule for w in loaded.warnings] == ["irradiance-warning"]
    applicators = icd_applicators()
    strong = (codec.Channel(660, 40_000_000, 3, 0), codec.Channel(830, 40_000_000, 3, 0))
    applicators[1] = dataclasses.replace(applicators[1], channels=strong)
    assert plan(loaded.protocol, applicators).warnings  # the warning travels with the plan
    applicators[1] = dataclasses.replace(applicators[1], area_mm2=17_280)
    refused = refuse(loaded.protocol, applicators)
    assert refused.rules == {"irradiance-ceiling"}
    assert "202.5 mW/cm²" in str(refused)


def test_site_limits_apply_when_planning() -> None:
    with pytest.raises(PlanError) as caught:
        plan(base(), icd_applicators(), Limits(fluence_ceiling_j_cm2=5.0))
    assert caught.value.rules == {"fluence-ceiling"}


def test_every_misfit_is_reported_at_once() -> None:
    applicators = icd_applicators()
    applicators[1] = probe_830(1)
    applicators[4] = probe_830(4)
    refused = refuse(base(), applicators)
    assert refused.rules == {"applicator-kind", "channel-missing"}
    assert all(issue.file == "test-base v1" for issue in refused.errors)


def test_energy_budget_and_duration_round_up() -> None:
    text = edit(BASE, "energy_j = 4.0", "energy_j = 4.000001")
    text = edit(text, "max_time_s = 96", "max_time_s = 97")
    emission = plan(parse_protocol(text).protocol, icd_applicators()).port(4).emissions[0]
    assert emission.target_energy_uj == 4_000_001
    assert emission.energy_budget_uj == math.ceil(4_000_001 * 1.05)
    assert emission.expected_duration_ms == 80_000
    assert emission.max_duration_ms == 96_000


def test_a_protocol_object_that_bypassed_the_loader_is_checked_too() -> None:
    protocol = base()
    port = protocol.ports[4]
    continuous = port.steps[0].model_copy(update={"mode": Mode.CONTINUOUS})
    unsafe = protocol.model_copy(
        update={"ports": {**protocol.ports, 4: port.model_copy(update={"steps": [continuous]})}}
    )
    refused = refuse(unsafe, icd_applicators())
    assert "pulsed-only" in refused.rules
