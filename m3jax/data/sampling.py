"""Which examples form which batch: FlagEmbedding's epoch plans and per-example draws, replayed from the seed.

    planner = EpochPlanner(seed, datasets, num_shards, same_dataset)   # datasets: data_datasets.read_datasets
    planner.epoch(e)                 # [(dataset index, global example ids of one global batch), ...] in step order
    draw_sample(seed, plan, k, ...)  # example k's positive, negatives and shuffle draws

Epoch plans (FlagEmbedding 1.4's `AbsEmbedderSameDatasetTrainDataset.refresh_epoch`, docs/flagembedding_semantics.md,
"Data"): each epoch, from one `np.random.default_rng(seed)` advanced epoch after epoch, shuffle the dataset order,
shuffle each dataset's examples (in place, so epochs compound), cut them into global batches of b*W, shuffle the
batches. A dataset's last short batch is kept when it has at least 2*W examples (research rule), trimmed to a
multiple of W; it is one more step shape (`step_shapes`). With same_dataset_within_batch=False all examples are one
pool, reshuffled each epoch, cut into batches of per_device_train_batch_size*W, the last incomplete batch dropped;
dataset_index is -1.

Per example: one random positive; G-1 negatives sampled without replacement (from the negatives repeated
ceil((G-1)/len(neg)) times when there are too few); the shuffle_ratio test and the order of the positive's three
chunks. G is train_group_size, or per dataset from its `type` / `train_group_size` column, read off the batch's
first example as FlagEmbedding does (`Corpus.group_size`).

Randomness. Epoch plans come from the one seeded generator above, so they are the same whatever the number of
processes or workers. Every per-example choice comes from `np.random.default_rng([seed, epoch, step, position in the
global batch])`, so it does not depend on which process or worker builds the batch either. The plan is random
access (step -> global batch), which is what makes the data pipeline's exact resume possible (m3jax/data/pipeline.py).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from m3jax.data.files import FileIndex, file_group_size

__all__ = ["BatchShape", "Corpus", "Dataset", "EpochPlanner", "Plan", "Sample", "Samples", "draw_sample",
           "seed_words", "step_shapes"]


class BatchShape(NamedTuple):
    """One global step shape: the train step compiles once per distinct value."""
    global_batch: int
    group_size: int
    query_len: int
    passage_len: int
    has_teacher: bool
    no_in_batch_neg: bool


@dataclasses.dataclass
class Dataset:
    """One batching unit: a file, or the merged small files of a directory (or, mixed mode, everything)."""
    name: str
    file_ids: list[int]
    start: int  # global example ids [start, stop)
    stop: int
    batch_size: int  # per device
    no_in_batch_neg: bool
    has_teacher: bool
    group_sizes: tuple[int, ...]  # every G a batch of it can have

    def __len__(self) -> int:
        return self.stop - self.start


def seed_words(seed: int) -> int:
    return seed % (1 << 63)  # SeedSequence takes non-negative ints


class EpochPlanner:
    """Epoch plans (which examples form each global batch, in which order), replayed from the seed on demand."""

    def __init__(self, seed: int, datasets: Sequence[Dataset], num_shards: int, same_dataset: bool):
        self._seed = seed_words(seed)
        self._ranges = [(d.start, d.stop) for d in datasets]
        self._global_bs = [d.batch_size * num_shards for d in datasets]
        self._w = num_shards
        self._same = same_dataset
        self._reset()

    def _reset(self) -> None:
        self._rng = np.random.default_rng(self._seed)
        self._order = np.arange(len(self._ranges))
        self._perms = [np.arange(a, b) for a, b in self._ranges]
        self._epoch = -1
        self._batches: list[tuple[int, np.ndarray]] = []

    def _advance(self) -> None:
        rng, batches = self._rng, []
        if self._same:
            # FlagEmbedding refresh_epoch: dataset order, then each dataset's examples, then the batch order, all
            # shuffled in place with one generator (so each epoch's order builds on the previous one).
            rng.shuffle(self._order)
            for d in self._order:
                perm, gbs = self._perms[d], self._global_bs[d]
                rng.shuffle(perm)
                for s in range(0, len(perm), gbs):
                    take = min(gbs, len(perm) - s)
                    if take < gbs:  # research rule: keep a short last batch of >= 2*W examples
                        if take < 2 * self._w:
                            break
                        take -= take % self._w
                    batches.append((int(d), perm[s:s + take].copy()))
            order = np.arange(len(batches))
            rng.shuffle(order)  # draws exactly as shuffling FlagEmbedding's list of batches
            batches = [batches[i] for i in order]
        else:
            perm, gbs = self._perms[0], self._global_bs[0]
            rng.shuffle(perm)
            batches = [(-1, perm[s:s + gbs].copy()) for s in range(0, len(perm) - gbs + 1, gbs)]
        self._batches = batches
        self._epoch += 1

    def epoch(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        if epoch < self._epoch:
            self._reset()
        while self._epoch < epoch:
            self._advance()
        return self._batches


@dataclasses.dataclass(eq=False, repr=False)
class Corpus:
    """Every example of the run by global id (a dataset is a contiguous id range): its file, record and counts."""
    files: list[FileIndex]
    file_of: np.ndarray  # int32 [examples]: index into files
    rec_of: np.ndarray  # int64 [examples]: record number in its file
    per_dataset_columns: bool  # same_dataset_within_batch: `type`, `train_group_size` are honoured

    def where(self, ex: int) -> tuple[int, int]:
        """(file number, record number) of example ex."""
        return int(self.file_of[ex]), int(self.rec_of[ex])

    def counts(self, ex: int) -> tuple[int, int]:
        """(positives, negatives) of example ex."""
        fi, r = self.where(ex)
        return int(self.files[fi].num_pos[r]), int(self.files[fi].num_neg[r])

    def type(self, ex: int) -> str | None:
        return self.files[self.file_of[ex]].type if self.per_dataset_columns else None

    def group_size(self, first_example: int, train_group_size: int) -> int:
        """G of a batch, read off its first example as FlagEmbedding does (data_files.file_group_size)."""
        if not self.per_dataset_columns:
            return train_group_size
        fi, r = self.where(first_example)
        f = self.files[fi]
        return file_group_size(f.type, f.group_size_column, train_group_size, int(f.num_neg[r]))

    def records(self, examples: Sequence[int]) -> list[dict]:
        """The records of these examples, in order; each file is opened once, for this call only."""
        rows: dict[int, list[tuple[int, int]]] = {}
        for k, ex in enumerate(examples):
            fi, r = self.where(ex)
            rows.setdefault(fi, []).append((k, r))
        out: list[Any] = [None] * len(examples)
        for fi, kr in rows.items():
            for (k, _), rec in zip(kr, self.files[fi].records([r for _, r in kr])):
                out[k] = rec
        return out


class Plan(NamedTuple):
    """A step's global batch: which examples, in batch order."""
    step: int
    epoch: int
    dataset_index: int  # -1: batches mixed across datasets (same_dataset_within_batch=False)
    examples: np.ndarray  # global example ids


class Sample(NamedTuple):
    """The random choices for one example of a batch."""
    example: int  # global example id
    pos: int  # the positive
    negs: np.ndarray  # the G-1 negatives, in sampled order
    shuffle_u: float  # shuffle_ratio test: the positive is reshuffled when shuffle_u < shuffle_ratio (and long)
    shuffle_perm: np.ndarray  # the order of its three chunks


class Samples(NamedTuple):
    """A planned batch with its examples' choices; every process draws the whole global batch."""
    plan: Plan
    group_size: int
    has_teacher: bool
    no_in_batch_neg: bool
    samples: list[Sample]  # the global batch; after LocalSlice, this process's slice
    pad_to: tuple[int, int] | None = None  # (query, passage) lengths every process pads to; None: own longest
    # multi-host: token lengths of the global batch's queries [B] and passages [B, G] (GlobalPadLengths)
    text_lengths: tuple[np.ndarray, np.ndarray] | None = None
    pack_to: tuple[int, int] | None = None  # multi-host packing: (row length, rows per device block); None: own


def draw_sample(seed: int, plan: Plan, position: int, num_pos: int, num_neg: int, group_size: int) -> Sample:
    """One example's choices, from `default_rng([seed, epoch, step, position])`: a positive, G-1 negatives without
    replacement (from the negatives repeated ceil((G-1)/#neg) times when there are too few), the shuffle draws."""
    rng = np.random.default_rng([seed_words(seed), plan.epoch, plan.step, position])
    pos = int(rng.integers(num_pos))
    k = group_size - 1
    if k == 0:
        negs = np.zeros(0, np.int64)
    elif num_neg < k:
        negs = rng.choice(np.tile(np.arange(num_neg), math.ceil(k / num_neg)), k, replace=False)
    else:
        negs = rng.choice(num_neg, k, replace=False)
    # Drawn whether used or not, so the stream (and the shuffle decision) never depends on text contents.
    return Sample(int(plan.examples[position]), pos, negs, float(rng.random()), rng.permutation(3))


def step_shapes(datasets: Sequence[Dataset], num_shards: int, same_dataset: bool, query_buckets: Sequence[int],
                passage_buckets: Sequence[int]) -> list[BatchShape]:
    """Every global step shape the epoch plans can give (the short last batch included), at every pad length."""
    out = set()
    for d in datasets:
        gbs = d.batch_size * num_shards
        sizes = {gbs}
        rest = len(d) % gbs
        if same_dataset and rest >= 2 * num_shards:
            sizes.add(rest - rest % num_shards)
        if len(d) < gbs:
            sizes.discard(gbs)
        for b in sizes:
            for g in d.group_sizes:
                for lq in query_buckets:
                    for lp in passage_buckets:
                        out.add(BatchShape(b, g, lq, lp, d.has_teacher, d.no_in_batch_neg))
    return sorted(out)
