"""API keys: minting and hashing. Keys are only ever stored, compared and logged as hashes."""

import hashlib
import secrets

KEY_PREFIX = "cg-"


def mint_key() -> str:
    """A new random API key (256 bits of entropy)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    """The form a key is stored in: `sha256:<hex digest>`."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()
