"""Sources a protocol may cite, and claims it may not make.

A protocol names its evidence by key. Only sources that have been checked
(shared DOSIMETRY.md) are on the list; adding one is a reviewed code change,
not an edit of a protocol file. Claims that circulate but could not be found
are refused wherever they appear in a file, comments included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reference:
    citation: str
    finding: str


REFERENCES: dict[str, Reference] = {
    "jenkins-carroll-2011": Reference(
        "Jenkins PA, Carroll JD. How to report low-level laser therapy (LLLT)/photomedicine "
        "dose and beam parameters. Photomed Laser Surg 2011;29(12):785–787.",
        "The parameter set every protocol and record reports; Bunsen–Roscoe reciprocity "
        "does not hold, so irradiance, time and fluence are each kept.",
    ),
    "walt-2010": Reference(
        "World Association for Laser Therapy (WALT). Dose table 780–860 nm GaAlAs lasers, 2010.",
        "Lumbar spine: 4–8 points, at least 4 J per point, 16 J in total, 20–300 s per point; "
        "cervical spine: 4–12 points, 16 J.",
    ),
    "glazov-2016": Reference(
        "Glazov et al. Acupunct Med 2016;34:328.",
        "Meta-analysis of 15 trials (1039 participants) in low back pain: benefit was seen "
        "at 3 J per point or more.",
    ),
    "huang-2015": Reference(
        "Huang et al. Arthritis Res Ther 2015;17:360.",
        "7 RCTs in non-specific low back pain: pain −13.6/100 in the short term, "
        "no effect on disability.",
    ),
    "yousefi-nooraie-2008": Reference(
        "Yousefi-Nooraie et al. Cochrane Database Syst Rev 2008; CD005107 "
        "(low level laser therapy for non-specific low back pain).",
        "7 RCTs: small short-term effects; no benefit added to exercise.",
    ),
    "guimaraes-2021": Reference(
        "Guimarães et al. Pain 2021;162:1612.",
        "148 patients, 12 sessions: photobiomodulation was not better than placebo for "
        "chronic non-specific low back pain.",
    ),
    "huang-2009": Reference(
        "Huang YY, Chen AC, Carroll JD, Hamblin MR. Biphasic dose response in low level "
        "light therapy. Dose-Response 2009;7:358.",
        "The dose response is biphasic: more is not better.",
    ),
    "joensen-2011": Reference(
        "Joensen et al. Photomed Laser Surg 2011;29:145.",
        "Skin heating: < 1.5 °C at WALT doses; a 200 mW 810 nm probe at high doses warmed "
        "dark skin by up to 22 °C.",
    ),
    "directive-2006-25-ec": Reference(
        "Directive 2006/25/EC (artificial optical radiation), exposure limit tables "
        "(ICNIRP / IEC 60825-1 skin MPE).",
        "Skin MPE 0.2·C_A W/cm² for 400–1400 nm, 10 s to 30 000 s.",
    ),
}


@dataclass(frozen=True, slots=True)
class Unverifiable:
    pattern: re.Pattern[str]
    claim: str
    instead: str


UNVERIFIABLE: tuple[Unverifiable, ...] = (
    Unverifiable(
        re.compile(r"cochrane[^\n]{0,60}(2021|22\s*(rct|randomi[sz]ed|trials))", re.I),
        "a 2021 Cochrane review of 22 RCTs (no such review was found)",
        "cite yousefi-nooraie-2008 (the Cochrane review: 7 RCTs, small short-term effects)",
    ),
    Unverifiable(
        re.compile(r"(2021|22\s*rcts?)[^\n]{0,60}cochrane", re.I),
        "a 2021 Cochrane review of 22 RCTs (no such review was found)",
        "cite yousefi-nooraie-2008 (the Cochrane review: 7 RCTs, small short-term effects)",
    ),
    Unverifiable(
        re.compile(r"pain\s+physician[^\n]{0,40}2023|2023[^\n]{0,40}pain\s+physician", re.I),
        "a Pain Physician 2023 meta-analysis (not found)",
        "cite huang-2015 or glazov-2016",
    ),
    Unverifiable(
        re.compile(r"(≥|>=|at\s+least|minimum(\s+of)?)\s*4\s*J\s*/\s*cm", re.I),
        "'≥ 4 J/cm²' (WALT says at least 4 J per point, not per cm²)",
        "write 'at least 4 J per point' and cite walt-2010",
    ),
)


def find_unverifiable(text: str) -> list[tuple[int, Unverifiable]]:
    """Every line (1-based) of `text` that makes a claim pbmd does not let a protocol make."""
    found: list[tuple[int, Unverifiable]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        for claim in UNVERIFIABLE:
            if claim.pattern.search(line):
                found.append((number, claim))
                break
    return found
