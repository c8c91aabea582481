"""The checks of format version 2: phases, the body map, dose sources, the skin.

A v2 protocol runs in phases (every step of a phase ends before the next
phase starts) and places its sites on regions of the body map
(:mod:`pbmd.protocols.body_map`). Ceilings are then checked on the skin:

- ``probe-over-pad``: a contact probe cannot be placed on skin a pad lies on,
  so the two are refused in the same phase on shared skin;
- ``patch-fluence`` and ``patch-fluence-total``: the cumulative fluence on every
  patch of skin over the session, from every applicator, wavelength and site
  name that reaches it, per wavelength and over all wavelengths;
- ``mpe-sum``: exposures that reach the same skin at the same time add (IEC
  60825-1): per phase and patch, the sum over ports of irradiance / skin MPE
  must stay ≤ 1.

Version 1 files keep their rules (one phase, ceilings per site name); what
such a file means in v2 is said by :func:`v1_reading`.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from pbmd.protocols.body_map import body_map
from pbmd.protocols.errors import Issue, Path, Severity, show_value
from pbmd.protocols.limits import (
    AREA_TOLERANCE,
    CONSISTENCY_TOLERANCE,
    MPE_FRACTION_SUM_MAX,
    Limits,
    skin_mpe_mw_cm2,
)
from pbmd.protocols.model import ApplicatorKind, Protocol

if TYPE_CHECKING:
    from pbmd.protocols.checks import ProtocolView, StepDose

_V2_STEP_KEYS = ("phase", "sources", "basis", "assumption")


def _g(value: float) -> str:
    return f"{value:.4g}"


def _step_path(port_key: str, index: int, *rest: str) -> Path:
    return ("ports", port_key, "steps", index, *rest)


def phase_indices(view: ProtocolView) -> dict[str, int]:
    """Phase id → its position (the first declaration of an id wins)."""
    out: dict[str, int] = {}
    for index, phase in view.phases:
        out.setdefault(phase.id, index)
    return out


# --------------------------------------------------------------------------
# The shape each version requires


def check_format(view: ProtocolView) -> Iterable[Issue]:
    """Keys each format version requires or does not have."""
    if view.schema_version == 1:
        yield from _check_v1_shape(view)
    elif view.schema_version == 2:
        yield from _check_v2_header(view)
        yield from _check_v2_sites(view)
        yield from _check_v2_steps(view)
        yield from _check_v2_totals(view)


def _v2_only(path: Path, key: str) -> Issue:
    return Issue(
        "v2-key-in-v1",
        f"{key!r} is a key of format version 2, and this file says schema_version = 1",
        path=path,
        allowed="the version 1 keys (docs/protocols.md)",
        fix=f"set schema_version = 2 and give the file phases and body regions, or remove {key!r}",
    )


def _missing(path: Path, key: str, why: str) -> Issue:
    return Issue(
        "missing-key",
        f"required key {key!r} is missing ({why})",
        path=(*path, key),
        fix=f"add {key} = …",
    )


def _check_v1_shape(view: ProtocolView) -> Iterable[Issue]:
    if view.body_map is not None:
        yield _v2_only(("body_map",), "body_map")
    if view.phases:
        yield _v2_only(("phases",), "phases")
    if view.totals:
        yield _v2_only(("totals",), "totals")
    for key, site in view.sites.items():
        path: Path = ("sites", key)
        if site.body_region is not None:
            yield _v2_only((*path, "body_region"), "body_region")
        if site.region is None:
            yield _missing(path, "region", "body region, for the contraindication checks")
        if site.area_covered_cm2 is None:
            yield _missing(path, "area_covered_cm2", "skin area this site covers")
    for port in view.ports:
        for index, step in port.steps:
            for key in _V2_STEP_KEYS:
                if getattr(step, key) not in (None, []):
                    yield _v2_only(_step_path(port.key, index, key), key)


def _check_v2_header(view: ProtocolView) -> Iterable[Issue]:
    the_map = body_map()
    if view.body_map is None:
        yield _missing((), "body_map", f'the body map the sites lie on: "{the_map.id}"')
    elif view.body_map != the_map.id:
        yield Issue(
            "body-map",
            f"body map {view.body_map!r} is not the one pbmd has",
            path=("body_map",),
            value=show_value(view.body_map),
            allowed=f'"{the_map.id}" (protocols/body_map.toml, version {the_map.version})',
            fix=f'set body_map = "{the_map.id}"',
        )
    if not view.phases and view.phases_complete:
        yield _missing((), "phases", "[[phases]]: the order the ports' steps run in")
    seen: set[str] = set()
    for index, phase in view.phases:
        if phase.id in seen:
            yield Issue(
                "phase-duplicate",
                f"phase {phase.id!r} is declared twice",
                path=("phases", index, "id"),
                value=show_value(phase.id),
                fix="give every [[phases]] entry its own id",
            )
        seen.add(phase.id)
    used = {step.phase for port in view.ports for _, step in port.steps}
    for index, phase in view.phases:
        if phase.id not in used:
            yield Issue(
                "phase-empty",
                f"phase {phase.id!r} has no step",
                path=("phases", index),
                value=show_value(phase.id),
                allowed="every phase runs at least one step",
                fix=f'give a step phase = "{phase.id}", or remove the phase',
            )


def _check_v2_sites(view: ProtocolView) -> Iterable[Issue]:
    the_map = body_map()
    for key, site in view.sites.items():
        path: Path = ("sites", key)
        if site.region is not None:
            yield Issue(
                "v1-key-in-v2",
                "'region' is a version 1 key: in version 2 the body map gives the zone",
                path=(*path, "region"),
                value=show_value(site.region.value),
                fix="remove it (body_region places the site)",
            )
        if site.body_region is None:
            yield _missing(path, "body_region", "the body-map region this site lies on")
            continue
        region = the_map.regions.get(site.body_region)
        if region is None:
            close = difflib.get_close_matches(site.body_region, list(the_map.regions), n=1)
            yield Issue(
                "body-region-unknown",
                f"{site.body_region!r} is not a region of the body map",
                path=(*path, "body_region"),
                value=show_value(site.body_region),
                allowed="a region of protocols/body_map.toml",
                fix=f"did you mean {close[0]!r}?" if close else "use a region of the map",
            )
            continue
        if site.area_covered_cm2 is not None and site.area_covered_cm2 > region.area_cm2 * (
            1 + AREA_TOLERANCE
        ):
            yield Issue(
                "site-area",
                f"the site covers {_g(site.area_covered_cm2)} cm², more than its region "
                f"{site.body_region!r} has",
                path=(*path, "area_covered_cm2"),
                value=f"{_g(site.area_covered_cm2)} cm²",
                allowed=f"≤ {_g(region.area_cm2)} cm²",
                fix="lower area_covered_cm2, leave it out, or choose a larger region",
            )


def _check_v2_steps(view: ProtocolView) -> Iterable[Issue]:
    phases = phase_indices(view)
    refs = {evidence.ref for _, evidence in view.evidence}
    the_map = body_map()
    for port in view.ports:
        last: tuple[int, str] | None = None
        for index, step in port.steps:
            path = _step_path(port.key, index)
            if step.phase is None:
                yield _missing(path, "phase", "the [[phases]] entry this step runs in")
            elif step.phase not in phases:
                if view.phases_complete:
                    yield Issue(
                        "phase-unknown",
                        f"phase {step.phase!r} is not declared in [[phases]]",
                        path=(*path, "phase"),
                        value=show_value(step.phase),
                        allowed=", ".join(phases) or "no phase is declared",
                        fix="declare it with [[phases]] id = … or use a declared phase",
                    )
            else:
                position = phases[step.phase]
                if last is not None and position < last[0]:
                    yield Issue(
                        "phase-order",
                        f"port {port.key}'s steps are not in phase order: phase "
                        f"{step.phase!r} runs before phase {last[1]!r} of an earlier step",
                        path=(*path, "phase"),
                        value=show_value(step.phase),
                        allowed="a port's steps listed in the order of [[phases]]",
                        fix="move this step above the steps of later phases",
                    )
                last = (position, step.phase) if last is None or position >= last[0] else last
            yield from _check_provenance(path, step.sources, step.basis, step.assumption, refs)
            site = view.sites.get(step.site)
            region_id = site.body_region if site is not None else None
            region = the_map.regions.get(region_id or "")
            applicator = port.applicator
            if (
                region is not None
                and applicator is not None
                and applicator.beam_area_cm2 > region.area_cm2 * (1 + AREA_TOLERANCE)
            ):
                yield Issue(
                    "site-area",
                    f"the applicator ({_g(applicator.beam_area_cm2)} cm²) does not fit on "
                    f"region {region_id!r} ({_g(region.area_cm2)} cm²)",
                    path=(*path, "site"),
                    value=show_value(step.site),
                    allowed=f"a region of at least {_g(applicator.beam_area_cm2)} cm²",
                    fix="put the site on a larger region, or use a smaller applicator",
                )


def _check_provenance(
    path: Path,
    sources: Sequence[str],
    basis: str | None,
    assumption: str | None,
    refs: set[str],
) -> Iterable[Issue]:
    """Every dose says where it comes from: cited sources with what they say, or an
    assumption in words."""
    if not sources and assumption is None:
        yield Issue(
            "dose-unsourced",
            "the dose states neither its sources nor an assumption",
            path=(*path, "sources"),
            allowed='sources = ["<evidence ref>"] with basis = "…", or assumption = "…"',
            fix="cite the [[evidence]] the figure comes from and what it says (basis), or "
            "say why this figure where no source gives it (assumption)",
        )
    if sources and basis is None:
        yield _missing(path, "basis", "what in the cited sources gives this figure")
    for i, ref in enumerate(sources):
        if ref not in refs:
            yield Issue(
                "unknown-source",
                f"source {ref!r} is not in this file's [[evidence]]",
                path=(*path, "sources", i),
                value=show_value(ref),
                allowed=", ".join(sorted(refs)) or "no evidence is listed",
                fix=f'add an [[evidence]] entry with ref = "{ref}", or cite a listed one',
            )


def _check_v2_totals(view: ProtocolView) -> Iterable[Issue]:
    phases = phase_indices(view)
    refs = {evidence.ref for _, evidence in view.evidence}
    for index, total in view.totals:
        path: Path = ("totals", index)
        yield from _check_provenance(path, total.sources, total.basis, total.assumption, refs)
        if total.phase is not None and total.phase not in phases and view.phases_complete:
            yield Issue(
                "phase-unknown",
                f"phase {total.phase!r} is not declared in [[phases]]",
                path=(*path, "phase"),
                value=show_value(total.phase),
                allowed=", ".join(phases) or "no phase is declared",
                fix="use a declared phase, or leave phase out (every phase)",
            )
        if total.energy_j is None and total.points is None:
            yield _missing(path, "energy_j", "the total to check: energy_j or points")


def check_stated_totals(view: ProtocolView, doses: Sequence[StepDose]) -> Iterable[Issue]:
    """A [[totals]] figure must be what the steps it covers add up to."""
    phases = phase_indices(view)
    for index, total in view.totals:
        wanted_phase = phases.get(total.phase) if total.phase is not None else None
        if total.phase is not None and wanted_phase is None:
            continue
        chosen = [
            d
            for d in doses
            if (wanted_phase is None or d.phase == wanted_phase)
            and (not total.ports or d.port in total.ports)
        ]
        energy_j = sum(d.energy_j for d in chosen)
        if total.energy_j is not None and (
            abs(energy_j - total.energy_j) > CONSISTENCY_TOLERANCE * total.energy_j
        ):
            yield Issue(
                "totals-mismatch",
                f"{total.label}: the steps deliver {_g(energy_j)} J, the file states "
                f"{_g(total.energy_j)} J",
                path=("totals", index, "energy_j"),
                value=f"{_g(total.energy_j)} J",
                allowed=f"{_g(energy_j)} J (the sum of the {len(chosen)} steps), within 1 %",
                fix="make the steps add up to what the source states, or correct the total",
            )
        points = len({d.site for d in chosen})
        if total.points is not None and points != total.points:
            yield Issue(
                "totals-mismatch",
                f"{total.label}: the steps treat {points} sites, the file states {total.points}",
                path=("totals", index, "points"),
                value=str(total.points),
                allowed=str(points),
                fix="make the steps treat the stated number of points, or correct it",
            )


# --------------------------------------------------------------------------
# The skin


def regions_of(view: ProtocolView, doses: Sequence[StepDose]) -> dict[Path, str]:
    """Each dose's body-map region, where its site has a known one."""
    the_map = body_map()
    out: dict[Path, str] = {}
    for d in doses:
        site = view.sites.get(d.site)
        if site is not None and site.body_region in the_map:
            out[d.path] = str(site.body_region)
    return out


def _where(d: StepDose, region: str) -> str:
    return f"ports.{d.port}.steps[{d.index}] (site {d.site!r} on {region})"


def check_skin(view: ProtocolView, doses: Sequence[StepDose], limits: Limits) -> Iterable[Issue]:
    """Contact over a running pad, cumulative fluence per patch, the MPE sum."""
    region = regions_of(view, doses)
    placed = [d for d in doses if d.path in region]
    kinds = {p.number: p.applicator.kind for p in view.ports if p.applicator is not None}
    phase_titles = {i: p.id for i, p in view.phases}
    yield from _check_contact(placed, region, kinds, phase_titles)
    yield from _check_patch_fluence(placed, region, limits)
    yield from _check_mpe_sum(placed, region, phase_titles)


def _check_contact(
    doses: Sequence[StepDose],
    region: dict[Path, str],
    kinds: dict[int, ApplicatorKind],
    phase_titles: dict[int, str],
) -> Iterable[Issue]:
    the_map = body_map()
    reported: set[tuple[Path, int]] = set()
    for probe in doses:
        if kinds.get(probe.port) is not ApplicatorKind.PROBE:
            continue
        for other in doses:
            if other.port == probe.port or other.phase != probe.phase:
                continue
            if kinds.get(other.port) is not ApplicatorKind.PAD:
                continue
            if (probe.path, other.port) in reported:
                continue
            if not the_map.share_skin(region[probe.path], region[other.path]):
                continue
            reported.add((probe.path, other.port))
            phase = phase_titles.get(probe.phase, str(probe.phase))
            yield Issue(
                "probe-over-pad",
                f"the contact probe on port {probe.port} would go on skin that the pad on "
                f"port {other.port} lies on while it runs: {_where(probe, region[probe.path])} "
                f"and {_where(other, region[other.path])} are both in phase {phase!r}",
                path=(*probe.path, "phase"),
                value=show_value(phase),
                allowed="a probe on skin no running pad covers",
                fix="put the probe steps in a later phase, which starts when the pads have "
                "ended (or choose probe sites away from the pads)",
            )
    warned: set[tuple[int, int, int]] = set()
    for a in doses:
        for b in doses:
            key = (a.phase, a.port, b.port)
            if a.port >= b.port or a.phase != b.phase or key in warned:
                continue
            if kinds.get(a.port) is not ApplicatorKind.PAD or kinds.get(b.port) is not (
                ApplicatorKind.PAD
            ):
                continue
            if the_map.share_skin(region[a.path], region[b.path]):
                warned.add(key)
                yield Issue(
                    "pad-overlap",
                    f"the pads on ports {a.port} and {b.port} run together on regions that "
                    f"overlap ({region[a.path]}, {region[b.path]}): they cannot both lie on "
                    "the shared skin, so they will lie side by side",
                    path=(*b.path, "site"),
                    value=show_value(b.site),
                    fix="accept the warning, or choose regions that do not overlap",
                    severity=Severity.WARNING,
                )


def _patches(region: dict[Path, str]) -> list[tuple[str, frozenset[str]]]:
    """Every patch some step reaches, largest first, with the regions reaching it."""
    the_map = body_map()
    used = set(region.values())
    out = [(patch, reach) for patch, reach in the_map.patches.items() if reach & used]
    out.sort(key=lambda item: (-the_map.area_cm2(item[0]), item[0]))
    return out


def _check_patch_fluence(
    doses: Sequence[StepDose], region: dict[Path, str], limits: Limits
) -> Iterable[Issue]:
    the_map = body_map()
    seen: set[tuple[frozenset[Path], int | None]] = set()
    for patch, reach in _patches(region):
        on_patch = [d for d in doses if region[d.path] in reach]
        by_wavelength: dict[int | None, list[StepDose]] = defaultdict(list)
        for d in on_patch:
            by_wavelength[d.wavelength_nm].append(d)
        by_wavelength[None] = on_patch
        for wavelength_nm, steps in by_wavelength.items():
            total = sum(d.fluence_j_cm2 for d in steps)
            if wavelength_nm is None:
                ceiling = limits.total_fluence_ceiling_j_cm2
                source = limits.total_fluence_ceiling_source
                rule, at = "patch-fluence-total", "over all wavelengths"
            else:
                ceiling = limits.fluence_ceiling_j_cm2
                source = limits.fluence_ceiling_source
                rule, at = "patch-fluence", f"at {wavelength_nm} nm"
            key = (frozenset(d.path for d in steps), wavelength_nm)
            if total <= ceiling * (1 + 1e-9) or key in seen:
                continue
            seen.add(key)
            parts = " + ".join(
                f"{_g(d.fluence_j_cm2)} from {_where(d, region[d.path])}" for d in steps
            )
            last = steps[-1]
            yield Issue(
                rule,
                f"the skin of {patch!r} ({the_map.label(patch)}) receives "
                f"{_g(total)} J/cm² {at} in one session: {parts}",
                path=(*last.path, last.target.value),
                value=f"{_g(total)} J/cm²",
                allowed=f"≤ {_g(ceiling)} J/cm² per patch of skin {at} per session "
                f"(source: {source})",
                fix=f"lower the doses that reach this skin so that they add up to at most "
                f"{_g(ceiling)} J/cm², or move a site to skin the others do not reach",
            )


def _check_mpe_sum(
    doses: Sequence[StepDose], region: dict[Path, str], phase_titles: dict[int, str]
) -> Iterable[Issue]:
    seen: set[frozenset[Path]] = set()
    phases = sorted({d.phase for d in doses})
    for patch, reach in _patches(region):
        for phase in phases:
            # A port runs one step at a time: its worst step on this skin counts.
            worst: dict[int, tuple[float, StepDose]] = {}
            for d in doses:
                if d.phase != phase or region[d.path] not in reach:
                    continue
                fraction = d.irradiance_mw_cm2 / skin_mpe_mw_cm2(d.wavelength_nm)
                if d.port not in worst or fraction > worst[d.port][0]:
                    worst[d.port] = (fraction, d)
            total = sum(f for f, _ in worst.values())
            key = frozenset(d.path for _, d in worst.values())
            if total <= MPE_FRACTION_SUM_MAX * (1 + 1e-9) or key in seen:
                continue
            seen.add(key)
            parts = " + ".join(
                f"{_g(f)} ({_g(d.irradiance_mw_cm2)} mW/cm² at {d.wavelength_nm} nm, "
                f"{_where(d, region[d.path])})"
                for f, d in sorted(worst.values(), key=lambda item: item[1].port)
            )
            last = max((d for _, d in worst.values()), key=lambda d: d.port)
            yield Issue(
                "mpe-sum",
                f"in phase {phase_titles.get(phase, str(phase))!r} the skin of {patch!r} is "
                f"exposed to {_g(total)} × the skin MPE at once: {parts}",
                path=(*last.path, "irradiance_mw_cm2"),
                value=_g(total),
                allowed="a sum of irradiance / skin MPE ≤ 1 over the wavelengths reaching "
                "the same skin at the same time (IEC 60825-1)",
                fix="lower the irradiance of these steps, or run them in different phases",
            )


def check_derated(
    doses: Sequence[StepDose], limits: Limits, skin_type: str | None
) -> Iterable[Issue]:
    """The irradiance ceilings lowered for the patient's skin type, where the site has
    configured a factor (none by default: no source gives one)."""
    factor = limits.derating(skin_type)
    if factor >= 1.0:
        return
    for d in doses:
        ceiling, origin = limits.irradiance_ceiling_at(d.wavelength_nm)
        derated = ceiling * factor
        if d.irradiance_mw_cm2 > derated:
            yield Issue(
                "skin-type-derating",
                f"irradiance {_g(d.irradiance_mw_cm2)} mW/cm² at {d.wavelength_nm} nm is above "
                f"the {origin} × {_g(factor)} for skin type {skin_type} "
                f"(source: {limits.irradiance_derating_source})",
                path=(*d.path, "irradiance_mw_cm2"),
                value=f"{_g(d.irradiance_mw_cm2)} mW/cm²",
                allowed=f"≤ {_g(derated)} mW/cm² for skin type {skin_type}",
                fix="choose a protocol with a lower irradiance for this patient, or review "
                "the site's derating configuration",
            )


# --------------------------------------------------------------------------
# What a version 1 file means in version 2


def v1_reading(protocol: Protocol) -> list[str]:
    """What a version 1 file is when read as version 2, in a clinician's words."""
    if protocol.schema_version != 1:
        return []
    ports = sorted(protocol.ports)
    pads = [n for n in ports if protocol.ports[n].applicator.kind is ApplicatorKind.PAD]
    probes = [n for n in ports if protocol.ports[n].applicator.kind is ApplicatorKind.PROBE]
    lines = [
        "version 1 file, read as version 2: one phase, 'all', in which ports "
        + ", ".join(str(n) for n in ports)
        + " start together and each runs its steps in order",
    ]
    if pads and probes:
        lines.append(
            "the probe on port "
            + ", ".join(str(n) for n in probes)
            + " runs while the pads on port "
            + ", ".join(str(n) for n in pads)
            + " run: in version 2 a probe on skin under a pad must be in a later phase"
        )
    lines.append(
        "its sites are not on the body map: fluence is summed per site name and wavelength "
        "(the version 1 rule), not on the skin; a version 2 file gives each site a "
        "body_region, and then doses on the same skin add up whatever the sites are called"
    )
    lines.append("its steps carry no dose sources: version 2 requires sources or an assumption")
    return lines
