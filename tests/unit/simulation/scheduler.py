"""The deterministic scheduler: actors (a delivery of a message, a check) are threads, but exactly one runs at a time
(baton passing). Every operation the stand-ins intercept (a Cosmos call, a manager call's start and end, a sleep, a
publish, a scheduled retry) is a yield point, where the seeded RNG picks the next actor to run, or fails the
operation, or crashes the actor (SimCrash, which the app's `except Exception` cannot catch: like SIGKILL). When no
actor can run, the virtual clock jumps to the earliest wake-up or timer. Same seed, same trace.
"""

from __future__ import annotations

import heapq
import itertools
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CRASH = "crash"
FAULT = "fault"  # the operation fails (a Cosmos outage, a failed publish or schedule)
LOSE = "lose"  # a write takes effect but its answer is lost (a dropped connection)
PROCEED = "proceed"


class SimCrash(BaseException):
    """The actor's process dies here (SIGKILL, the function timeout): nothing in the app can catch it."""


class SimAbort(BaseException):
    """The schedule is over (a violation was found, or the step limit hit): parked actors unwind."""


@dataclass
class Actor:
    """One thread of app code: a delivery of a message or a check."""

    name: str
    body: Callable[[], Any]
    started_at: float
    message: Any = None  # the bus message of a delivery
    delivery: int = 0
    count: int = 0  # the DeliveryCount it was handed
    calls: int = 0  # integration-manager calls it made
    wake_at: float = 0.0  # runnable once the clock reaches it
    label: str = "start"
    allowed: tuple[str, ...] = ()  # the directives its next operation admits (besides PROCEED and CRASH)
    directive: str = PROCEED
    done: bool = False
    ended: str = ""  # "returned", "raised", "crashed"
    result: Any = None
    error: BaseException | None = None
    thread: threading.Thread | None = None
    go: threading.Event = field(default_factory=threading.Event)  # its turn (baton passing)
    events: list[Any] = field(default_factory=list)  # what it published


class Scheduler:
    """Runs actors one at a time on a virtual clock (epoch seconds), with timers for what happens on its own."""

    def __init__(self, seed: int, start: float) -> None:
        self.rng = random.Random(seed)
        self.now = start
        self.start = start
        self._back = threading.Event()  # the running actor handed the baton back
        self._by_thread: dict[int, Actor] = {}
        self.actors: list[Actor] = []
        self._timers: list[tuple[float, int, str, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.trace: list[str] = []
        self.steps = 0
        # Set by the world: which directive to give an actor about to run its next operation.
        self.decide: Callable[[Actor], str] = lambda actor: PROCEED

    # Called from actor threads ----------------------------------------------------------------------------------

    def current(self) -> Actor | None:
        """The actor running on this thread (None: the scheduler's own thread)."""
        return self._by_thread.get(threading.get_ident())

    def point(self, label: str, allowed: tuple[str, ...] = ()) -> str:
        """A yield point before an operation: returns the directive (PROCEED, or one of `allowed`); raises SimCrash."""
        actor = self.current()
        if actor is None:
            return PROCEED
        return self._park(actor, label, self.now, allowed)

    def sleep(self, seconds: float, label: str = "sleep") -> None:
        """The actor waits `seconds` of virtual time (other actors run meanwhile)."""
        actor = self.current()
        if actor is None:
            raise AssertionError("sleep outside an actor")
        self._park(actor, f"{label} {seconds:.3f}s", self.now + max(0.0, seconds), ())

    def _park(self, actor: Actor, label: str, wake_at: float, allowed: tuple[str, ...]) -> str:
        actor.label, actor.wake_at, actor.allowed = label, wake_at, allowed
        actor.go.clear()
        self._back.set()
        actor.go.wait()
        directive, actor.directive = actor.directive, PROCEED
        if directive == "abort":
            raise SimAbort
        if directive == CRASH:
            raise SimCrash
        return directive

    # The scheduler's side ------------------------------------------------------------------------------------------

    def spawn(self, name: str, body: Callable[[], Any], message: Any = None, delivery: int = 0) -> Actor:
        """A new actor, parked before its first line."""
        actor = Actor(name, body, self.now, message, delivery, wake_at=self.now)

        def run() -> None:
            self._by_thread[threading.get_ident()] = actor
            actor.go.wait()
            try:
                if actor.directive == "abort":
                    raise SimAbort
                if actor.directive == CRASH:
                    raise SimCrash
                actor.result = actor.body()
                actor.ended = "returned"
            except SimCrash:
                actor.ended = "crashed"
            except SimAbort:
                actor.ended = "aborted"
            except Exception as error:  # noqa: BLE001 - the handler raised: the queue abandons the message
                actor.ended, actor.error = "raised", error
            except BaseException as error:  # noqa: BLE001 - a bug of the simulation itself: reported by the world
                actor.ended, actor.error = "broken", error
            finally:
                actor.done = True
                self._back.set()

        actor.thread = threading.Thread(target=run, name=name, daemon=True)
        self.actors.append(actor)
        actor.thread.start()
        return actor

    def resume(self, actor: Actor, directive: str = PROCEED) -> None:
        """Run `actor` until its next yield point or its end."""
        actor.directive = directive
        self.steps += 1
        self._back.clear()
        actor.go.set()
        self._back.wait()

    def at(self, when: float, label: str, action: Callable[[], None]) -> None:
        """Run `action` on the scheduler's thread once the clock reaches `when`."""
        heapq.heappush(self._timers, (when, next(self._seq), label, action))

    def fire_due(self) -> None:
        """Run every timer due by now, in time order."""
        while self._timers and self._timers[0][0] <= self.now:
            _, _, label, action = heapq.heappop(self._timers)
            self.log("timer", label)
            action()

    def runnable(self) -> list[Actor]:
        """Live actors whose wake-up time has come."""
        return [a for a in self.actors if not a.done and a.wake_at <= self.now]

    def next_time(self) -> float | None:
        """The earliest wake-up or timer after now."""
        times = [a.wake_at for a in self.actors if not a.done and a.wake_at > self.now]
        if self._timers:
            times.append(self._timers[0][0])
        return min(times, default=None)

    def log(self, who: str, what: str) -> None:
        """One line of the trace."""
        self.trace.append(f"t=+{self.now - self.start:9.3f} {who:<14} {what}")

    def shutdown(self) -> None:
        """Unwind every live actor (SimAbort) and join the threads."""
        for actor in self.actors:
            if not actor.done:
                self.resume(actor, "abort")
        for actor in self.actors:
            if actor.thread is not None:
                actor.thread.join(timeout=5)
