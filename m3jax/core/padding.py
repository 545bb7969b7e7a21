"""The fixed ladder of padded lengths shared by training batches and inference batches.

Every distinct padded shape is one more XLA compilation; padding to a ladder bounds them. The default ladder is the
powers of two from 32 (at most 2x padding, about 25% on average), ending at the max length itself.
"""
from __future__ import annotations

from collections.abc import Sequence


def length_buckets(max_len: int, configured: Sequence[int] = ()) -> list[int]:
    """Pad lengths for texts of at most max_len tokens: the configured ones (or 32, 64, 128, ...) below max_len,
    then max_len itself."""
    if configured:
        below = [b for b in configured if b < max_len]
    else:
        below, p = [], 32
        while p < max_len:
            below.append(p)
            p *= 2
    return sorted(set(below)) + [max_len]


def pad_length(longest: int, buckets: Sequence[int]) -> int:
    """Smallest bucket >= longest."""
    for b in buckets:
        if b >= longest:
            return b
    raise ValueError(f"a text of {longest} tokens is longer than the max length {buckets[-1]}")


def round_up(n: int, minimum: int = 8) -> int:
    """Smallest power of two or 1.5 x a power of two that is >= n (and >= minimum): sizes for arrays whose
    length varies from call to call (at most 1.5x padding, a handful of compiled shapes)."""
    size = minimum
    while True:
        if size >= n:
            return size
        if size * 3 // 2 >= n:
            return size * 3 // 2
        size *= 2
