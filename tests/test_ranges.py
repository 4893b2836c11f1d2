import pytest

from compute_block_similarity.ranges import (
    format_inclusive,
    format_layers,
    kept_ranges,
    parse_layers,
)


def test_kept_ranges_half_open():
    assert kept_ranges(30, range(12, 16)) == [(0, 12), (16, 30)]
    assert kept_ranges(6, [0, 1]) == [(2, 6)]
    assert kept_ranges(6, [5]) == [(0, 5)]
    assert kept_ranges(6, [1, 3, 4]) == [(0, 1), (2, 3), (5, 6)]
    with pytest.raises(ValueError):
        kept_ranges(6, [6])


def test_format_and_parse_round_trip():
    for layers in ([2, 3, 4, 5], [21, 22, 23, 24, 25, 26, 27, 28, 30], [0], [1, 3, 5]):
        assert parse_layers(format_inclusive(layers)) == layers
    assert format_inclusive([30, 21, 22, 23]) == "21-23,30"
    assert format_layers([30, 21, 22, 23]) == "[21, 24), [30, 31)"
    assert format_layers([]) == ""
