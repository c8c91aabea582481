"""The body map: named regions of skin, their areas, and how they lie on each other.

Protocol files of schema version 2 place every site on a region of this map
(``protocols/body_map.toml``), so that ceilings are checked on the skin, not
on a site's name. Two relations are declared: ``inside`` (a region lies wholly
within another, e.g. a probe point within a pad's footprint) and ``overlaps``
(two regions share some skin, symmetric). From them:

- the regions that *reach* a patch R: R, its containers, every region that
  overlaps R, and those regions' containers. The dose on R is the sum of the
  doses on every region that reaches it;
- two regions *share skin* when one reaches the other.

An overlap is not inherited by the regions inside: that the lumbosacral pad's
footprint overlaps the right paraspinal one says nothing about a point left
of the midline inside the lumbosacral footprint. A region inside another that
lies (partly) under a third says so itself, with ``inside`` or ``overlaps``.
"""

from __future__ import annotations

import functools
import hashlib
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError

from pbmd.protocols.model import Identifier, Region

BODY_MAP_FILE = Path(__file__).resolve().parent / "body_map.toml"


class BodyMapError(ValueError):
    """The body map file is unreadable or inconsistent (a packaging error, not a user's)."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class BodyRegion(_Model):
    """One region of skin as the map file states it."""

    label: str = Field(min_length=1, max_length=200)
    zone: Annotated[Region, Strict(False)] = Field(
        description="Coarse body region of the contraindication checks."
    )
    area_cm2: float = Field(gt=0, le=5000, description="Skin area of the region.")
    area_basis: str = Field(
        min_length=1, description='Where the area comes from, or "assumption: …".'
    )
    inside: list[Identifier] = Field(
        default_factory=list, description="Regions this one lies within."
    )
    overlaps: list[Identifier] = Field(default_factory=list, description="Regions sharing skin.")


class _MapFile(_Model):
    id: Identifier
    version: int = Field(ge=1)
    regions: dict[Identifier, BodyRegion] = Field(min_length=1)


@dataclass(frozen=True)
class BodyMap:
    """The map, with the relations closed over (containers of containers, both sides
    of an overlap) so that the checks only look them up."""

    id: str
    version: int
    sha256: str
    regions: Mapping[str, BodyRegion]
    containers: Mapping[str, frozenset[str]]
    overlaps: Mapping[str, frozenset[str]]

    def __contains__(self, region_id: object) -> bool:
        return region_id in self.regions

    def reaching(self, patch: str) -> frozenset[str]:
        """Every region whose light lands on (some of) patch: the sum of their
        doses is the dose on the patch."""
        out = {patch} | self.containers[patch]
        for other in self.overlaps[patch]:
            out |= {other} | self.containers[other]
        return frozenset(out)

    def reached_by(self, region: str) -> frozenset[str]:
        """The patches a step on `region` adds dose to (the inverse of `reaching`)."""
        return frozenset(p for p in self.regions if region in self.reaching(p))

    def share_skin(self, a: str, b: str) -> bool:
        """Whether an applicator on `a` and one on `b` may lie on the same skin."""
        return b in self.reaching(a) or a in self.reaching(b)


def parse_body_map(data: bytes, source: str = "body_map.toml") -> BodyMap:
    """Read and close a map file; BodyMapError says what is wrong with it."""
    try:
        raw = _MapFile.model_validate(tomllib.loads(data.decode("utf-8")))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError, ValidationError) as exc:
        raise BodyMapError(f"{source}: {exc}") from None
    regions = raw.regions
    for rid, region in regions.items():
        for other in (*region.inside, *region.overlaps):
            if other not in regions:
                raise BodyMapError(f"{source}: region {rid!r} names unknown region {other!r}")
            if other == rid:
                raise BodyMapError(f"{source}: region {rid!r} names itself")
    containers: dict[str, frozenset[str]] = {}

    def close(rid: str, seen: tuple[str, ...]) -> frozenset[str]:
        if rid in seen:
            raise BodyMapError(f"{source}: regions inside each other in a loop: {seen}")
        if rid not in containers:
            found: set[str] = set()
            for parent in regions[rid].inside:
                found |= {parent} | close(parent, (*seen, rid))
            containers[rid] = frozenset(found)
        return containers[rid]

    for rid in regions:
        close(rid, ())
    for rid, region in regions.items():
        for parent in region.inside:
            if regions[parent].area_cm2 < region.area_cm2:
                raise BodyMapError(
                    f"{source}: region {rid!r} ({region.area_cm2:g} cm²) is larger than "
                    f"{parent!r} ({regions[parent].area_cm2:g} cm²) it lies inside"
                )
    overlaps: dict[str, set[str]] = {rid: set() for rid in regions}
    for rid, region in regions.items():
        for other in region.overlaps:
            overlaps[rid].add(other)
            overlaps[other].add(rid)
    return BodyMap(
        id=raw.id,
        version=raw.version,
        sha256=hashlib.sha256(data).hexdigest(),
        regions=regions,
        containers=containers,
        overlaps={rid: frozenset(o) for rid, o in overlaps.items()},
    )


@functools.cache
def body_map() -> BodyMap:
    """The shipped map (read once)."""
    return parse_body_map(BODY_MAP_FILE.read_bytes(), str(BODY_MAP_FILE))
