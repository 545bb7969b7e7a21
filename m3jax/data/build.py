"""Training data: FlagEmbedding's BGE-M3 data semantics on grain, with bounded step shapes and exact resume.

    settings = config.data_settings(run_config)                  # at the edge (trainer, plan)
    data = build_train_data(settings, tokenizer, num_batch_shards=W, process_index=p, process_count=P)
    data.steps_per_epoch, data.shapes()          # global batches per epoch; every step shape that can occur
    it = data.iterator(start_step)               # grain DatasetIterator of local batches; get_state()/set_state()

Where each part lives (FlagEmbedding 1.4's `AbsEmbedderSameDatasetTrainDataset` and its research trainer, in our
words: docs/flagembedding_semantics.md, "Data"):
- m3jax/data/files.py: the record format, validation, byte-offset indexes, tokenisation helpers.
- m3jax/data/datasets.py: DataSettings; train_data read into datasets (thresholds, batch sizes, no_in_batch_neg).
- m3jax/data/sampling.py: which examples form which batch (epoch plans, per-example draws), seeded; the step shapes.
- m3jax/data/pipeline.py: the grain stages (read texts, tokenise and pad, global pad lengths, local slice) and
  TrainIterator with its exact-resume state.
- here: build_train_data puts them together; TrainData is what it returns; the <unk> share check the trainer logs.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from m3jax.core import packing
from m3jax.data.datasets import DataSettings, read_datasets
from m3jax.data.files import DataError, cut_is_exact, token_length_table
from m3jax.data.pipeline import (
    DrawSamples,
    GlobalPackShape,
    GlobalPadLengths,
    LocalSlice,
    PackRows,
    Pipeline,
    PlanStep,
    ReadTexts,
    Stage,
    TokenizeAndPad,
    TrainIterator,
)
from m3jax.data.sampling import BatchShape, step_shapes

__all__ = ["BatchShape", "DataError", "DataSettings", "DatasetInfo", "TrainData", "TrainIterator", "build_train_data",
           "log_unknown_token_share", "unknown_token_share"]

logger = logging.getLogger(__name__)


class DatasetInfo(NamedTuple):
    name: str
    num_examples: int
    batch_size: int  # per device
    group_sizes: tuple[int, ...]
    has_teacher: bool
    no_in_batch_neg: bool


class TrainData:
    """What build_train_data returns: the step count, the step shapes and iterators over local batches."""

    def __init__(self, pipeline: Pipeline, shapes: list[BatchShape], num_workers: int, prefetch: int,
                 bad_example_counts: dict[str, int]):
        self._pipeline = pipeline
        self._shapes = shapes
        self._num_workers = num_workers
        self._prefetch = prefetch
        self.steps_per_epoch: int = pipeline.plan.steps_per_epoch
        self.bad_example_counts = bad_example_counts  # file -> examples skipped (skip_bad_examples)
        self.datasets = [DatasetInfo(d.name, len(d), d.batch_size, d.group_sizes, d.has_teacher, d.no_in_batch_neg)
                         for d in pipeline.plan.datasets]  # in dataset_index order
        self._direct: Pipeline | None = None

    def shapes(self) -> list[BatchShape]:
        return list(self._shapes)

    def iterator(self, start_step: int = 0) -> TrainIterator:
        return TrainIterator(self._pipeline.fresh(), start_step, self._num_workers, self._prefetch)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """The local batch of one step, built in this process (for tests and inspection)."""
        if self._direct is None:
            self._direct = self._pipeline.fresh()
        return self._direct(step)[1]


def build_train_data(settings: DataSettings, tokenizer, *, num_batch_shards: int, process_index: int = 0,
                     process_count: int = 1) -> TrainData:
    """Read and validate settings.train_data and plan its batches (see the module docstring).

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
    s = settings
    tokenizer_json = backend.to_str()
    corpus, datasets, bad_counts = read_datasets(s, cut_is_exact(tokenizer_json))
    plan = PlanStep(s.seed, datasets, num_batch_shards, s.same_dataset_within_batch)
    steps = plan.steps_per_epoch
    if steps == 0:
        raise DataError("no complete batch: every dataset is smaller than its global batch (per-device batch size x "
                        f"{num_batch_shards} shards) and than 2 x {num_batch_shards}; datasets: "
                        + ", ".join(f"{d.name} ({len(d)} examples, batch {d.batch_size})" for d in datasets))
    stages: list[Stage] = [plan, DrawSamples(s.seed, s.train_group_size, corpus, datasets)]
    global_lengths = None
    if process_count > 1:  # every process must pad to the global batch's lengths: take them from a table
        types = [f.type if s.same_dataset_within_batch else None for f in corpus.files]
        lengths = token_length_table(corpus.files, types, tokenizer_json, query_max_len=s.query_max_len,
                                     passage_max_len=s.passage_max_len, ins=s.instructions,
                                     num_workers=s.num_data_workers)
        global_lengths = GlobalPadLengths(s, corpus, lengths, tokenizer_json)
        stages.append(global_lengths)
    pad_id = int(tokenizer.pad_token_id)
    local = [LocalSlice(process_index, process_count), ReadTexts(s, corpus), TokenizeAndPad(s, tokenizer_json, pad_id)]
    if s.packing:  # several processes: each packs its own blocks into the shape planned for the global batch
        base = packing_base_row_length(s, Pipeline(stages + local), global_lengths)
        if global_lengths is not None:
            stages.append(GlobalPackShape(num_batch_shards, base, packing_ladder(s)))
        local.append(PackRows(num_batch_shards // process_count, base, packing_ladder(s), pad_id))
    stages += local
    shapes = step_shapes(datasets, num_batch_shards, s.same_dataset_within_batch, s.query_buckets,
                         s.passage_buckets)
    for d in datasets:
        logger.info("dataset %s: %d examples, batch %d/device, group sizes %s, teacher scores %s, no_in_batch_neg %s",
                    d.name, len(d), d.batch_size, d.group_sizes, d.has_teacher, d.no_in_batch_neg)
    combos = sorted({(b.global_batch, b.group_size, b.has_teacher, b.no_in_batch_neg) for b in shapes})
    logger.info("%d steps per epoch; at most %d step shapes: (global_batch, group_size, has_teacher, "
                "no_in_batch_neg) in %s x query_len in %s x passage_len in %s", steps, len(shapes), combos,
                list(s.query_buckets), list(s.passage_buckets))
    return TrainData(Pipeline(stages), shapes, s.num_data_workers, s.data_prefetch, bad_counts)


# ---- packing ------------------------------------------------------------------------------------------------------

PACKING_SAMPLE_STEPS = 8  # the first batches, whose texts choose the base row length


def packing_ladder(s: DataSettings) -> tuple[int, ...]:
    """The row lengths of packed batches: the query and passage ladders together."""
    return tuple(sorted(set(s.query_buckets) | set(s.passage_buckets)))


def packing_base_row_length(s: DataSettings, padded: Pipeline, global_lengths: GlobalPadLengths | None) -> int:
    """The base row length of a packed run (packing.base_row_length: room for 8 texts of their mean length, at most
    packing.ROW_LENGTH), chosen from the texts of the first batches -- the same batches whatever the start step, so
    a resumed run chooses the same -- the global batches' (one process: its batches; several: their lengths from
    the token-length table, so every process chooses the same); the bounded set of packed step shapes is logged."""
    ladder = packing_ladder(s)
    lengths, padded = [], padded.fresh()
    plan, draw = padded.stages[:2]
    table = global_lengths.fresh() if global_lengths is not None else None
    for step in range(min(PACKING_SAMPLE_STEPS, plan.steps_per_epoch)):
        if table is None:
            batch = padded(step)[1]
            lengths += [*batch["query_attention_mask"].sum(1), *batch["passage_attention_mask"].sum(1)]
        else:
            queries, passages = table.text_lengths(draw.map(plan.map(step)))
            lengths += [*queries, *passages[passages > 0]]
    base = packing.base_row_length(lengths, ladder)
    row_lengths = [length for length in ladder if length >= base]
    rows = max(d.batch_size * (1 + max(d.group_sizes)) for d in plan.datasets)
    logger.info("packing: rows of %d tokens (chosen from the %d texts of the first batches, mean %.1f tokens), or "
                "of the batch's longest text; packed step shapes: rows per device in packing.row_count's ladder "
                "up to %d x row length in %s (segment slots %s)", base, len(lengths),
                float(np.mean(lengths)) if lengths else 0.0, packing.row_count(rows), row_lengths,
                [packing.segment_slots(packing.max_segments_per_row(n)) for n in row_lengths])
    return base


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
