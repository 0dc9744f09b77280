"""Ticket order for reproducible runs: results arrive in any order and are told in the order asked.

A reorder buffer: a result is held from its arrival until every earlier ticket's result has been
released. The live driver feeds it arrivals; ``resume`` feeds it the run store's events (asks and
results in the order they were recorded) and so re-derives exactly the order, and the interleaving
with asks, in which the driver told them — the store needs no record of its own of when a result
was told.

    >>> from evomerge.search import Evaluation
    >>> import numpy as np
    >>> order = TicketOrder([0, 1, 2])
    >>> [e.ticket for e in order.arrived(Evaluation(2, np.zeros(1)))], order.held
    ([], [2])
    >>> [e.ticket for e in order.arrived(Evaluation(0, np.zeros(1)))]
    [0]
    >>> [e.ticket for e in order.arrived(Evaluation(1, np.zeros(1)))]
    [1, 2]
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from evomerge.search import Evaluation, Proposal


class TicketOrder:
    """Holds results until every earlier ticket asked has been released (see the module docstring).

    ``outstanding``: the tickets asked and not yet told; ``held``: results among them that have
    already arrived (a resumed run's, recorded before its checkpoint and never told).
    """

    def __init__(self, outstanding: Iterable[int] = (), held: Iterable[Evaluation] = ()) -> None:
        self._waiting = deque(sorted(outstanding))
        self._held = {evaluation.ticket: evaluation for evaluation in held}
        unknown = set(self._held) - set(self._waiting)
        if unknown:
            raise ValueError(f"TicketOrder: held results {sorted(unknown)} are not outstanding")

    @property
    def held(self) -> list[int]:
        """Tickets whose results arrived and wait for an earlier one."""
        return sorted(self._held)

    def asked(self, ticket: int) -> None:
        """A new ticket (tickets are asked in increasing order)."""
        if self._waiting and ticket <= self._waiting[-1]:
            raise ValueError(f"TicketOrder: ticket {ticket} asked after {self._waiting[-1]}")
        self._waiting.append(ticket)

    def arrived(self, evaluation: Evaluation) -> list[Evaluation]:
        """Hold ``evaluation``; return the results now due, in ticket order (possibly none)."""
        self._held[evaluation.ticket] = evaluation
        return self.release()

    def release(self) -> list[Evaluation]:
        """The held results whose earlier tickets have all been released, in ticket order."""
        due = []
        while self._waiting and self._waiting[0] in self._held:
            due.append(self._held.pop(self._waiting.popleft()))
        return due

    def replay(self, events: Iterable[Proposal | Evaluation]) -> list[Proposal | Evaluation]:
        """Recorded events (in store order) rearranged into the order a reproducible driver told them."""
        told: list[Proposal | Evaluation] = list(self.release())
        for event in events:
            if isinstance(event, Proposal):
                self.asked(event.ticket)
                told.append(event)
            else:
                told.extend(self.arrived(event))
        return told
