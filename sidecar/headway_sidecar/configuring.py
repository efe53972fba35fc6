"""The config in force: loading, validating, swapping, and the two ways a new one arrives.

A :class:`Config` is immutable; a request takes the current one when it
arrives and keeps it to the end, so a swap never changes the rules under an
in-flight or queued request. A document is refused, and the last good one
kept, when it does not parse, names an unknown schema version, or carries a
lower generation (or the same generation with other content). New documents
come from polling the mounted file and from ``PUT /config``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypedDict

from headway_contract import ContractError, Document, HashingKeys, KeyFileError, load_hashing_keys
from headway_contract import loads as load_document

from headway_sidecar import auth
from headway_sidecar.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Config:
    """One document with what is derived from it and the hashing keys it was matched with."""

    document: Document
    keys: HashingKeys
    authenticator: auth.Authenticator

    @classmethod
    def build(cls, document: Document, keys: HashingKeys) -> Config:
        return cls(document, keys, auth.Authenticator(document, keys))


class Refused(Exception):
    """A document that was not applied; ``result`` is its reload metric label."""

    def __init__(self, result: str, status: int, message: str) -> None:
        super().__init__(message)
        self.result = result
        self.status = status
        self.message = message


class Applied(TypedDict):
    version: str
    generation: int
    changed: bool


Listener = Callable[[Document], None]


def read_document(path: str | Path) -> Document:
    """Load and parse the config file; raises OSError or ContractError."""
    return load_document(Path(path).read_bytes())


class ConfigStore:
    """Holds the :class:`Config` in force and decides whether an offered document replaces it."""

    def __init__(
        self, config: Config, *, metrics: Metrics, listeners: Sequence[Listener] = ()
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._listeners = list(listeners)
        metrics.set_config_version(config.document.version)

    @property
    def current(self) -> Config:
        return self._config

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def offer(self, text: bytes | str, *, source: str) -> Applied:
        """Apply a serialised document, or raise :class:`Refused` keeping the current one."""
        try:
            document = load_document(text)
        except ContractError as e:
            self._refuse("error", 400, f"invalid config from {source}: {e}")
        return self.apply(document, source=source)

    def apply(self, document: Document, *, source: str) -> Applied:
        running = self._config.document
        if document.generation < running.generation:
            self._refuse(
                "stale",
                409,
                f"config from {source} has generation {document.generation}, "
                f"lower than the running {running.generation}",
            )
        if document.generation == running.generation:
            if document.version == running.version:
                return Applied(
                    version=running.version, generation=running.generation, changed=False
                )
            self._refuse(
                "stale",
                409,
                f"config from {source} has the running generation {running.generation} "
                f"but another version ({document.version})",
            )
        self._swap(Config.build(document, self._config.keys), source=source)
        return Applied(version=document.version, generation=document.generation, changed=True)

    def rotate_keys(self, keys: HashingKeys) -> None:
        """Match API keys and hop headers with a new set of hashing keys from now on."""
        if keys != self._config.keys:
            self._config = Config.build(self._config.document, keys)
            logger.info("hashing keys reloaded: %s", ", ".join(k for k, _ in keys.keys))

    def _swap(self, config: Config, *, source: str) -> None:
        # Listeners reconfigure long-lived parts (limiter, scheduler); one that
        # refuses the document leaves the old config in force.
        for listener in self._listeners:
            try:
                listener(config.document)
            except (ValueError, OSError) as e:
                self._refuse("error", 400, f"config from {source} cannot be applied: {e}")
        self._config = config
        self._metrics.config_reloads.labels("ok").inc()
        self._metrics.set_config_version(config.document.version)
        logger.info(
            "config applied from %s: generation %d, version %s",
            source,
            config.document.generation,
            config.document.version,
        )

    def _refuse(self, result: str, status: int, message: str) -> NoReturn:
        self._metrics.config_reloads.labels(result).inc()
        logger.warning("%s; keeping version %s", message, self._config.document.version)
        raise Refused(result, status, message)


def token_matches(token_file: str | None, header: str) -> bool:
    """Whether ``Authorization: Bearer <token>`` carries the push token, in constant time.

    The file is read on every call so a rotated Secret takes effect without a
    restart; without a token file every push is refused.
    """
    if token_file is None:
        return False
    try:
        expected = Path(token_file).read_text(encoding="utf-8").strip()
    except OSError as e:
        logger.error("cannot read push token file %s: %s", token_file, e.strerror)
        return False
    scheme, _, presented = header.strip().partition(" ")
    if not expected or scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(presented.strip().encode(), expected.encode())


async def watch_files(
    store: ConfigStore, *, config_path: str, key_file: str | None, interval: float
) -> None:
    """Poll the mounted config and key files, offering whatever changed. Runs until cancelled.

    NB: a ConfigMap volume swaps a symlink, so the path is re-read, never kept open.
    """
    last_config = _read_bytes(config_path)
    last_keys = _read_bytes(key_file) if key_file else None
    while True:
        await asyncio.sleep(interval)
        if key_file is not None:
            content = _read_bytes(key_file)
            if content is not None and content != last_keys:
                last_keys = content
                try:
                    store.rotate_keys(load_hashing_keys(key_file))
                except KeyFileError as e:
                    logger.error("keeping the old hashing keys: %s", e)
        content = _read_bytes(config_path)
        if content is None or content == last_config:
            continue
        last_config = content
        with contextlib.suppress(Refused):  # logged and counted by the store
            store.offer(content, source="file")


def _read_bytes(path: str) -> bytes | None:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        # A ConfigMap update briefly removes the file; the next poll sees it.
        logger.debug("cannot read %s: %s", path, e.strerror)
        return None
