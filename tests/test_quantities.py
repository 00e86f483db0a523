"""Kubernetes quantities, sizes and durations: parsing, canonical forms, and the errors people see."""

from __future__ import annotations

import pytest

from kt_jupyter.errors import ComputeSpecError
from kt_jupyter.quantities import (canonical_bytes, format_bytes, format_duration, parse_cpus, parse_duration,
                                   parse_gpus, parse_memory, parse_size)


@pytest.mark.parametrize("value, text, cores", [
    (1, "1", 1.0), (2, "2", 2.0), ("2", "2", 2.0), ("2.0", "2", 2.0), ("0.5", "500m", 0.5), ("500m", "500m", 0.5),
    (0.25, "250m", 0.25), ("1000m", "1", 1.0), ("2000m", "2", 2.0), ("1.5", "1500m", 1.5), ("0.001", "1m", 0.001),
    (" 4 ", "4", 4.0), (".5", "500m", 0.5), ("100m", "100m", 0.1),
])
def test_cpus_normalise_to_kubernetes_canonical_form(value, text, cores):
    assert parse_cpus(value) == (text, cores)


@pytest.mark.parametrize("value, needle", [
    ("abc", "cannot read 'abc' as a quantity; write it like '500m'"),
    ("2Gi", "unknown unit 'Gi' in '2Gi'; CPUs are cores ('2', '0.5') or millicores ('500m')"),
    ("0.0001", "finer than Kubernetes' resolution of 1 millicore"),
    ("0.5m", "finer than Kubernetes' resolution of 1 millicore"),
    (0, "must be more than zero, e.g. '500m'; got 0"),
    ("0m", "must be more than zero"),
    (-1, "must not be negative, e.g. '500m'; got -1"),
    ("-1", "must not be negative"),
    (True, "must be a number or a string like '500m'; got True (bool)"),
    ([1], "must be a number or a string like '500m'"),
    (float("nan"), "must be a finite number"),
    (float("inf"), "must be a finite number"),
])
def test_cpus_errors_name_param_value_and_example(value, needle):
    with pytest.raises(ComputeSpecError) as err:
        parse_cpus(value)
    assert str(err.value).startswith("cpus")
    assert needle in str(err.value)


@pytest.mark.parametrize("value, n, text", [
    ("4Gi", 4 * 2**30, "4Gi"), ("4096Mi", 4 * 2**30, "4Gi"), ("512Mi", 512 * 2**20, "512Mi"),
    ("1.5Gi", 1536 * 2**20, "1536Mi"), ("4G", 4 * 10**9, "4G"), ("100M", 10**8, "100M"), ("1K", 1000, "1k"),
    ("1k", 1000, "1k"), ("1Ki", 1024, "1Ki"), ("1Ti", 2**40, "1Ti"), ("1T", 10**12, "1T"),
    (1024, 1024, "1024"), (1000000, 10**6, "1M"), ("1000000", 10**6, "1M"), ("123", 123, "123"),
    ("0.1Ki", 103, "103"), ("2048Ki", 2 * 2**20, "2Mi"), ("1Pi", 2**50, "1Pi"), ("1Ei", 2**60, "1Ei"),
    ("4 Gi", 4 * 2**30, "4Gi"), (1.5, 2, "2"),
])
def test_memory_to_bytes_and_canonical(value, n, text):
    assert parse_memory(value) == (n, text)


@pytest.mark.parametrize("value, needle", [
    ("4GB", "unknown unit 'GB' in '4GB'; use Ki, Mi, Gi, Ti (binary) or k, M, G, T (decimal), e.g. '4G'"),
    ("4GiB", "e.g. '4Gi'"),
    ("4gb", "e.g. '4Gi'"),
    ("100m", "'100m' means milli-bytes in Kubernetes; did you mean '100Mi' (mebibytes)?"),
    ("lots", "cannot read 'lots' as a quantity; write it like '4Gi'"),
    ("0", "must be more than zero, e.g. '4Gi'"),
    ("0Gi", "must be more than zero"),
    (-5, "must not be negative"),
    (None, "must be a number or a string like '4Gi'; got None"),
    ("4Gi4", "cannot read"),
])
def test_memory_errors(value, needle):
    with pytest.raises(ComputeSpecError) as err:
        parse_memory(value, "memory")
    assert str(err.value).startswith("memory")
    assert needle in str(err.value)


def test_memory_error_names_the_parameter_it_was_given():
    with pytest.raises(ComputeSpecError, match=r"^disk_size: unknown unit 'XB'"):
        parse_memory("10XB", "disk_size")


def test_canonical_bytes():
    assert canonical_bytes(3 * 2**30) == "3Gi"
    assert canonical_bytes(3 * 10**9, binary=False) == "3G"
    assert canonical_bytes(1500) == "1500"
    assert canonical_bytes(0) == "0"


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (512, "512 B"), (1023, "1023 B"), (1024, "1 KiB"), (1536, "1.5 KiB"), (2**20, "1 MiB"),
    (int(1.5 * 2**30), "1.5 GiB"), (2**40, "1 TiB"), (2**20 - 1, "1 MiB"), (10.0, "10 B"), (-2048, "-2 KiB"),
    (5 * 2**60, "5 EiB"), (2**70, "1024 EiB"), (123456789, "117.7 MiB"),
])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("value, n", [
    ("256MB", 256 * 10**6), ("1GiB", 2**30), ("100k", 10**5), ("100K", 10**5), ("100KB", 10**5), (1024, 1024),
    ("1024", 1024), ("1.5GB", 15 * 10**8), ("2Mi", 2 * 2**20), ("10mb", 10**7), ("0", 0), ("7B", 7), ("1tb", 10**12),
])
def test_parse_size(value, n):
    assert parse_size(value) == n


@pytest.mark.parametrize("value, needle", [
    ("10XB", "pull_limit: unknown unit 'XB' in '10XB'; use B, KB, MB, GB (decimal) or KiB, MiB, GiB (binary), "
             "e.g. '256MB'"),
    ("big", "pull_limit: cannot read 'big'"),
    (-1, "pull_limit must not be negative"),
])
def test_parse_size_errors(value, needle):
    with pytest.raises(ComputeSpecError) as err:
        parse_size(value, "pull_limit")
    assert needle in str(err.value)


@pytest.mark.parametrize("value, seconds", [
    (90, 90.0), (1.5, 1.5), ("90", 90.0), ("30s", 30.0), ("30m", 1800.0), ("1h", 3600.0), ("1d", 86400.0),
    ("1h30m", 5400.0), ("1h 30m", 5400.0), ("500ms", 0.5), ("1w", 604800.0), ("2H", 7200.0), ("0.5h", 1800.0),
])
def test_parse_duration(value, seconds):
    assert parse_duration(value, "inactivity_ttl") == seconds


@pytest.mark.parametrize("value, needle", [
    ("soon", "inactivity_ttl: cannot read 'soon' as a duration; write seconds (3600) or e.g. '30m', '1h'"),
    ("30x", "cannot read '30x'"),
    ("1h and 5m", "cannot read"),
    (0, "inactivity_ttl must be a positive duration, e.g. '30m'; got 0"),
    ("-5", "must be a positive duration"),
    (True, "inactivity_ttl must be seconds or a string like '30m'; got True"),
    (float("inf"), "must be a positive duration"),
])
def test_parse_duration_errors(value, needle):
    with pytest.raises(ComputeSpecError) as err:
        parse_duration(value, "inactivity_ttl")
    assert needle in str(err.value)


@pytest.mark.parametrize("seconds, text", [(1800, "30m"), (90, "90s"), (3600, "1h"), (86400, "1d"), (1.5, "1.5s")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("value, n", [(None, 0), (0, 0), (1, 1), ("2", 2), ("0", 0), (2.0, 2), ("4.0", 4)])
def test_parse_gpus(value, n):
    assert parse_gpus(value) == n


@pytest.mark.parametrize("value, needle", [
    ("0.5", "gpus='0.5': GPUs are requested whole, e.g. 1; to share one GPU, set gpu_memory"),
    (-1, "gpus must be a whole number like 1 (0 for none); got -1"),
    ("one", "gpus must be a whole number like 1; got 'one'"),
    (True, "gpus must be a whole number like 1; got True"),
    ("inf", "gpus must be a whole number like 1 (0 for none)"),
])
def test_parse_gpus_errors(value, needle):
    with pytest.raises(ComputeSpecError) as err:
        parse_gpus(value)
    assert needle in str(err.value)


@pytest.mark.parametrize("parse", [parse_cpus, parse_memory])
@pytest.mark.parametrize("value, needle", [
    pytest.param("9" * 60000, "(60000 characters) is not a quantity", id="long-string"),  # never a ValueError
    pytest.param(10 ** 5000, "-bit number is too large", id="huge-int"),
    pytest.param("99999999999999999999", "is too large", id="past-int64"),
])
def test_huge_quantities_are_spec_errors_that_do_not_echo_them(parse, value, needle):
    with pytest.raises(ComputeSpecError) as err:
        parse(value)
    assert needle in str(err.value) and len(str(err.value)) < 200
