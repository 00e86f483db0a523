"""Kubernetes quantities, sizes and durations: parsed, normalised, and explained when wrong.

Pure functions, no I/O. Every parse error is a
:class:`~kt_jupyter.errors.ComputeSpecError` whose message names the
parameter, repeats the bad value and shows a good one.
"""

from __future__ import annotations

import math
import re
from decimal import ROUND_CEILING, Decimal, InvalidOperation

from .errors import ComputeSpecError

#: Binary suffixes Kubernetes accepts, and their factors.
BINARY_SUFFIXES = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
#: Decimal suffixes Kubernetes accepts (``K`` is read as ``k``, as the seed allows), and their factors.
DECIMAL_SUFFIXES = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}

_NUMBER = r"(?P<num>[0-9]+(?:\.[0-9]*)?|\.[0-9]+)"
_QUANTITY_RE = re.compile(rf"^{_NUMBER}\s*(?P<unit>[A-Za-z]*)$")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h|d|w)")
_DURATION_UNITS_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20, "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40,
}


#: Longest quantity string read (Kubernetes' own are far shorter); longer ones are refused unread.
QUANTITY_MAX_CHARS = 40
#: A transfer's rate (and ETA) is said from its second report on, at least this long after its first (a report
#: starts at the transfer's first progress call, with bytes moved already: its rate then read 829 GiB/s).
RATE_MIN_S = 0.001
#: Largest number a quantity may hold before its unit (Kubernetes quantities are int64 at heart).
QUANTITY_MAX = Decimal(2**63 - 1)


def _split(value: object, param: str, example: str) -> tuple[Decimal, str]:
    """A number and its unit suffix from an int, float or string; errors name ``param``."""
    number, unit = _split_unbounded(value, param, example)
    if number > QUANTITY_MAX:
        shown = value if len(str(value)) <= QUANTITY_MAX_CHARS else f"{str(value)[:QUANTITY_MAX_CHARS]}..."
        raise ComputeSpecError(f"{param}: {shown!r} is too large; write it like {example!r}")
    return number, unit


def _split_unbounded(value: object, param: str, example: str) -> tuple[Decimal, str]:
    if isinstance(value, str) and len(value) > QUANTITY_MAX_CHARS:
        raise ComputeSpecError(f"{param}: {value[:QUANTITY_MAX_CHARS]!r}... ({len(value)} characters) is not "
                               f"a quantity; write it like {example!r}")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        raise ComputeSpecError(f"{param}: a {value.bit_length()}-bit number is too large; write it like {example!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ComputeSpecError(
            f"{param} must be a number or a string like {example!r}; got {value!r} ({type(value).__name__})")
    if isinstance(value, float) and not math.isfinite(value):
        raise ComputeSpecError(f"{param} must be a finite number, e.g. {example!r}; got {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ComputeSpecError(f"{param} must not be negative, e.g. {example!r}; got {value!r}")
        return Decimal(repr(value)) if isinstance(value, float) else Decimal(value), ""
    match = _QUANTITY_RE.match(value.strip())
    if not match:
        if value.strip().startswith("-"):
            raise ComputeSpecError(f"{param} must not be negative, e.g. {example!r}; got {value!r}")
        raise ComputeSpecError(f"{param}: cannot read {value!r} as a quantity; write it like {example!r}")
    return Decimal(match["num"]), match["unit"]


def _plain(d: Decimal) -> str:
    """A Decimal without exponent or trailing zeros: ``0.50`` -> ``0.5``, ``2.0`` -> ``2``."""
    text = format(d.normalize(), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def parse_cpus(value: float | str, param: str = "cpus") -> tuple[str, float]:
    """CPU quantity -> (Kubernetes canonical string, cores).

    ``2`` -> ``("2", 2.0)``, ``"0.5"`` and ``"500m"`` -> ``("500m", 0.5)``.
    Kubernetes counts CPU in whole millicores, so finer values are refused.
    """
    example = "500m"
    number, unit = _split(value, param, example)
    if unit == "m":
        millis = number
    elif unit == "":
        millis = number * 1000
    else:
        raise ComputeSpecError(
            f"{param}: unknown unit {unit!r} in {value!r}; CPUs are cores ('2', '0.5') or millicores ('500m')")
    if millis == 0:
        raise ComputeSpecError(f"{param} must be more than zero, e.g. {example!r}; got {value!r}")
    if millis != millis.to_integral_value():
        raise ComputeSpecError(
            f"{param}: {value!r} is finer than Kubernetes' resolution of 1 millicore; use e.g. {example!r}")
    m = int(millis)
    text = str(m // 1000) if m % 1000 == 0 else f"{m}m"
    return text, m / 1000


def canonical_bytes(n: int, binary: bool = True) -> str:
    """The shortest exact Kubernetes spelling of ``n`` bytes: ``4294967296`` -> ``"4Gi"``."""
    table = BINARY_SUFFIXES if binary else DECIMAL_SUFFIXES
    for suffix, factor in reversed(table.items()):
        if n and n % factor == 0:
            return f"{n // factor}{suffix}"
    return str(n)


def parse_memory(value: float | str, param: str = "memory") -> tuple[int, str]:
    """Memory or disk quantity -> (bytes, canonical string).

    Binary units (``"1.5Gi"``) canonicalise to binary ones (``"1536Mi"``);
    decimal units and plain byte counts to decimal ones (``"4G"``, ``1024`` ->
    ``"1024"``). Fractions of a byte round up, as Kubernetes does.
    """
    example = "4Gi"
    number, unit = _split(value, param, example)
    if unit in BINARY_SUFFIXES:
        factor, binary = BINARY_SUFFIXES[unit], True
    elif unit in DECIMAL_SUFFIXES or unit == "K":
        factor, binary = DECIMAL_SUFFIXES[unit.lower() if unit == "K" else unit], False
    elif unit == "":
        factor, binary = 1, False
    elif unit == "m":
        raise ComputeSpecError(
            f"{param}: {value!r} means milli-bytes in Kubernetes; did you mean '{_plain(number)}Mi' (mebibytes)?")
    else:
        hint = unit[:-1] if unit[-1:] in "bB" and unit[:-1] in {**BINARY_SUFFIXES, **DECIMAL_SUFFIXES, "K": 1} else ""
        suggestion = f"{_plain(number)}{hint}" if hint else example
        raise ComputeSpecError(
            f"{param}: unknown unit {unit!r} in {value!r}; use Ki, Mi, Gi, Ti (binary) or k, M, G, T "
            f"(decimal), e.g. {suggestion!r}")
    try:
        n = int((number * factor).to_integral_value(rounding=ROUND_CEILING))
    except InvalidOperation:  # pragma: no cover - absurdly large input
        raise ComputeSpecError(f"{param}: {value!r} is too large") from None
    if n <= 0:
        raise ComputeSpecError(f"{param} must be more than zero, e.g. {example!r}; got {value!r}")
    return n, canonical_bytes(n, binary)


def format_bytes(n: float) -> str:
    """Human-readable binary size: ``1536`` -> ``"1.5 KiB"``, ``512`` -> ``"512 B"``."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    if n < 1024:
        return f"{sign}{n:.0f} B"
    units = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")
    value = float(n)
    for i, unit in enumerate(units):
        value /= 1024
        rounded = round(value, 1)
        if rounded < 1024 or i == len(units) - 1:
            text = f"{rounded:.1f}".removesuffix(".0")
            return f"{sign}{text} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def parse_size(value: int | str, param: str = "size") -> int:
    """A byte size as people write it -> bytes: ``"256MB"``, ``"1GiB"``, ``"100k"``, ``1024``.

    Units are case-insensitive; ``k``/``KB``/``M``/``MB``... are decimal,
    ``Ki``/``KiB``/``Mi``/``MiB``... binary. Zero is allowed (a threshold).
    """
    example = "256MB"
    number, unit = _split(value, param, example)
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ComputeSpecError(
            f"{param}: unknown unit {unit!r} in {value!r}; use B, KB, MB, GB (decimal) or KiB, MiB, GiB "
            f"(binary), e.g. {example!r}")
    return int((number * factor).to_integral_value(rounding=ROUND_CEILING))


def parse_duration(value: float | str, param: str = "duration") -> float:
    """A positive duration -> seconds: ``90``, ``"90"``, ``"30s"``, ``"30m"``, ``"1h30m"``, ``"1d"``."""
    example = "30m"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ComputeSpecError(f"{param} must be seconds or a string like {example!r}; got {value!r}")
    if isinstance(value, str):
        text = value.strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION_PART_RE.findall(text)
            if not parts or _DURATION_PART_RE.sub("", text).strip():
                raise ComputeSpecError(
                    f"{param}: cannot read {value!r} as a duration; write seconds (3600) or e.g. "
                    f"{example!r}, '1h', '1h30m', '1d'") from None
            seconds = sum(float(num) * _DURATION_UNITS_S[unit] for num, unit in parts)
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ComputeSpecError(f"{param} must be a positive duration, e.g. {example!r}; got {value!r}")
    return seconds


def format_duration(seconds: float) -> str:
    """Seconds as the shortest exact duration string: ``1800`` -> ``"30m"``, ``90`` -> ``"90s"``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


def parse_gpus(value: int | str | None, param: str = "gpus") -> int:
    """GPU count -> int; ``None`` and ``0`` mean none. Whole GPUs only."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ComputeSpecError(f"{param} must be a whole number like 1; got {value!r}")
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        raise ComputeSpecError(f"{param} must be a whole number like 1; got {value!r}") from None
    if not number.is_finite() or number < 0:
        raise ComputeSpecError(f"{param} must be a whole number like 1 (0 for none); got {value!r}")
    if number != number.to_integral_value():
        raise ComputeSpecError(
            f"{param}={value!r}: GPUs are requested whole, e.g. 1; to share one GPU, "
            "set gpu_memory (e.g. gpu_memory='4Gi') instead")
    return int(number)
