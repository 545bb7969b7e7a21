"""The training data as grain stages: step number -> this process's padded batch, with exact resume.

    pipeline = Pipeline([PlanStep(...), DrawSamples(...), [GlobalPadLengths(...)], LocalSlice(...), ReadTexts(...),
                         TokenizeAndPad(...)])          # assembled by data_build.build_train_data
    it = TrainIterator(pipeline, start_step, num_workers, prefetch)   # get_state() / set_state()

Stages. The pipeline is a grain `MapDataset` of step numbers mapped through small named transforms, each one
picklable and testable alone:
    step --PlanStep--> Plan: epoch, dataset index, the global batch's example ids (data_plan.EpochPlanner)
         --DrawSamples--> Samples: G and every example's choices (positive, negatives, shuffle draws)
         --GlobalPadLengths--> the pad lengths all processes agree on (only when process_count > 1)
         --GlobalPackShape--> the packed shape all processes agree on (process_count > 1 and config.packing)
         --LocalSlice--> this process's slice of the examples
         --ReadTexts--> Texts: queries, passages and teacher scores, as strings and floats
         --TokenizeAndPad--> (step, the local batch of arrays below)
         --PackRows--> the same with its packed rows added (config.packing)
The plan is random access (step -> global batch), so the iterator state is just the next step: restoring a state
gives exactly the batches of the uninterrupted run, even with a different num_data_workers.

Per example (ReadTexts): with knowledge_distillation and teacher scores, negatives are sorted by teacher score,
descending (research trainer; FlagEmbedding 1.4 does not sort). shuffle_ratio: a positive longer than 100 characters
is cut into three chunks that are shuffled and joined with spaces, with that probability. Instructions: the
example's `prompt` or query_instruction_for_retrieval formats the query; passage_instruction_for_retrieval the
passages (symmetric_sts / symmetric_clustering data take the query instruction instead).

Padding. Query and passage tensors are padded to the smallest `seq_len_buckets` entry (default: 32, 64, 128, ...,
m3jax/core/padding.py) that holds the longest text of the GLOBAL batch, capped at query_max_len / passage_max_len, so
the number of compiled step shapes is bounded (data_plan.step_shapes lists them all).
All processes of a multi-host job must agree on those lengths while each tokenises only its own slice:
- process_count == 1: the process tokenises the whole global batch, so its longest text is the global one.
- process_count > 1: lengths come from a per-text token-length table computed once at start-up in worker
  processes and cached on disk (m3jax.data.files.token_length_table; key: file path, size, mtime, tokenizer hash,
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

Workers: num_data_workers grain processes (0: a thread of the main process) run the whole chain for a step,
tokenisation included (one tokenizer thread per worker when there are several); they re-read records by byte offset
(data_files.FileIndex) instead of receiving the texts. Measured throughput: benchmarks/data_pipeline.py.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import os
from typing import Any, NamedTuple

import grain
import numpy as np
from absl import flags as absl_flags

from m3jax.core import packing
from m3jax.core.padding import pad_length
from m3jax.data.datasets import DataSettings
from m3jax.data.files import (
    CHARS_PER_TOKEN,
    FileLengths,
    cut_is_exact,
    encode_truncated,
    make_backend_tokenizer,
    passage_text,
    query_text,
)
from m3jax.data.sampling import Corpus, Dataset, EpochPlanner, Plan, Sample, Samples, draw_sample

__all__ = ["DrawSamples", "GlobalPackShape", "GlobalPadLengths", "LocalSlice", "PackRows", "Pipeline", "PlanStep",
           "ReadTexts", "Stage", "Texts", "TokenizeAndPad", "TrainIterator", "pack_batch"]

_ENDLESS_EPOCHS = 1_000_000  # the iterator runs epoch after epoch; the train loop decides when to stop


# Each stage is a grain Map transform with one job; Pipeline chains them on a grain MapDataset of step numbers.
# A stage holds read-only inputs (shared by every copy) and a `_cache` of what it builds on first use (the epoch
# plans, tokenizers): the cache is not pickled to grain workers and each `fresh()` copy starts its own, so two
# consumers (an iterator's thread, TrainData.batch) never share mutable state.

_stage = functools.partial(dataclasses.dataclass, eq=False, repr=False)  # grain names a stage by its class


class Texts(NamedTuple):
    """This process's slice as strings: instructions applied, negatives in final order."""
    batch: Samples
    queries: list[str]
    passages: list[str]  # G per query, positive first
    teacher_scores: np.ndarray  # float32 [n, G]; zeros without teacher scores


@_stage
class Stage(grain.transforms.Map):
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
class PlanStep(Stage):
    """step -> Plan: epoch plans (FlagEmbedding's refresh_epoch, EpochPlanner) replayed from the seed on demand."""
    seed: int
    datasets: list[Dataset]
    num_shards: int
    same_dataset: bool
    steps_per_epoch: int = dataclasses.field(init=False)

    def __post_init__(self):
        self.steps_per_epoch = len(self.planner().epoch(0))

    def planner(self) -> EpochPlanner:
        return self.cached("planner", lambda: EpochPlanner(self.seed, self.datasets, self.num_shards,
                                                           self.same_dataset))

    def map(self, step: int) -> Plan:
        step = int(step)
        epoch, i = divmod(step, self.steps_per_epoch)
        d, examples = self.planner().epoch(epoch)[i]
        return Plan(step, epoch, d, examples)


@_stage
class DrawSamples(Stage):
    """Plan -> Samples: G from the batch's first example, then draw_sample for each example of the global batch."""
    seed: int
    train_group_size: int
    corpus: Corpus
    datasets: list[Dataset]

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
class GlobalPadLengths(Stage):
    """Samples -> Samples with pad_to (multi-host): the global batch's pad lengths, from the token-length table.

    A reshuffled positive is the one text the table cannot know: it is read and tokenised here (in every process,
    since the shuffle decision comes from the shared draws), so the lengths are exact.
    """

    s: DataSettings
    corpus: Corpus
    lengths: list[FileLengths]  # per file: token length of every query, positive and negative
    tokenizer_json: str
    # per file: where each record's entries start in its lengths.pos and lengths.neg
    first: list[tuple[np.ndarray, np.ndarray]] = dataclasses.field(init=False)

    def __post_init__(self):
        self.first = [(_first_index(f.num_pos), _first_index(f.num_neg)) for f in self.corpus.files]

    def text_lengths(self, batch: Samples) -> tuple[np.ndarray, np.ndarray]:
        """Token lengths of the global batch's queries [B] and passages [B, G] (positive first; the negatives in
        drawn order, not ReadTexts' teacher-score order: only the lengths of each example's group matter; 0 where
        an example has no such passage -- a text has at least <s> and </s>)."""
        ratio = self.s.shuffle_ratio
        reshuffled = [smp for smp in batch.samples if ratio > 0 and smp.shuffle_u < ratio]
        reshuffled_len = {}
        tokenizer = self.tokenizer(self.tokenizer_json, self.s.passage_max_len)
        for smp, rec in zip(reshuffled, self.corpus.records([smp.example for smp in reshuffled])):
            text = passage_text(_positive(smp, rec, ratio), rec, self.corpus.type(smp.example), self.s.instructions)
            reshuffled_len[smp.example] = len(tokenizer.encode(text).ids)
        queries = np.zeros(len(batch.samples), np.int64)
        passages = np.zeros((len(batch.samples), batch.group_size), np.int64)
        for k, smp in enumerate(batch.samples):
            fi, r = self.corpus.where(smp.example)
            table, (first_pos, first_neg) = self.lengths[fi], self.first[fi]
            queries[k] = table.query[r]
            passages[k, 0] = reshuffled_len.get(smp.example, int(table.pos[first_pos[r] + smp.pos]))
            passages[k, 1:1 + len(smp.negs)] = table.neg[first_neg[r] + smp.negs]  # G - 1 of them (0: none)
        return queries, passages

    def map(self, batch: Samples) -> Samples:
        queries, passages = self.text_lengths(batch)
        lq, lp = int(queries.max(initial=0)), int(passages.max(initial=0))
        return batch._replace(pad_to=(pad_length(lq, self.s.query_buckets), pad_length(lp, self.s.passage_buckets)),
                              text_lengths=(queries, passages))


@_stage
class GlobalPackShape(Stage):
    """Samples -> Samples with pack_to (multi-host packing, after GlobalPadLengths): the packed shape of the global
    batch, (row length, rows per device block), planned from every device block's text lengths
    (packing.train_pack_shape), so every process builds the same shapes and packs its own blocks into them (PackRows):
    the global packed batch is the one a single process would build."""
    num_blocks: int  # device blocks of the global batch (W)
    base_row_length: int
    ladder: tuple[int, ...]

    def map(self, batch: Samples) -> Samples:
        queries, passages = batch.text_lengths
        blocks = [np.concatenate([q, p[p > 0]]) for q, p in zip(np.split(queries, self.num_blocks),
                                                               np.split(passages, self.num_blocks))]
        return batch._replace(pack_to=packing.train_pack_shape(blocks, self.base_row_length, self.ladder))


@_stage
class LocalSlice(Stage):
    """Samples -> Samples: this process's contiguous slice [p*n, (p+1)*n) of the global batch."""
    process_index: int
    process_count: int

    def map(self, batch: Samples) -> Samples:
        n = len(batch.samples) // self.process_count
        return batch._replace(samples=batch.samples[self.process_index * n:(self.process_index + 1) * n])


@_stage
class ReadTexts(Stage):
    """Samples -> Texts: read the records apply the shuffle, the KD negative order and instructions."""
    s: DataSettings
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
class TokenizeAndPad(Stage):
    """Texts -> (step, local batch): FlagEmbedding's collator, `tokenizer(texts, truncation=True, max_length=...)`
    through the Rust backend, right-padded with pad_token_id (mask 0) to pad_to, else to the bucket of the longest."""
    s: DataSettings
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
        batch = {
            "query_input_ids": q_ids, "query_attention_mask": q_mask,
            "passage_input_ids": p_ids, "passage_attention_mask": p_mask,
            "teacher_scores": texts.teacher_scores,
            "has_teacher_scores": np.bool_(b.has_teacher), "no_in_batch_neg": np.bool_(b.no_in_batch_neg),
            "epoch": np.int32(b.plan.epoch), "dataset_index": np.int32(b.plan.dataset_index),
        }
        if b.pack_to is not None:  # for PackRows, which takes it out
            batch[PACK_TO] = np.asarray(b.pack_to, np.int32)
        return b.plan.step, batch


PACK_TO = "pack_to"  # multi-host packing: the global (row length, rows per block), from TokenizeAndPad to PackRows


def pack_batch(batch: dict[str, np.ndarray], num_blocks: int, base_row_length: int, ladder: tuple[int, ...],
               pad_id: int, pack_to: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """A padded local batch (TokenizeAndPad's) with its packed form added (config.packing): each of its num_blocks
    device blocks (b queries and their b*G passages) packed into rows of one length (m3jax.core.packing.pack_blocks:
    base_row_length, or the ladder length of the batch's longest text), and each text's tokens located in its
    block's rows (gather_index, at the padded widths). Added: packed_input_ids, packed_segment_ids,
    packed_position_ids [blocks * R, L], packed_starts [blocks * R, S], query_index [n, Lq], passage_index [n*G, Lp]
    (int32). The padded arrays stay (host-side checks and counts); a packed step reads only the packed ones.
    pack_to: (L, R) of the global batch (multi-host, GlobalPackShape); None: planned from this batch."""
    q_ids, q_mask = batch["query_input_ids"], batch["query_attention_mask"]
    p_ids, p_mask = batch["passage_input_ids"], batch["passage_attention_mask"]
    nq, npass = len(q_ids) // num_blocks, len(p_ids) // num_blocks
    q_len, p_len = q_mask.sum(1), p_mask.sum(1)
    blocks = [[q_ids[i, :q_len[i]] for i in range(k * nq, (k + 1) * nq)]
              + [p_ids[i, :p_len[i]] for i in range(k * npass, (k + 1) * npass)] for k in range(num_blocks)]
    if pack_to is None:
        longest = max(int(q_len.max(initial=0)), int(p_len.max(initial=0)))
        row_length, n_rows = packing.train_row_length(longest, base_row_length, ladder), None
    else:
        row_length, n_rows = (int(n) for n in pack_to)
    packed = packing.pack_blocks(blocks, row_length, pad_id, n_rows)


    n_rows = len(packed.input_ids) // num_blocks
    per_block = nq + npass
    queries = [t for t in packed.texts if t[0] % per_block < nq]
    passages = [t for t in packed.texts if t[0] % per_block >= nq]
    return dict(batch, packed_input_ids=packed.input_ids, packed_segment_ids=packed.segment_ids,
                packed_position_ids=packed.position_ids, packed_starts=packed.starts,
                query_index=packing.gather_index(queries, n_rows, row_length, q_ids.shape[1]),
                passage_index=packing.gather_index(passages, n_rows, row_length, p_ids.shape[1]))


@_stage
class PackRows(Stage):
    """(step, local batch) -> the same with its packed form (pack_batch; config.packing): several texts per row,
    per device block, in rows of base_row_length (chosen from the data at start: build.packed_rows_stage) or of the
    batch's longest text; with several processes, in the global batch's shape (GlobalPackShape, passed on by
    TokenizeAndPad under PACK_TO). Deterministic: the rows are a function of the batch (the global one) alone."""
    num_blocks: int  # device blocks of this process's slice
    base_row_length: int
    ladder: tuple[int, ...]  # the row lengths (seq_len_buckets up to the longer max length)
    pad_id: int

    def map(self, element: tuple[int, dict[str, np.ndarray]]) -> tuple[int, dict[str, np.ndarray]]:
        step, batch = element
        batch = dict(batch)
        pack_to = batch.pop(PACK_TO, None)
        return step, pack_batch(batch, self.num_blocks, self.base_row_length, self.ladder, self.pad_id,
                                None if pack_to is None else tuple(pack_to))


class Pipeline:
    """The stages of one consumer, in order: PlanStep, DrawSamples, [GlobalPadLengths, [GlobalPackShape]],
    LocalSlice, ReadTexts, TokenizeAndPad, [PackRows]."""

    def __init__(self, stages: list[Stage]):
        assert isinstance(stages[0], PlanStep)
        self.stages = stages
        self.plan: PlanStep = stages[0]

    def fresh(self) -> Pipeline:
        return Pipeline([stage.fresh() for stage in self.stages])

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

    def __init__(self, pipeline: Pipeline, start_step: int, num_workers: int, prefetch: int):
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
