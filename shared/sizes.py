"""Aspect ratios of the contract and the pixel sizes that diffusion-style models want for them."""

from __future__ import annotations

import math

SEED_ASPECT_RATIOS: tuple[str, ...] = ("1:1", "16:9", "9:16", "3:2", "21:9")
EXT_ASPECT_RATIOS: tuple[str, ...] = ("2:3", "4:3", "3:4", "4:5", "5:4")
ASPECT_RATIOS: tuple[str, ...] = SEED_ASPECT_RATIOS + EXT_ASPECT_RATIOS

# "One megapixel" in the SD sense: 1024x1024, the size the SDXL family was trained at.
_MEGAPIXEL = 1024 * 1024
# A ratio error costs twice an area error: the shape is what the user asked for, the area only a
# budget. With the nearest widths per height as candidates, weights from ~0.1 to 3 all give the SDXL
# buckets at 1 MP; far above that an exact ratio wins at a much smaller area (3:2 -> 1152x768).
_RATIO_WEIGHT = 2.0


def parse_aspect_ratio(aspect_ratio: str) -> float:
    """Width / height of one of ASPECT_RATIOS; ValueError for anything else."""
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"unknown aspect ratio {aspect_ratio!r}; must be one of {', '.join(ASPECT_RATIOS)}")
    w, h = aspect_ratio.split(":")
    return int(w) / int(h)


def nearest_aspect_ratio(width: int, height: int) -> str:
    """The one of ASPECT_RATIOS closest to width:height (by log ratio: 2:1 is as far from 1:1 as 1:2)."""
    wanted = math.log(width / height)
    return min(ASPECT_RATIOS, key=lambda ratio: abs(math.log(parse_aspect_ratio(ratio)) - wanted))


def size_for_aspect_ratio(aspect_ratio: str, megapixels: float = 1.0, multiple: int = 64) -> tuple[int, int]:
    """(width, height), both multiples of `multiple`, area at most `megapixels` MP, ratio close to asked.

    1:1 -> 1024x1024, 16:9 -> 1344x768, 3:2 -> 1216x832, 21:9 -> 1536x640, 4:3 -> 1152x896
    (the SDXL training buckets). The area never exceeds the budget, so a model's memory limit holds.
    """
    ratio = parse_aspect_ratio(aspect_ratio)
    if not megapixels > 0 or not math.isfinite(megapixels):
        raise ValueError("megapixels must be a positive number")
    if multiple < 1:
        raise ValueError("multiple must be a positive integer")
    # Solve for the landscape orientation and transpose, so 9:16 is exactly 16:9 turned.
    portrait = ratio < 1
    r = 1 / ratio if portrait else ratio
    area = megapixels * _MEGAPIXEL

    best: tuple[float, int, int, int] | None = None  # (score, -area, width, height)
    max_h = max(1, int(math.sqrt(area / r) / multiple) + 1)
    for h in range(multiple, (max_h + 1) * multiple, multiple):
        for w in {
            max(multiple, math.floor(h * r / multiple) * multiple),
            math.ceil(h * r / multiple) * multiple,
        }:
            if w * h > area:
                continue
            score = _RATIO_WEIGHT * abs(math.log(w / h / r)) + abs(math.log(w * h / area))
            candidate = (score, -w * h, w, h)
            if best is None or candidate < best:
                best = candidate
    if best is None:  # budget below one multiple x multiple tile: the smallest size there is
        w, h = multiple * max(1, round(r)), multiple
    else:
        w, h = best[2], best[3]
    return (h, w) if portrait else (w, h)
