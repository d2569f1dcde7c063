"""API keys: generation, hashing, verification, and the local user's key file.

A key looks like ``bsk_<id>_<secret>``: ``id`` is 8 hex chars (not secret: it names the key in
``bonn-sweep keys list``, in logs and as the rate-limit bucket), ``secret`` 43 url-safe base64 chars
(32 random bytes). The server stores only ``sha256(key)`` with the id (table ``api_keys`` of the study
store, :class:`service.core.store.ApiKey`); a key of 256 random bits needs no slow password hash, sha256 is
preimage-resistant enough. Keys from the environment (``BONN_SWEEP_API_KEYS``, any string an operator
chooses, or ``sha256:<hex>`` of it) are hashed in memory at start-up and never written anywhere.

Verification compares hashes with :func:`hmac.compare_digest` (constant time) against every candidate,
without an early exit on a match.

The embedded stack writes its key to ``{home}/api-key`` (mode 0600) so that the CLI on the same machine
uses it without the user copying anything (:func:`ensure_local_key`).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

KEY_PREFIX = "bsk_"
KEY_RE = re.compile(r"^bsk_([0-9a-f]{8})_[A-Za-z0-9_-]{20,}$")
LOCAL_KEY_FILE = "api-key"
LOCAL_KEY_NAME = "local"
CLIENT_ENV = "BONN_SWEEP_API_KEY"  # the key a client (CLI, scripts) sends


def new_key() -> tuple[str, str]:
    """``(key_id, key)``: a fresh random key."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


def key_id_of(key: str) -> str | None:
    m = KEY_RE.match(key)
    return m.group(1) if m else None


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    sha256: str
    name: str = ""


def parse_entries(text: str, *, source: str) -> list[KeyEntry]:
    """Entries of ``BONN_SWEEP_API_KEYS`` (comma- or newline-separated) or of a keys file: a key, or
    ``sha256:<64 hex>``. Blank lines and ``#`` comments are skipped."""
    out: list[KeyEntry] = []
    for raw in re.split(r"[,\n]", text):
        item = raw.strip()
        if not item or item.startswith("#"):
            continue
        if item.startswith("sha256:"):
            digest = item.removeprefix("sha256:").strip().lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ValueError(f"{source}: 'sha256:' must be followed by 64 hex digits")
        else:
            digest = hash_key(item)
        kid = key_id_of(item) or f"{source}-{digest[:8]}"
        out.append(KeyEntry(kid, digest, source))
    return out


class KeyRing:
    """The keys the API accepts right now: a snapshot (store rows + configured entries)."""

    def __init__(self, entries: list[KeyEntry]) -> None:
        self.entries = list(entries)

    def __len__(self) -> int:
        return len(self.entries)

    def verify(self, presented: str) -> KeyEntry | None:
        """The entry whose hash equals ``sha256(presented)``; every entry is compared (constant time)."""
        digest = hash_key(presented).encode()
        found: KeyEntry | None = None
        for entry in self.entries:
            if hmac.compare_digest(entry.sha256.encode(), digest) and found is None:
                found = entry
        return found


# -- the local user's key file -----------------------------------------------------------------------


def local_key_path(home: str | Path) -> Path:
    return Path(home).expanduser().absolute() / LOCAL_KEY_FILE


def read_local_key(home: str | Path) -> str | None:
    try:
        text = local_key_path(home).read_text().strip()
    except OSError:
        return None
    return text or None


def write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by its owner only (0600 from the start, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.chmod(tmp, 0o600)
    tmp.replace(path)


def ensure_local_key(home: str | Path, store_url: str) -> str:
    """The key in ``{home}/api-key`` if the store knows it (and it is not revoked); else a new key,
    stored hashed and written there (0600). Returns the key."""
    from service.core.store import StudyStore

    store = StudyStore(store_url)
    try:
        store.create_all()
        current = read_local_key(home)
        if current:
            kid = key_id_of(current)
            row = store.get_api_key(kid) if kid else None
            if row is not None and row.revoked_at is None and hmac.compare_digest(row.sha256, hash_key(current)):
                return current
        key_id, key = new_key()
        store.add_api_key(key_id, hash_key(key), LOCAL_KEY_NAME)
        write_private(local_key_path(home), key + "\n")
        return key
    finally:
        store.close()
