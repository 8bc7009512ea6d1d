"""The route through the body: which servers hold which layers.

A body of layers [X, Y) may be sharded over several servers: `lambdasplit serve --split X:M` on some,
`--split M:Y` on others. The client is given their URLs and asks each one what it holds (/v1/info);
servers that hold the same layers are replicas of one hop, and the hops, in layer order, must tile
[X, Y) with no gap and no overlap:

    --server http://a1:8470,http://a2:8470,http://b:8470
        a1, a2: layers [1, 15)   b: layers [15, 29)
    route:  hop [1, 15) on a1 (a2 if a1 fails)  ->  hop [15, 29) on b

A server may also serve a part of what it holds (a session asks for any [x, y) inside it), so a route
for a narrower client split trims the first and last hops.

A server that does not answer when the route is planned is left out of it, but not forgotten: the route
keeps it as `missing`, and a hop that loses its servers asks those again (`reprobe`) before it gives up,
so a replica that was down at the start and came up since takes over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ..wire.protocol import ServerInfo
from .transport import BodyError


class RouteError(ValueError):
    """The servers do not make a usable route (a gap, an overlap, another model): said in words."""


@dataclass(frozen=True)
class Hop:
    x: int
    y: int
    replicas: tuple[str, ...]

    def __str__(self) -> str:
        return f"[{self.x}, {self.y}) on {', '.join(self.replicas)}"


@dataclass(frozen=True)
class Route:
    hops: tuple[Hop, ...]
    missing: tuple[str, ...] = ()  # servers that did not answer when the route was planned: asked again later

    @property
    def x(self) -> int:
        return self.hops[0].x

    @property
    def y(self) -> int:
        return self.hops[-1].y

    def __str__(self) -> str:
        return " -> ".join(str(h) for h in self.hops)


def plan_route(served: dict[str, tuple[int, int]], split: tuple[int, int] | None = None) -> Route:
    """The hops that tile `split` (default: from the lowest first layer to the highest last one), from
    what each URL serves: {url: (x, y)}. Servers of identical ranges are replicas of one hop, in the
    order given."""
    if not served:
        raise RouteError("no body server answered")
    groups: dict[tuple[int, int], list[str]] = {}
    for url, layers in served.items():
        groups.setdefault(layers, []).append(url)
    ranges = sorted(groups)
    x, y = split if split is not None else (ranges[0][0], max(r[1] for r in ranges))
    if len(ranges) == 1:  # replicas of one body (the usual case): any split inside it
        (lo, hi), = ranges
        if not lo <= x <= y <= hi:
            raise RouteError(f"the servers hold layers [{lo}, {hi}); the client's split [{x}, {y}) is not inside them")
        return Route((Hop(x, y, tuple(groups[(lo, hi)])),))
    hops, at = [], x
    for lo, hi in ranges:
        if hi <= at or lo >= y:
            continue  # wholly before the point reached, or after the split's end
        if lo > at:
            break
        if lo < at and hops:
            raise RouteError(f"the servers' layers overlap: {_describe(groups)}; run each server with a "
                             "disjoint --split (replicas of a hop must serve the same layers)")
        hops.append(Hop(at, min(hi, y), tuple(groups[(lo, hi)])))
        at = min(hi, y)
        if at == y:
            return Route(tuple(hops))
    raise RouteError(f"no chain of servers covers layers [{x}, {y}) (stuck at layer {at}): {_describe(groups)}")


def _describe(groups: dict[tuple[int, int], list[str]]) -> str:
    return "; ".join(f"[{lo}, {hi}) on {', '.join(urls)}" for (lo, hi), urls in sorted(groups.items()))


def discover_route(urls: list[str], info: Callable[[str], ServerInfo], split: tuple[int, int] | None = None,
                   on_event: Callable[[str], None] = lambda message: None) -> tuple[Route, ServerInfo]:
    """Ask every server what it holds and plan the route; a server that cannot be reached is left out
    (said through on_event), as long as the others still cover the split. Returns the route and one
    server's info (the model's facts: layers, name)."""
    served, facts, failures = {}, {}, []
    for url in urls:
        try:
            facts[url] = info(url)
        except BodyError as exc:
            failures.append(f"{url}: {exc}")
            on_event(f"{url} left out of the route: {exc}")
            continue
        served[url] = (facts[url].x, facts[url].y)
    if not served:
        raise BodyError("unreachable", "no body server answered: " + "; ".join(failures))
    names = {(f.model_name, f.num_layers, f.hidden_size) for f in facts.values()}
    if len(names) > 1:
        raise RouteError("the servers hold different models: " + "; ".join(
            f"{url}: {f.model_name} ({f.num_layers} layers, D={f.hidden_size})" for url, f in facts.items()))
    route = plan_route(served, split)
    return Route(route.hops, tuple(url for url in urls if url not in served)), next(iter(facts.values()))


def reprobe(route: Route, hop: Hop, info: Callable[[str], ServerInfo],
            on_event: Callable[[str], None] = lambda message: None) -> list[str]:
    """The servers left out of `route` (down when it was planned) that answer now and hold all of `hop`'s
    layers: replicas the hop may move on to."""
    found = []
    for url in route.missing:
        try:
            facts = info(url)
        except (BodyError, OSError, ValueError):
            continue
        if facts.x <= hop.x and hop.y <= facts.y:
            on_event(f"{url} answers now: it joins the route as a replica of layers [{hop.x}, {hop.y})")
            found.append(url)
    return found
