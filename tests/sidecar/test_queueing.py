"""The admission queues and slot scheduler, driven through their public interface."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter

import headway_contract
import pytest
from headway_sidecar import errors, queueing
from headway_sidecar.queueing import Scheduler, Slot

Q = queueing.QUANTUM_TOKENS


def capacity(
    max_concurrency: int = 1,
    share: float = 1.0,
    *,
    realtime_depth: int = 1000,
    batch_depth: int = 1000,
    realtime_timeout: float = 10.0,
    batch_timeout: float = 60.0,
) -> headway_contract.Capacity:
    return headway_contract.Capacity(
        max_concurrency=max_concurrency,
        batch_max_share=share,
        realtime=headway_contract.QueueSettings(max_depth=realtime_depth, timeout=realtime_timeout),
        batch=headway_contract.QueueSettings(max_depth=batch_depth, timeout=batch_timeout),
    )


def acquire_now(
    scheduler: Scheduler, priority: str = "realtime", tenant: str = "t", tokens: int = 100
) -> Slot:
    """A slot granted without the coroutine ever suspending (no queueing, no task switch)."""
    coro = scheduler.acquire(
        priority=priority, tenant=tenant, weight=1, tokens=tokens, deadline=time.monotonic() + 60
    )
    try:
        coro.send(None)
    except StopIteration as stop:
        slot: Slot = stop.value
        return slot
    with contextlib.suppress(asyncio.CancelledError):
        coro.throw(asyncio.CancelledError())  # leaves the queue, as a disconnect would
    raise AssertionError(f"a {priority} request was queued instead of served at once")


def start(
    scheduler: Scheduler,
    priority: str = "realtime",
    tenant: str = "t",
    *,
    tokens: int = 100,
    weight: int = 1,
    deadline: float | None = None,
) -> asyncio.Task[Slot]:
    return asyncio.create_task(
        scheduler.acquire(
            priority=priority,
            tenant=tenant,
            weight=weight,
            tokens=tokens,
            deadline=time.monotonic() + 60 if deadline is None else deadline,
        )
    )


async def settle() -> None:
    # Lets freshly created tasks run up to their first await: they are queued in
    # creation order.
    for _ in range(3):
        await asyncio.sleep(0)


async def stop(tasks: list[asyncio.Task[Slot]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def serve_in_order(
    scheduler: Scheduler, requests: list[tuple[str, int, int]]
) -> list[tuple[str, int]]:
    """Queue (tenant, weight, tokens) batch requests behind a held slot of a one-slot
    scheduler, then let each release as soon as it is served; the dispatch order."""
    order: list[tuple[str, int]] = []

    async def one(tenant: str, weight: int, tokens: int) -> None:
        slot = await scheduler.acquire(
            priority="batch",
            tenant=tenant,
            weight=weight,
            tokens=tokens,
            deadline=time.monotonic() + 60,
        )
        order.append((tenant, tokens))
        slot.release()

    holder = acquire_now(scheduler, "batch")
    tasks = []
    for tenant, weight, tokens in requests:
        tasks.append(asyncio.create_task(one(tenant, weight, tokens)))
        await asyncio.sleep(0)  # queued one at a time, in list order
    assert scheduler.depth("batch") == len(requests)

    holder.release()
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=30)
    assert scheduler.inflight("batch") == 0
    return order


# -- classes and slots -----------------------------------------------------------------------


async def test_free_slot_goes_to_realtime_before_earlier_batch() -> None:
    scheduler = Scheduler(capacity(2, share=1.0))
    held = [acquire_now(scheduler, "batch"), acquire_now(scheduler, "batch")]
    batch = [start(scheduler, "batch") for _ in range(5)]
    await settle()
    realtime = start(scheduler, "realtime")
    await settle()
    assert (scheduler.depth("batch"), scheduler.depth("realtime")) == (5, 1)

    held[0].release()

    slot = await asyncio.wait_for(realtime, timeout=5)
    assert slot.priority == "realtime"
    assert scheduler.inflight("realtime") == 1
    assert scheduler.depth("batch") == 5
    assert not any(task.done() for task in batch)
    await stop(batch)


async def test_batch_share_caps_batch_and_leaves_room_for_realtime() -> None:
    scheduler = Scheduler(capacity(4, share=0.5))
    batch = [acquire_now(scheduler, "batch"), acquire_now(scheduler, "batch")]
    third = start(scheduler, "batch")
    await settle()
    assert scheduler.inflight("batch") == 2
    assert scheduler.depth("batch") == 1  # two slots are free, but batch is at its share

    realtime = [acquire_now(scheduler, "realtime"), acquire_now(scheduler, "realtime")]
    assert scheduler.inflight("realtime") == 2

    # A freed real-time slot does not lift the batch cap; a freed batch slot does.
    realtime[0].release()
    assert scheduler.depth("batch") == 1
    batch[0].release()
    assert scheduler.depth("batch") == 0
    assert (await asyncio.wait_for(third, timeout=5)).priority == "batch"
    assert scheduler.inflight("batch") == 2


async def test_batch_gets_one_slot_even_when_share_rounds_to_zero() -> None:
    scheduler = Scheduler(capacity(3, share=0.1))
    acquire_now(scheduler, "batch")
    second = start(scheduler, "batch")
    await settle()
    assert (scheduler.inflight("batch"), scheduler.depth("batch")) == (1, 1)
    await stop([second])


async def test_release_is_idempotent() -> None:
    scheduler = Scheduler(capacity(1))
    slot = acquire_now(scheduler)
    waiters = [start(scheduler), start(scheduler)]
    await settle()

    slot.release()
    slot.release()
    async with slot:
        pass

    # One release handed over one slot: the second waiter still waits.
    assert scheduler.inflight("realtime") == 1
    assert scheduler.depth("realtime") == 1
    async with await waiters[0]:
        pass
    async with await waiters[1]:
        pass
    assert scheduler.inflight("realtime") == 0


async def test_waited_is_time_spent_queued() -> None:
    now = [100.0]
    scheduler = Scheduler(capacity(1), clock=lambda: now[0])
    holder = acquire_now(scheduler)
    assert holder.waited == 0.0
    waiter = start(scheduler, deadline=time.monotonic() + 60)
    await settle()

    now[0] += 2.5
    holder.release()

    assert (await waiter).waited == pytest.approx(2.5)


# -- fairness inside a class -----------------------------------------------------------------


async def test_fairness_trickle_is_served_through_a_flood() -> None:
    scheduler = Scheduler(capacity(1))
    requests = [("flood", 1, Q)] * 200 + [("trickle", 1, Q)] * 5

    order = await serve_in_order(scheduler, requests)

    trickle_positions = [i for i, (tenant, _) in enumerate(order) if tenant == "trickle"]
    assert len(trickle_positions) == 5
    assert trickle_positions[-1] < 10


async def test_fairness_follows_weights_in_tokens() -> None:
    scheduler = Scheduler(capacity(1))
    requests = [("heavy", 3, 300)] * 300 + [("light", 1, 300)] * 300

    order = await serve_in_order(scheduler, requests)

    # Both tenants stay backlogged over the first 200 dispatches.
    tokens = Counter[str]()
    for tenant, size in order[:200]:
        tokens[tenant] += size
    assert tokens["heavy"] / tokens["light"] == pytest.approx(3.0, rel=0.1)


async def test_fairness_is_counted_in_tokens_not_requests() -> None:
    scheduler = Scheduler(capacity(1))
    requests = [("big", 1, 10 * Q)] * 50 + [("small", 1, Q)] * 500

    order = await serve_in_order(scheduler, requests)

    served = Counter(tenant for tenant, _ in order[:220])
    assert served["small"] / served["big"] == pytest.approx(10.0, rel=0.2)


async def test_fairness_keeps_each_tenant_fifo() -> None:
    scheduler = Scheduler(capacity(1))
    sizes = [700, 50, 3000, 10, 512, 1]
    requests = [("a", 1, size) for size in sizes] + [("b", 2, size) for size in sizes]

    order = await serve_in_order(scheduler, requests)

    assert [size for tenant, size in order if tenant == "a"] == sizes
    assert [size for tenant, size in order if tenant == "b"] == sizes


async def test_fairness_survives_requests_far_above_the_quantum() -> None:
    scheduler = Scheduler(capacity(1))
    requests = [("huge", 1, 1000 * Q)] * 3 + [("tiny", 1, 1)] * 3

    order = await serve_in_order(scheduler, requests)

    # Three tiny requests cost almost nothing, so they finish before the second huge one.
    assert [tenant for tenant, _ in order].index("tiny") < 2
    assert Counter(tenant for tenant, _ in order[:4]) == {"huge": 1, "tiny": 3}


# -- limits, timeouts, disconnects -----------------------------------------------------------


async def test_queue_full_at_max_depth_with_retry_after() -> None:
    scheduler = Scheduler(capacity(1, realtime_depth=2))
    acquire_now(scheduler)
    waiters = [start(scheduler), start(scheduler)]
    await settle()

    with pytest.raises(errors.QueueFull) as full:
        await scheduler.acquire(
            priority="realtime", tenant="t", weight=1, tokens=1, deadline=time.monotonic() + 60
        )

    assert full.value.retry_after is not None and full.value.retry_after >= 1.0
    assert full.value.headers()["retry-after"] == "1"
    assert full.value.status == 503
    assert scheduler.depth("realtime") == 2
    # The batch queue has its own depth limit.
    other = start(scheduler, "batch")
    await settle()
    assert scheduler.depth("batch") == 1
    await stop([*waiters, other])


async def test_queue_full_retry_after_follows_recent_hold_times() -> None:
    now = [0.0]
    scheduler = Scheduler(
        capacity(2, realtime_depth=1, realtime_timeout=30.0), clock=lambda: now[0]
    )
    for _ in range(3):
        slot = acquire_now(scheduler)
        now[0] += 12.0
        slot.release()
    held = [acquire_now(scheduler), acquire_now(scheduler)]
    waiter = start(scheduler)
    await settle()

    with pytest.raises(errors.QueueFull) as full:
        await scheduler.acquire(priority="realtime", tenant="t", weight=1, tokens=1, deadline=60)

    # 12 s holds over 2 slots: one frees about every 6 s.
    assert full.value.retry_after == pytest.approx(6.0)
    await stop([waiter])
    for slot in held:
        slot.release()


async def test_case24_timed_out_and_disconnected_waiters_leave_at_once() -> None:
    scheduler = Scheduler(capacity(1, realtime_timeout=1.0))
    holder = acquire_now(scheduler)
    arrival = time.monotonic()
    timing_out = [start(scheduler, deadline=arrival + 1.0) for _ in range(5)]
    disconnecting = start(scheduler, deadline=arrival + 60)
    await settle()
    assert scheduler.depth("realtime") == 6

    await asyncio.sleep(0.5)
    disconnecting.cancel()
    await asyncio.sleep(0)
    assert scheduler.depth("realtime") == 5
    with pytest.raises(asyncio.CancelledError):
        await disconnecting

    outcomes = await asyncio.wait_for(
        asyncio.gather(*timing_out, return_exceptions=True), timeout=10
    )
    assert all(isinstance(outcome, errors.QueueTimeout) for outcome in outcomes)
    for outcome in outcomes:
        assert isinstance(outcome, errors.QueueTimeout)
        assert outcome.retry_after == pytest.approx(1.0)
        assert outcome.headers()["retry-after"] == "1"
    # The slot is still held, so nothing was dispatched: the timers removed them.
    assert scheduler.depth("realtime") == 0
    assert scheduler.inflight("realtime") == 1

    seventh = start(scheduler)
    await settle()
    holder.release()
    assert scheduler.inflight("realtime") == 1  # handed over inside release
    assert scheduler.depth("realtime") == 0
    assert (await asyncio.wait_for(seventh, timeout=5)).priority == "realtime"


async def test_deadline_already_past_times_out_only_when_it_would_wait() -> None:
    scheduler = Scheduler(capacity(1))
    past = time.monotonic() - 1
    slot = await scheduler.acquire(
        priority="realtime", tenant="t", weight=1, tokens=1, deadline=past
    )

    with pytest.raises(errors.QueueTimeout):
        await scheduler.acquire(priority="realtime", tenant="t", weight=1, tokens=1, deadline=past)
    assert scheduler.depth("realtime") == 0
    slot.release()


@pytest.mark.parametrize("cancel_first", [False, True])
async def test_cancelled_during_handoff_leaks_no_slot(cancel_first: bool) -> None:
    scheduler = Scheduler(capacity(1))
    holder = acquire_now(scheduler)
    first, second = start(scheduler), start(scheduler)
    await settle()

    # Both happen in one loop iteration: the slot is handed to `first` and its
    # client goes away before its task ever resumes.
    if cancel_first:
        first.cancel()
        holder.release()
    else:
        holder.release()
        first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first

    slot = await asyncio.wait_for(second, timeout=5)
    assert scheduler.inflight("realtime") == 1
    assert scheduler.depth("realtime") == 0
    slot.release()
    assert scheduler.inflight("realtime") == 0


async def test_close_refuses_waiters_and_new_calls_but_lets_inflight_finish() -> None:
    scheduler = Scheduler(capacity(1))
    holder = acquire_now(scheduler)
    waiters = [start(scheduler), start(scheduler, "batch"), start(scheduler, "batch", "other")]
    await settle()

    scheduler.close()

    outcomes = await asyncio.gather(*waiters, return_exceptions=True)
    assert all(isinstance(outcome, errors.ShuttingDown) for outcome in outcomes)
    assert all(getattr(outcome, "retry_after", None) == 1.0 for outcome in outcomes)
    assert (scheduler.depth("realtime"), scheduler.depth("batch")) == (0, 0)
    assert scheduler.inflight("realtime") == 1
    assert not await scheduler.wait_idle(0.01)

    drained = asyncio.create_task(scheduler.wait_idle(10))
    await settle()
    holder.release()
    assert await drained
    with pytest.raises(errors.ShuttingDown):
        await scheduler.acquire(
            priority="realtime", tenant="t", weight=1, tokens=1, deadline=time.monotonic() + 60
        )
    assert scheduler.inflight("realtime") == 0


# -- reconfiguration -------------------------------------------------------------------------


async def test_reconfigure_smaller_drops_nothing_and_applies_to_new_dispatches() -> None:
    scheduler = Scheduler(capacity(4))
    held = [acquire_now(scheduler) for _ in range(4)]
    waiters = [start(scheduler) for _ in range(3)]
    await settle()

    scheduler.reconfigure(capacity(2))
    assert scheduler.capacity == 2
    assert (scheduler.inflight("realtime"), scheduler.depth("realtime")) == (4, 3)

    held[0].release()
    held[1].release()
    assert (scheduler.inflight("realtime"), scheduler.depth("realtime")) == (2, 3)
    held[2].release()
    assert (scheduler.inflight("realtime"), scheduler.depth("realtime")) == (2, 2)

    scheduler.reconfigure(capacity(3))
    assert (scheduler.inflight("realtime"), scheduler.depth("realtime")) == (3, 1)
    await stop(waiters)


async def test_reconfigure_batch_share_applies_as_slots_free() -> None:
    scheduler = Scheduler(capacity(4, share=0.5))
    held = [acquire_now(scheduler, "batch"), acquire_now(scheduler, "batch")]
    waiter = start(scheduler, "batch")
    await settle()

    scheduler.reconfigure(capacity(4, share=0.25))
    held[0].release()
    assert (scheduler.inflight("batch"), scheduler.depth("batch")) == (1, 1)
    held[1].release()
    assert (scheduler.inflight("batch"), scheduler.depth("batch")) == (1, 0)
    (await waiter).release()


async def test_unknown_priority_is_refused() -> None:
    scheduler = Scheduler(capacity(1))
    with pytest.raises(ValueError, match="urgent"):
        await scheduler.acquire(priority="urgent", tenant="t", weight=1, tokens=1, deadline=1e9)
