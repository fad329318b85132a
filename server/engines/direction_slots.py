"""Which bank slot holds which named direction, and which slots in-flight requests still hold.

Directions can be loaded and removed while the server runs. A removed direction disappears
from the name table at once (new requests: unknown direction), but its slot returns to the
free pool only when the last request that was admitted with it has finished: until then that
request keeps reading the slot's values, so they must not change under it. A request holds its
slot from admission to its last token through :meth:`DirectionSlots.hold`.

Plain bookkeeping, no tensors: the engines write the bank; this decides where.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

from abliserve.errors import UserError

DEFAULT_MAX_DIRECTIONS = 32  # bank slots beyond the baseline
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
NAME_RULE = "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"


class DirectionError(UserError, ValueError):
    """A direction cannot be loaded or removed; the message says why (HTTP: ``status``)."""

    status = 400


class DirectionConflictError(DirectionError):
    """The name is taken, the bank is full, or the direction cannot be removed (HTTP 409)."""

    status = 409


class UnknownDirectionError(DirectionError):
    """No direction of that name is loaded (HTTP 404)."""

    status = 404


def check_direction_name(name: str) -> str:
    """A direction name travels in URLs and headers: refuse anything else, naming the rule."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = name if isinstance(name, str) and name.isprintable() else repr(name)
        raise DirectionError(f"direction name {shown[:80]!r} is invalid: use {NAME_RULE}")
    return name


class DirectionSlots:
    """Name-to-slot table of a bank of ``capacity`` slots (1..capacity; 0 is the baseline)."""

    def __init__(self, names: Iterable[str], capacity: int) -> None:
        names = list(names)
        if capacity < 0:
            raise DirectionError(f"--max-directions must be at least 0, got {capacity}")
        if len(names) > capacity:
            raise DirectionError(
                f"{len(names)} directions given; the bank holds at most {capacity} "
                "(raise --max-directions)"
            )
        self.capacity = capacity
        self._published = {name: slot for slot, name in enumerate(names, start=1)}
        self._loads = {slot: slot for slot in self._published.values()}  # slot -> load number
        self._load_count = len(names)
        self._holds: Counter[int] = Counter()
        self._retired: set[int] = set()  # removed, but still held by requests in flight
        self._reserved: set[int] = set()  # being written, not yet published

    @property
    def names(self) -> list[str]:
        """Published names, in the order they were loaded."""
        return list(self._published)

    def slot(self, name: str) -> int:
        """The slot of a published direction."""
        try:
            return self._published[name]
        except KeyError:
            raise UnknownDirectionError(f"no direction named {name!r} is loaded") from None

    def holders(self, slot: int) -> int:
        """Requests in flight that hold ``slot``."""
        return self._holds[slot]

    def reserve(self, name: str) -> int:
        """A free slot for ``name``, taken out of the pool until :meth:`publish` or
        :meth:`unreserve`; refused if the name is taken or no slot is free."""
        if name in self._published:
            raise DirectionConflictError(f"a direction named {name!r} is already loaded")
        taken = set(self._published.values()) | self._retired | self._reserved
        free = [slot for slot in range(1, self.capacity + 1) if slot not in taken]
        if not free:
            held = f", {len(self._retired)} removed but still in use" if self._retired else ""
            raise DirectionConflictError(
                f"the direction bank is full ({self.capacity} slots{held}); remove a direction "
                "first, or restart with a larger --max-directions"
            )
        self._reserved.add(free[0])
        return free[0]

    def publish(self, name: str, slot: int) -> None:
        self._reserved.discard(slot)
        self._published[name] = slot
        self._load_count += 1
        self._loads[slot] = self._load_count

    def load_number(self, slot: int) -> int:
        """Which load wrote ``slot`` (a number never given twice; 0 for the baseline): what
        tells apart two directions published under one name, one after the other."""
        return self._loads.get(slot, 0)

    def unreserve(self, slot: int) -> None:
        self._reserved.discard(slot)

    def unpublish(self, name: str) -> int:
        """Remove ``name`` from the table now; its slot frees when its last holder finishes."""
        slot = self.slot(name)
        del self._published[name]
        if self._holds[slot]:
            self._retired.add(slot)
        return slot

    @contextmanager
    def hold(self, name: str | None) -> Iterator[int]:
        """The slot of ``name`` (0 for None), held until the block ends."""
        slot = 0 if name is None else self.slot(name)
        if slot == 0:
            yield 0
            return
        self._holds[slot] += 1
        try:
            yield slot
        finally:
            self._holds[slot] -= 1
            if not self._holds[slot]:
                del self._holds[slot]
                self._retired.discard(slot)
