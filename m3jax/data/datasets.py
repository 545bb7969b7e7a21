"""The datasets of a run: its train_data files read, validated and formed into batching units, FlagEmbedding's way.

    corpus, datasets, bad_counts = read_datasets(settings)   # settings: DataSettings (config.data_settings)

FlagEmbedding 1.4's `AbsEmbedderSameDatasetTrainDataset` and its research trainer (`research/BGE_M3/data.py`), in
our words (docs/flagembedding_semantics.md, "Data"):
- every train_data path is a directory, each .json/.jsonl file in it one dataset (taken in sorted order), or a
  .json/.jsonl file, one dataset (FlagEmbedding 1.4.2: such a file is never merged with others: below
  small_threshold it is skipped; `no_in_batch_neg` at the end of its name without the extension marks it). See
  m3jax/data/files.py for the record format and validation.
- same_dataset_within_batch (default): each batch comes from one dataset. Per-device batch size b: the file's
  `batch_size` column, else its `len-LO-HI` tag looked up in batch_size_by_length (config None: the research table
  for train_group_size 8 or 1), else per_device_train_batch_size; `type` containing "symmetric" halves it. Files
  smaller than small_threshold are merged per directory (batch size: the smallest of theirs); a merged set smaller
  than drop_threshold is dropped. A directory whose name ends in `no_in_batch_neg` marks its datasets.
- same_dataset_within_batch=False: all datasets pooled into one (per_device_train_batch_size); per-dataset columns
  other than `prompt` are ignored (FlagEmbedding's non-same-dataset path).
- max_example_num_per_dataset subsamples each file when it is read (FlagEmbedding 1.4 order: before the
  small_threshold test), with a generator seeded by (seed, file number).
How the datasets' examples become batches: m3jax/data/sampling.py.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import re

import numpy as np

from m3jax.core import storage
from m3jax.data.files import (
    CHARS_PER_TOKEN,
    DataError,
    FileIndex,
    Instructions,
    ScanRules,
    file_group_size,
    list_dataset_files,
    scan_files,
)
from m3jax.data.sampling import Corpus, Dataset, seed_words

__all__ = ["DataSettings", "read_datasets"]

logger = logging.getLogger(__name__)

_LEN_TAG = re.compile(r"len-(\d+)-(\d+|inf)\.jsonl?$")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """What the training data reads of the run config (config.data_settings; defaults and their documentation:
    config.default_config). A plain picklable value: every grain worker gets a copy."""
    train_data: tuple[str, ...]  # the comma-separated paths, one by one
    seed: int
    train_group_size: int
    query_max_len: int
    passage_max_len: int
    query_buckets: tuple[int, ...]  # the pad lengths: seq_len_buckets up to query_max_len (padding.length_buckets)
    passage_buckets: tuple[int, ...]
    max_example_num_per_dataset: int
    instructions: Instructions  # query_/passage_instruction_for_retrieval and their _format
    knowledge_distillation: bool
    shuffle_ratio: float
    same_dataset_within_batch: bool
    small_threshold: int
    drop_threshold: int
    per_device_train_batch_size: int
    # (("LO-HI", per-device batch size), ...): config None is the research table for train_group_size; "auto" until
    # the trainer sizes it (m3jax.plan.auto_batch_sizes)
    batch_size_by_length: tuple[tuple[str, int], ...] | str
    skip_bad_examples: bool
    num_data_workers: int
    data_prefetch: int
    packing: bool = False  # add each batch's packed form (m3jax.data.pipeline.PackRows)


def _file_batch_size(f: FileIndex, s: DataSettings) -> int:
    """FlagEmbedding: `batch_size` column, else the length tag's size (research), else per_device_train_batch_size,
    halved for symmetric types."""
    if f.batch_size is not None:
        return f.batch_size
    default = size = s.per_device_train_batch_size
    m = _LEN_TAG.search(os.path.basename(f.path))
    if m:
        size = dict(s.batch_size_by_length).get(f"{m.group(1)}-{m.group(2)}", default)
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


def read_datasets(s: DataSettings, cut: bool = False) -> tuple[Corpus, list[Dataset], dict[str, int]]:
    """Scan every file and form the datasets (FlagEmbedding's thresholds and batch sizes)."""
    dirs = list(s.train_data)
    if not dirs:
        raise DataError("config.train_data is empty; expected one or more directories of .json/.jsonl files "
                        "or .json/.jsonl files (comma-separated)")
    dirs = [_staged_train_dir(d) if storage.is_url(d) else d for d in dirs]
    long_chars = (CHARS_PER_TOKEN * s.query_max_len, CHARS_PER_TOKEN * s.passage_max_len)
    rules = ScanRules(s.train_group_size, s.knowledge_distillation, s.same_dataset_within_batch, s.skip_bad_examples,
                      long_text_chars=long_chars)
    paths = [(os.path.normpath(d), p) for d in dirs for p in list_dataset_files(os.path.normpath(d))]
    logger.info("reading %d file(s): %s", len(paths), ", ".join(p for _, p in paths))
    scanned = scan_files([p for _, p in paths], rules, s.num_data_workers)
    files: list[FileIndex] = []
    groups: dict[str, tuple[list[int], list[int]]] = {os.path.normpath(d): ([], []) for d in dirs}
    dropped: list[str] = []
    max_n = s.max_example_num_per_dataset
    for file_number, ((directory, path), f) in enumerate(zip(paths, scanned)):
        if len(f) > max_n:
            rng = np.random.default_rng([seed_words(s.seed), file_number])
            f = f.subset(np.sort(rng.choice(len(f), max_n, replace=False)))
        if len(f) == 0:
            logger.warning("%s: no examples, skipped", path)
            dropped.append(f"{path} (no valid examples)")
            continue
        if s.knowledge_distillation and not f.has_scores:
            if not s.same_dataset_within_batch:
                raise DataError(f"{path}: no 'pos_scores'/'neg_scores'; expected teacher scores on every example "
                                "of every file with knowledge_distillation=True and same_dataset_within_batch="
                                "False (FlagEmbedding's rule)")
            logger.warning("%s has no teacher scores: its batches train without knowledge distillation", path)
        files.append(f)
        big, small = groups[directory]
        (small if s.same_dataset_within_batch and len(f) < s.small_threshold else big).append(len(files) - 1)
    bad_counts = {f.path: f.bad_count for f in files if f.bad_count}
    long_q, long_p = (sum(f.long_texts[k] for f in files) for k in (0, 1))
    if long_q or long_p:
        logger.info("%d queries longer than %d characters and %d passages longer than %d in the training files (%d "
                    "characters per token x max length): %s", long_q, long_chars[0], long_p, long_chars[1],
                    CHARS_PER_TOKEN,
                    "each is cut at a space before tokenisation where that keeps exactly its first max length tokens, "
                    "else tokenised whole" if cut else "tokenised whole and then truncated (this tokenizer's "
                    "pipeline is not one the cut is proven exact for)")

    datasets: list[Dataset] = []
    order: list[int] = []  # file ids in global example order

    def add(name, file_ids, batch_size, nibn):
        start = sum(len(files[i]) for i in order)
        order.extend(file_ids)
        fs = [files[i] for i in file_ids]
        datasets.append(Dataset(
            name=name, file_ids=list(file_ids), start=start, stop=start + sum(len(f) for f in fs),
            batch_size=batch_size, no_in_batch_neg=nibn,
            has_teacher=s.knowledge_distillation and all(f.has_scores for f in fs),
            group_sizes=_group_sizes(fs, s.train_group_size, s.same_dataset_within_batch)))

    if s.same_dataset_within_batch:
        for directory, (big, small) in groups.items():
            nibn = _no_in_batch_neg(directory)
            for i in big:
                add(files[i].path, [i], _file_batch_size(files[i], s), nibn)
            if small and not os.path.isdir(directory):  # FlagEmbedding: a file path below small_threshold is skipped
                dropped.append(f"{directory} with {len(files[small[0]])} examples (a train_data file below "
                               f"small_threshold {s.small_threshold} is skipped, as in FlagEmbedding)")
                logger.warning("dropping %s", dropped[-1])
                continue
            if small:
                fs = [files[i] for i in small]
                total = sum(len(f) for f in fs)
                if total < s.drop_threshold:
                    dropped.append(f"{len(fs)} small file(s) of {directory} with {total} examples (< drop_threshold "
                                   f"{s.drop_threshold})")
                    logger.warning("dropping %s", dropped[-1])
                    continue
                for attr in ("type", "has_scores"):
                    if len({getattr(f, attr) for f in fs}) > 1:
                        raise DataError(
                            f"{directory}: the files below small_threshold ({s.small_threshold}) are merged into "
                            f"one dataset but differ in {attr}: " + ", ".join(f"{f.path}={getattr(f, attr)!r}"
                                                                             for f in fs)
                            + "; expected one value (FlagEmbedding cannot concatenate them either)")
                bs = min(_file_batch_size(f, s) for f in fs)
                add(f"{directory} (merged small files: {', '.join(os.path.basename(f.path) for f in fs)})",
                    small, bs, nibn)
    elif files:
        add(",".join(os.path.normpath(d) for d in dirs), list(range(len(files))),
            s.per_device_train_batch_size, False)
    if not datasets:
        raise DataError("no training examples in " + ", ".join(dirs) + (": dropped " + "; ".join(dropped)
                                                                        if dropped else ""))
    file_of = np.concatenate([np.full(len(files[i]), i, np.int32) for i in order])
    rec_of = np.concatenate([np.arange(len(files[i]), dtype=np.int64) for i in order])
    return Corpus(files, file_of, rec_of, s.same_dataset_within_batch), datasets, bad_counts
