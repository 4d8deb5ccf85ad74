import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.errors import EdgeError
from edge.sizes import format_size, parse_size


@pytest.mark.parametrize("text,value", [("2GB", 2 * 10**9), ("2G", 2 * 10**9), ("1500MB", 1500 * 10**6),
                                        ("512MiB", 512 * 2**20), ("0.5GB", 5 * 10**8), ("140mb", 140 * 10**6),
                                        ("4096", 4096), ("1.5 GiB", int(1.5 * 2**30))])
def test_parse(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "2 parsecs", "-1GB", "1e9"])
def test_bad_sizes_name_the_flag(text):
    with pytest.raises(EdgeError, match="--ram"):
        parse_size(text, "--ram")


def test_format():
    assert format_size(98_362_432) == "98.4MB" and format_size(2.1e9) == "2.1GB" and format_size(12) == "12B"


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=12) | st.from_regex(r"\s*-?[0-9.e+]{0,6}\s*[kKmMgGtTiIbB]{0,3}\s*", fullmatch=True))
def test_fuzzed_sizes_parse_or_name_the_flag(text):
    """Any text: a size in bytes, or an EdgeError naming the flag; nothing else."""
    try:
        value = parse_size(text, "--ram")
    except EdgeError as exc:
        assert str(exc).startswith("--ram: cannot read") and "\n" not in str(exc)
    else:
        assert isinstance(value, int) and value >= 0


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 10**13))
def test_printed_sizes_read_back(n):
    """What edge prints (98.4MB) is what --ram reads, to the printed precision."""
    assert parse_size(format_size(n)) == pytest.approx(n, rel=0.05, abs=1)
