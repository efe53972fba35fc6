"""What ``headway render`` and ``headway operator`` run: the CLI's side of the operator package.

``render`` reads resource YAML (files, folders or ``-`` for stdin; multi-document,
Secrets included), renders it like the operator would, and writes one canonical
JSON document per pool. Any problem is printed to stderr naming the file, the
resource and the field, and then nothing is written: a partial set of documents
from a command line is a surprise, while the operator keeps serving what is valid.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO
from urllib.parse import urlsplit

import yaml
from headway_contract import HashingKeys, KeyFileError, RedisSettings, dumps, load_hashing_keys

from headway_operator import rendering, specs
from headway_operator.rendering import DEFAULT_POOL_ADDRESS, Rendering
from headway_operator.specs import InferenceRoute, ModelPool, Secret, SpecError, TokenQuota

SUFFIXES = (".yaml", ".yml", ".json")
REDIS_SCHEMES = ("redis", "rediss", "unix")


@dataclass(slots=True)
class Resources:
    """What a set of files declares; ``problems`` are ready to print."""

    pools: list[ModelPool] = field(default_factory=list)
    routes: list[InferenceRoute] = field(default_factory=list)
    quotas: list[TokenQuota] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    # (kind, namespace, name) -> "file: document N", to say where a resource came from
    origins: dict[tuple[str, str, str], str] = field(default_factory=dict)

    def where(self, kind: str, namespace: str, name: str) -> str:
        return self.origins.get((kind, namespace, name), "")


def load(paths: Iterable[str], stdin: TextIO | None = None) -> Resources:
    """Parse every ModelPool, InferenceRoute, TokenQuota and Secret in ``paths``.

    Folders are read one level deep, like ``kubectl apply -f``, in name order.
    Other kinds are skipped; a ``List`` is opened. Nothing here raises.
    """
    resources = Resources()
    for path, text in _texts(paths, resources.problems, stdin or sys.stdin):
        try:
            bodies = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            line = f": line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or "cannot be parsed"
            resources.problems.append(f"{path}{line}: not valid YAML: {problem}")
            continue
        for number, body in enumerate(bodies, start=1):
            for item in _items(body):
                _add(resources, item, f"{path}: document {number}")
    return resources


def _texts(paths: Iterable[str], problems: list[str], stdin: TextIO) -> Iterator[tuple[str, str]]:
    for name in paths:
        if name == "-":
            yield "<stdin>", stdin.read()
            continue
        path = Path(name)
        files = (
            sorted(p for p in path.iterdir() if p.suffix in SUFFIXES) if path.is_dir() else [path]
        )
        if path.is_dir() and not files:
            problems.append(f"{name}: holds no .yaml, .yml or .json file")
        for file in files:
            try:
                yield str(file), file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as e:
                reason = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
                problems.append(f"{file}: cannot be read: {reason}")


def _items(body: object) -> Iterator[object]:
    if (
        isinstance(body, dict)
        and body.get("kind") == "List"
        and isinstance(body.get("items"), list)
    ):
        yield from body["items"]
    elif body is not None:
        yield body


def _add(resources: Resources, body: object, origin: str) -> None:
    if not isinstance(body, dict):
        resources.problems.append(
            f"{origin}: expected a resource object, not {type(body).__name__}"
        )
        return
    kind = body.get("kind")
    parse = specs.PARSERS.get(kind) if isinstance(kind, str) else None
    if parse is None:
        group = str(body.get("apiVersion", "")).partition("/")[0]
        if group == specs.API_VERSION.partition("/")[0]:
            resources.problems.append(f"{origin}: kind {kind!r} is not a Headway resource")
        return
    try:
        resource = parse(body)
    except SpecError as e:
        resources.problems.append(f"{origin}: {e}")
        return

    identity = (str(kind), resource.namespace, resource.name)
    if identity in resources.origins:
        first = resources.origins[identity]
        resources.problems.append(
            f"{origin}: {kind} {resource.namespace}/{resource.name} is also defined in {first}"
        )
        return
    resources.origins[identity] = origin
    if isinstance(resource, ModelPool):
        resources.pools.append(resource)
    elif isinstance(resource, InferenceRoute):
        resources.routes.append(resource)
    elif isinstance(resource, TokenQuota):
        resources.quotas.append(resource)
    else:
        resources.secrets.append(resource)


def redis_settings(url: str | None) -> RedisSettings | None:
    """Settings for ``--redis-url``; raises ValueError for a URL that carries a password."""
    if url is None:
        return None
    parts = urlsplit(url)
    if parts.scheme not in REDIS_SCHEMES:
        # NB: the URL itself is not echoed: it may hold a password.
        shown = f"{parts.scheme}://" if parts.scheme else "a URL without a scheme"
        raise ValueError(f"--redis-url: expected a redis://, rediss:// or unix:// URL, not {shown}")
    # NB: the contract lands in ConfigMaps: a password goes in a mounted file instead.
    if parts.password is not None:
        raise ValueError("--redis-url: a password in the URL would be written to every config")
    return RedisSettings(url=url)


def render_files(
    files: Sequence[str],
    *,
    keys: HashingKeys,
    redis: RedisSettings | None = None,
    fail_mode: str = "open",
    generation: int = 1,
    pool_address: str | Callable[[str, str], str] = DEFAULT_POOL_ADDRESS,
) -> tuple[Rendering, list[str]]:
    """Load and render ``files``; the problems of both steps, each naming its file."""
    resources = load(files)
    result = rendering.render(
        resources.pools,
        resources.routes,
        resources.quotas,
        resources.secrets,
        keys=keys,
        redis=redis,
        fail_mode=fail_mode,
        generation=generation,
        pool_address=pool_address,
    )
    problems = list(resources.problems)
    for problem in result.problems:
        origin = resources.where(problem.kind, problem.namespace, problem.name)
        problems.append(f"{origin}: {problem}" if origin else str(problem))
    return result, problems


def render(
    *,
    files: list[str],
    out_dir: str | None,
    redis_url: str | None,
    key_file: str | None,
    fail_mode: str,
) -> int:
    """``headway render``: 0 when every document was written, 1 on any problem."""
    try:
        keys = load_hashing_keys(key_file)
        redis = redis_settings(redis_url)
    except (KeyFileError, ValueError) as e:
        return _fail([str(e)])
    result, problems = render_files(files, keys=keys, redis=redis, fail_mode=fail_mode)
    if problems:
        return _fail(problems, "nothing written")
    if not result.documents:
        return _fail([f"no ModelPool found in {', '.join(files)}"])

    texts = {
        f"{namespace}.{pool}.json": dumps(document)
        for (namespace, pool), document in sorted(result.documents.items())
    }
    if out_dir is None:
        for text in texts.values():
            sys.stdout.write(text + "\n")
        return 0
    try:
        _write(Path(out_dir), texts)
    except OSError as e:
        return _fail([f"{out_dir}: cannot write: {e.strerror or e}"])
    print(f"wrote {len(texts)} document(s) to {out_dir}", file=sys.stderr)
    return 0


def _write(folder: Path, texts: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in texts.items():
        # Renamed into place, so a sidecar polling the folder never reads half a file.
        handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{name}.")
        try:
            with os.fdopen(handle, "w", encoding="utf-8") as out:
                out.write(text + "\n")
            os.replace(temporary, folder / name)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def _fail(problems: Iterable[str], summary: str = "") -> int:
    lines = list(problems)
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    if summary:
        print(f"headway render: {len(lines)} problem(s); {summary}", file=sys.stderr)
    return 1


def run_operator(*, namespaces: list[str], all_namespaces: bool, kopf_args: list[str]) -> int:
    """``headway operator``: the flags after the scope are the operator's own (see ``running``)."""
    from headway_operator import running  # kopf loads only for this command

    try:
        flags = running.parse(namespaces, all_namespaces, kopf_args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return running.run(flags)
