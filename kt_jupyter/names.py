"""The one rule for compute names, checked wherever a name arrives (pure: no I/O).

A compute name becomes a directory of the local registry, a Kubernetes label
value and part of a Service name, and it arrives from URLs, magic lines and
the Python API. :func:`check_compute_name` is the only gate: up to 63 ASCII
letters, digits, ``-``, ``_`` or ``.``, starting and ending with a letter or
digit (a Kubernetes label value that is not empty). So no name is ``.`` or
``..``, holds a ``/``, a NUL or a newline, or starts with ``-``.
"""

from __future__ import annotations

import re

from .errors import ComputeSpecError

#: Longest compute name (a Kubernetes label value).
#: Where pod kernels can live: the backends, in the order a name is looked for.
BACKENDS = ("local", "kubernetes")
MAX_NAME_CHARS = 63
#: Characters of a rejected value quoted back in an error message.
MAX_ECHO_CHARS = 80
#: A name that shows the rule in error messages.
NAME_EXAMPLE = "train"

_NAME_RE = re.compile(r"[A-Za-z0-9](?:[-A-Za-z0-9_.]*[A-Za-z0-9])?")


def shown(value: object, max_chars: int = MAX_ECHO_CHARS) -> str:
    """``repr`` of a value from the outside, cut to about ``max_chars`` characters (says how long it was)."""
    if isinstance(value, (str, bytes)) and len(value) > max_chars:
        return f"{value[:max_chars]!r}... ({len(value)} characters)"
    if not isinstance(value, (str, bytes, int, float, bool, type(None))):
        return f"a {type(value).__name__}"
    text = repr(value)
    return text if len(text) <= max_chars + 2 else f"{text[:max_chars]}..."


def check_compute_name(name: object) -> str:
    """``name`` if it is a valid compute name, else a ComputeSpecError that says the rule (and quotes little)."""
    if isinstance(name, str) and len(name) <= MAX_NAME_CHARS and _NAME_RE.fullmatch(name):
        return name
    raise ComputeSpecError(
        f"name {shown(name)} is not a valid compute name: use up to {MAX_NAME_CHARS} letters, digits, '-', '_' "
        f"or '.', starting and ending with a letter or digit, e.g. {NAME_EXAMPLE!r}")
