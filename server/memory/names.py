"""Validation of client-chosen names: bank names, snapshot names and memory keys.

Bank and snapshot names become file-name parts (snapshots, WAL records), so they
are restricted to 1-64 characters of ``[A-Za-z0-9_.-]`` starting with a letter or
digit, with no ``..``. Keys are free text (1..max_key_length printable characters)
because they never touch the file system.
"""

from __future__ import annotations

import re

from ..errors import InvalidArgument

MAX_NAME_LENGTH = 64
# Client input shown in an error message is cut to this many characters: a status
# message travels in trailers, which gRPC limits (8 KiB by default).
MAX_ECHO_CHARS = 80
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def shorten(value: object, limit: int = MAX_ECHO_CHARS) -> str:
    """``repr(value)`` cut to about ``limit`` characters, saying how long it was."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} chars"
    return f"{text[:limit]}... ({size})"


def _validate_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgument(f"{what} name must be a non-empty string", field="name")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(
            f"{what} name is {len(name)} characters; at most {MAX_NAME_LENGTH} are allowed",
            field="name",
        )
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidArgument(
            f"{what} name {shorten(name)} is invalid: use letters, digits, '_', '.', '-', "
            "start with a letter or digit, and no '..'",
            field="name",
        )
    return name


def validate_bank_name(name: object) -> str:
    """Returns ``name`` if it is a valid bank name, else raises ``InvalidArgument``."""
    return _validate_name(name, "bank")


def validate_snapshot_name(name: object) -> str:
    """Returns ``name`` if it is a valid snapshot name, else raises ``InvalidArgument``."""
    return _validate_name(name, "snapshot")


def validate_key(key: object, max_length: int) -> str:
    """Returns ``key`` if it is a valid memory key, else raises ``InvalidArgument``.

    Args:
        key: 1..max_length printable characters (any script; no control characters).
        max_length: the server's ``max_key_length``.
    """
    if not isinstance(key, str) or not key:
        raise InvalidArgument("key must be a non-empty string", field="keys")
    if len(key) > max_length:
        raise InvalidArgument(
            f"key is {len(key)} characters; at most {max_length} are allowed", field="keys"
        )
    if not key.isprintable():
        raise InvalidArgument(
            f"key {shorten(key)} contains non-printable characters", field="keys"
        )
    return key
