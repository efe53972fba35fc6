"""Keyed hashing of API keys and signing of the internal hop header.

API keys never leave the namespace Secret in clear: the operator hands the
sidecars HMAC-SHA256 digests tagged with the id of the hashing key. A key
file may hold several keys (one ``<id>:<secret>`` per line) so the hashing
key can be rotated: the renderer hashes every API key with every hashing key,
and a sidecar matches with whichever of its keys it holds.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

DEV_KEY_ID = "dev"
# NB: public on purpose. Used only when no --key-file is given, with a warning.
_DEV_SECRET = b"headway-development-hashing-key-do-not-use-in-production"


class KeyFileError(ValueError):
    """The hashing key file is missing, empty or malformed."""


@dataclass(frozen=True, slots=True)
class HashingKeys:
    """Hashing keys by id; ``current`` is the first one in the file."""

    keys: tuple[tuple[str, bytes], ...]

    @property
    def current(self) -> tuple[str, bytes]:
        return self.keys[0]

    @property
    def is_development(self) -> bool:
        return self.keys == ((DEV_KEY_ID, _DEV_SECRET),)


def development_keys() -> HashingKeys:
    return HashingKeys(keys=((DEV_KEY_ID, _DEV_SECRET),))


def load_hashing_keys(path: str | Path | None) -> HashingKeys:
    """Read a key file, or fall back to the development key with a warning.

    The file holds ``<id>:<secret>`` lines; a file with a single line and no
    colon is one key with id ``k1``. Blank lines and ``#`` comments are skipped.
    """
    if path is None:
        logger.warning("no hashing key file given: using the public development key")
        return development_keys()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise KeyFileError(f"cannot read hashing key file {path}: {e.strerror}") from e
    return parse_hashing_keys(text, str(path))


def parse_hashing_keys(text: str, source: str = "hashing keys") -> HashingKeys:
    """Keys from the text of a key file (or of the Secret it is mounted from).

    ``source`` names it in errors; the text itself is never shown.
    """
    lines = [ln.strip() for ln in text.splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(lines) == 1 and ":" not in lines[0]:
        return HashingKeys(keys=(("k1", lines[0].encode()),))

    keys: list[tuple[str, bytes]] = []
    for number, line in enumerate(lines, start=1):
        key_id, sep, secret = line.partition(":")
        if not sep or not key_id.strip() or not secret.strip():
            raise KeyFileError(f"{source}: line {number} is not '<id>:<secret>'")
        keys.append((key_id.strip(), secret.strip().encode()))
    if not keys:
        raise KeyFileError(f"{source}: holds no key")
    ids = [key_id for key_id, _ in keys]
    if len(set(ids)) != len(ids):
        raise KeyFileError(f"{source}: a key id appears twice")
    return HashingKeys(keys=tuple(keys))


def hash_api_key(key_id: str, secret: bytes, api_key: str) -> str:
    """The tagged digest of one API key: ``hmac-sha256:<key id>:<hex>``."""
    digest = hmac.new(secret, api_key.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"hmac-sha256:{key_id}:{digest}"


def sign(keys: HashingKeys, payload: str) -> str:
    """Sign a hop header payload with the current key: ``<key id>.<hex>``."""
    key_id, secret = keys.current
    digest = hmac.new(secret, payload.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"{key_id}.{digest}"


def verify(keys: HashingKeys, payload: str, signature: str) -> bool:
    """Check a signature made by :func:`sign` with any of the held keys."""
    key_id, _, digest = signature.partition(".")
    for held_id, secret in keys.keys:
        if held_id == key_id:
            expected = hmac.new(secret, payload.encode("utf-8"), hashlib.sha256).hexdigest()
            return hmac.compare_digest(expected, digest)
    return False
