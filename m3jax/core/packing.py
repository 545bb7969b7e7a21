"""Packing several texts into each fixed-length row: segment ids instead of right padding.

A padded batch computes on every pad token: texts padded to the next length of the power-of-two ladder
(m3jax.core.padding) waste about a quarter of the compute on average, far more on short texts. Packing puts texts one
after another in rows of a fixed length; each token carries its text's segment id (1, 2, ... within the row; 0 for
padding) and its position within its text (XLM-R positions: pad_token_id + 1 + index), attention is confined to
each segment (m3jax.model.attention), and the heads are read per segment (BGEM3.packed).

The plan is deterministic (the same lengths give the same rows) and compiles a bounded set of shapes:
  row length  a length of the ladder: the smallest >= max(text, base) -- short texts share rows of a base length
              chosen from the data (`base_row_length`: room for 8 texts of the mean length, at most `row_length`,
              256 by default), a longer text gets a row of its own ladder length, whose tail shorter texts fill
  rows        batch_size, then powers of two for what remains (`batch_row_counts`), a multiple of the devices
  segments    a power of two >= 4, at most row length // 4 texts per row (cuDNN's packed layout sizes its
              statistics by it)
Texts are placed longest first, each into the fullest row with room for it (best fit), else into a new row.
"""
from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from m3jax.core.padding import pad_length, round_up

ROW_LENGTH = 256  # short texts share rows of this many tokens (or the max length when it is lower)
MIN_SEGMENT_SLOTS = 4


def max_segments_per_row(row_length: int) -> int:
    """The most texts one row of this length holds."""
    return max(2, row_length // 4)


def segment_slots(count: int) -> int:
    """Per-row segment slots of a batch whose fullest row holds `count` texts: a power of two >= 4."""
    slots = MIN_SEGMENT_SLOTS
    while slots < count:
        slots *= 2
    return slots


def base_row_length(lengths: Sequence[int], ladder: Sequence[int], row_length: int = ROW_LENGTH) -> int:
    """The row length short texts share, chosen from the data: the smallest ladder length that holds 8 texts of
    the mean length (and the longest text), at most row_length (and the ladder's top). Short texts alone (queries)
    get short rows: attention over a row costs in proportion to its length."""
    lengths = np.asarray(lengths, np.int64)
    want = max(8 * float(lengths.mean()), int(lengths.max())) if len(lengths) else 0
    fits = [b for b in ladder if b >= want]
    return min(row_length, ladder[-1], fits[0] if fits else ladder[-1])


@dataclasses.dataclass
class Row:
    length: int
    texts: list[int] = dataclasses.field(default_factory=list)
    used: int = 0


def pack_rows(lengths: Sequence[int], ladder: Sequence[int], row_length: int = ROW_LENGTH) -> list[Row]:
    """Rows holding every text (by index into `lengths`), best fit, longest text first; in the order opened.

    A row's length is the smallest ladder length >= max(its first text, base_row_length(...)); it holds at most
    max_segments_per_row(length) texts."""
    if not len(lengths):
        return []
    lengths = np.asarray(lengths, np.int64)
    base = base_row_length(lengths, ladder, row_length)
    top = ladder[-1]
    order = np.argsort(-lengths, kind="stable")
    rows: list[Row] = []
    # open[f] = rows (by index) with exactly f free tokens and room for another text, in the order they reached f
    open_rows = [collections.deque() for _ in range(top + 1)]
    has = np.zeros(top + 1, bool)
    for i in order:
        n = int(lengths[i])
        free_ok = has[n:]
        if free_ok.any():
            f = n + int(np.argmax(free_ok))  # best fit: the least free space that holds the text
            r = open_rows[f].popleft()
            has[f] = bool(open_rows[f])
        else:
            r = len(rows)
            rows.append(Row(pad_length(max(n, base), ladder)))
        row = rows[r]
        row.texts.append(int(i))
        row.used += n
        free = row.length - row.used
        if free >= 2 and len(row.texts) < max_segments_per_row(row.length):  # a text has at least <s> </s>
            open_rows[free].append(r)
            has[free] = True
    return rows


@dataclasses.dataclass
class PackedBatch:
    """One batch of packed rows: input_ids, segment_ids, position_ids [R, L] and starts [R, S] (int32), and for
    each text in it (text index, row, start, length)."""

    input_ids: np.ndarray
    segment_ids: np.ndarray
    position_ids: np.ndarray
    starts: np.ndarray
    texts: list[tuple[int, int, int, int]]

    @property
    def real_tokens(self) -> int:
        return int((self.segment_ids != 0).sum())


def plan_batches(lengths: Sequence[int], batch_size: int, ladder: Sequence[int], n_dev: int = 1,
                 row_length: int = ROW_LENGTH) -> list[tuple[int, int, int, list[Row]]]:
    """The packed batches of texts with these lengths, as (rows, row length, segment slots, the rows of texts):
    rows of the same length together (longest first), in batches of `batch_row_counts` rows (filler rows are all
    padding)."""
    rows = pack_rows(lengths, ladder, row_length)
    out = []
    for length in sorted({r.length for r in rows}, reverse=True):
        same = [r for r in rows if r.length == length]
        start = 0
        for size in batch_row_counts(len(same), batch_size, n_dev):
            chunk = same[start:start + size]
            start += len(chunk)
            out.append((size, length, segment_slots(max(len(r.texts) for r in chunk)), chunk))
    return out


def batch_row_counts(n_rows: int, batch_size: int, n_dev: int = 1) -> list[int]:
    """Row counts of the batches holding n_rows rows: batch_size while more remain, then the largest powers of two
    that fit, the last (under batch_size // 16 rows) rounded up; each a multiple of n_dev. A handful of sizes;
    under batch_size // 16 filler rows per row length."""
    step = max(1, batch_size // 16)
    sizes, left = [], n_rows
    while left > 0:
        if left >= batch_size:
            size = batch_size
        elif left >= step:
            size = 1 << (left.bit_length() - 1)  # the largest power of two <= left
        else:
            size = min(batch_size, round_up(left, 1))
        size = -(-size // n_dev) * n_dev
        sizes.append(size)
        left -= size
    return sizes


def packed_batches(token_ids: Sequence[Sequence[int]], batch_size: int, ladder: Sequence[int], n_dev: int,
                   pad_id: int, row_length: int = ROW_LENGTH) -> Iterator[PackedBatch]:
    """`plan_batches` filled with the token ids: texts one after another in their rows, XLM-R positions
    restarting at pad_id + 1 in each text, padding (pad_id, segment 0, position pad_id) after the last."""
    for n_rows, length, slots, chunk in plan_batches([len(t) for t in token_ids], batch_size, ladder, n_dev,
                                                     row_length):
        batch = _empty_batch(n_rows, length, slots, pad_id)
        for r, row in enumerate(chunk):
            _fill_row(batch, r, row, token_ids, 0, pad_id)
        yield batch


def _empty_batch(n_rows: int, length: int, slots: int, pad_id: int) -> PackedBatch:
    """Rows of padding only: pad_id, segment 0, position pad_id."""
    return PackedBatch(np.full((n_rows, length), pad_id, np.int32), np.zeros((n_rows, length), np.int32),
                       np.full((n_rows, length), pad_id, np.int32), np.zeros((n_rows, slots), np.int32), [])


def _fill_row(batch: PackedBatch, r: int, row: Row, token_ids: Sequence[Sequence[int]], first: int,
              pad_id: int) -> None:
    """Row r of `batch` holds row.texts (indices into token_ids) one after another: segment ids 1, 2, ..., XLM-R
    positions restarting at pad_id + 1 in each text; each text's (first + index, row, start, length) is noted."""
    at = 0
    for s, i in enumerate(row.texts):
        toks = token_ids[i]
        n = len(toks)
        batch.input_ids[r, at:at + n] = toks
        batch.segment_ids[r, at:at + n] = s + 1
        batch.position_ids[r, at:at + n] = np.arange(pad_id + 1, pad_id + 1 + n)
        batch.starts[r, s] = at
        batch.texts.append((first + i, r, at, n))
        at += n


def ladder_computed_tokens(lengths: Sequence[int], batch_size: int, ladder: Sequence[int], n_dev: int = 1) -> int:
    """Tokens computed by today's unpacked batches (m3jax.model.inference.bucketed_batches: length-sorted, each batch
    padded to the ladder and its row count to a power of two)."""
    lengths = np.sort(np.asarray(lengths, np.int64))[::-1]
    batch_ladder = [b for b in (2 ** k for k in range(20)) if b < batch_size] + [batch_size]
    total = 0
    for start in range(0, len(lengths), batch_size):
        chunk = lengths[start:start + batch_size]
        n_rows = -(-pad_length(len(chunk), batch_ladder) // n_dev) * n_dev
        total += n_rows * pad_length(int(chunk[0]), ladder)
    return total


def packed_computed_tokens(lengths: Sequence[int], batch_size: int, ladder: Sequence[int], n_dev: int = 1,
                           row_length: int = ROW_LENGTH) -> int:
    """Tokens computed by the packed batches of `plan_batches` (filler rows included)."""
    return sum(n_rows * length for n_rows, length, _, _ in plan_batches(lengths, batch_size, ladder, n_dev,
                                                                        row_length))


# ---- training batches ---------------------------------------------------------------------------------------------
# A train step's queries and passages are packed per device block (each device encodes its own examples) into rows
# of one length for the whole batch; the step gathers each text's tokens back into the padded [N, L] layout the loss
# takes (m3jax.train.step), so the loss sees exactly the arrays of the padded step.

ROWS_PER_OCTAVE = 16  # row counts above this are m * 2^k, 16 <= m < 32: under 1/16 filler rows, few distinct counts


def row_count(n: int) -> int:
    """Rows of a packed training block that holds n rows of texts: n itself up to ROWS_PER_OCTAVE, then the
    smallest m * 2^k >= n with ROWS_PER_OCTAVE <= m < 2 * ROWS_PER_OCTAVE."""
    if n <= ROWS_PER_OCTAVE:
        return max(1, n)
    step = 1 << ((n - 1).bit_length() - ROWS_PER_OCTAVE.bit_length())
    return -(-n // step) * step


def train_row_length(longest: int, base: int, ladder: Sequence[int]) -> int:
    """The row length of a training batch: `base` (chosen from the data at start, base_row_length), or the ladder
    length of the batch's longest text when that is longer."""
    return pad_length(max(longest, base), ladder)


def train_pack_shape(block_lengths: Sequence[Sequence[int]], base: int, ladder: Sequence[int]) -> tuple[int, int]:
    """(row length, rows per block) of a training batch whose device blocks hold texts of these token lengths:
    train_row_length of its longest text, and row_count of the fullest block's rows (pack_rows). What pack_blocks
    takes for the blocks themselves; from the lengths alone, so that every process of a multi-host job computes the
    global batch's shape while packing only its own blocks (m3jax.data.pipeline.GlobalPackShape)."""
    longest = max((int(n) for lengths in block_lengths for n in lengths), default=0)
    row_length = train_row_length(longest, base, ladder)
    return row_length, row_count(max(len(pack_rows(lengths, [row_length], row_length)) for lengths in block_lengths))


def pack_blocks(blocks: Sequence[Sequence[Sequence[int]]], row_length: int, pad_id: int,
                n_rows: int | None = None) -> PackedBatch:
    """Texts of each device block (token ids) packed into that block's rows, every row `row_length` long: blocks
    get the same row count (`n_rows`, by default row_count of the fullest block's; a multi-host job passes the
    global batch's, train_pack_shape) and segment slots (as many as a row of that length can hold,
    max_segments_per_row, as a power of two: one slot count per row length), so together they are one
    [blocks * rows, row_length] array whose k-th block of rows holds block k's texts. `texts` gives, for each text
    (numbered through the blocks in order), its (index, row over all blocks, start, length)."""
    plans = [pack_rows([len(t) for t in texts], [row_length], row_length) for texts in blocks]
    fullest = max(len(rows) for rows in plans)
    if n_rows is None:
        n_rows = row_count(fullest)
    elif fullest > n_rows:
        raise ValueError(f"a device block needs {fullest} rows of {row_length} tokens, more than the {n_rows} planned "
                         "for the global batch: the token-length cache is stale (delete it) or the tokenizer differs "
                         "between processes")
    slots = segment_slots(max_segments_per_row(row_length))  # a function of the row length: one shape fewer
    total = n_rows * len(blocks)
    batch, first = _empty_batch(total, row_length, slots, pad_id), 0
    for b, (block, rows) in enumerate(zip(blocks, plans)):
        for r, row in enumerate(rows):
            _fill_row(batch, b * n_rows + r, row, block, first, pad_id)
        first += len(block)
    batch.texts.sort()
    return batch


def gather_index(texts: Sequence[tuple[int, int, int, int]], n_rows: int, row_length: int, width: int) -> np.ndarray:
    """[len(texts), width] int32: for each text (index, row, start, length) of a `pack_blocks` batch with n_rows
    rows per block, the block-local flat position (row within the block * row_length + column) of each of its
    tokens, -1 past its length (the padded layout's padding)."""
    out = np.full((len(texts), width), -1, np.int32)
    for k, (_, row, start, n) in enumerate(texts):
        base = (row % n_rows) * row_length + start
        out[k, :n] = np.arange(base, base + n)
    return out
