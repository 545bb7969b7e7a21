"""`m3jax mine`: hard negatives for FlagEmbedding-format training data, by exact search with a bge-m3 model.

    m3jax mine --model /models/bge-m3 --input train.jsonl --output train_mined.jsonl \
        [--pool pool.jsonl] [--mode dense] [--range-for-sampling 10-210] [--negative-number 15] \
        [--max-score S] [--absolute-margin M] [--relative-margin R] [--fill random|none] [--seed 0]

FlagEmbedding's scripts/hn_mine.py, with every retrieval mode of bge-m3 and filters against false negatives:

1. Pool: the candidate passages, the `text` of every line of --pool or (without it) every pos and neg text of the
   input, as hn_mine does; duplicates removed, the first occurrence kept (hn_mine dedupes through a Python set,
   whose order is arbitrary; here a passage's pool position is its first occurrence's rank). Texts are compared by
   a 128-bit BLAKE2 hash of their UTF-8 bytes.
2. Search: each query (with --query-instruction, or the record's own "prompt") against every pool passage, exactly,
   with m3jax.evaluation.search.ExactSearch: the top b of range_for_sampling "a-b" by the --mode score (dense, sparse,
   colbert, dense+sparse or all, the combinations weighted like compute_score). Equal scores rank the lower pool
   position first.
3. Choice: of ranks a..b-1 (0-based, hn_mine's slice), drop the record's positives and the query itself (exact
   text, hn_mine's rule); with --max-score, passages scoring above it; with --absolute-margin m, passages scoring
   above (lowest positive score - m); with --relative-margin r, above (1 - r) x the lowest positive score (the
   positives scored by the same mode on their own vectors, m3jax.model.inference.pair_scores; meant for positive
   scores). When more than negative_number are left, negative_number of them are drawn at random; the chosen are
   written in rank order. When fewer are left, --fill random (hn_mine's rule, the default) adds random pool
   passages that are not a positive, the query or already chosen -- unscored, so the score filters do not apply to
   them -- and --fill none leaves the list short.
4. Output: every input record, in input order, with "neg" set to the chosen passages; the other fields are kept
   ("neg_scores", which would no longer match, is dropped).

Random draws come from a generator seeded by (seed, record number): the output depends on the seed, not on the
devices, the passes or interruptions.

Streaming: the input is indexed (byte offsets per record, m3jax.data.files), not loaded; the deduplicated pool is
written once to the work directory and read back in chunks of --passages-per-chunk. Queries go in passes of
--queries-per-pass records: a pass encodes its queries once and streams the whole pool through the search, so the
pool is encoded once per pass (once when the queries fit in one pass). Memory: a pass's records, their query
representations and top-b lists, one chunk of passages, and 24 bytes per pool passage (offset and hash).

Resume: the pool, one output part per finished pass and the running search state of the current pass (saved every
--save-every seconds and when its search is complete) live in a work directory next to the output
(m3jax.core.storage.ResumableOutput). Rerunning the same command after an interruption continues from there, and the
output is byte-identical to an uninterrupted run's.

Several processes (jax.distributed): each searches its share of the pool chunks (chunk c on process c mod P), the
top-b lists are merged at the end of each pass, and process 0 chooses and writes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from m3jax.core.errors import M3JaxError
from m3jax.core.storage import ResumableOutput, atomic_file
from m3jax.data import files as data_files
from m3jax.data.files import DataError
from m3jax.evaluation.options import DEFAULT_WEIGHTS, combine, heads_of, scoring_mode
from m3jax.evaluation.search import BLOCK_BYTES, ExactSearch, merge_top_k, model_vocab_size
from m3jax.model.inference import pair_scores

logger = logging.getLogger(__name__)

FILLS = ("random", "none")
_NO_HASH = np.zeros(1, "V16")[0]  # padding in the per-record lists of excluded hashes


class MineError(M3JaxError, ValueError):
    """A mining option that cannot work; the message names the option."""


def parse_range(text: str) -> tuple[int, int]:
    """'10-210' -> (10, 210): ranks 10..209 of the search (0-based, hn_mine's slice)."""
    parts = str(text).split("-")
    try:
        a, b = (int(x) for x in parts)
    except ValueError:
        raise MineError(f"range_for_sampling={text!r}: expected START-END, e.g. 10-210") from None
    if not 0 <= a < b:
        raise MineError(f"range_for_sampling={text!r}: expected 0 <= START < END")
    return a, b


@dataclasses.dataclass(frozen=True)
class MineOptions:
    """What `mine` does; the CLI flags of the same names (m3jax mine --help) document each one."""

    mode: str = "dense"
    weights: tuple[float, float, float] = DEFAULT_WEIGHTS
    range_for_sampling: tuple[int, int] = (10, 210)  # hn_mine's default
    negative_number: int = 15
    max_score: float | None = None
    absolute_margin: float | None = None
    relative_margin: float | None = None
    fill: str = "random"
    seed: int = 0
    query_instruction: str | None = None  # a record's own "prompt" wins, as in training
    query_instruction_format: str = "{}{}"
    batch_size: int = 256
    query_max_len: int = 512
    passage_max_len: int = 512
    queries_per_pass: int | None = None  # None: 131072, or 16384 when the mode needs colbert vectors
    passages_per_block: int | None = None  # passages per search step; None: from the mode and vocabulary size
    passages_per_chunk: int | None = None  # passages encoded at a time (the resume granularity); None: 8 blocks

    def checked(self) -> MineOptions:
        mode, weights = scoring_mode(self.mode, self.weights, MineError, "mining ranks")
        rng = parse_range("-".join(map(str, self.range_for_sampling))) if not isinstance(
            self.range_for_sampling, str) else parse_range(self.range_for_sampling)
        if self.negative_number < 1:
            raise MineError(f"negative_number={self.negative_number}: expected at least 1")
        if self.fill not in FILLS:
            raise MineError(f"fill={self.fill!r}: expected one of {', '.join(FILLS)}")
        for name in ("max_score", "absolute_margin", "relative_margin"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise MineError(f"{name}={value}: expected a finite number")
        if self.relative_margin is not None and not 0 <= self.relative_margin < 1:
            raise MineError(f"relative_margin={self.relative_margin}: expected 0 <= r < 1")
        for name in ("batch_size", "queries_per_pass", "passages_per_block", "passages_per_chunk"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise MineError(f"{name}={value}: expected a positive number")
        for name in ("query_max_len", "passage_max_len"):
            if getattr(self, name) < 2:
                raise MineError(f"{name}={getattr(self, name)}: expected at least 2")
        return dataclasses.replace(self, mode=mode, weights=weights, range_for_sampling=rng)


def _hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


# ---------------------------------------------------------------------------------------------------------------
# The candidate pool


def read_pool_file(path: str) -> Iterator[str]:
    """The `text` of every line of a candidate pool file (hn_mine's format), with path:line errors."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: candidate pool file does not exist")
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except (ValueError, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{line_no}: invalid JSON ({e}); expected one {{\"text\": ...}} object per "
                                f"line") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{line_no}: a JSON {type(obj).__name__}; expected an object with \"text\"")
            if "text" not in obj:
                raise DataError(f"{path}:{line_no}: missing 'text'; expected a string")
            if not isinstance(obj["text"], str):
                raise DataError(f"{path}:{line_no}: 'text' is {type(obj['text']).__name__}; expected a string")
            yield obj["text"]


class Pool:
    """The deduplicated candidate passages, stored in the work directory: `pool.jsonl` (one JSON string per line)
    and `pool.npz` (byte offsets [n + 1] and BLAKE2 hashes [n] of the texts)."""

    def __init__(self, jsonl_path: str, npz_path: str):
        self.path = jsonl_path
        with np.load(npz_path) as z:
            self.offsets, self.hashes = z["offsets"], z["hashes"]

    def __len__(self) -> int:
        return len(self.hashes)

    def chunk(self, start: int, stop: int) -> list[str]:
        """Passages start..stop-1."""
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[start]))
            data = f.read(int(self.offsets[stop] - self.offsets[start]))
        return [json.loads(line) for line in data.split(b"\n")[:-1]]

    def texts(self, ids: Sequence[int]) -> dict[int, str]:
        """{id: passage} for some passages, read in file order."""
        out = {}
        with open(self.path, "rb") as f:
            for i in sorted(set(int(x) for x in ids)):
                f.seek(int(self.offsets[i]))
                out[i] = json.loads(f.read(int(self.offsets[i + 1] - self.offsets[i])))
        return out

    @classmethod
    def build(cls, texts: Callable[[], Iterator[str]], jsonl_path: str, npz_path: str, what: str) -> Pool:
        """Deduplicate the passages `texts()` yields (called twice: hashes first, then the kept texts are written)."""
        hashes = bytearray()
        for text in texts():
            hashes += _hash(text)
        if not hashes:
            raise DataError(f"{what}: the candidate pool is empty; expected at least one passage")
        all_hashes = np.frombuffer(bytes(hashes), "V16")
        _, first = np.unique(all_hashes, return_index=True)
        keep = np.zeros(len(all_hashes), bool)
        keep[first] = True
        offsets = [0]
        with atomic_file(jsonl_path, "wb") as f:
            for i, text in enumerate(texts()):
                if keep[i]:
                    line = (json.dumps(text, ensure_ascii=False) + "\n").encode("utf-8")
                    f.write(line)
                    offsets.append(offsets[-1] + len(line))
        with atomic_file(npz_path, "wb") as f:
            np.savez(f, offsets=np.asarray(offsets, np.int64), hashes=all_hashes[np.sort(first)])
        return cls(jsonl_path, npz_path)


# ---------------------------------------------------------------------------------------------------------------
# Choosing the negatives


def positive_scores(model, queries: Sequence[str], records: Sequence[dict], options: MineOptions) -> np.ndarray:
    """The lowest score of each record's positives under options.mode (m3jax.model.inference.pair_scores)."""
    passages = [p for rec in records for p in rec["pos"]]
    query_of = np.repeat(np.arange(len(records)), [len(rec["pos"]) for rec in records])
    base = pair_scores(model, queries, passages, query_of, heads=tuple(heads_of([options.mode])),
                       batch_size=options.batch_size, query_max_length=options.query_max_len,
                       passage_max_length=options.passage_max_len)
    found = combine(base, options.mode, options.weights)
    starts = np.concatenate([[0], np.cumsum([len(rec["pos"]) for rec in records])[:-1]])
    return np.minimum.reduceat(found, starts)


def choose_negatives(records: Sequence[dict], record_numbers: Sequence[int], top: np.ndarray, index: np.ndarray,
                     pool: Pool, options: MineOptions, pos_scores: np.ndarray | None = None) -> list[list[int]]:
    """Pool ids of the negatives of each record (rank order) from its search results top / index [n, k]."""
    a, b = options.range_for_sampling
    cand, cand_scores = index[:, a:b], top[:, a:b]
    keep = np.isfinite(cand_scores)
    excluded = [[_hash(p) for p in rec["pos"]] + [_hash(rec["query"])] for rec in records]
    width = max(len(x) for x in excluded)
    excl = np.full((len(records), width), _NO_HASH)
    for r, hashes in enumerate(excluded):
        excl[r, :len(hashes)] = np.frombuffer(b"".join(hashes), "V16")
    if cand.shape[1]:
        keep &= ~(pool.hashes[cand][:, :, None] == excl[:, None, :]).any(-1)
    if options.max_score is not None:
        keep &= cand_scores <= options.max_score
    if options.absolute_margin is not None:
        keep &= cand_scores <= pos_scores[:, None] - options.absolute_margin
    if options.relative_margin is not None:
        keep &= cand_scores <= pos_scores[:, None] * (1 - options.relative_margin)
    n, chosen = options.negative_number, []
    for r, number in enumerate(record_numbers):
        ids = cand[r][keep[r]]
        rng = np.random.default_rng([options.seed, int(number)])
        if len(ids) > n:
            ids = ids[np.sort(rng.choice(len(ids), n, replace=False))]
        ids = [int(i) for i in ids]
        if len(ids) < n and options.fill == "random":
            taken, banned = set(ids), set(excluded[r])
            draw = rng.choice(len(pool), min(len(pool), n + len(banned)), replace=False)
            for j in draw:
                if len(ids) == n:
                    break
                if int(j) not in taken and pool.hashes[j].tobytes() not in banned:
                    ids.append(int(j))
        chosen.append(ids)
    return chosen


# ---------------------------------------------------------------------------------------------------------------
# The job


def _default_queries_per_pass(mode: str) -> int:
    return 16384 if "colbert" in heads_of([mode]) else 131072


def _default_block(mode: str, vocab_size: int) -> int:
    heads = heads_of([mode])
    if "colbert" in heads:
        return 256
    if "sparse" in heads:  # the block's [passages, vocab] lexical matrix within the search's memory budget
        return int(min(4096, max(64, BLOCK_BYTES // (4 * vocab_size))))
    return 4096


def _file_id(path: str | None) -> dict | None:
    if path is None:
        return None
    st = os.stat(path)
    return {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def open_job(command: str, output_path: str, settings: dict, *, overwrite: bool, error: type[Exception]):
    """The ResumableOutput of a `m3jax <command>` job on every process: process 0 creates (or resumes) it, the others
    open it once it exists."""
    import jax

    primary = jax.process_index() == 0
    job = ResumableOutput(output_path, settings, overwrite=overwrite, error=error) if primary else None
    _barrier(f"m3jax-{command}-start")
    if job is None:
        job = ResumableOutput(output_path, settings, error=error, primary=False)
    if job.resumed and primary:
        logger.info("%s: continuing the unfinished job in %s", command, job.work_dir)
    return job


def _barrier(name: str) -> None:
    import jax

    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _allgather(x: np.ndarray) -> list[np.ndarray]:
    import jax

    if jax.process_count() == 1:
        return [x]
    from jax.experimental import multihost_utils

    return list(np.asarray(multihost_utils.process_allgather(x)))


def read_input(input_path: str, pool_path: str | None = None) -> data_files.FileIndex:
    """Validate the input file (and the pool file) and index the input's records; DataError names file:line."""
    if not os.path.isfile(input_path):
        raise DataError(f"{input_path}: input file does not exist")
    rules = data_files.ScanRules(train_group_size=1, knowledge_distillation=False, per_dataset_columns=False,
                                 skip_bad_examples=False)
    index = data_files.scan_file(os.fspath(input_path), rules)
    if len(index) == 0:
        raise DataError(f"{input_path}: no records; expected one {{\"query\", \"pos\", \"neg\"}} object per line")
    if pool_path is not None:
        if not any(True for _ in read_pool_file(pool_path)):
            raise DataError(f"{pool_path}: the candidate pool is empty; expected one {{\"text\": ...}} object per "
                            f"line")
        for _ in read_pool_file(pool_path):  # every line's errors before any work
            pass
    return index


def mine(model, input_path: str, output_path: str, options: MineOptions = MineOptions(), *,
         pool_path: str | None = None, model_info: dict | None = None, overwrite: bool = False,
         save_every: float = 300.0, progress: bool = True, records_index: data_files.FileIndex | None = None) -> dict:
    """Mine hard negatives for every record of `input_path` into `output_path` (see the module docstring).

    `model`: an m3jax BGEM3FlagModel built without a query instruction (options carry it). `model_info`: what
    identifies the model in the resume settings (path, dtype ...). `records_index`: read_input's result, when the
    caller validated the files already. Returns a small report (counts, seconds).
    """
    import jax
    from tqdm.auto import tqdm

    options = options.checked()
    t0 = time.monotonic()
    rank, n_proc = jax.process_index(), jax.process_count()
    if records_index is None:
        records_index = read_input(input_path, pool_path)
    n_records = len(records_index)
    settings = {"command": "mine", "input": _file_id(input_path), "pool": _file_id(pool_path),
                "model": model_info, "options": dataclasses.asdict(options)}
    job = open_job("mine", output_path, settings, overwrite=overwrite, error=MineError)

    pool_files = job.path("pool.jsonl"), job.path("pool.npz")
    if rank == 0 and not os.path.isfile(pool_files[1]):
        if pool_path is not None:
            texts, what = (lambda: read_pool_file(pool_path)), pool_path
        else:
            def texts():
                for i in range(n_records):
                    rec = records_index.record(i)
                    yield from rec["pos"]
                    yield from rec.get("neg") or ()
            what = f"{input_path} (pos and neg texts)"
        Pool.build(texts, *pool_files, what=what)
    _barrier("m3jax-mine-pool")
    pool = Pool(*pool_files)
    n_pool = len(pool)

    vocab_size = model_vocab_size(model)
    p_block = options.passages_per_block or _default_block(options.mode, vocab_size)
    chunk = options.passages_per_chunk or 8 * p_block
    per_pass = options.queries_per_pass or _default_queries_per_pass(options.mode)
    k = min(options.range_for_sampling[1], n_pool)
    n_passes, n_chunks = -(-n_records // per_pass), -(-n_pool // chunk)
    mine_chunks = list(range(rank, n_chunks, n_proc))
    my_passages = sum(min(chunk, n_pool - c * chunk) for c in mine_chunks)
    ins = data_files.Instructions(query=options.query_instruction, query_format=options.query_instruction_format)
    logger.info("mine: %d records, %d pool passages, top %d by %s, %d pass(es), %d process(es)", n_records, n_pool, k,
                options.mode, n_passes, n_proc)
    short = 0
    for p in range(n_passes):
        if job.has_part(p):
            continue
        numbers = range(p * per_pass, min((p + 1) * per_pass, n_records))
        records = [records_index.record(i) for i in numbers]
        queries = [data_files.query_text(rec, ins) for rec in records]
        searcher = ExactSearch(model, queries, modes=(options.mode,), weights=options.weights, top_k=k,
                                  batch_size=options.batch_size, query_max_len=options.query_max_len,
                                  passage_max_len=options.passage_max_len, passages_per_block=p_block)
        state_path = job.path(f"search-{p:08d}-{rank}.npz")
        done = 0
        if os.path.isfile(state_path):
            with np.load(state_path) as z:
                searcher.load_state(z["top"], z["index"])
                done = int(z["chunks_done"])
            logger.info("mine: pass %d continues after %d of its %d pool chunks", p + 1, done, len(mine_chunks))
        bar = tqdm(total=my_passages, initial=sum(min(chunk, n_pool - c * chunk) for c in mine_chunks[:done]),
                   desc=f"mine pass {p + 1}/{n_passes}", unit="passage", dynamic_ncols=True, disable=not progress)
        last_save = time.monotonic()
        for j in range(done, len(mine_chunks)):
            start = mine_chunks[j] * chunk
            stop = min(start + chunk, n_pool)
            searcher.add(pool.chunk(start, stop), positions=np.arange(start, stop))
            bar.update(stop - start)
            # saved every save_every seconds, and once the pass's search is complete (choosing is not redone then)
            if j + 1 == len(mine_chunks) or time.monotonic() - last_save >= save_every:
                top, index = searcher.state()
                with atomic_file(state_path, "wb") as f:
                    np.savez(f, top=top, index=index, chunks_done=j + 1)
                last_save = time.monotonic()
        bar.close()
        top, index = searcher.state()
        top, index = merge_top_k(list(zip(_allgather(top[0]), _allgather(index[0]))), k)
        del searcher
        if rank == 0:
            pos = None
            if options.absolute_margin is not None or options.relative_margin is not None:
                pos = positive_scores(model, queries, records, options)
            chosen = choose_negatives(records, numbers, top, index, pool, options, pos)
            texts = pool.texts([i for ids in chosen for i in ids])
            with job.part(p) as f:
                for rec, ids in zip(records, chosen):
                    rec["neg"] = [texts[i] for i in ids]
                    rec.pop("neg_scores", None)
                    f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            short += sum(len(ids) < options.negative_number for ids in chosen)
        _barrier(f"m3jax-mine-pass-{p}")
        if os.path.exists(state_path):
            os.unlink(state_path)
    if rank == 0:
        job.finish(n_passes)
        if short:
            logger.warning("mine: %d record(s) got fewer than %d negatives (a small pool or strict filters%s)", short,
                           options.negative_number, "" if options.fill == "random" else "; --fill none")
    _barrier("m3jax-mine-end")
    return {"records": n_records, "pool": n_pool, "passes": n_passes, "short_records": short,
            "seconds": time.monotonic() - t0}
