"""Service names, and what a node advertises about the services it offers.

A service name is a subject without wildcards: dot-separated tokens, each non-empty, with no
whitespace and neither ``*`` nor ``>``, at most ``MAX_SERVICE_BYTES`` bytes of UTF-8.
"""

from __future__ import annotations

from typing import Any

from meshq.errors import UsageError

MAX_SERVICE_BYTES = 1024
SERVICES = "services"  # the advert kind (meshq.core.mesh.adverts): {service: [idempotent, concurrency]}
_VALID_KEPT = 4096  # valid names remembered (every request checks its name: pipelined, that adds up)
_valid: dict[str, None] = {}


def validate_service_name(name: Any) -> str:
    """``name`` if it is a valid service name, else ``UsageError`` (a ``ValueError``) naming the rule."""
    if type(name) is str and name in _valid:
        return name
    _check_service_name(name)
    if len(_valid) >= _VALID_KEPT:
        _valid.clear()
    _valid[name] = None
    return name


def _check_service_name(name: Any) -> None:
    if not isinstance(name, str):
        raise UsageError(f"a service name is a str, not {type(name).__name__}")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_SERVICE_BYTES:
        raise UsageError(f"service name of {len(name.encode('utf-8', 'surrogatepass'))} bytes: at most "
                         f"{MAX_SERVICE_BYTES} bytes of UTF-8")
    if not name:
        raise UsageError("a service name cannot be empty: use dot-separated tokens such as 'billing.invoice'")
    for token in name.split("."):
        if not token:
            raise UsageError(f"service name {name!r} has an empty token: tokens are separated by single dots, "
                             "with none at either end")
        if "*" in token or ">" in token:
            raise UsageError(f"service name {name!r} contains a wildcard ('*' or '>'): a service is one exact "
                             "name; wildcards are for subscription patterns")
        if any(ch.isspace() for ch in token):
            raise UsageError(f"service name {name!r} contains whitespace: tokens are made of printable "
                             "characters other than '.', '*' and '>'")


def offers_of(value: Any) -> dict[str, tuple[bool, int]]:
    """The services a peer's advert names, ``{service: (idempotent, concurrency)}``; entries that
    are malformed (a peer we cannot trust) are left out."""
    found: dict[str, tuple[bool, int]] = {}
    if type(value) is not dict:
        return found
    for name, entry in value.items():
        if (type(name) is str and type(entry) is list and len(entry) == 2 and type(entry[0]) is bool
                and type(entry[1]) is int and entry[1] > 0):
            found[name] = (entry[0], entry[1])
    return found
