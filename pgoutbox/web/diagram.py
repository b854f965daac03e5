"""Lifecycle diagrams as inline SVG, drawn on the server (no JavaScript library).

States are laid out in columns by their distance from ``pending`` along the lifecycle's forward
transitions; each pair of states gets one arrow labelled with every trigger between them. An
operation's page passes its current state and the transitions its audit trail recorded, which
are drawn highlighted. Every name is escaped: a definition read back from the database is data.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from html import escape

from markupsafe import Markup

from pgoutbox.lifecycle import FINISHED_STATES, PENDING, Lifecycle

# Triggers pgoutbox's own machinery fires (rescue, release, operators): drawn dashed when an
# operation took one. States are placed along the main path only (Lifecycle._main_path, what
# `pgoutbox lifecycle show` draws), so the drawing reads left to right the way operations go.
MACHINERY = frozenset({"lose", "release", "retry", "replay", "cancel", "reject"})

_COLUMN = 190
_ROW = 74
_BOX_W = 140
_BOX_H = 34
_MARGIN = 24


def _columns(lifecycle: Lifecycle) -> dict[str, int]:
    """Each state's column: its distance from ``pending`` along the lifecycle's main path."""
    forward: dict[str, set[str]] = {}
    for t in lifecycle._main_path():
        if t.to_state != PENDING:
            forward.setdefault(t.from_state, set()).add(t.to_state)
    depth = {PENDING: 0}
    queue = deque([PENDING])
    while queue:
        state = queue.popleft()
        for nxt in sorted(forward.get(state, ())):
            if nxt not in depth:
                depth[nxt] = depth[state] + 1
                queue.append(nxt)
    deepest = max(depth.values(), default=0)
    for state in lifecycle.states:  # reached only by machinery (e.g. cancelled): the last column
        depth.setdefault(state, deepest + 1 if state in FINISHED_STATES else deepest)
    return depth


def lifecycle_svg(
    lifecycle: Lifecycle,
    *,
    current: str | None = None,
    taken: Iterable[tuple[str | None, str]] = (),
) -> Markup:
    """The lifecycle as an ``<svg>`` element; ``current`` and the ``(from, to)`` pairs in
    ``taken`` (the path an operation took) are highlighted."""
    columns = _columns(lifecycle)
    rows: dict[int, int] = {}
    position: dict[str, tuple[float, float]] = {}
    for state in lifecycle.states:
        column = columns[state]
        row = rows.get(column, 0)
        rows[column] = row + 1
        position[state] = (_MARGIN + column * _COLUMN, _MARGIN + 14 + row * _ROW)
    width = _MARGIN * 2 + max(columns.values(), default=0) * _COLUMN + _BOX_W
    height = _MARGIN * 2 + 14 + max(rows.values(), default=1) * _ROW
    taken_pairs = {(a, b) for a, b in taken}
    visited = {b for _, b in taken_pairs} | {a for a, _ in taken_pairs if a is not None}

    # The path an operation takes, as `pgoutbox lifecycle show` draws it, and whatever else
    # this operation took (a retry, a replay): every machinery edge would hide the shape.
    main = lifecycle._main_path()
    shown = [
        t for t in lifecycle.transitions if t in main or (t.from_state, t.to_state) in taken_pairs
    ]
    edges: dict[tuple[str, str], list[str]] = {}
    for t in sorted(shown, key=lambda t: (t.from_state, t.trigger, t.to_state)):
        edges.setdefault((t.from_state, t.to_state), []).append(t.trigger)

    parts = [
        f'<svg class="lifecycle" xmlns="http://www.w3.org/2000/svg" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        f'aria-label="lifecycle {escape(lifecycle.name)}">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
        'markerHeight="8" markerUnits="userSpaceOnUse" orient="auto-start-reverse">'
        '<path d="M0,0 L10,5 L0,10 z"/></marker></defs>',
    ]
    for (source, target), triggers in edges.items():
        machinery = all(trigger in MACHINERY for trigger in triggers)
        classes = ["edge"]
        if machinery:
            classes.append("machinery")
        if (source, target) in taken_pairs:
            classes.append("taken")
        label = escape(", ".join(triggers))
        path, lx, ly = _edge_path(position[source], position[target])
        parts.append(
            f'<g class="{" ".join(classes)}"><path d="{path}" marker-end="url(#arrow)"/>'
            f'<text x="{lx:.0f}" y="{ly:.0f}">{label}</text></g>'
        )
    x0, y0 = position.get(PENDING, (_MARGIN, _MARGIN + 14))
    start_classes = "edge taken" if (None, PENDING) in taken_pairs else "edge"
    parts.append(
        f'<g class="{start_classes}"><path d="M{x0 - 20:.0f},{y0 - 14:.0f} '
        f'L{x0 + 10:.0f},{y0:.0f}" marker-end="url(#arrow)"/></g>'
    )
    for state in lifecycle.states:
        x, y = position[state]
        classes = ["state", _kind(lifecycle, state)]
        if state in visited:
            classes.append("visited")
        if state == current:
            classes.append("current")
        parts.append(
            f'<g class="{" ".join(classes)}" data-state="{escape(state)}">'
            f'<rect x="{x:.0f}" y="{y:.0f}" width="{_BOX_W}" height="{_BOX_H}" rx="8"/>'
            f'<text x="{x + _BOX_W / 2:.0f}" y="{y + _BOX_H / 2 + 5:.0f}">{escape(state)}</text>'
            "</g>"
        )
    parts.append("</svg>")
    return Markup("".join(parts))


def _kind(lifecycle: Lifecycle, state: str) -> str:
    if state in FINISHED_STATES:
        return "final"
    if state in lifecycle.parking:
        return "parking"
    if state in lifecycle.working:
        return "working"
    return "waiting"


def _edge_path(
    source: tuple[float, float], target: tuple[float, float]
) -> tuple[str, float, float]:
    """A curved arrow between two boxes (a loop for a state to itself), and where its label
    goes. Curves bend to the left of their direction, so A->B and B->A do not overlap."""
    (sx, sy), (tx, ty) = source, target
    if (sx, sy) == (tx, ty):
        cx, top = sx + _BOX_W / 2, sy
        path = (
            f"M{cx - 20:.0f},{top:.0f} C{cx - 30:.0f},{top - 30:.0f} "
            f"{cx + 30:.0f},{top - 30:.0f} {cx + 20:.0f},{top:.0f}"
        )
        return path, cx, top - 26
    a = (sx + _BOX_W / 2, sy + _BOX_H / 2)
    b = (tx + _BOX_W / 2, ty + _BOX_H / 2)
    a = _border(a, b)
    b = _border(b, a)
    dx, dy = b[0] - a[0], b[1] - a[1]
    length = math.hypot(dx, dy) or 1.0
    bend = min(40.0, length / 4)
    mx, my = (a[0] + b[0]) / 2 - dy / length * bend, (a[1] + b[1]) / 2 + dx / length * bend
    path = f"M{a[0]:.0f},{a[1]:.0f} Q{mx:.0f},{my:.0f} {b[0]:.0f},{b[1]:.0f}"
    # The curve's midpoint is halfway between the chord's midpoint and the control point.
    lx = ((a[0] + b[0]) / 2 + mx) / 2
    ly = ((a[1] + b[1]) / 2 + my) / 2 - 3
    return path, lx, ly


def _border(centre: tuple[float, float], towards: tuple[float, float]) -> tuple[float, float]:
    """Where the line from a box's centre towards a point leaves the box."""
    (cx, cy), (px, py) = centre, towards
    dx, dy = px - cx, py - cy
    if dx == 0 and dy == 0:
        return centre
    scale = min(
        (_BOX_W / 2) / abs(dx) if dx else math.inf,
        (_BOX_H / 2) / abs(dy) if dy else math.inf,
    )
    return cx + dx * scale, cy + dy * scale
