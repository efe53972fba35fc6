"""The autoscaling policy, replayed over recorded load sequences.

Each scenario is a table of rows ``(from t, to t, load, expected replicas)``,
one decision every 10 s, the replica count fed back as the next ``current``.
Loads are demand (in flight plus waiting); the replay splits it over the
replicas that are ready, as the sidecars would report it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from headway_operator import scaling, specs
from headway_operator.scaling import Histogram, History, Load, Signals

STEP = 10.0
SLOTS, BATCH_SLOTS = 32, 24  # capacity.maxConcurrency 32, batchMaxShare 0.75
SPEC = specs.Scaling(
    mode="operator",
    min_replicas=1,
    max_replicas=8,
    target_queue_per_replica=4,
    ttft_target=0.8,
    scale_up_cooldown=30.0,
    scale_down_delay=300.0,
)
# The sidecar's TTFT bucket bounds (headway_sidecar.metrics.TTFT_BUCKETS).
BOUNDS = (0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0, 60.0)


def observed(*values: float) -> Histogram:
    """A cumulative histogram holding these TTFT observations."""
    bounds = (*BOUNDS, float("inf"))
    return Histogram(bounds, tuple(sum(v <= b for v in values) for b in bounds))


@dataclass(frozen=True)
class Demand:
    """One interval of a recorded sequence."""

    realtime: int = 0
    batch: int = 0
    ttft: float | None = None  # 20 real-time first tokens at this latency in the interval


def signals_for(demand: Demand, ready: int, ttft: list[tuple[float, Histogram]]) -> Signals:
    # Real-time takes free slots first; batch holds at most its share.
    rt_inflight = min(demand.realtime, SLOTS * ready)
    batch_inflight = min(demand.batch, BATCH_SLOTS * ready, SLOTS * ready - rt_inflight)
    return Signals(
        ready=ready,
        capacity=SLOTS,
        batch_slots=BATCH_SLOTS,
        waiting={"realtime": demand.realtime - rt_inflight, "batch": demand.batch - batch_inflight},
        inflight={"realtime": rt_inflight, "batch": batch_inflight},
        ttft=tuple(ttft),
    )


Row = tuple[float, float, Demand | Sequence[Demand], int]


def replay(
    rows: Sequence[Row], spec: specs.Scaling = SPEC, start_delay: float = 0.0
) -> list[tuple[float, int, int, str]]:
    """(t, expected, got, reason) for every step; pods are ready ``start_delay`` after creation."""
    started = [-1e9]  # creation times of the replicas, oldest first
    history, ttft = History(), []
    steps = []
    for first, last, demand, expected in rows:
        t = first
        while t <= last:
            current = demand if isinstance(demand, Demand) else demand[int(t // STEP) % 2]
            if current.ttft is not None:
                ttft.append((t, observed(*[current.ttft] * 20)))
            ready = sum(s <= t - start_delay for s in started)
            decision, history = scaling.decide(
                spec, signals_for(current, ready, ttft), len(started), history, t
            )
            while len(started) < decision.replicas:
                started.append(t)
            del started[decision.replicas :]
            steps.append((t, expected, decision.replicas, decision.reason))
            t += STEP
    return steps


def check(steps: list[tuple[float, int, int, str]], reversals: int = 1) -> None:
    wrong = [s for s in steps if s[1] != s[2]]
    table = "\n".join(f"t={t:5.0f} expected {e} got {g} ({r})" for t, e, g, r in steps)
    assert not wrong, f"mismatch at t={wrong[0][0]:.0f}:\n{table}"
    # No flapping: the count goes up, then down, at most `reversals` times.
    counts = [g for _, _, g, _ in steps]
    moves = [b - a for a, b in itertools.pairwise(counts) if b != a]
    turns = sum((a > 0) != (b > 0) for a, b in itertools.pairwise(moves))
    assert turns <= reversals, table


LOW, HIGH, NEAR = 0.3, 1.5, 0.7  # TTFT seconds: healthy, over target, within headroom


def test_burst_scales_up_at_once_and_down_after_the_delay() -> None:
    check(
        replay(
            [
                (0, 0, Demand(realtime=10), 1),
                # 200 / (32 slots + 4 waiting) per replica -> 6, in one step.
                (10, 60, Demand(realtime=200), 6),
                # The last high recommendation (t=60) must age out of the delay.
                (70, 350, Demand(realtime=10), 6),
                (360, 400, Demand(realtime=10), 1),
            ]
        )
    )


def test_sustained_load_at_a_boundary_does_not_flap() -> None:
    # Needs 3 at odd tens of seconds, 4 at even ones (t // 10 picks the item).
    wobble = (Demand(realtime=110), Demand(realtime=100))
    check(
        replay(
            [
                (0, 0, Demand(realtime=30), 1),
                (10, 10, wobble, 3),
                (20, 30, wobble, 3),  # 110 wants 4: cooldown since t=10
                (40, 600, wobble, 4),  # never 300 s without a 4: stays
                (610, 890, Demand(realtime=30), 4),
                (900, 920, Demand(realtime=30), 1),
            ]
        )
    )


def test_decaying_load_steps_down_one_delay_behind_demand() -> None:
    check(
        replay(
            [
                (0, 50, Demand(realtime=280), 8),
                (60, 110, Demand(realtime=240), 8),  # needs 7
                (120, 170, Demand(realtime=200), 8),  # 6
                (180, 230, Demand(realtime=160), 8),  # 5
                (240, 290, Demand(realtime=120), 8),  # 4
                (300, 340, Demand(realtime=80), 8),  # 3
                (350, 350, Demand(realtime=80), 7),  # the last 8 (t=50) is 300 s old
                (360, 400, Demand(realtime=40), 7),  # 2
                (410, 410, Demand(realtime=40), 6),
                (420, 460, Demand(), 6),
                (470, 520, Demand(), 5),
                (530, 580, Demand(), 4),
                (590, 640, Demand(), 3),
                (650, 700, Demand(), 2),
                (710, 760, Demand(), 1),
            ]
        )
    )


def test_batch_flood_with_calm_realtime_scales_on_the_batch_share() -> None:
    check(
        replay(
            [
                (0, 0, Demand(realtime=10), 1),
                # 150 batch over 24 batch slots + 4 waiting per replica -> 6.
                (10, 300, Demand(realtime=10, batch=150), 6),
                (310, 590, Demand(realtime=10), 6),
                (600, 620, Demand(realtime=10), 1),
            ]
        )
    )


def test_ttft_spike_with_short_queues_steps_up_once_per_cooldown() -> None:
    check(
        replay(
            [
                (0, 0, Demand(realtime=20, ttft=LOW), 1),
                (10, 10, Demand(realtime=20, ttft=HIGH), 2),  # queue says 1, TTFT adds one
                (20, 30, Demand(realtime=20, ttft=HIGH), 2),  # cooldown
                (40, 40, Demand(realtime=20, ttft=HIGH), 3),
                (50, 330, Demand(realtime=20, ttft=LOW), 3),
                (340, 360, Demand(realtime=20, ttft=LOW), 1),
            ]
        )
    )


def test_ttft_close_to_target_holds_the_added_replica() -> None:
    check(
        replay(
            [
                (0, 0, Demand(realtime=20, ttft=LOW), 1),
                (10, 10, Demand(realtime=20, ttft=HIGH), 2),
                # Under the target, but within 20 % of it: no scale-down, no step.
                (20, 900, Demand(realtime=20, ttft=NEAR), 2),
            ]
        )
    )


def test_replicas_still_starting_count_as_the_ttft_step() -> None:
    # Replicas are ready 60 s after creation; TTFT stays high for 100 s.
    check(
        replay(
            [
                (0, 0, Demand(realtime=20, ttft=LOW), 1),
                (10, 10, Demand(realtime=20, ttft=HIGH), 2),
                (20, 60, Demand(realtime=20, ttft=HIGH), 2),  # the step is not ready yet
                (70, 70, Demand(realtime=20, ttft=HIGH), 3),
                (80, 100, Demand(realtime=20, ttft=HIGH), 3),
                # The 30 s TTFT window still holds slow samples until t=120.
                (110, 410, Demand(realtime=20, ttft=LOW), 3),
                (420, 440, Demand(realtime=20, ttft=LOW), 1),
            ],
            start_delay=60.0,
        )
    )


# -- single decisions --------------------------------------------------------------------------


NO_HISTORY = History()


def decide(
    signals: Signals, current: int, history: History = NO_HISTORY, now: float = 1000.0
) -> tuple[scaling.Decision, History]:
    return scaling.decide(SPEC, signals, current, history, now)


def test_demand_beyond_max_is_clamped_and_reported_as_limited() -> None:
    decision, _ = decide(signals_for(Demand(realtime=10, batch=2000), 1, []), 1)
    assert (decision.replicas, decision.reason) == (8, "ScaleUp")
    assert decision.wanted > SPEC.max_replicas
    assert decision.batch_waiting == 2000 - 22


def test_batch_backlog_is_not_counted_while_realtime_ttft_is_high() -> None:
    ttft = [(995.0, observed(*[HIGH] * 20))]
    calm, _ = decide(signals_for(Demand(realtime=10, batch=150), 2, []), 2)
    hurt, _ = decide(signals_for(Demand(realtime=10, batch=150), 2, ttft), 2)
    assert calm.replicas == 6
    assert hurt.replicas == 3  # one step over the two ready, not the batch's six
    assert "not counted" in hurt.message and "TTFT p95 1.475s" in hurt.message


def test_realtime_over_target_never_scales_down() -> None:
    # Batch holds most slots; real-time waits above target although its own
    # demand alone would fit in fewer replicas.
    signals = Signals(
        ready=6,
        capacity=SLOTS,
        batch_slots=BATCH_SLOTS,
        waiting={"realtime": 30, "batch": 0},
        inflight={"realtime": 48, "batch": 144},
    )
    history = History(((0.0, 6),), observing_since=0.0)
    decision, _ = decide(signals, 6, history)
    assert decision.replicas == 6
    assert "real-time is over its targets" in decision.message


def test_a_fresh_history_waits_a_full_delay_before_scaling_down() -> None:
    # As after an operator restart: no memory of the last five minutes.
    idle = signals_for(Demand(), 4, [])
    decision, history = decide(idle, 4, History(), now=0.0)
    assert (decision.replicas, decision.reason) == (4, "ScaleDownDelay")
    decision, history = decide(idle, 4, history, now=299.0)
    assert decision.replicas == 4
    decision, _ = decide(idle, 4, history, now=300.0)
    assert (decision.replicas, decision.reason) == (1, "ScaleDown")


def test_silent_replicas_hold_the_count_and_restart_the_delay() -> None:
    idle = signals_for(Demand(), 3, [])
    _, history = decide(idle, 3, History(), now=0.0)
    decision, history = decide(Signals(ready=0, unreported=3), 3, history, now=200.0)
    assert (decision.replicas, decision.reason) == (3, "NoLoadReports")
    decision, history = decide(idle, 3, history, now=310.0)
    assert decision.reason == "ScaleDownDelay"  # the low run started again at t=310
    partial = Signals(ready=2, unreported=1, capacity=SLOTS, batch_slots=BATCH_SLOTS)
    decision, _ = decide(partial, 3, history, now=700.0)
    assert decision.replicas == 3 and "did not report" in decision.message


def test_a_changed_spec_applies_at_once() -> None:
    decision, _ = decide(signals_for(Demand(), 12, []), 12)
    assert (decision.replicas, decision.reason) == (8, "OutOfBounds")
    decision, history = decide(signals_for(Demand(), 0, []), 0)
    assert (decision.replicas, history.last_scale_up) == (1, 1000.0)


def test_too_few_ttft_samples_say_nothing() -> None:
    few = [(995.0, observed(*[HIGH] * (scaling.MIN_TTFT_SAMPLES - 1)))]
    decision, _ = decide(signals_for(Demand(realtime=5), 1, few), 1)
    assert (decision.replicas, decision.ttft_p95) == (1, None)
    assert decision.ttft_samples == scaling.MIN_TTFT_SAMPLES - 1


# -- histograms and /load ----------------------------------------------------------------------


def test_p95_is_taken_over_buckets_merged_across_pods() -> None:
    fast = observed(*[0.1] * 90)  # one busy pod, all fast
    slow = observed(*[2.5] * 10)  # one quiet pod, all slow
    merged = scaling.merge([fast, slow])
    assert merged.count == 100
    # 10 % of all first tokens are slow: the fleet's p95 is slow, although
    # the busy pod's p95 is fast and an average of p95s would be ~1.3 s.
    assert fast.quantile(0.95) == pytest.approx(0.1 - 0.05 * 0.05)
    assert merged.quantile(0.95) == pytest.approx(2.0 + 1.0 * 0.5)
    assert scaling.merge([fast]).quantile(0.5) == pytest.approx(0.075)


def test_quantile_past_the_last_finite_bound_is_that_bound() -> None:
    assert observed(120.0, 130.0).quantile(0.95) == 60.0
    assert Histogram().quantile(0.95) is None


def test_histograms_with_other_bounds_merge_at_their_own_bounds() -> None:
    coarse = Histogram((1.0, float("inf")), (4, 4))
    merged = observed(0.1, 0.1) + coarse
    assert merged.count == 6
    assert merged.at(0.5) == 2  # the coarse pod's four are only known to be <= 1.0
    assert merged.at(1.0) == 6


def test_intervals_take_differences_and_survive_a_restarted_sidecar() -> None:
    before = {"a": observed(0.1, 0.1), "b": observed(2.0)}
    after = {"a": observed(0.1, 0.1, 0.1), "b": observed(0.1), "c": observed(*[9.0] * 50)}
    interval = scaling.ttft_interval(before, after)
    # a: one new; b: counter went back (restart), all of it counts; c: new pod, baseline only.
    assert interval.count == 2
    assert interval.at(0.1) == 2


LOAD = {
    "pool": "small",
    "version": "abc",
    "capacity": 4,
    "batchSlots": 3,
    "queueDepth": {"realtime": 2, "batch": 7},
    "inflight": {"realtime": 3, "batch": 1},
    "ttft": {
        "realtime": {
            "buckets": [
                {"le": "0.5", "count": 1},
                {"le": "1.0", "count": 3},
                {"le": "+Inf", "count": 3},
            ],
            "count": 3,
            "sum": 2.0,
        },
        "batch": {"buckets": [{"le": "+Inf", "count": 0}], "count": 0, "sum": 0.0},
    },
}


def test_load_parses_the_sidecar_shape_and_ignores_unknown_fields() -> None:
    data = {**LOAD, "newField": {"x": 1}, "queueDepth": {"realtime": 2, "batch": 7, "bulk": 9}}
    load = scaling.parse_load(data)
    assert (load.capacity, load.batch_slots) == (4, 3)
    assert load.waiting == {"realtime": 2, "batch": 7}
    assert load.ttft["realtime"].counts == (1, 3, 3)
    signals = Signals.of([load, load], unreported=1)
    assert (signals.ready, signals.unreported, signals.capacity) == (2, 1, 4.0)
    assert signals.inflight == {"realtime": 6, "batch": 2}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": "4"}, "capacity"),
        ({"queueDepth": None}, "queueDepth"),
        ({"inflight": {"realtime": -1}}, "inflight.realtime"),
        ({"ttft": {"realtime": {"buckets": [{"le": "1.0", "count": 1}]}}}, "ttft.realtime.buckets"),
        ({"ttft": {"realtime": {"buckets": [{"le": "soon", "count": 1}]}}}, "buckets[0].le"),
    ],
)
def test_bad_load_names_the_field(change: dict[str, object], field: str) -> None:
    with pytest.raises(scaling.LoadError, match=field.replace("[", r"\[").replace("]", r"\]")):
        scaling.parse_load({**LOAD, **change})


def test_load_without_histograms_or_batch_slots_still_reads() -> None:
    data = {k: v for k, v in LOAD.items() if k not in ("ttft", "batchSlots")}
    load = scaling.parse_load(data)
    assert load.ttft == {} and load.batch_slots == 4
    assert isinstance(load, Load)
