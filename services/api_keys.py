"""Upstream API keys at rest: Fernet (AES-128-CBC and HMAC-SHA256, from
`cryptography`) with the key in SWITCHBOARD_SECRET_KEY (settings.py).

The `llm.api_key` column holds the Fernet token. A worker keeps the
plaintext of the keys it used lately in memory, next to the Fernet key that
decrypts them all anyway, rather than decrypt one at every request (~60 µs,
some 4% of a proxied request's CPU). A key that does not decrypt is an
error, never sent on: a start-up check (`check_stored_keys`) says so before
the first request, and `decrypt` raises if a row was written with another key
since.
"""
import logging

import sqlalchemy as sa
from cachetools import LRUCache
from cryptography.fernet import Fernet, InvalidToken

from models import Llm
from services.errors import ServiceError

log = logging.getLogger(__name__)

KEYS_KEPT = 1024  # plaintexts a worker keeps, by their stored token: one per LLM with a key
GENERATE_HINT = ("make one with: python -c 'from cryptography.fernet import Fernet; "
                 "print(Fernet.generate_key().decode())'")


class SecretKeyError(RuntimeError):
    """SWITCHBOARD_SECRET_KEY is malformed, or is not the key the stored API
    keys were encrypted with. The message says what to do; the server must
    not start."""


class ApiKeyUnreadable(ServiceError):
    status, type, code = 500, "server_error", "api_key_unreadable"


class ApiKeyCipher:
    def __init__(self, key: str, source: str = "SWITCHBOARD_SECRET_KEY"):
        """`source` names where the key came from, for error messages.
        Raises SecretKeyError when `key` is not a Fernet key."""
        try:
            self._fernet = Fernet(key.strip().encode() if isinstance(key, str) else key)
        except (ValueError, TypeError):
            raise SecretKeyError(f"{source} is not a valid key: it must be 32 url-safe "
                                 f"base64-encoded bytes ({GENERATE_HINT})") from None
        self.source = source
        self._plaintexts = LRUCache(KEYS_KEPT)  # stored token -> plaintext

    @classmethod
    def from_config(cls, config) -> "ApiKeyCipher":
        from_file = config.get("SECRETS_FROM_INSTANCE", {}).get("SWITCHBOARD_SECRET_KEY")
        return cls(config["API_KEY_SECRET"],
                   f"the key in {from_file}" if from_file else "SWITCHBOARD_SECRET_KEY")

    def __repr__(self):  # never the key
        return f"ApiKeyCipher({self.source})"

    def encrypt(self, api_key: str | None) -> str | None:
        """The value to store for `api_key`; no key (None or "") stores None."""
        if not api_key:
            return None
        return self._fernet.encrypt(api_key.encode()).decode()

    def can_decrypt(self, stored: str) -> bool:
        try:
            self._fernet.decrypt(stored.encode())
        except InvalidToken:
            return False
        return True

    def decrypt(self, stored: str | None, llm: str) -> str | None:
        """The plaintext of a stored key. Raises ApiKeyUnreadable."""
        if stored is None:
            return None
        plaintext = self._plaintexts.get(stored)
        if plaintext is not None:
            return plaintext
        try:
            plaintext = self._fernet.decrypt(stored.encode()).decode()
        except InvalidToken:
            log.error("the API key of LLM %s does not decrypt with %s", llm, self.source)
            raise ApiKeyUnreadable(
                f"The API key of LLM '{llm}' cannot be decrypted with this server's "
                f"{self.source}; an operator must fix the key or set the LLM's api_key "
                f"again", code="api_key_unreadable") from None
        self._plaintexts[stored] = plaintext
        return plaintext


def check_stored_keys(session, cipher: ApiKeyCipher) -> int:
    """Decrypt every stored API key once; returns how many there are. Raises
    SecretKeyError naming the LLMs whose key does not decrypt."""
    rows = session.execute(sa.select(Llm.name, Llm.api_key).where(Llm.api_key.is_not(None)))
    unreadable, count = [], 0
    for name, stored in rows:
        count += 1
        if not cipher.can_decrypt(stored):
            unreadable.append(name)
    if unreadable:
        shown = ", ".join(sorted(unreadable)[:5]) + (", ..." if len(unreadable) > 5 else "")
        raise SecretKeyError(
            f"{cipher.source} does not decrypt the API keys stored in the database "
            f"({len(unreadable)} of {count}: {shown}). Set SWITCHBOARD_SECRET_KEY to the key "
            f"they were encrypted with (the first host's SWITCHBOARD_SECRET_KEY, or its "
            f"instance/SWITCHBOARD_SECRET_KEY file), the same on every host.")
    return count
