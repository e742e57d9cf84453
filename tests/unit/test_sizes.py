import math

import pytest

from shared.sizes import (
    ASPECT_RATIOS,
    EXT_ASPECT_RATIOS,
    SEED_ASPECT_RATIOS,
    nearest_aspect_ratio,
    size_for_aspect_ratio,
)


def test_ratio_lists_are_the_contracts():
    assert SEED_ASPECT_RATIOS == ("1:1", "16:9", "9:16", "3:2", "21:9")
    assert EXT_ASPECT_RATIOS == ("2:3", "4:3", "3:4", "4:5", "5:4")
    assert ASPECT_RATIOS == SEED_ASPECT_RATIOS + EXT_ASPECT_RATIOS


@pytest.mark.parametrize(
    ("ratio", "size"),
    [
        ("1:1", (1024, 1024)),
        ("16:9", (1344, 768)),
        ("9:16", (768, 1344)),
        ("3:2", (1216, 832)),
        ("2:3", (832, 1216)),
        ("21:9", (1536, 640)),
        ("4:3", (1152, 896)),
        ("3:4", (896, 1152)),
    ],
)
def test_sdxl_buckets(ratio, size):
    assert size_for_aspect_ratio(ratio) == size


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
@pytest.mark.parametrize(("megapixels", "multiple"), [(1.0, 64), (0.5, 64), (2.0, 64), (1.0, 8), (0.25, 16)])
def test_every_ratio_is_close_in_shape_and_area(ratio, megapixels, multiple):
    w, h = size_for_aspect_ratio(ratio, megapixels, multiple)
    rw, rh = (int(x) for x in ratio.split(":"))
    assert w % multiple == 0 and h % multiple == 0
    assert w * h <= megapixels * 1024 * 1024
    assert w * h >= 0.8 * megapixels * 1024 * 1024
    assert abs(math.log((w / h) / (rw / rh))) < 0.06  # within ~6% of the asked shape
    assert (w > h) == (rw > rh) and (w == h) == (rw == rh)


@pytest.mark.parametrize(
    ("landscape", "portrait"), [("16:9", "9:16"), ("3:2", "2:3"), ("4:3", "3:4"), ("5:4", "4:5")]
)
def test_portrait_is_landscape_turned(landscape, portrait):
    w, h = size_for_aspect_ratio(landscape)
    assert size_for_aspect_ratio(portrait) == (h, w)


def test_finer_multiple_gets_closer_to_the_ratio():
    coarse = size_for_aspect_ratio("16:9", multiple=64)
    fine = size_for_aspect_ratio("16:9", multiple=8)
    assert abs(fine[0] / fine[1] - 16 / 9) < abs(coarse[0] / coarse[1] - 16 / 9)


def test_tiny_budget_still_gives_a_size():
    w, h = size_for_aspect_ratio("1:1", megapixels=0.001)
    assert (w, h) == (64, 64)


@pytest.mark.parametrize("bad", ["", "1:2", "16/9", "1:1 ", "abc", "0:0"])
def test_unknown_ratio_is_refused(bad):
    with pytest.raises(ValueError, match="aspect ratio"):
        size_for_aspect_ratio(bad)


@pytest.mark.parametrize(("megapixels", "multiple"), [(0, 64), (-1, 64), (float("nan"), 64), (1, 0)])
def test_bad_budget_is_refused(megapixels, multiple):
    with pytest.raises(ValueError):
        size_for_aspect_ratio("1:1", megapixels, multiple)


@pytest.mark.parametrize(
    ("width", "height", "expected"),
    [
        (1024, 1024, "1:1"),
        (1536, 1024, "3:2"),
        (1024, 1536, "2:3"),
        (1792, 1024, "16:9"),
        (512, 768, "2:3"),
        (2048, 512, "21:9"),
        (1000, 800, "5:4"),
    ],
)
def test_the_nearest_aspect_ratio_of_a_size(width: int, height: int, expected: str) -> None:
    assert nearest_aspect_ratio(width, height) == expected
