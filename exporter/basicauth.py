"""HTTP basic authentication against bcrypt hashes, with exporter-toolkit's semantics.

- The header is parsed as Go's `Request.BasicAuth` does: a case-insensitive `Basic ` prefix,
  standard base64 with padding, user and password split at the first colon, both as bytes.
- A hash is valid when Go's `bcrypt.Cost` accepts it: at least 59 bytes, `$`, a major version
  up to 2 with an optional minor letter, a two-digit cost from 4 to 31. Go compares only the
  cost, salt and digest, so `$2a$`, `$2b$`, `$2y$` (htpasswd) are the same hash.
- bcrypt reads at most 72 bytes of a password; longer ones are compared by their first 72
  bytes, as Go does (Python's bcrypt refuses them instead, so they are cut here).
- An unknown user is checked against a dummy hash of the highest configured cost, so it costs
  what a known user costs and timing does not tell which names exist.
- Each (user, password) outcome, right or wrong, is remembered under an HMAC with a key made
  at start, so a Prometheus scraping every few seconds pays bcrypt once, and no password is
  kept. Only one bcrypt runs at a time, as in exporter-toolkit: a flood of wrong passwords
  costs at most one core.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import bcrypt

_MIN_HASH_SIZE = 59  # Go's bcrypt minHashSize
_MAX_PASSWORD = 72
_CACHE_SIZE = 100


@dataclass(frozen=True, slots=True)
class ParsedHash:
    """The parts of a bcrypt hash that Go's comparison uses."""

    cost: int
    rest: bytes  # salt (22) and digest (31), bcrypt base64

    def for_python(self) -> bytes:
        """The same hash under the prefix Python's bcrypt reads."""
        return b"$2b$%02d$" % self.cost + self.rest


def parse_hash(hashed: bytes) -> ParsedHash | str:
    """The hash's parts, or why Go's `bcrypt.Cost` refuses it."""
    if len(hashed) < _MIN_HASH_SIZE:
        return "crypto/bcrypt: hashedSecret too short to be a bcrypted password"
    if hashed[0:1] != b"$":
        return f"crypto/bcrypt: bcrypt hashes must start with '$', but hashedSecret started with {chr(hashed[0])!r}"  # noqa: E501
    if hashed[1] > ord("2"):
        return f"crypto/bcrypt: bcrypt algorithm version {chr(hashed[1])!r} requested is newer than current version '2'"  # noqa: E501
    offset = 3 if hashed[2:3] == b"$" else 4
    digits = hashed[offset : offset + 2]
    try:
        cost = int(digits.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        return f"strconv.Atoi: parsing {digits.decode('latin-1')!r}: invalid syntax"
    if not 4 <= cost <= 31:
        return f"crypto/bcrypt: cost {cost} is outside allowed range (4,31)"
    return ParsedHash(cost=cost, rest=hashed[offset + 3 :])


def validate_hash(hashed: str) -> str | None:
    """None for a hash Prometheus would start with, else its reason."""
    parsed = parse_hash(hashed.encode("utf-8"))
    return parsed if isinstance(parsed, str) else None


def parse_authorization(header: str | None) -> tuple[bytes, bytes] | None:
    """(user, password) from an `Authorization: Basic` header value, else None."""
    if header is None or len(header) < 6 or header[:6].lower() != "basic ":
        return None
    token = header[6:]
    try:
        decoded = base64.b64decode(token.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return None
    return user, password


class BasicAuth:
    """Decides whether a request's credentials are valid; safe to call from many threads."""

    def __init__(self, users: dict[str, str]) -> None:
        self._users: dict[bytes, ParsedHash] = {}
        for user, hashed in users.items():
            parsed = parse_hash(hashed.encode("utf-8"))
            if isinstance(parsed, str):
                raise ValueError(f"basic_auth_users.{user}: {parsed}")
            self._users[user.encode("utf-8")] = parsed
        cost = max((parsed.cost for parsed in self._users.values()), default=4)
        dummy = bcrypt.hashpw(os.urandom(16).hex().encode(), bcrypt.gensalt(rounds=cost))
        self._dummy = ParsedHash(cost=cost, rest=dummy[7:])
        self._key = os.urandom(32)
        self._cache: OrderedDict[bytes, bool] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._bcrypt_lock = threading.Lock()

    def cached(self, header: str | None) -> bool | None:
        """The remembered outcome for these credentials; None when bcrypt must decide.

        Cheap (one HMAC), so a server may call it on its I/O thread and hand only the
        misses to `check`. Missing or unparsable credentials are refused outright.
        """
        credentials = parse_authorization(header)
        if credentials is None:
            return False
        with self._cache_lock:
            outcome = self._cache.get(self._cache_key(*credentials))
        return outcome

    def check(self, header: str | None) -> bool:
        """Whether the header carries a configured user and that user's password."""
        credentials = parse_authorization(header)
        if credentials is None:
            return False
        user, password = credentials
        key = self._cache_key(user, password)
        with self._cache_lock:
            outcome = self._cache.get(key)
        if outcome is not None:
            return outcome
        hashed = self._users.get(user)
        known = hashed is not None
        with self._bcrypt_lock:
            matches = _compare(hashed if hashed is not None else self._dummy, password)
        outcome = known and matches
        with self._cache_lock:
            self._cache[key] = outcome
            while len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return outcome

    def _cache_key(self, user: bytes, password: bytes) -> bytes:
        message = len(user).to_bytes(4, "big") + user + password
        return hmac.new(self._key, message, hashlib.sha256).digest()


def _compare(hashed: ParsedHash, password: bytes) -> bool:
    """bcrypt's verdict on the first 72 bytes of `password`; a corrupt hash matches nothing."""
    try:
        return bcrypt.checkpw(password[:_MAX_PASSWORD], hashed.for_python())
    except ValueError:
        return False
