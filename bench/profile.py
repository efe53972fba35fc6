"""``python -m bench.profile``: where the sidecar's CPU goes, sampled by py-spy under load.

For each load (plain requests through wrk, then concurrent streams) it starts
the simulator and one Headway arm, samples the sidecar with py-spy while the
load runs, and prints the functions with the most samples: own time (the
frame on top of the stack) and inclusive time (anywhere on the stack; a
resumed coroutine's stack starts at the coroutine, so read inclusive shares
of the event loop's frames as a lower bound). The
tables are written to ``--out`` as ``profile-<arm>-<load>.txt``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import re
import subprocess
import tempfile
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from bench import arms, deps, procs, run

log = logging.getLogger("bench")
_LINE = re.compile(r":\d+\)")


def top(raw: str, limit: int) -> str:
    """Own and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    lines = [f"{total} samples", "", "own %  function"]
    lines += [f"{100 * n / total:5.1f}  {f}" for f, n in own.most_common(limit)]
    lines += ["", "incl %  function"]
    lines += [f"{100 * n / total:6.1f}  {f}" for f, n in inclusive.most_common(limit)]
    return "\n".join(lines)


def sample(
    endpoint: arms.Endpoint, ctx: arms.Context, seconds: float, load: Callable[[], run.Row]
) -> str:
    """py-spy on the arm's process while ``load()`` runs; the collapsed stacks."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        spy = subprocess.Popen(
            [
                "taskset",
                "-c",
                procs.LOAD_CORE,
                deps.py_spy_binary(),
                "record",
                "--pid",
                str(endpoint.process.pid),
                "--rate",
                "250",
                "--format",
                "raw",
                "--duration",
                f"{seconds:.0f}",
                "--nonblocking",
                "-o",
                out.name,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            result = run.measure(endpoint, ctx, load)
            log.info("under py-spy: %s", run._brief(result))
        finally:
            spy.wait(seconds + 60)
        return Path(out.name).read_text()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--arm", choices=arms.HEADWAY_ARMS, default="headway-full")
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16, help="plain requests in flight")
    parser.add_argument("--streams", type=int, default=256, help="concurrent streams")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--out", type=Path, default=run.REPO / "bench" / "results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    deps.ensure(("wrk", "redis-server"), litellm=False, profilers=True)
    plan = run.Plan.from_args(run.build_parser().parse_args(["--quick"]))

    with contextlib.ExitStack() as stack:
        ctx = arms.Context(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hwp-"))))
        if args.arm == "headway-full":
            stack.callback(run.start_redis(ctx).stop)
        loads = {
            "requests": (
                run.FAST,
                lambda e: run.requests_run(plan, e, args.concurrency, args.seconds),
            ),
            "streams": (
                run.STREAM,
                lambda e: run.client(
                    "streams",
                    e,
                    f"--streams={args.streams}",
                    f"--duration={args.seconds}",
                    f"--max-tokens={run.STREAM.output_tokens}",
                ),
            ),
        }
        args.out.mkdir(parents=True, exist_ok=True)
        for name, (upstream, drive) in loads.items():
            with run.stage(ctx, [args.arm], upstream, run.ROOMY) as (_, endpoints):
                endpoint = endpoints[args.arm]
                run.warm(plan, {args.arm: endpoint})
                raw = sample(endpoint, ctx, args.seconds, functools.partial(drive, endpoint))
            table = top(raw, args.top)
            (args.out / f"profile-{args.arm}-{name}.txt").write_text(table + "\n")
            print(f"\n## {args.arm}, {name}\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
