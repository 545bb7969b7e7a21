"""Training data pipeline: FlagEmbedding's BGE-M3 data semantics on grain, with bounded step shapes and exact resume.

    data = build_train_data(config, tokenizer, num_batch_shards=W, process_index=p, process_count=P)
    data.steps_per_epoch, data.shapes()          # global batches per epoch; every step shape that can occur
    it = data.iterator(start_step)               # grain DatasetIterator of local batches; get_state()/set_state()

What a step is: FlagEmbedding 1.4's `AbsEmbedderSameDatasetTrainDataset` and its research trainer
(`research/BGE_M3/data.py`), in our words (docs/flagembedding_semantics.md, "Data"):
- every train_data path is a directory, each .json/.jsonl file in it one dataset (taken in sorted order), or a
  .json/.jsonl file, one dataset (FlagEmbedding 1.4.2: such a file is never merged with others: below
  small_threshold it is skipped; `no_in_batch_neg` at the end of its name without the extension marks it). See
  m3jax/data_files.py for the record format and validation.
- same_dataset_within_batch (default): each batch comes from one dataset. Per-device batch size b: the file's
  `batch_size` column, else its `len-LO-HI` tag looked up in config.batch_size_by_length (None: the research table
  for train_group_size 8 or 1), else per_device_train_batch_size; `type` containing "symmetric" halves it. Files
  smaller than small_threshold are merged per directory (batch size: the smallest of theirs); a merged set smaller
  than drop_threshold is dropped. A directory whose name ends in `no_in_batch_neg` marks its datasets.
  Each epoch, from one `np.random.default_rng(seed)` advanced epoch after epoch exactly as FlagEmbedding's
  `refresh_epoch` does: shuffle the dataset order, shuffle each dataset's examples (in place, so epochs compound),
  cut them into global batches of b*W, shuffle the batches. A dataset's last short batch is kept when it has at
  least 2*W examples (research rule), trimmed to a multiple of W; it is one more step shape.
- same_dataset_within_batch=False: all datasets pooled and reshuffled each epoch, batches of
  per_device_train_batch_size*W mixed across datasets, the last incomplete batch dropped; per-dataset columns other
  than `prompt` are ignored (FlagEmbedding's non-same-dataset path); dataset_index is -1.
- per example: one random positive; G-1 negatives sampled without replacement (from the negatives repeated
  ceil((G-1)/len(neg)) times when there are too few); with knowledge_distillation and teacher scores, negatives are
  sorted by teacher score, descending (research trainer; FlagEmbedding 1.4 does not sort). G is
  train_group_size, or per dataset from its `type` / `train_group_size` column (read off the batch's first example,
  as FlagEmbedding does). shuffle_ratio: a positive longer than 100 characters is cut into three chunks that are
  shuffled and joined with spaces, with that probability. Instructions: the example's `prompt` or
  query_instruction_for_retrieval formats the query; passage_instruction_for_retrieval the passages
  (symmetric_sts / symmetric_clustering data take the query instruction instead).
- max_example_num_per_dataset subsamples each file when it is read (FlagEmbedding 1.4 order: before the
  small_threshold test), with a generator seeded by (seed, file number).

Randomness. Epoch plans come from the one seeded generator above, so they are the same whatever the number of
processes or workers. Every per-example choice (positive, negatives, shuffle) comes from
`np.random.default_rng([seed, epoch, step, position in the global batch])`, so it does not depend on which process
or worker builds the batch either. The plan is random access (step -> global batch): the grain dataset is a
`MapDataset` over step numbers, and the iterator state is just the next step. Restoring a state therefore gives
exactly the batches of the uninterrupted run, even with a different num_data_workers.

Padding. Query and passage tensors are padded to the smallest `seq_len_buckets` entry (default: 32, 64, 128, ...,
m3jax/padding.py) that holds the longest text of the GLOBAL batch, capped at query_max_len / passage_max_len, so
the number of compiled step shapes is bounded; `shapes()` lists them all and build_train_data logs them.
All processes of a multi-host job must agree on those lengths while each tokenises only its own slice:
- process_count == 1: the process tokenises the whole global batch, so its longest text is the global one.
- process_count > 1: lengths come from a per-text token-length table computed once at start-up in worker
  processes and cached on disk (m3jax.data_files.token_length_table; key: file path, size, mtime, tokenizer hash,
  max lengths, instructions). A positive that shuffle_ratio reshuffles is the one text the table cannot know; every
  process re-reads and tokenises those few texts of the global batch (all of them: shuffling is decided from the
  shared per-example generator), so the lengths are exact, not a conservative max_len, and the padded batch is the
  same as with one process.

Output, per process (n = b*W/process_count queries, its contiguous slice of the global batch): query_input_ids /
query_attention_mask int32 [n, Lq]; passage_input_ids / passage_attention_mask int32 [n*G, Lp] (query i's
passages at rows i*G..i*G+G-1, positive first); teacher_scores float32 [n, G] (raw scores, zeros when absent);
has_teacher_scores, no_in_batch_neg (np.bool_); epoch, dataset_index (np.int32). Tokenisation is FlagEmbedding's
collator: `tokenizer(texts, truncation=True, max_length=...)` (through the tokenizer's Rust backend), right padding
with pad_token_id and attention mask 0.

Stages. The pipeline is a grain `MapDataset` of step numbers mapped through small named transforms, each one
picklable and testable alone:
    step --PlanStep--> Plan: epoch, dataset index, the global batch's example ids
         --DrawSamples--> Samples: G and every example's choices (positive, negatives, shuffle draws)
         --GlobalPadLengths--> the pad lengths all processes agree on (only when process_count > 1)
         --LocalSlice--> this process's slice of the examples
         --ReadTexts--> Texts: queries, passages and teacher scores, as strings and floats
         --TokenizeAndPad--> (step, the local batch of arrays below)

Workers: num_data_workers grain processes (0: a thread of the main process) run the whole chain for a step,
tokenisation included (one tokenizer thread per worker when there are several); they re-read records by byte offset
(data_files.FileIndex) instead of receiving the texts. Files are validated at start-up, in worker processes too when
there are many megabytes of them. Measured throughput: benchmarks/data_pipeline.py.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from absl import flags as absl_flags

from m3jax import storage
from m3jax.config import RESEARCH_BATCH_SIZE_BY_LENGTH, train_data_dirs
from m3jax.data_files import (
    CHARS_PER_TOKEN,
    DataError,
    FileIndex,
    FileLengths,
    Instructions,
    ScanRules,
    cut_is_exact,
    encode_truncated,
    file_group_size,
    list_dataset_files,
    make_backend_tokenizer,
    passage_text,
    query_text,
    scan_files,
    token_length_table,
)
from m3jax.padding import length_buckets, pad_length

__all__ = ["DataError", "BatchShape", "DatasetInfo", "TrainData", "TrainIterator", "build_train_data", "length_buckets"]

logger = logging.getLogger(__name__)

_LEN_TAG = re.compile(r"len-(\d+)-(\d+|inf)\.jsonl?$")
_ENDLESS_EPOCHS = 1_000_000  # the iterator runs epoch after epoch; the train loop decides when to stop


class BatchShape(NamedTuple):
    """One global step shape: the train step compiles once per distinct value."""
    global_batch: int
    group_size: int
    query_len: int
    passage_len: int
    has_teacher: bool
    no_in_batch_neg: bool


@dataclasses.dataclass
class _Dataset:
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


@dataclasses.dataclass(frozen=True)
class _Settings:
    """The config fields a worker needs (a plain picklable copy)."""
    seed: int
    train_group_size: int
    query_max_len: int
    passage_max_len: int
    query_buckets: tuple[int, ...]
    passage_buckets: tuple[int, ...]
    shuffle_ratio: float
    knowledge_distillation: bool
    same_dataset: bool
    instructions: Instructions


def _seed_words(seed: int) -> int:
    return seed % (1 << 63)  # SeedSequence takes non-negative ints


class _Planner:
    """Epoch plans (which examples form each global batch, in which order), replayed from the seed on demand."""

    def __init__(self, seed: int, datasets: Sequence[_Dataset], num_shards: int, same_dataset: bool):
        self._seed = _seed_words(seed)
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


# ---- the pipeline: step -> Plan -> Samples -> Texts -> padded arrays ------------------------------------------------
#
# Each stage is a grain Map transform with one job; TrainData chains them on a grain MapDataset of step numbers.
# A stage holds read-only inputs (shared by every copy) and a `_cache` of what it builds on first use (the epoch
# plans, tokenizers): the cache is not pickled to grain workers and each `fresh()` copy starts its own, so two
# consumers (an iterator's thread, TrainData.batch) never share mutable state.

_stage = functools.partial(dataclasses.dataclass, eq=False, repr=False)  # grain names a stage by its class


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


class Texts(NamedTuple):
    """This process's slice as strings: instructions applied, negatives in final order."""
    batch: Samples
    queries: list[str]
    passages: list[str]  # G per query, positive first
    teacher_scores: np.ndarray  # float32 [n, G]; zeros without teacher scores


@_stage
class _Stage(grain.transforms.Map):
    """One named stage of the pipeline (see the comment above)."""
    _cache: dict[str, Any] = dataclasses.field(default_factory=dict, init=False, repr=False)

    def cached(self, key: str, build):
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def __getstate__(self):  # pickling (grain workers) and copy.copy (fresh) leave the cache behind
        return {**self.__dict__, "_cache": {}}

    def fresh(self):
        """A copy with its own cache (inputs shared), for one more consumer."""
        return copy.copy(self)

    def tokenizer(self, tokenizer_json: str, max_len: int):
        return self.cached(f"tokenizer {max_len}", lambda: make_backend_tokenizer(tokenizer_json, max_len))


@_stage
class PlanStep(_Stage):
    """step -> Plan: epoch plans (FlagEmbedding's refresh_epoch, _Planner) replayed from the seed on demand."""
    seed: int
    datasets: list[_Dataset]
    num_shards: int
    same_dataset: bool
    steps_per_epoch: int = dataclasses.field(init=False)

    def __post_init__(self):
        self.steps_per_epoch = len(self.planner().epoch(0))

    def planner(self) -> _Planner:
        return self.cached("planner", lambda: _Planner(self.seed, self.datasets, self.num_shards, self.same_dataset))

    def map(self, step: int) -> Plan:
        step = int(step)
        epoch, i = divmod(step, self.steps_per_epoch)
        d, examples = self.planner().epoch(epoch)[i]
        return Plan(step, epoch, d, examples)


def draw_sample(seed: int, plan: Plan, position: int, num_pos: int, num_neg: int, group_size: int) -> Sample:
    """One example's choices, from `default_rng([seed, epoch, step, position])`: a positive, G-1 negatives without
    replacement (from the negatives repeated ceil((G-1)/#neg) times when there are too few), the shuffle draws."""
    rng = np.random.default_rng([_seed_words(seed), plan.epoch, plan.step, position])
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


@_stage
class DrawSamples(_Stage):
    """Plan -> Samples: G from the batch's first example, then draw_sample for each example of the global batch."""
    seed: int
    train_group_size: int
    corpus: Corpus
    datasets: list[_Dataset]

    def map(self, plan: Plan) -> Samples:
        g = self.corpus.group_size(int(plan.examples[0]), self.train_group_size)
        d = self.datasets[max(plan.dataset_index, 0)]
        samples = [draw_sample(self.seed, plan, k, *self.corpus.counts(ex), g) for k, ex in enumerate(plan.examples)]
        return Samples(plan, g, d.has_teacher, d.no_in_batch_neg, samples)


def _shuffle_text(text: str, perm: np.ndarray) -> str:
    """FlagEmbedding `_shuffle_text`: three chunks of len//3+1 characters, reordered, joined with spaces."""
    size = len(text) // 3 + 1
    chunks = [text[i:i + size] for i in range(0, len(text), size)]
    assert len(chunks) == 3, len(chunks)  # always 3 for the > 100 characters texts it is applied to
    return " ".join(chunks[j] for j in perm)


def _positive(sample: Sample, rec: dict, shuffle_ratio: float) -> str:
    """The sampled positive, its chunks shuffled when it is over 100 characters and shuffle_u < shuffle_ratio."""
    text = rec["pos"][sample.pos]
    if shuffle_ratio > 0 and len(text) > 100 and sample.shuffle_u < shuffle_ratio:
        return _shuffle_text(text, sample.shuffle_perm)
    return text


def _first_index(counts: np.ndarray) -> np.ndarray:
    """Where each record's entries start in a flat per-file array of `counts` entries per record."""
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


@_stage
class GlobalPadLengths(_Stage):
    """Samples -> Samples with pad_to (multi-host): the global batch's pad lengths, from the token-length table.

    A reshuffled positive is the one text the table cannot know: it is read and tokenised here (in every process,
    since the shuffle decision comes from the shared draws), so the lengths are exact.
    """

    s: _Settings
    corpus: Corpus
    lengths: list[FileLengths]  # per file: token length of every query, positive and negative
    tokenizer_json: str
    # per file: where each record's entries start in its lengths.pos and lengths.neg
    first: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(init=False)

    def __post_init__(self):
        self.first = [(_first_index(f.num_pos), _first_index(f.num_neg)) for f in self.corpus.files]

    def map(self, batch: Samples) -> Samples:
        ratio = self.s.shuffle_ratio
        reshuffled = [smp for smp in batch.samples if ratio > 0 and smp.shuffle_u < ratio]
        reshuffled_len = {}
        tokenizer = self.tokenizer(self.tokenizer_json, self.s.passage_max_len)
        for smp, rec in zip(reshuffled, self.corpus.records([smp.example for smp in reshuffled])):
            text = passage_text(_positive(smp, rec, ratio), rec, self.corpus.type(smp.example), self.s.instructions)
            reshuffled_len[smp.example] = len(tokenizer.encode(text).ids)
        lq = lp = 0
        for smp in batch.samples:
            fi, r = self.corpus.where(smp.example)
            table, (first_pos, first_neg) = self.lengths[fi], self.first[fi]
            lq = max(lq, int(table.query[r]))
            if len(smp.negs):
                lp = max(lp, int(table.neg[first_neg[r] + smp.negs].max()))
            lp = max(lp, reshuffled_len.get(smp.example, int(table.pos[first_pos[r] + smp.pos])))
        return batch._replace(pad_to=(pad_length(lq, self.s.query_buckets), pad_length(lp, self.s.passage_buckets)))


@_stage
class LocalSlice(_Stage):
    """Samples -> Samples: this process's contiguous slice [p*n, (p+1)*n) of the global batch."""
    process_index: int
    process_count: int

    def map(self, batch: Samples) -> Samples:
        n = len(batch.samples) // self.process_count
        return batch._replace(samples=batch.samples[self.process_index * n:(self.process_index + 1) * n])


@_stage
class ReadTexts(_Stage):
    """Samples -> Texts: read the records apply the shuffle, the KD negative order and instructions."""
    s: _Settings
    corpus: Corpus

    def map(self, batch: Samples) -> Texts:
        ins = self.s.instructions
        queries, passages, scores = [], [], []
        for smp, rec in zip(batch.samples, self.corpus.records([smp.example for smp in batch.samples])):
            negs = [int(j) for j in smp.negs]
            if batch.has_teacher:  # research trainer: negatives by teacher score, descending (stable: ties keep order)
                negs = sorted(negs, key=lambda j: rec["neg_scores"][j], reverse=True)
                scores.append([rec["pos_scores"][smp.pos]] + [rec["neg_scores"][j] for j in negs])
            queries.append(query_text(rec, ins))
            texts = [_positive(smp, rec, self.s.shuffle_ratio)] + [rec["neg"][j] for j in negs]
            passages.extend(passage_text(t, rec, self.corpus.type(smp.example), ins) for t in texts)
        shape = (len(queries), batch.group_size)
        teacher = np.asarray(scores, np.float32).reshape(shape) if batch.has_teacher else np.zeros(shape, np.float32)
        return Texts(batch, queries, passages, teacher)


@_stage
class TokenizeAndPad(_Stage):
    """Texts -> (step, local batch): FlagEmbedding's collator, `tokenizer(texts, truncation=True, max_length=...)`
    through the Rust backend, right-padded with pad_token_id (mask 0) to pad_to, else to the bucket of the longest."""
    s: _Settings
    tokenizer_json: str
    pad_id: int

    def encode(self, texts: list[str], max_len: int, buckets: tuple[int, ...], pad_to: int | None):
        """Token ids and attention mask [len(texts), pad_to] (pad_to None: the longest text's bucket). A text
        longer than CHARS_PER_TOKEN * max_len characters is cut first where that gives the same tokens
        (data_files.encode_truncated)."""
        exact = self.cached("cut_is_exact", lambda: cut_is_exact(self.tokenizer_json))
        encs = encode_truncated(self.tokenizer(self.tokenizer_json, max_len), texts, max_len,
                                CHARS_PER_TOKEN * max_len if exact else None)
        lens = [len(e.ids) for e in encs]
        if pad_to is None:
            pad_to = pad_length(max(lens), buckets)
        ids = np.full((len(texts), pad_to), self.pad_id, np.int32)
        mask = np.zeros((len(texts), pad_to), np.int32)
        for i, (e, n) in enumerate(zip(encs, lens)):
            if n > pad_to:
                raise RuntimeError(f"text of {n} tokens in a batch padded to {pad_to}: the token-length cache is "
                                   "stale (delete it) or the tokenizer differs between processes")
            ids[i, :n] = e.ids
            mask[i, :n] = 1
        return ids, mask

    def map(self, texts: Texts) -> tuple[int, dict[str, np.ndarray]]:
        b, s = texts.batch, self.s
        lq, lp = b.pad_to or (None, None)
        q_ids, q_mask = self.encode(texts.queries, s.query_max_len, s.query_buckets, lq)
        p_ids, p_mask = self.encode(texts.passages, s.passage_max_len, s.passage_buckets, lp)
        return b.plan.step, {
            "query_input_ids": q_ids, "query_attention_mask": q_mask,
            "passage_input_ids": p_ids, "passage_attention_mask": p_mask,
            "teacher_scores": texts.teacher_scores,
            "has_teacher_scores": np.bool_(b.has_teacher), "no_in_batch_neg": np.bool_(b.no_in_batch_neg),
            "epoch": np.int32(b.plan.epoch), "dataset_index": np.int32(b.plan.dataset_index),
        }


class _Pipeline:
    """The stages of one consumer, in order: PlanStep, DrawSamples, [GlobalPadLengths], LocalSlice, ReadTexts,
    TokenizeAndPad."""

    def __init__(self, stages: list[_Stage]):
        assert isinstance(stages[0], PlanStep)
        self.stages = stages
        self.plan: PlanStep = stages[0]

    def fresh(self) -> _Pipeline:
        return _Pipeline([stage.fresh() for stage in self.stages])

    def dataset(self, start: int, stop: int) -> grain.MapDataset:
        """step -> (step, local batch) for the steps [start, stop)."""
        ds = grain.MapDataset.range(start, stop)
        for stage in self.stages:
            ds = ds.map(stage)
        return ds

    def __call__(self, step: int) -> tuple[int, dict[str, np.ndarray]]:
        element: Any = step
        for stage in self.stages:
            element = stage.map(element)
        return element


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index
    if worker_count > 1:  # parallelism comes from the workers: one tokenizer thread each, no oversubscription
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class TrainIterator(grain.DatasetIterator):
    """Local batches from a start step on, epoch after epoch (the train loop stops it).

    The state is the next step number: `get_state()` -> {"step", "steps_per_epoch", "seed"}; `set_state` restarts the
    grain pipeline there. Works with grain's orbax handler (grain.checkpoint.CheckpointSave / CheckpointRestore).
    """

    def __init__(self, pipeline: _Pipeline, start_step: int, num_workers: int, prefetch: int):
        super().__init__()
        self._pipeline = pipeline
        self._step = int(start_step)
        self._num_workers = num_workers
        self._prefetch = max(1, prefetch)
        self._inner = None

    def _start(self) -> None:
        if self._num_workers > 0 and not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()  # grain's worker start reads absl flags; outside an absl app, defaults
        ds = self._pipeline.dataset(self._step, self._step + self._pipeline.plan.steps_per_epoch * _ENDLESS_EPOCHS)
        if self._num_workers > 0:
            ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=1))
            ids = ids.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._num_workers, per_worker_buffer_size=self._prefetch), worker_init_fn=_worker_init)
        else:
            ids = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=self._prefetch))
        self._inner = iter(ids)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        if self._inner is None:
            self._start()
        step, batch = next(self._inner)
        if step != self._step:  # grain keeps order; this guards the resume guarantee
            raise RuntimeError(f"data pipeline returned step {step}, expected {self._step}")
        self._step += 1
        return batch

    def get_state(self) -> dict[str, Any]:
        return {"step": self._step, "steps_per_epoch": self._pipeline.plan.steps_per_epoch,
                "seed": self._pipeline.plan.seed}

    def set_state(self, state: dict[str, Any]) -> None:
        for key in ("steps_per_epoch", "seed"):
            if key in state and int(state[key]) != self.get_state()[key]:
                raise ValueError(f"data iterator state has {key}={state[key]} but this run's data has "
                                 f"{self.get_state()[key]}: the training data or seed changed, so the saved position "
                                 "cannot be resumed exactly")
        self._close_inner()
        self._step = int(state["step"])

    def start_prefetch(self) -> None:
        if self._inner is None:
            self._start()
        self._inner.start_prefetch()

    def _close_inner(self) -> None:
        if self._inner is not None:
            self._inner.close()
            self._inner = None

    def close(self) -> None:
        self._close_inner()
        super().close()

    def __str__(self) -> str:
        return f"m3jax.TrainIterator(step={self._step}, workers={self._num_workers})"


class DatasetInfo(NamedTuple):
    name: str
    num_examples: int
    batch_size: int  # per device
    group_sizes: tuple[int, ...]
    has_teacher: bool
    no_in_batch_neg: bool


class TrainData:
    """What build_train_data returns: the step count, the step shapes and iterators over local batches."""

    def __init__(self, pipeline: _Pipeline, shapes: list[BatchShape], num_workers: int, prefetch: int,
                 bad_example_counts: dict[str, int]):
        self._pipeline = pipeline
        self._shapes = shapes
        self._num_workers = num_workers
        self._prefetch = prefetch
        self.steps_per_epoch: int = pipeline.plan.steps_per_epoch
        self.bad_example_counts = bad_example_counts  # file -> examples skipped (skip_bad_examples)
        self.datasets = [DatasetInfo(d.name, len(d), d.batch_size, d.group_sizes, d.has_teacher, d.no_in_batch_neg)
                         for d in pipeline.plan.datasets]  # in dataset_index order
        self._direct: _Pipeline | None = None

    def shapes(self) -> list[BatchShape]:
        return list(self._shapes)

    def iterator(self, start_step: int = 0) -> TrainIterator:
        return TrainIterator(self._pipeline.fresh(), start_step, self._num_workers, self._prefetch)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The local batch of one step, built in this process (for tests and inspection)."""
        if self._direct is None:
            self._direct = self._pipeline.fresh()
        return self._direct(step)[1]


# ---- building -----------------------------------------------------------------------------------------------------

def _file_batch_size(f: FileIndex, config, default: int) -> int:
    """FlagEmbedding: `batch_size` column, else the length tag's size (research), halved for symmetric types."""
    if f.batch_size is not None:
        return f.batch_size
    size = default
    m = _LEN_TAG.search(os.path.basename(f.path))
    if m:
        table = config.batch_size_by_length
        table = dict(table) if table is not None else RESEARCH_BATCH_SIZE_BY_LENGTH.get(config.train_group_size, {})
        size = table.get(f"{m.group(1)}-{m.group(2)}", default)
    if f.type is not None and "symmetric" in f.type:
        size //= 2
    if size < 1:
        raise DataError(f"{f.path}: per-device batch size {size} (type {f.type!r} halves {default}); expected >= 1 - "
                        "give the file a 'batch_size' column or raise per_device_train_batch_size")
    return size


def _group_sizes(files: list[FileIndex], g: int, same_dataset: bool) -> tuple[int, ...]:
    if not same_dataset:
        return (g,)
    out = set()
    for f in files:
        if f.type == "symmetric_class":
            out.update(int(x) for x in np.unique(np.minimum(f.num_neg + 1, g)))
        else:
            out.add(file_group_size(f.type, f.group_size_column, g, 0))
    return tuple(sorted(out))


def _settings(config) -> _Settings:
    return _Settings(
        seed=int(config.seed), train_group_size=int(config.train_group_size),
        query_max_len=int(config.query_max_len), passage_max_len=int(config.passage_max_len),
        query_buckets=tuple(length_buckets(config.query_max_len, tuple(config.seq_len_buckets))),
        passage_buckets=tuple(length_buckets(config.passage_max_len, tuple(config.seq_len_buckets))),
        shuffle_ratio=float(config.shuffle_ratio), knowledge_distillation=bool(config.knowledge_distillation),
        same_dataset=bool(config.same_dataset_within_batch),
        instructions=Instructions(config.query_instruction_for_retrieval, config.query_instruction_format,
                                  config.passage_instruction_for_retrieval, config.passage_instruction_format))


def _staged_train_dir(url: str) -> str:
    """A train_data URL (gs://bucket/data/task_a, or a .json/.jsonl file): its .json/.jsonl files copied to the
    local cache once per host, since records are re-read by byte offset. The local copy keeps the URL's base name
    (`no_in_batch_neg`)."""
    if not storage.isdir(url):
        if storage.exists(url) and url.endswith((".json", ".jsonl")):
            return storage.stage(url, what="train_data")
        what = "is a file but not .json/.jsonl" if storage.exists(url) else "does not exist"
        raise DataError(f"train_data path {url!r} {what}; expected a directory of .json/.jsonl files or a "
                        ".json/.jsonl file")
    return storage.stage(url, what="train_data", keep=lambda rel: "/" not in rel and rel.endswith((".json", ".jsonl")))


def _no_in_batch_neg(path: str) -> bool:
    """FlagEmbedding: a directory whose name ends in `no_in_batch_neg`, or a file whose name does before its
    extension (`data_dir.split('.')[-2].endswith('no_in_batch_neg')`)."""
    if os.path.isdir(path):
        return os.path.basename(path).endswith("no_in_batch_neg")
    return os.path.splitext(path)[0].endswith("no_in_batch_neg")


def _read_datasets(config, s: _Settings, cut: bool = False) -> tuple[Corpus, list[_Dataset], dict[str, int]]:
    """Scan every file and form the datasets (FlagEmbedding's thresholds and batch sizes)."""
    dirs = train_data_dirs(config)
    if not dirs:
        raise DataError("config.train_data is empty; expected one or more directories of .json/.jsonl files "
                        "or .json/.jsonl files (comma-separated)")
    dirs = [_staged_train_dir(d) if storage.is_url(d) else d for d in dirs]
    long_chars = (CHARS_PER_TOKEN * s.query_max_len, CHARS_PER_TOKEN * s.passage_max_len)
    rules = ScanRules(s.train_group_size, s.knowledge_distillation, s.same_dataset, bool(config.skip_bad_examples),
                      long_text_chars=long_chars)
    paths = [(os.path.normpath(d), p) for d in dirs for p in list_dataset_files(os.path.normpath(d))]
    logger.info("reading %d file(s): %s", len(paths), ", ".join(p for _, p in paths))
    scanned = scan_files([p for _, p in paths], rules, int(config.num_data_workers))
    files: list[FileIndex] = []
    groups: dict[str, tuple[list[int], list[int]]] = {os.path.normpath(d): ([], []) for d in dirs}
    dropped: list[str] = []
    max_n = int(config.max_example_num_per_dataset)
    for file_number, ((directory, path), f) in enumerate(zip(paths, scanned)):
        if len(f) > max_n:
            rng = np.random.default_rng([_seed_words(s.seed), file_number])
            f = f.subset(np.sort(rng.choice(len(f), max_n, replace=False)))
        if len(f) == 0:
            logger.warning("%s: no examples, skipped", path)
            dropped.append(f"{path} (no valid examples)")
            continue
        if s.knowledge_distillation and not f.has_scores:
            if not s.same_dataset:
                raise DataError(f"{path}: no 'pos_scores'/'neg_scores'; expected teacher scores on every example "
                                "of every file with knowledge_distillation=True and same_dataset_within_batch="
                                "False (FlagEmbedding's rule)")
            logger.warning("%s has no teacher scores: its batches train without knowledge distillation", path)
        files.append(f)
        big, small = groups[directory]
        (small if s.same_dataset and len(f) < config.small_threshold else big).append(len(files) - 1)
    bad_counts = {f.path: f.bad_count for f in files if f.bad_count}
    long_q, long_p = (sum(f.long_texts[k] for f in files) for k in (0, 1))
    if long_q or long_p:
        logger.info("%d queries longer than %d characters and %d passages longer than %d in the training files (%d "
                    "characters per token x max length): %s", long_q, long_chars[0], long_p, long_chars[1],
                    CHARS_PER_TOKEN,
                    "each is cut at a space before tokenisation where that keeps exactly its first max length tokens, "
                    "else tokenised whole" if cut else "tokenised whole and then truncated (this tokenizer's "
                    "pipeline is not one the cut is proven exact for)")

    datasets: list[_Dataset] = []
    order: list[int] = []  # file ids in global example order

    def add(name, file_ids, batch_size, nibn):
        start = sum(len(files[i]) for i in order)
        order.extend(file_ids)
        fs = [files[i] for i in file_ids]
        datasets.append(_Dataset(
            name=name, file_ids=list(file_ids), start=start, stop=start + sum(len(f) for f in fs),
            batch_size=batch_size, no_in_batch_neg=nibn,
            has_teacher=s.knowledge_distillation and all(f.has_scores for f in fs),
            group_sizes=_group_sizes(fs, s.train_group_size, s.same_dataset)))

    if s.same_dataset:
        for directory, (big, small) in groups.items():
            nibn = _no_in_batch_neg(directory)
            for i in big:
                add(files[i].path, [i], _file_batch_size(files[i], config, config.per_device_train_batch_size), nibn)
            if small and not os.path.isdir(directory):  # FlagEmbedding: a file path below small_threshold is skipped
                dropped.append(f"{directory} with {len(files[small[0]])} examples (a train_data file below "
                               f"small_threshold {config.small_threshold} is skipped, as in FlagEmbedding)")
                logger.warning("dropping %s", dropped[-1])
                continue
            if small:
                fs = [files[i] for i in small]
                total = sum(len(f) for f in fs)
                if total < config.drop_threshold:
                    dropped.append(f"{len(fs)} small file(s) of {directory} with {total} examples (< drop_threshold "
                                   f"{config.drop_threshold})")
                    logger.warning("dropping %s", dropped[-1])
                    continue
                for attr in ("type", "has_scores"):
                    if len({getattr(f, attr) for f in fs}) > 1:
                        raise DataError(
                            f"{directory}: the files below small_threshold ({config.small_threshold}) are merged into "
                            f"one dataset but differ in {attr}: " + ", ".join(f"{f.path}={getattr(f, attr)!r}"
                                                                             for f in fs)
                            + "; expected one value (FlagEmbedding cannot concatenate them either)")
                bs = min(_file_batch_size(f, config, config.per_device_train_batch_size) for f in fs)
                add(f"{directory} (merged small files: {', '.join(os.path.basename(f.path) for f in fs)})",
                    small, bs, nibn)
    elif files:
        add(",".join(os.path.normpath(d) for d in dirs), list(range(len(files))),
            int(config.per_device_train_batch_size), False)
    if not datasets:
        raise DataError("no training examples in " + ", ".join(dirs) + (": dropped " + "; ".join(dropped)
                                                                        if dropped else ""))
    file_of = np.concatenate([np.full(len(files[i]), i, np.int32) for i in order])
    rec_of = np.concatenate([np.arange(len(files[i]), dtype=np.int64) for i in order])
    return Corpus(files, file_of, rec_of, s.same_dataset), datasets, bad_counts


def _shapes(datasets: Sequence[_Dataset], s: _Settings, num_shards: int) -> list[BatchShape]:
    out = set()
    for d in datasets:
        gbs = d.batch_size * num_shards
        sizes = {gbs}
        rest = len(d) % gbs
        if s.same_dataset and rest >= 2 * num_shards:
            sizes.add(rest - rest % num_shards)
        if len(d) < gbs:
            sizes.discard(gbs)
        for b in sizes:
            for g in d.group_sizes:
                for lq in s.query_buckets:
                    for lp in s.passage_buckets:
                        out.add(BatchShape(b, g, lq, lp, d.has_teacher, d.no_in_batch_neg))
    return sorted(out)


def build_train_data(config, tokenizer, *, num_batch_shards: int, process_index: int = 0,
                     process_count: int = 1) -> TrainData:
    """Read and validate config.train_data and plan its batches (see the module docstring).

    num_batch_shards: devices the batch axis is split over (W); a dataset of per-device batch size b gives global
    batches of b*W queries, of which process p gets the contiguous slice [p*n, (p+1)*n), n = b*W/process_count.
    tokenizer: a Hugging Face fast tokenizer (its Rust backend does the work in the workers).
    """
    if num_batch_shards < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"num_batch_shards={num_batch_shards}, process_index={process_index}, "
                         f"process_count={process_count}: expected W >= 1 and 0 <= process_index < process_count")
    if num_batch_shards % process_count:
        raise ValueError(f"num_batch_shards={num_batch_shards} is not a multiple of process_count={process_count}; "
                         "expected the same number of batch shards on every process")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; load it with "
                        "AutoTokenizer.from_pretrained(..., use_fast=True)")
    s = _settings(config)
    tokenizer_json = backend.to_str()
    corpus, datasets, bad_counts = _read_datasets(config, s, cut_is_exact(tokenizer_json))
    plan = PlanStep(s.seed, datasets, num_batch_shards, s.same_dataset)
    steps = plan.steps_per_epoch
    if steps == 0:
        raise DataError("no complete batch: every dataset is smaller than its global batch (per-device batch size x "
                        f"{num_batch_shards} shards) and than 2 x {num_batch_shards}; datasets: "
                        + ", ".join(f"{d.name} ({len(d)} examples, batch {d.batch_size})" for d in datasets))
    stages: list[_Stage] = [plan, DrawSamples(s.seed, s.train_group_size, corpus, datasets)]
    if process_count > 1:  # every process must pad to the global batch's lengths: take them from a table
        types = [f.type if s.same_dataset else None for f in corpus.files]
        lengths = token_length_table(corpus.files, types, tokenizer_json, query_max_len=s.query_max_len,
                                     passage_max_len=s.passage_max_len, ins=s.instructions,
                                     num_workers=int(config.num_data_workers))
        stages.append(GlobalPadLengths(s, corpus, lengths, tokenizer_json))
    stages += [LocalSlice(process_index, process_count), ReadTexts(s, corpus),
               TokenizeAndPad(s, tokenizer_json, int(tokenizer.pad_token_id))]
    shapes = _shapes(datasets, s, num_batch_shards)
    for d in datasets:
        logger.info("dataset %s: %d examples, batch %d/device, group sizes %s, teacher scores %s, no_in_batch_neg %s",
                    d.name, len(d), d.batch_size, d.group_sizes, d.has_teacher, d.no_in_batch_neg)
    combos = sorted({(b.global_batch, b.group_size, b.has_teacher, b.no_in_batch_neg) for b in shapes})
    logger.info("%d steps per epoch; at most %d step shapes: (global_batch, group_size, has_teacher, "
                "no_in_batch_neg) in %s x query_len in %s x passage_len in %s", steps, len(shapes), combos,
                list(s.query_buckets), list(s.passage_buckets))
    return TrainData(_Pipeline(stages), shapes, int(config.num_data_workers), int(config.data_prefetch), bad_counts)


# ---- tokenizer check ----------------------------------------------------------------------------------------------

UNKNOWN_TOKEN_WARN_SHARE = 0.05  # more <unk> than this in the first batches: the tokenizer does not fit the texts


def unknown_token_share(tokenizer, batches: Sequence[dict[str, np.ndarray]]) -> float:
    """Share of `<unk>` among the text tokens of the batches' queries and passages: attention mask 1, special
    tokens other than `<unk>` (`<s>`, `</s>`, ...) not counted. 0.0 without an unk token or without text tokens."""
    unk = tokenizer.unk_token_id
    if unk is None:
        return 0.0
    other_special = sorted(set(tokenizer.all_special_ids) - {unk})
    n_unk = n_text = 0
    for batch in batches:
        for side in ("query", "passage"):
            ids = batch[f"{side}_input_ids"]
            text = batch[f"{side}_attention_mask"].astype(bool) & ~np.isin(ids, other_special)
            n_text += int(text.sum())
            n_unk += int((text & (ids == unk)).sum())
    return n_unk / n_text if n_text else 0.0


def log_unknown_token_share(tokenizer, train_data: TrainData, num_batches: int = 2) -> float:
    """Log the share of `<unk>` tokens in the first batches (INFO; WARNING above UNKNOWN_TOKEN_WARN_SHARE), which
    is otherwise silent when a tokenizer is broken or belongs to another model; returns the share."""
    steps = range(min(num_batches, train_data.steps_per_epoch))
    share = unknown_token_share(tokenizer, [train_data.batch(step) for step in steps])
    message = "%.1f%% of the text tokens of the first %d batches are %s"
    if share > UNKNOWN_TOKEN_WARN_SHARE:
        logger.warning(message + " (more than %.0f%%): the tokenizer does not fit the training texts; check the "
                       "tokenizer files of %s", 100 * share, len(steps), tokenizer.unk_token,
                       100 * UNKNOWN_TOKEN_WARN_SHARE, tokenizer.name_or_path)
    else:
        logger.info(message, 100 * share, len(steps), tokenizer.unk_token)
    return share
