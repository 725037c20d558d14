"""The UI's password as a salted hash: made by `famsearch ui`, handed to the Streamlit child in its environment
(never the password itself), checked by the login gate (`ui.login`). No Streamlit here: the CLI imports it."""

from __future__ import annotations

import hashlib
import hmac
import secrets

from retrieval.config import ENV_PREFIX

HASH_ENV = ENV_PREFIX + "UI_PASSWORD_HASH"  # set: the UI asks for the password first
SCHEME = "pbkdf2_sha256"
ITERATIONS = 200_000  # ~0.1 s a check: slow enough to guess offline, quick enough to log in


def _derive(password: str, salt: bytes, iterations: int) -> bytes:
    return hashlib.pbkdf2_hmac("sha256", password.encode(), salt, iterations)


def hash_password(password: str, iterations: int = ITERATIONS) -> str:
    """``password`` -> ``"pbkdf2_sha256$ITERATIONS$SALT_HEX$HASH_HEX"`` with a fresh random salt."""
    salt = secrets.token_bytes(16)
    return f"{SCHEME}${iterations}${salt.hex()}${_derive(password, salt, iterations).hex()}"


def password_matches(stored: str, attempt: str) -> bool:
    """Whether ``attempt`` is the password ``stored`` (from `hash_password`) was made from; in constant time."""
    try:
        scheme, iterations, salt, expected = stored.split("$")
        if scheme != SCHEME:
            raise ValueError(scheme)
        derived = _derive(attempt, bytes.fromhex(salt), int(iterations))
        return hmac.compare_digest(derived, bytes.fromhex(expected))
    except ValueError:
        raise ValueError(f"{HASH_ENV} is not a hash made by `famsearch ui`") from None
