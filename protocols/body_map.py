"""The body map: named regions of skin, their areas, and how they lie on each other.

Protocol files of schema version 2 place every site on a region of this map
(``protocols/body_map.toml``), so that ceilings are checked on the skin, not
on a site's name. Two relations are declared: ``inside`` (a region lies wholly
within another, e.g. a probe point within a pad's footprint) and ``overlaps``
(two regions share some skin, symmetric).

The checks add doses on *patches*: pieces of skin that a set of regions all
cover. A step on region S lies on S and on every region S is inside
(``up(S)``). The patches are

- each region R: the skin of R carries what lies on up(R);
- each maximal set of regions that pairwise overlap (a clique of the overlap
  relation): the skin they may share carries what lies on any of them or on
  the regions they are inside.

So two pads whose footprints both overlap a third region, but not each other,
are never added together; three footprints that pairwise overlap are (the map
does not say whether they share one point, so the check assumes they do). An
overlap is not inherited by the regions inside: that the lumbosacral footprint
overlaps the right paraspinal one says nothing about a point left of the
midline inside the lumbosacral footprint. A region inside another that lies
(partly) under a third says so itself, with ``inside`` or ``overlaps``.
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
    of an overlap) and its patches of skin, so that the checks only look them up."""

    id: str
    version: int
    sha256: str
    regions: Mapping[str, BodyRegion]
    containers: Mapping[str, frozenset[str]]
    overlaps: Mapping[str, frozenset[str]]
    patches: Mapping[str, frozenset[str]]
    """Patch name -> the regions whose steps land on it (a region's own name, or the
    overlapping regions' names joined with " ∩ ")."""

    def __contains__(self, region_id: object) -> bool:
        return region_id in self.regions

    def up(self, region: str) -> frozenset[str]:
        """The region and every region it lies inside."""
        return frozenset({region}) | self.containers[region]

    def reaching(self, patch: str) -> frozenset[str]:
        """The regions whose steps land on a patch: the sum of their doses is its dose."""
        return self.patches[patch]

    def reached_by(self, region: str) -> frozenset[str]:
        """The patches a step on `region` adds dose to."""
        return frozenset(p for p, regions in self.patches.items() if region in regions)

    def share_skin(self, a: str, b: str) -> bool:
        """Whether an applicator on `a` and one on `b` may lie on the same skin."""
        return any(a in regions and b in regions for regions in self.patches.values())

    def label(self, patch: str) -> str:
        """A patch in the map's words."""
        return " ∩ ".join(self.regions[r].label for r in patch.split(" ∩ "))

    def area_cm2(self, patch: str) -> float:
        """A patch's area as far as the map knows it: its smallest region's."""
        return min(self.regions[r].area_cm2 for r in patch.split(" ∩ "))


def _cliques(graph: Mapping[str, frozenset[str]]) -> list[frozenset[str]]:
    """The maximal cliques of an undirected graph (Bron–Kerbosch with pivoting)."""
    out: list[frozenset[str]] = []

    def extend(clique: frozenset[str], candidates: set[str], excluded: set[str]) -> None:
        if not candidates and not excluded:
            out.append(clique)
            return
        pivot = max(candidates | excluded, key=lambda v: len(graph[v] & candidates))
        for v in sorted(candidates - graph[pivot]):
            extend(clique | {v}, candidates & graph[v], excluded & graph[v])
            candidates = candidates - {v}
            excluded = excluded | {v}

    extend(frozenset(), set(graph), set())
    return out


def _patches(
    regions: Mapping[str, BodyRegion],
    containers: Mapping[str, frozenset[str]],
    overlaps: Mapping[str, frozenset[str]],
) -> dict[str, frozenset[str]]:
    def up(region: str) -> frozenset[str]:
        return frozenset({region}) | containers[region]

    patches = {rid: up(rid) for rid in regions}
    for clique in _cliques(overlaps):
        if len(clique) > 1:
            patches[" ∩ ".join(sorted(clique))] = frozenset().union(*(up(r) for r in clique))
    return patches


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
    closed = {rid: frozenset(o) for rid, o in overlaps.items()}
    for rid in regions:
        for a in containers[rid]:
            for b in containers[rid]:
                related = a == b or a in containers[b] or b in containers[a] or b in closed[a]
                if not related:
                    raise BodyMapError(
                        f"{source}: region {rid!r} lies inside {a!r} and {b!r}, which the map "
                        "does not say overlap: declare the overlap"
                    )
    return BodyMap(
        id=raw.id,
        version=raw.version,
        sha256=hashlib.sha256(data).hexdigest(),
        regions=regions,
        containers=containers,
        overlaps=closed,
        patches=_patches(regions, containers, closed),
    )


@functools.cache
def body_map() -> BodyMap:
    """The shipped map (read once)."""
    return parse_body_map(BODY_MAP_FILE.read_bytes(), str(BODY_MAP_FILE))
