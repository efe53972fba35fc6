"""Argument parsing for ``headway`` and dispatch to the package that does the work.

The subcommands and their flags are public (design section 2a); each one
imports its package lazily so ``headway simulate`` never loads kopf.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from headway_contract import parse_duration


def _duration(text: str) -> float:
    """A duration like ``500ms`` or ``2m``; a bare number is seconds (``DEMO_DURATION=20``)."""
    try:
        return float(text) if text.strip().replace(".", "", 1).isdigit() else parse_duration(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host or "127.0.0.1", int(port)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser], name: str, summary: str
) -> argparse.ArgumentParser:
    """A subcommand whose one-line summary shows both in ``headway --help`` and its own."""
    return commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="headway",
        description="Headway: a Kubernetes-native gateway for real-time AI inference.",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,  # case-insensitive: --log-level debug
        choices=LOG_LEVELS,
        help="logging level (default INFO)",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = _command(commands, "sidecar", "serve the OpenAI API in front of a model server")
    p.add_argument("--config", required=True, help="contract document (JSON) to load and watch")
    p.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 8080),
        metavar="HOST:PORT",
        help="public API address (default 127.0.0.1:8080)",
    )
    p.add_argument(
        "--admin-listen",
        type=_address,
        default=("127.0.0.1", 9090),
        metavar="HOST:PORT",
        help="metrics, health and PUT /config address (default 127.0.0.1:9090)",
    )
    p.add_argument("--key-file", help="hashing keys for API keys and hop headers")
    p.add_argument("--push-token-file", help="bearer token for PUT /config (else refused)")
    p.add_argument(
        "--grace", type=_duration, default=30.0, help="drain time on SIGTERM (default 30s)"
    )

    p = _command(commands, "simulate", "run an OpenAI-compatible model-server simulator")
    p.add_argument(
        "--listen",
        type=_address,
        default=("127.0.0.1", 8000),
        metavar="HOST:PORT",
        help="address to serve on (default 127.0.0.1:8000)",
    )
    p.add_argument("--ttft", type=_duration, default=0.2, help="time to first token (200ms)")
    p.add_argument("--tpot", type=_duration, default=0.02, help="time per output token (20ms)")
    p.add_argument("--output-tokens", type=int, default=64, help="tokens per answer (64)")
    p.add_argument("--max-concurrency", type=int, default=32, help="sequences at once (32)")
    p.add_argument("--no-usage", action="store_true", help="never report usage")

    p = _command(commands, "render", "render resource YAML into contract documents")
    p.add_argument("-f", dest="files", action="append", required=True, help="file or folder")
    p.add_argument("-o", dest="out_dir", help="write <namespace>.<pool>.json here (else stdout)")
    p.add_argument("--redis-url", help="Redis for shared limits (default: in-memory)")
    p.add_argument("--key-file", help="hashing keys for API keys")
    p.add_argument(
        "--fail-mode",
        choices=("open", "closed"),
        default="open",
        help="when Redis is unreachable: admit (open) or refuse (closed) (default open)",
    )

    p = _command(commands, "operator", "run the operator that reconciles Headway resources")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument(
        "--namespace",
        action="append",
        dest="namespaces",
        default=[],
        help="namespace to watch; repeat for several (default: every namespace)",
    )
    scope.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    p.epilog = "Other options are the operator's own: see `headway operator -- --help`."

    p = _command(commands, "demo", "run the whole data plane on this machine, with traffic")
    p.add_argument("--duration", type=_duration, default=60.0, help="traffic time (60s)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:
        # The reader left (`headway render | head`): nothing more to say. Point
        # stdout at devnull so the interpreter's final flush cannot fail again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, as a shell reports it


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    # The operator's own options (peering, timeouts...) are parsed by the
    # operator package, which loads kopf only when that command runs.
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "operator":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.command == "sidecar":
        from headway_sidecar import serving

        return serving.run(
            config_path=args.config,
            listen=args.listen,
            admin_listen=args.admin_listen,
            key_file=args.key_file,
            push_token_file=args.push_token_file,
            grace=args.grace,
        )
    if args.command == "simulate":
        from headway_sidecar import simulator

        return simulator.run(
            listen=args.listen,
            ttft=args.ttft,
            tpot=args.tpot,
            output_tokens=args.output_tokens,
            max_concurrency=args.max_concurrency,
            usage=not args.no_usage,
        )
    if args.command == "render":
        from headway_operator import cli as operator_cli

        return operator_cli.render(
            files=args.files,
            out_dir=args.out_dir,
            redis_url=args.redis_url,
            key_file=args.key_file,
            fail_mode=args.fail_mode,
        )
    if args.command == "operator":
        from headway_operator import cli as operator_cli

        return operator_cli.run_operator(
            namespaces=args.namespaces,
            all_namespaces=args.all_namespaces,
            kopf_args=extra,
        )
    if args.command == "demo":
        from headway_cli import demo

        return demo.run(duration=args.duration)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
