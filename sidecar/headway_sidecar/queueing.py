"""Admission queues and upstream slots: which request goes to the model server next.

A free slot goes to a waiting real-time request first, and batch may hold at
most `Capacity.batch_slots`, so real-time work finds room without waiting out a
long batch generation. Inside a class, tenants share by deficit round robin
counted in tokens, not requests, so a tenant's flood cannot starve a trickle.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType

import headway_contract

from headway_sidecar import errors

REALTIME = "realtime"
BATCH = "batch"

QUANTUM_TOKENS = 512
"""Credit one unit of fairShareWeight earns per round-robin turn, in tokens.

About one typical reservation (a short prompt plus the default 512-token
output cap), so tenants of equal weight alternate request by request. A bigger
request banks credit over several turns; rounds in which nobody can afford
anything are skipped arithmetically, never looped through.
"""

_HOLD_SMOOTHING = 0.2  # weight of the newest slot hold time in the running mean


@dataclass(eq=False, slots=True)
class _Waiter:
    priority: str
    tenant: str
    tokens: int
    queued_at: float
    future: asyncio.Future[Slot]
    timer: asyncio.TimerHandle | None = None


@dataclass(eq=False, slots=True)
class _Tenant:
    name: str
    weight: int
    # NB: an OrderedDict, not a deque: timeouts and disconnects remove
    # waiters from the middle, and that must stay O(1).
    waiters: OrderedDict[_Waiter, None] = field(default_factory=OrderedDict)
    deficit: int = 0

    @property
    def quantum(self) -> int:
        return self.weight * QUANTUM_TOKENS

    @property
    def head(self) -> _Waiter:
        return next(iter(self.waiters))


class _ClassQueue:
    """One class's waiters: a FIFO per tenant, served by deficit round robin."""

    def __init__(self) -> None:
        self.depth = 0
        self._tenants: dict[str, _Tenant] = {}
        self._turns: deque[_Tenant] = deque()  # the front tenant is the one whose turn it is
        self._credited = False  # the front tenant has had its quantum for this turn

    def push(self, waiter: _Waiter, weight: int) -> None:
        tenant = self._tenants.get(waiter.tenant)
        if tenant is None:
            tenant = self._tenants[waiter.tenant] = _Tenant(waiter.tenant, weight)
            self._turns.append(tenant)
        # The newest request carries the tenant's current weight (configs change).
        tenant.weight = max(1, weight)
        tenant.waiters[waiter] = None
        self.depth += 1

    def remove(self, waiter: _Waiter) -> bool:
        tenant = self._tenants.get(waiter.tenant)
        if tenant is None or waiter not in tenant.waiters:
            return False
        self._unlink(tenant, waiter)
        return True

    def pop(self) -> _Waiter | None:
        """The next waiter to serve, or None when only abandoned entries were left."""
        credited = 0
        while self._turns:
            tenant = self._turns[0]
            if not self._credited:
                tenant.deficit += tenant.quantum
                self._credited = True
                credited += 1

            head = tenant.head
            if head.future.done():
                # Its task was cancelled and has not yet run to leave the queue itself.
                self._unlink(tenant, head)
                continue
            if head.tokens <= tenant.deficit:
                tenant.deficit -= head.tokens
                self._unlink(tenant, head)
                return head

            self._turns.rotate(-1)
            self._credited = False
            if credited >= len(self._turns):
                self._skip_idle_rounds()
                credited = 0
        return None

    def drain(self) -> list[_Waiter]:
        waiters = [w for tenant in self._turns for w in tenant.waiters]
        self.depth = 0
        self._tenants.clear()
        self._turns.clear()
        self._credited = False
        return waiters

    def _skip_idle_rounds(self) -> None:
        # Every tenant has had a turn and none could afford its head request:
        # grant at once the rounds after which the first of them can, instead
        # of spinning through them (a 30k-token request against a 512 quantum).
        rounds = min(math.ceil((t.head.tokens - t.deficit) / t.quantum) for t in self._turns) - 1
        if rounds > 0:
            for tenant in self._turns:
                tenant.deficit += rounds * tenant.quantum

    def _unlink(self, tenant: _Tenant, waiter: _Waiter) -> None:
        del tenant.waiters[waiter]
        self.depth -= 1
        if tenant.waiters:
            return
        # An emptied queue leaves the rotation and forfeits its credit: an idle
        # tenant does not bank a burst for later (classic DRR).
        del self._tenants[tenant.name]
        if self._turns[0] is tenant:
            self._credited = False
        self._turns.remove(tenant)


class Slot:
    """One upstream slot, held from dispatch until `release` or the end of `async with`."""

    __slots__ = ("_granted_at", "_released", "_scheduler", "priority", "waited")

    def __init__(
        self, scheduler: Scheduler, priority: str, waited: float, granted_at: float
    ) -> None:
        self.priority = priority
        self.waited = waited  # seconds spent queued here
        self._scheduler = scheduler
        self._granted_at = granted_at
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._scheduler._release(self.priority, self._granted_at)

    async def __aenter__(self) -> Slot:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Scheduler:
    """The two class queues in front of `maxConcurrency` slots of one model server.

    Everything runs on the event loop thread with no await between a check
    and its update, so no locks; a slot is handed over inside `release`.
    """

    def __init__(
        self,
        capacity: headway_contract.Capacity,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = capacity
        self._clock = clock
        self._queues = {REALTIME: _ClassQueue(), BATCH: _ClassQueue()}
        self._inflight = {REALTIME: 0, BATCH: 0}
        self._closed = False
        self._mean_hold: float | None = None  # seconds, smoothed over recent releases
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def capacity(self) -> int:
        return self._capacity.max_concurrency

    def depth(self, priority: str) -> int:
        return self._queue(priority).depth

    def inflight(self, priority: str) -> int:
        self._queue(priority)
        return self._inflight[priority]

    def reconfigure(self, capacity: headway_contract.Capacity) -> None:
        # Waiters keep their deadlines and in-flight slots stay held; a smaller
        # limit only means fewer hand-offs until enough slots have freed.
        self._capacity = capacity
        self._dispatch()

    async def acquire(
        self, *, priority: str, tenant: str, weight: int, tokens: int, deadline: float
    ) -> Slot:
        queue = self._queue(priority)
        if self._closed:
            raise errors.ShuttingDown("the sidecar is shutting down", retry_after=1.0)
        if not queue.depth and self._has_room(priority):
            return self._grant(priority, waited=0.0)

        limit = self._capacity.queue(priority).max_depth
        if queue.depth >= limit:
            raise errors.QueueFull(
                f"the {priority} queue is full ({limit} requests waiting)",
                retry_after=self._retry_after(priority),
            )
        now = self._clock()
        if deadline <= now:
            raise self._timeout(priority, waited=0.0)

        loop = asyncio.get_running_loop()
        waiter = _Waiter(priority, tenant, max(0, tokens), now, loop.create_future())
        queue.push(waiter, weight)
        waiter.timer = loop.call_later(deadline - now, self._expire, waiter)
        try:
            return await waiter.future
        except asyncio.CancelledError:
            self._abandon(waiter)
            raise
        finally:
            waiter.timer.cancel()

    def close(self) -> None:
        self._closed = True
        for queue in self._queues.values():
            for waiter in queue.drain():
                if not waiter.future.done():
                    waiter.future.set_exception(
                        errors.ShuttingDown(
                            "the sidecar is shutting down; retry on another replica",
                            retry_after=1.0,
                        )
                    )

    async def wait_idle(self, timeout: float) -> bool:  # noqa: ASYNC109
        # A timeout argument, not asyncio.timeout(): a drain that runs out of
        # time is an answer (False), not an error.
        if self._idle.is_set():
            return True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

    # -- internals ---------------------------------------------------------------------------

    def _queue(self, priority: str) -> _ClassQueue:
        try:
            return self._queues[priority]
        except KeyError:
            raise ValueError(f"unknown priority class {priority!r}: realtime or batch") from None

    def _has_room(self, priority: str) -> bool:
        if self._inflight[REALTIME] + self._inflight[BATCH] >= self._capacity.max_concurrency:
            return False
        return priority == REALTIME or self._inflight[BATCH] < self._capacity.batch_slots

    def _grant(self, priority: str, *, waited: float) -> Slot:
        self._inflight[priority] += 1
        self._idle.clear()
        return Slot(self, priority, waited, self._clock())

    def _dispatch(self) -> None:
        # Real-time first: batch is looked at only once no real-time request
        # waits or no slot is left, so batch can never take a slot from it.
        for priority in (REALTIME, BATCH):
            queue = self._queues[priority]
            while queue.depth and self._has_room(priority):
                waiter = queue.pop()
                if waiter is None:
                    break
                waited = self._clock() - waiter.queued_at
                waiter.future.set_result(self._grant(priority, waited=waited))

    def _release(self, priority: str, granted_at: float) -> None:
        self._inflight[priority] -= 1
        held = max(0.0, self._clock() - granted_at)
        if self._mean_hold is None:
            self._mean_hold = held
        else:
            self._mean_hold += _HOLD_SMOOTHING * (held - self._mean_hold)

        self._dispatch()
        if not self._inflight[REALTIME] + self._inflight[BATCH]:
            self._idle.set()

    def _expire(self, waiter: _Waiter) -> None:
        if self._queue(waiter.priority).remove(waiter) and not waiter.future.done():
            waited = self._clock() - waiter.queued_at
            waiter.future.set_exception(self._timeout(waiter.priority, waited=waited))

    def _abandon(self, waiter: _Waiter) -> None:
        # The client went away. Still queued: leave now, so depth drops at
        # once. Already handed a slot in this same loop iteration: give it on.
        if self._queue(waiter.priority).remove(waiter):
            return
        future = waiter.future
        if future.done() and not future.cancelled() and future.exception() is None:
            future.result().release()

    def _timeout(self, priority: str, *, waited: float) -> errors.QueueTimeout:
        return errors.QueueTimeout(
            f"no {priority} slot freed within the queue timeout (waited {waited:.1f} s here)",
            retry_after=self._retry_after(priority),
        )

    def _retry_after(self, priority: str) -> float:
        # The expected gap between two releases the class could use: the mean
        # hold time spread over its slots. Never under 1 s (the header's
        # granularity) and never over the class timeout (a retry then waits
        # no longer than this request was allowed to).
        slots = self._capacity.batch_slots if priority == BATCH else self._capacity.max_concurrency
        gap = 1.0 if self._mean_hold is None else self._mean_hold / slots
        return max(1.0, min(gap, self._capacity.queue(priority).timeout))
