import pytest

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
