"""``make bench``: Headway's overhead and its priority scheduling against the alternatives.

The harness starts every arm (direct to the simulator, nginx, the Headway
sidecar bare and fully on, the LiteLLM proxy) on this machine, drives the same
load through each, interleaved round by round, and records medians of rounds.
``python -m bench.run --help`` lists the flags; docs/benchmarks.md the results.
"""
