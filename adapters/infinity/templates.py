"""Infinity's per-aspect-ratio scale templates (spec §2.1).

Every template is a list of 13 token grids (h, w); a ``pn`` picks a prefix of it
(0.06M: 7, 0.25M: 10, 0.60M: 12, 1M: 13). For every ratio r != 1 there is a transposed
template keyed by int(1000 / r) / 1000. An image uses the template nearest to its h/w.
RoPE positions are normalised to the *1M* last grid of the template (``rope_grid``).
"""

from __future__ import annotations

from sar_core.schedule import Schedule

PN_SCALES = {"0.06M": 7, "0.25M": 10, "0.60M": 12, "1M": 13}

_BASE = {
    1.000: "1,1 2,2 4,4 6,6 8,8 12,12 16,16 20,20 24,24 32,32 40,40 48,48 64,64",
    1.250: "1,1 2,2 3,3 5,4 10,8 15,12 20,16 25,20 30,24 35,28 45,36 55,44 70,56",
    1.333: "1,1 2,2 4,3 8,6 12,9 16,12 20,15 24,18 28,21 36,27 48,36 60,45 72,54",
    1.500: "1,1 2,2 3,2 6,4 9,6 15,10 21,14 27,18 33,22 39,26 48,32 63,42 78,52",
    1.750: "1,1 2,2 3,3 7,4 11,6 14,8 21,12 28,16 35,20 42,24 56,32 70,40 84,48",
    2.000: "1,1 2,2 4,2 6,3 10,5 16,8 22,11 30,15 38,19 46,23 60,30 74,37 90,45",
    2.500: "1,1 2,2 5,2 10,4 15,6 20,8 25,10 30,12 40,16 50,20 65,26 80,32 100,40",
    3.000: "1,1 2,2 6,2 9,3 15,5 21,7 27,9 36,12 45,15 54,18 72,24 90,30 111,37",
}


def _parse(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in p.split(",")) for p in text.split())


def _build() -> dict[float, tuple[tuple[int, int], ...]]:
    table = {}
    for ratio, text in _BASE.items():
        grids = _parse(text)
        table[ratio] = grids
        if ratio != 1.0:
            table[int(1000 / ratio) / 1000] = tuple((w, h) for h, w in grids)
    return table


TEMPLATES = _build()


def nearest_ratio(h_div_w: float) -> float:
    """The template key nearest to an image's h/w."""
    return min(TEMPLATES, key=lambda r: abs(r - float(h_div_w)))


def check_pn(pn: str) -> int:
    if pn not in PN_SCALES:
        raise ValueError(f"unknown pn {pn!r}; choose one of {', '.join(PN_SCALES)}")
    return PN_SCALES[pn]


def template_schedule(h_div_w: float, pn: str) -> Schedule:
    """The scale schedule of the template nearest ``h_div_w`` for ``pn``."""
    return Schedule(TEMPLATES[nearest_ratio(h_div_w)][: check_pn(pn)])


def schedule_template(schedule: Schedule, prefer: float | None = None) -> float:
    """The template whose prefix ``schedule`` is (RoPE tables exist only for those).

    Short prefixes are shared by several templates: ``prefer`` (the model's configured
    h/w) wins when it matches."""
    scales = tuple(Schedule.parse(schedule).scales)
    order = list(TEMPLATES)
    if prefer is not None:
        order.insert(0, nearest_ratio(prefer))
    for ratio in order:
        grids = TEMPLATES[ratio]
        if grids[: len(scales)] == scales:
            return ratio
    raise ValueError(f"schedule {Schedule(scales)} is not a prefix of any Infinity template; "
                     "use a template schedule (e.g. --pn 0.06M with an aspect ratio), see docs/infinity.md")


def scale_levels(schedule: Schedule, prefer: float | None = None) -> tuple[float, list[int]]:
    """(template, index of every scale in it). A template prefix gives 0..K-1; an ordered
    subset of the preferred template (the official rollout's [scale 0, scale k] pass) gives
    the scales' own indices, so level embeddings and RoPE positions stay those of scale k."""
    try:
        ratio = schedule_template(schedule, prefer)
        return ratio, list(range(len(Schedule.parse(schedule))))
    except ValueError:
        if prefer is None:
            raise
        scales = list(Schedule.parse(schedule).scales)
        for ratio in [nearest_ratio(prefer)] + list(TEMPLATES):  # the preferred one, then any
            grids = TEMPLATES[ratio]
            idx = [grids.index(hw) if hw in grids else -1 for hw in scales]
            if min(idx) >= 0 and idx == sorted(set(idx)):
                return ratio, idx
        raise


def rope_grid(schedule: Schedule, prefer: float | None = None) -> tuple[int, int]:
    """(Hn, Wn): the last grid of the 1M schedule of ``schedule``'s template."""
    return TEMPLATES[schedule_template(schedule, prefer)][-1]
