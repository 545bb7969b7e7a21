"""Training data pipeline: FlagEmbedding's BGE-M3 data semantics on grain, with bounded step shapes and exact resume.

    data = build_train_data(config, tokenizer, num_batch_shards=W, process_index=p, process_count=P)
    data.steps_per_epoch, data.shapes()          # global batches per epoch; every step shape that can occur
    it = data.iterator(start_step)               # grain DatasetIterator of local batches; get_state()/set_state()

What a step is (shared/reference/M3_SEMANTICS.md "Data"; FlagEmbedding 1.4 `AbsEmbedderSameDatasetTrainDataset`
and the research trainer `research/BGE_M3/data.py`):
- every train_data path is a directory; each .json/.jsonl file in it is one dataset (see m3jax/data_files.py for
  the record format and validation). Files are taken in sorted order.
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

Workers: num_data_workers grain processes (0: a thread of the main process) build whole batches, tokenisation
included (one tokenizer thread per worker when there are several); they re-read records by byte offset
(data_files.FileIndex) instead of receiving the texts. Files are validated at start-up, in worker processes too when
there are many megabytes of them. Measured throughput: scripts/benchmark_data.py.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import grain
import numpy as np
from absl import flags as absl_flags

from m3jax.config import RESEARCH_BATCH_SIZE_BY_LENGTH, train_data_dirs
from m3jax.padding import length_buckets, pad_length
from m3jax.data_files import (
    DataError, FileIndex, FileLengths, Instructions, ScanRules, file_group_size, list_dataset_files, passage_text,
    query_text, scan_files, token_length_table, make_backend_tokenizer)

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


@dataclasses.dataclass
class _Sample:
    example: int  # global example id
    pos: int
    negs: np.ndarray
    shuffle_u: float
    shuffle_perm: np.ndarray


def _shuffle_text(text: str, perm: np.ndarray) -> str:
    """FlagEmbedding `_shuffle_text`: three chunks of len//3+1 characters, reordered, joined with spaces."""
    size = len(text) // 3 + 1
    chunks = [text[i:i + size] for i in range(0, len(text), size)]
    assert len(chunks) == 3, len(chunks)  # always 3 for the > 100 characters texts it is applied to
    return " ".join(chunks[j] for j in perm)


class _BatchMaker:
    """step -> (step, local batch). Picklable; runs in grain workers (tokenizers are built lazily there)."""

    def __init__(self, settings: _Settings, files: list[FileIndex], datasets: list[_Dataset],
                 file_of: np.ndarray, rec_of: np.ndarray, steps_per_epoch: int, num_shards: int,
                 process_index: int, process_count: int, tokenizer_json: str, pad_id: int,
                 lengths: list[FileLengths] | None):
        self.s = settings
        self.files = files
        self.datasets = datasets
        self.file_of = file_of
        self.rec_of = rec_of
        self.steps_per_epoch = steps_per_epoch
        self.num_shards = num_shards
        self.process_index = process_index
        self.process_count = process_count
        self.tokenizer_json = tokenizer_json
        self.pad_id = pad_id
        self.lengths = lengths
        if lengths is not None:  # where each record's pos / neg lengths start in the flat per-file arrays
            self.pos_start = [np.concatenate([[0], np.cumsum(f.num_pos)[:-1]]).astype(np.int64) for f in files]
            self.neg_start = [np.concatenate([[0], np.cumsum(f.num_neg)[:-1]]).astype(np.int64) for f in files]
        self._reset_caches()

    def _reset_caches(self) -> None:
        self._planner: _Planner | None = None
        self._tok: dict[str, Any] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_planner"], state["_tok"] = None, {}
        return state

    def fresh(self) -> "_BatchMaker":
        """A copy with its own caches and file handles (arrays shared), for one more consumer thread."""
        new = object.__new__(_BatchMaker)
        new.__dict__.update(self.__getstate__())
        new.files = [dataclasses.replace(f, _fh=None) for f in self.files]
        return new

    # -- pieces ---------------------------------------------------------------------------------------------------
    def planner(self) -> _Planner:
        if self._planner is None:
            self._planner = _Planner(self.s.seed, self.datasets, self.num_shards, self.s.same_dataset)
        return self._planner

    def tokenizer(self, which: str):
        if which not in self._tok:
            max_len = self.s.query_max_len if which == "q" else self.s.passage_max_len
            self._tok[which] = make_backend_tokenizer(self.tokenizer_json, max_len)
        return self._tok[which]

    def _record(self, ex: int) -> dict:
        return self.files[self.file_of[ex]].record(int(self.rec_of[ex]))

    def _type(self, ex: int) -> str | None:
        return self.files[self.file_of[ex]].type if self.s.same_dataset else None

    def group_size(self, first_example: int) -> int:
        if not self.s.same_dataset:
            return self.s.train_group_size
        f = self.files[self.file_of[first_example]]
        return file_group_size(f.type, f.group_size_column, self.s.train_group_size,
                               int(f.num_neg[self.rec_of[first_example]]))

    def _sample(self, epoch: int, step: int, position: int, ex: int, group_size: int) -> _Sample:
        f, r = self.files[self.file_of[ex]], int(self.rec_of[ex])
        rng = np.random.default_rng([_seed_words(self.s.seed), epoch, step, position])
        pos = int(rng.integers(f.num_pos[r]))
        k, n_neg = group_size - 1, int(f.num_neg[r])
        if k == 0:
            negs = np.zeros(0, np.int64)
        elif n_neg < k:  # too few negatives: sample from them repeated ceil(k / n_neg) times
            negs = rng.choice(np.tile(np.arange(n_neg), math.ceil(k / n_neg)), k, replace=False)
        else:
            negs = rng.choice(n_neg, k, replace=False)
        # Drawn whether used or not, so the stream (and the shuffle decision) never depends on text contents.
        return _Sample(ex, pos, negs, float(rng.random()), rng.permutation(3))

    def _shuffled(self, sample: _Sample, pos_text: str) -> bool:
        return self.s.shuffle_ratio > 0 and len(pos_text) > 100 and sample.shuffle_u < self.s.shuffle_ratio

    def _texts(self, sample: _Sample, has_teacher: bool):
        """(query, [positive, negatives...], teacher scores) of one sampled example, instructions applied."""
        rec = self._record(sample.example)
        type_ = self._type(sample.example)
        pos = rec["pos"][sample.pos]
        if self._shuffled(sample, pos):
            pos = _shuffle_text(pos, sample.shuffle_perm)
        negs = [int(j) for j in sample.negs]
        scores = []
        if has_teacher:
            neg_scores = rec["neg_scores"]
            negs = sorted(negs, key=lambda j: neg_scores[j], reverse=True)  # stable: ties keep sampled order
            scores = [rec["pos_scores"][sample.pos]] + [neg_scores[j] for j in negs]
        passages = [passage_text(t, rec, type_, self.s.instructions) for t in [pos] + [rec["neg"][j] for j in negs]]
        return query_text(rec, self.s.instructions), passages, scores

    def _encode(self, texts: list[str], which: str, pad_to: int | None):
        """Token ids and attention mask, right-padded to pad_to (None: to the longest text's bucket)."""
        encs = self.tokenizer(which).encode_batch(texts)
        lens = [len(e.ids) for e in encs]
        if pad_to is None:
            buckets = self.s.query_buckets if which == "q" else self.s.passage_buckets
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

    def _global_lengths(self, samples: list[_Sample], has_teacher: bool) -> tuple[int, int]:
        """Pad lengths of the global batch from the token-length table (multi-host)."""
        lq, lp = 0, 0
        for smp in samples:
            fi, r = int(self.file_of[smp.example]), int(self.rec_of[smp.example])
            tab = self.lengths[fi]
            lq = max(lq, int(tab.query[r]))
            if len(smp.negs):
                lp = max(lp, int(tab.neg[self.neg_start[fi][r] + smp.negs].max()))
            pos_len = int(tab.pos[self.pos_start[fi][r] + smp.pos])
            if self.s.shuffle_ratio > 0 and smp.shuffle_u < self.s.shuffle_ratio:
                # A reshuffled positive tokenises differently: tokenise it (only these few texts, all processes).
                _, passages, _ = self._texts(smp, has_teacher)
                pos_len = len(self.tokenizer("p").encode(passages[0]).ids)
            lp = max(lp, pos_len)
        return pad_length(lq, self.s.query_buckets), pad_length(lp, self.s.passage_buckets)

    # -- the batch ------------------------------------------------------------------------------------------------
    def global_batch(self, step: int) -> tuple[int, int, np.ndarray]:
        """(epoch, dataset index or -1, global example ids) of a step."""
        epoch, i = divmod(step, self.steps_per_epoch)
        d, ids = self.planner().epoch(epoch)[i]
        return epoch, d, ids

    def __call__(self, step: int) -> tuple[int, dict[str, np.ndarray]]:
        step = int(step)
        epoch, d, ids = self.global_batch(step)
        ds = self.datasets[max(d, 0)]
        g = self.group_size(int(ids[0]))
        has_teacher = ds.has_teacher
        samples = [self._sample(epoch, step, k, int(ex), g) for k, ex in enumerate(ids)]
        n = len(ids) // self.process_count
        local = samples[self.process_index * n:(self.process_index + 1) * n]
        if self.process_count == 1:
            lq = lp = None  # this process sees the whole global batch: pad to its own longest texts
        else:
            lq, lp = self._global_lengths(samples, has_teacher)
        queries, passages, scores = [], [], []
        for smp in local:
            q, ps, sc = self._texts(smp, has_teacher)
            queries.append(q)
            passages.extend(ps)
            scores.append(sc)
        q_ids, q_mask = self._encode(queries, "q", lq)
        p_ids, p_mask = self._encode(passages, "p", lp)
        teacher = np.asarray(scores, np.float32) if has_teacher else np.zeros((n, g), np.float32)
        for f in self.files:  # don't hold file handles between batches of a worker
            f.close()
        return step, {
            "query_input_ids": q_ids, "query_attention_mask": q_mask,
            "passage_input_ids": p_ids, "passage_attention_mask": p_mask,
            "teacher_scores": teacher.reshape(n, g),
            "has_teacher_scores": np.bool_(has_teacher), "no_in_batch_neg": np.bool_(ds.no_in_batch_neg),
            "epoch": np.int32(epoch), "dataset_index": np.int32(d),
        }


def _worker_init(worker_index: int, worker_count: int) -> None:
    del worker_index
    if worker_count > 1:  # parallelism comes from the workers: one tokenizer thread each, no oversubscription
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class TrainIterator(grain.DatasetIterator):
    """Local batches from a start step on, epoch after epoch (the train loop stops it).

    The state is the next step number: `get_state()` -> {"step", "steps_per_epoch", "seed"}; `set_state` restarts the
    grain pipeline there. Works with grain's orbax handler (grain.checkpoint.CheckpointSave / CheckpointRestore).
    """

    def __init__(self, maker: _BatchMaker, start_step: int, num_workers: int, prefetch: int):
        super().__init__()
        self._maker = maker
        self._step = int(start_step)
        self._num_workers = num_workers
        self._prefetch = max(1, prefetch)
        self._inner = None

    def _start(self) -> None:
        if self._num_workers > 0 and not absl_flags.FLAGS.is_parsed():
            absl_flags.FLAGS.mark_as_parsed()  # grain's worker start reads absl flags; outside an absl app, defaults
        stop = self._step + self._maker.steps_per_epoch * _ENDLESS_EPOCHS
        ds = grain.MapDataset.range(self._step, stop).map(self._maker)
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
        return {"step": self._step, "steps_per_epoch": self._maker.steps_per_epoch, "seed": self._maker.s.seed}

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

    def __init__(self, maker: _BatchMaker, shapes: list[BatchShape], num_workers: int, prefetch: int,
                 bad_example_counts: dict[str, int]):
        self._maker = maker
        self._shapes = shapes
        self._num_workers = num_workers
        self._prefetch = prefetch
        self.steps_per_epoch: int = maker.steps_per_epoch
        self.bad_example_counts = bad_example_counts  # file -> examples skipped (skip_bad_examples)
        self.datasets = [DatasetInfo(d.name, len(d), d.batch_size, d.group_sizes, d.has_teacher, d.no_in_batch_neg)
                         for d in maker.datasets]  # in dataset_index order
        self._direct: _BatchMaker | None = None

    def shapes(self) -> list[BatchShape]:
        return list(self._shapes)

    def iterator(self, start_step: int = 0) -> TrainIterator:
        return TrainIterator(self._maker.fresh(), start_step, self._num_workers, self._prefetch)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The local batch of one step, built in this process (for tests and inspection)."""
        if self._direct is None:
            self._direct = self._maker.fresh()
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


def _read_datasets(config, s: _Settings):
    """Scan every file and form the datasets (FlagEmbedding's thresholds and batch sizes)."""
    dirs = train_data_dirs(config)
    if not dirs:
        raise DataError("config.train_data is empty; expected one or more directories of .json/.jsonl files "
                        "(comma-separated)")
    rules = ScanRules(s.train_group_size, s.knowledge_distillation, s.same_dataset, bool(config.skip_bad_examples))
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
            nibn = os.path.basename(directory).endswith("no_in_batch_neg")
            for i in big:
                add(files[i].path, [i], _file_batch_size(files[i], config, config.per_device_train_batch_size), nibn)
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
    return files, datasets, file_of, rec_of, bad_counts


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
    files, datasets, file_of, rec_of, bad_counts = _read_datasets(config, s)

    tokenizer_json = backend.to_str()
    lengths = None
    if process_count > 1:
        types = [f.type if s.same_dataset else None for f in files]
        lengths = token_length_table(files, types, tokenizer_json, query_max_len=s.query_max_len,
                                     passage_max_len=s.passage_max_len, ins=s.instructions,
                                     num_workers=int(config.num_data_workers))
    steps = len(_Planner(s.seed, datasets, num_batch_shards, s.same_dataset).epoch(0))
    if steps == 0:
        raise DataError("no complete batch: every dataset is smaller than its global batch (per-device batch size x "
                        f"{num_batch_shards} shards) and than 2 x {num_batch_shards}; datasets: "
                        + ", ".join(f"{d.name} ({len(d)} examples, batch {d.batch_size})" for d in datasets))
    maker = _BatchMaker(s, files, datasets, file_of, rec_of, steps, num_batch_shards, process_index, process_count,
                        tokenizer_json, int(tokenizer.pad_token_id), lengths)
    shapes = _shapes(datasets, s, num_batch_shards)
    for d in datasets:
        logger.info("dataset %s: %d examples, batch %d/device, group sizes %s, teacher scores %s, no_in_batch_neg %s",
                    d.name, len(d), d.batch_size, d.group_sizes, d.has_teacher, d.no_in_batch_neg)
    combos = sorted({(b.global_batch, b.group_size, b.has_teacher, b.no_in_batch_neg) for b in shapes})
    logger.info("%d steps per epoch; at most %d step shapes: (global_batch, group_size, has_teacher, "
                "no_in_batch_neg) in %s x query_len in %s x passage_len in %s", steps, len(shapes), combos,
                list(s.query_buckets), list(s.passage_buckets))
    return TrainData(maker, shapes, int(config.num_data_workers), int(config.data_prefetch), bad_counts)


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
