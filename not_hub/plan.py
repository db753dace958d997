"""The transplant plan: which recipient layers go, which come in, and where, decided before anything is touched.

Every surgery not_hub does is one *splice* of the recipient's layer stack: at `position`, take out `remove` layers
and put in `insert` layers. The modes are entries of one table saying how many layers each removes; the plan is
pure (no model, no torch), so it can be checked and tested on its own, and its inverse is the same kind of plan
(put back what was removed, take out what was inserted). `transplant.apply_plan` executes either direction, so
transplant, explant and rollback share one code path (as peft's `_unload_and_optionally_merge` serves `unload` and
`merge_and_unload`, and mergekit's planner precedes its executor).

Index arithmetic, with k = layers coming in and L = recipient depth before the splice:

- `replace`: removes k layers; the organ occupies [position, position + k); 0 <= position <= L - k.
- `insert` / `bridge`: removes none; the organ is placed before recipient layer `position`; 0 <= position <= L.
- `splice`: removes `remove` layers (any number, given) and inserts k; 0 <= position <= L - remove. A recovered
  organ that carries its trained neighbours is grafted this way.
- `excise`: removes `remove` layers and inserts none (k = 0): layer pruning, undone by putting them back.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import InvalidModeError, InvalidPositionError


@dataclass(frozen=True)
class Mode:
    """One way of grafting.

    Attributes:
        name: the `mode=` value.
        removes: how many recipient layers leave: "organ" (as many as come in), "none", or "given" (`remove=`).
        bridges: the organ sits between trainable linear bridges.
        summary: one line for docs, the CLI and the Space.
    """

    name: str
    removes: str
    bridges: bool
    summary: str


MODES: dict[str, Mode] = {
    m.name: m
    for m in (
        Mode("replace", "organ", False, "the organ takes the place of recipient layers [position, position + k)"),
        Mode("insert", "none", False, "the organ goes in before recipient layer `position`: k layers deeper"),
        Mode("bridge", "none", True, "inserted between trainable identity-initialised linear bridges"),
        Mode("splice", "given", False, "recipient layers [position, position + remove) give way to the organ"),
        Mode("excise", "given", False, "recipient layers [position, position + remove) are taken out, none come in"),
    )
}
MODE_NAMES: tuple[str, ...] = tuple(MODES)


@dataclass(frozen=True)
class TransplantPlan:
    """At `position`, `remove` recipient layers leave and `insert` layers come in.

    The layers that come in occupy `[position, position + insert)` of the new stack; the ones that leave held
    `[position, position + remove)` of the old one.
    """

    mode: str
    position: int
    remove: int
    insert: int
    depth_before: int

    @property
    def depth_after(self) -> int:
        return self.depth_before - self.remove + self.insert

    @property
    def removed_range(self) -> tuple[int, int]:
        """Half-open range of the recipient layers that leave (indices before the splice)."""
        return self.position, self.position + self.remove

    @property
    def inserted_range(self) -> tuple[int, int]:
        """Half-open range the incoming layers occupy after the splice."""
        return self.position, self.position + self.insert

    def inverse(self) -> TransplantPlan:
        """The plan that undoes this one: put back what was removed, take out what was inserted."""
        return TransplantPlan(
            mode=f"undo {self.mode}",
            position=self.position,
            remove=self.insert,
            insert=self.remove,
            depth_before=self.depth_after,
        )

    def at(self, position: int) -> TransplantPlan:
        """The same splice at another position (an organ's block may have moved since, as others came and went)."""
        return TransplantPlan(self.mode, position, self.remove, self.insert, self.depth_before)

    def splice(self, values: Sequence, incoming: Sequence) -> tuple[list, list]:
        """Apply the plan to a list (the layer list, or a per-layer config list): `(new list, removed entries)`."""
        if len(values) != self.depth_before or len(incoming) != self.insert:
            raise AssertionError(  # internal invariant: callers build `incoming` from this plan
                f"plan for {self.depth_before} -> {self.depth_after} layers applied to {len(values)} entries with "
                f"{len(incoming)} incoming"
            )
        start, stop = self.removed_range
        return [*values[:start], *incoming, *values[stop:]], list(values[start:stop])


def _as_position(position) -> int:
    if isinstance(position, bool):
        raise InvalidPositionError(f"position={position!r} is a bool; pass the 0-based index of a layer")
    try:
        return operator.index(position)  # ints and numpy integers; floats and strings are refused, not coerced
    except TypeError:
        raise InvalidPositionError(
            f"position={position!r} is not an integer; pass the 0-based index of a layer"
        ) from None


def _removed_count(mode: Mode, organ_layers: int, remove: int | None) -> int:
    if mode.removes == "given":
        if remove is None or isinstance(remove, bool) or not isinstance(remove, int) or remove < 0:
            raise InvalidPositionError(
                f"mode={mode.name!r} needs remove=<number of recipient layers to take out> (an integer >= 0), "
                f"got {remove!r}"
            )
        return remove
    if remove is not None and remove != (organ_layers if mode.removes == "organ" else 0):
        raise InvalidPositionError(
            f"mode={mode.name!r} removes {'k' if mode.removes == 'organ' else 'no'} recipient layers; "
            f"remove={remove!r} does not apply (use mode='splice' to choose how many)"
        )
    return organ_layers if mode.removes == "organ" else 0


def get_mode(mode: str) -> Mode:
    """The `Mode` named `mode`.

    Raises:
        InvalidModeError: not one of `MODE_NAMES`.
    """
    if mode not in MODES:
        raise InvalidModeError(f"mode={mode!r} is not supported; expected one of {MODE_NAMES}")
    return MODES[mode]


def valid_positions(mode: str, organ_layers: int, depth: int, *, remove: int | None = None) -> range:
    """Every position at which an organ of `organ_layers` layers fits a `depth`-layer recipient in `mode`."""
    removed = _removed_count(get_mode(mode), organ_layers, remove)
    return range(0, depth - removed + 1)


def plan_transplant(
    mode: str,
    position,
    *,
    organ_layers: int,
    depth: int,
    occupied: Sequence[tuple[int, int]] = (),
    remove: int | None = None,
) -> TransplantPlan:
    """Check a transplant against the recipient's shape and the organs already in it, and return its plan.

    Args:
        mode: one of `MODE_NAMES`.
        position: 0-based index of the first recipient layer the incoming layers occupy.
        organ_layers: how many layers come in (k).
        depth: the recipient's current number of layers.
        occupied: half-open ranges held by organs already transplanted (they cannot be cut into).
        remove: recipient layers to take out (mode="splice" only).

    Raises:
        InvalidModeError: unknown mode.
        InvalidPositionError: the position is not an integer, out of range, or cuts into another organ.

    Example:
        ```python
        >>> plan_transplant("insert", 4, organ_layers=3, depth=30).depth_after
        33
        ```
    """
    spec = get_mode(mode)
    position = _as_position(position)
    removed = _removed_count(spec, organ_layers, remove)
    last = depth - removed
    if not 0 <= position <= last:
        what = f"replace {removed} of" if removed else "be inserted into"
        raise InvalidPositionError(
            f"position={position} with a {organ_layers}-layer organ cannot {what} a {depth}-layer recipient in "
            f"mode={mode!r}; expected 0 <= position <= {last}"
        )
    for lo, hi in occupied:
        # Removing layers of another organ, or inserting strictly inside it, would split or destroy it.
        cuts = position < hi and lo < position + removed
        splits = lo < position < hi
        if cuts or splits:
            raise InvalidPositionError(
                f"position={position} (mode={mode!r}, {organ_layers} layers) overlaps the organ already "
                f"transplanted at layers [{lo}, {hi}); choose a position outside that range, or explant it first"
            )
    return TransplantPlan(mode=mode, position=position, remove=removed, insert=organ_layers, depth_before=depth)
