"""Reading FlagEmbedding training files: validation with file:line errors, per-record texts, token-length table.

One example per record: `{"query": str, "pos": [str], "neg": [str]}`, optionally `"pos_scores"`/`"neg_scores"`
(teacher scores, one per passage) and the per-dataset columns FlagEmbedding 1.4 reads: `type`, `batch_size`,
`train_group_size`, and the per-example query instruction `prompt`. A `.jsonl` file holds one JSON object per line;
a `.json` file holds either JSON lines or one JSON array of objects.

Files are parsed here line by line with `json.loads` (not through `datasets`) so that every bad record is reported
as `path:line: what is wrong; expected what`. What is kept of a file is an index (byte offset of each valid record
plus a few per-record counts), not the texts: data-loader workers re-read the records they need by offset, so the
memory of the main process and of each worker stays small whatever the corpus size and the OS page cache is shared.

Rules beyond FlagEmbedding (each one an error FlagEmbedding would hit later, or a silent surprise):
- `type`, `batch_size` and `train_group_size` must hold one value per file (FlagEmbedding reads them off the first
  record of a file or of a batch, so mixed values would give batch-dependent behaviour or its type assertion).
- with knowledge_distillation, a file has teacher scores on every record or on none.
- `neg` may be missing or empty only when the file's group size is 1 (FlagEmbedding divides by len(neg)).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging
import math
import multiprocessing
import os
import socket
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

from m3jax.core import storage
from m3jax.core.errors import M3JaxError

logger = logging.getLogger(__name__)

SYMMETRIC_QUERY_INSTRUCTION_TYPES = ("symmetric_sts", "symmetric_clustering")


class DataError(M3JaxError, ValueError):
    """Training data that m3jax cannot use; the message names the path (and line) and what was expected."""


@dataclasses.dataclass(frozen=True)
class Instructions:
    """query/passage_instruction_for_retrieval and their formats (config fields of the same names)."""
    query: str | None = None
    query_format: str = "{}{}"
    passage: str | None = None
    passage_format: str = "{}{}"


@dataclasses.dataclass(frozen=True)
class ScanRules:
    """What a valid record is, given the run's settings."""
    train_group_size: int
    knowledge_distillation: bool
    per_dataset_columns: bool  # same_dataset_within_batch: type / batch_size / train_group_size are honoured
    skip_bad_examples: bool
    long_text_chars: tuple[int, int] = (0, 0)  # count queries / passages longer than this (0: do not count)


@dataclasses.dataclass
class FileIndex:
    """One dataset file after validation: where its valid records are and the per-file columns."""
    path: str
    line_numbers: np.ndarray  # int64 [n], 1-based line (JSON lines) or element number (JSON array) per record
    num_pos: np.ndarray  # int32 [n]
    num_neg: np.ndarray  # int32 [n]
    offsets: np.ndarray | None = None  # int64 [n] byte offset of each record (JSON lines files)
    blobs: list[bytes] | None = None  # each record re-encoded (JSON array files)
    type: str | None = None
    batch_size: int | None = None  # the `batch_size` column
    group_size_column: int | None = None  # the `train_group_size` column
    has_scores: bool = False  # pos_scores / neg_scores present (only looked at with knowledge_distillation)
    bad_count: int = 0
    long_texts: tuple[int, int] = (0, 0)  # valid records' queries / passages longer than ScanRules.long_text_chars
    _fh: Any = dataclasses.field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.line_numbers)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_fh"] = None  # open file handles stay in the process that opened them
        return state

    def subset(self, keep: np.ndarray) -> FileIndex:
        """The same file restricted to records `keep` (max_example_num_per_dataset)."""
        return dataclasses.replace(
            self, line_numbers=self.line_numbers[keep], num_pos=self.num_pos[keep], num_neg=self.num_neg[keep],
            offsets=None if self.offsets is None else self.offsets[keep],
            blobs=None if self.blobs is None else [self.blobs[i] for i in keep], _fh=None)

    def raw(self, i: int) -> bytes:
        """Record i as stored: its line (JSON lines, re-read from disk) or its re-encoded element (JSON array)."""
        if self.blobs is not None:
            return self.blobs[i]
        if self._fh is None:
            self._fh = open(self.path, "rb")  # noqa: SIM115 (kept open between records; close() closes it)
        return _line_at(self._fh, self.offsets[i])

    def record(self, i: int) -> dict:
        return json.loads(self.raw(i))

    def records(self, rows: Sequence[int]) -> list[dict]:
        """Records `rows`, read through a file handle of this call's own: no state, so threads may share the index."""
        if self.blobs is not None:
            return [json.loads(self.blobs[i]) for i in rows]
        with open(self.path, "rb") as fh:
            return [json.loads(_line_at(fh, self.offsets[i])) for i in rows]

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _line_at(fh, offset) -> bytes:
    fh.seek(int(offset))
    return fh.readline().rstrip(b"\r\n")


def file_group_size(type_: str | None, group_size_column: int | None, train_group_size: int,
                    first_num_neg: int) -> int:
    """Passages per query of a batch whose first example comes from a file with these columns.

    FlagEmbedding 1.4 `_get_train_group_size`: `type` wins over `train_group_size` (only_1neg -> 2, symmetric_class ->
    min(#neg of the batch's first example + 1, G), any other type -> G), then the `train_group_size` column, then G.
    """
    if type_ is not None:
        if type_ == "only_1neg":
            return 2
        if type_ == "symmetric_class":
            return min(first_num_neg + 1, train_group_size)
        return train_group_size
    if group_size_column is not None:
        return group_size_column
    return train_group_size


def list_dataset_files(directory: str) -> list[str]:
    """The .json/.jsonl files of a train_data directory, sorted (FlagEmbedding's os.listdir order is arbitrary); a
    train_data path that is a .json/.jsonl file is itself (FlagEmbedding 1.4.2: one dataset per file path)."""
    if not os.path.exists(directory):
        raise DataError(f"train_data path {directory!r} does not exist; expected a directory of .json/.jsonl files "
                        "or a .json/.jsonl file")
    if not os.path.isdir(directory):
        if directory.endswith((".json", ".jsonl")):
            return [directory]
        raise DataError(f"train_data path {directory!r} is a file but not .json/.jsonl; expected a directory of "
                        ".json/.jsonl files or a .json/.jsonl file (FlagEmbedding skips it silently)")
    files = sorted(f for f in os.listdir(directory) if f.endswith((".json", ".jsonl"))
                   and os.path.isfile(os.path.join(directory, f)))
    if not files:
        raise DataError(f"train_data directory {directory!r} has no .json/.jsonl files; expected one file per dataset")
    return [os.path.join(directory, f) for f in files]


def _type_name(x: Any) -> str:
    return "null" if x is None else type(x).__name__


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_texts(rec: dict, field: str, *, required: bool, non_empty: bool, why: str = "") -> str | None:
    if field not in rec:
        return f"missing {field!r}; expected a{' non-empty' if non_empty else ''} list of strings{why}" \
            if required else None
    v = rec[field]
    if not isinstance(v, list):
        return f"{field!r} is {_type_name(v)}; expected a list of strings"
    if non_empty and not v:
        return f"{field!r} is empty; expected at least one {'positive' if field == 'pos' else 'negative'} " \
               f"passage{why}"
    for j, t in enumerate(v):
        if not isinstance(t, str):
            return f"{field!r}[{j}] is {_type_name(t)}; expected a string"
    return None


def _check_scores(rec: dict, field: str, texts_field: str) -> str | None:
    v = rec[field]
    if not isinstance(v, list):
        return f"{field!r} is {_type_name(v)}; expected a list of numbers"
    n = len(rec.get(texts_field) or [])
    if len(v) != n:
        return (f"{field!r} has {len(v)} entries but {texts_field!r} has {n}; expected one teacher score per "
                f"passage")
    for j, s in enumerate(v):
        if not _is_number(s):
            return f"{field!r}[{j}] is {s!r}; expected a finite number"
    return None


def _file_columns(rec: dict, rules: ScanRules) -> tuple[dict, str | None]:
    """The per-file columns as this record states them, or an error."""
    cols = {"type": None, "batch_size": None, "group_size_column": None, "has_scores": False}
    if rules.per_dataset_columns:
        if "type" in rec and rec["type"] is not None:
            if not isinstance(rec["type"], str):
                return cols, f"'type' is {_type_name(rec['type'])}; expected a string"
            cols["type"] = rec["type"]
        for field, key in (("batch_size", "batch_size"), ("train_group_size", "group_size_column")):
            if field in rec and rec[field] is not None:
                v = rec[field]
                if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                    return cols, f"{field!r} is {v!r}; expected a positive int"
                cols[key] = v
    if rules.knowledge_distillation:
        has_p, has_n = "pos_scores" in rec, "neg_scores" in rec
        if has_p != has_n:
            return cols, f"has {'pos_scores' if has_p else 'neg_scores'} without " \
                         f"{'neg_scores' if has_p else 'pos_scores'}; expected both teacher score lists or neither"
        cols["has_scores"] = has_p
    return cols, None


def check_record(rec: Any, rules: ScanRules, file_cols: dict | None) -> tuple[dict | None, str | None]:
    """Validate one parsed record. Returns (its per-file columns, None) or (None, what is wrong)."""
    if not isinstance(rec, dict):
        return None, f"a JSON {_type_name(rec)}; expected a JSON object with 'query', 'pos' and 'neg'"
    if "query" not in rec:
        return None, "missing 'query'; expected a string"
    if not isinstance(rec["query"], str):
        return None, f"'query' is {_type_name(rec['query'])}; expected a string"
    err = _check_texts(rec, "pos", required=True, non_empty=True)
    if err:
        return None, err
    if "prompt" in rec and rec["prompt"] is not None and not isinstance(rec["prompt"], str):
        return None, f"'prompt' is {_type_name(rec['prompt'])}; expected a string (a per-example query instruction)"
    cols, err = _file_columns(rec, rules)
    if err:
        return None, err
    if file_cols is not None:
        for key, field in (("type", "type"), ("batch_size", "batch_size"),
                           ("group_size_column", "train_group_size"), ("has_scores", "pos_scores/neg_scores")):
            if cols[key] != file_cols[key]:
                if key == "has_scores":
                    return None, (f"{'has' if cols[key] else 'lacks'} teacher scores but the file's first example "
                                  f"{'has' if file_cols[key] else 'lacks'} them; expected scores on every example "
                                  "of a file or on none")
                return None, (f"{field!r} is {cols[key]!r} but the file's first example has {file_cols[key]!r}; "
                              "expected one value per dataset file")
    g = train_group_size_for(cols, rules)
    why = f" (group size {g} needs {g - 1} negatives per query)"
    err = _check_texts(rec, "neg", required=g > 1, non_empty=g > 1, why=why)
    if err:
        return None, err
    if cols["has_scores"]:
        err = _check_scores(rec, "pos_scores", "pos") or _check_scores(rec, "neg_scores", "neg")
        if err:
            return None, err
    return cols, None


def train_group_size_for(cols: dict, rules: ScanRules) -> int:
    """The largest group size records of a file with these columns can be sampled with."""
    if cols["type"] == "symmetric_class":
        return rules.train_group_size
    return file_group_size(cols["type"], cols["group_size_column"], rules.train_group_size, 0)


def _iter_json_lines(path: str):
    """(line number, byte offset, parsed record or the exception) for every non-blank line."""
    offset = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            start, offset = offset, offset + len(line)
            if line_no == 1 and line.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
                line, start = line[3:], start + 3
            if not line.strip():
                continue
            try:
                yield line_no, start, json.loads(line), None
            except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
                yield line_no, start, None, e


def _is_json_array(path: str) -> bool:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def scan_file(path: str, rules: ScanRules) -> FileIndex:
    """Validate every record of one dataset file and index the valid ones.

    Raises DataError at the first bad record, or (skip_bad_examples) logs each one and counts them.
    """
    array = path.endswith(".json") and _is_json_array(path)
    offsets, line_numbers, num_pos, num_neg, blobs = [], [], [], [], []
    file_cols: dict | None = None
    bad = 0
    long_q = long_p = 0
    q_chars, p_chars = rules.long_text_chars

    def bad_record(where: str, reason: str) -> None:
        nonlocal bad
        msg = f"{path}:{where}: {reason}"
        if not rules.skip_bad_examples:
            raise DataError(msg)
        bad += 1
        logger.warning("skipping bad example %s", msg)

    if array:
        try:
            with open(path, "rb") as f:
                records = json.load(f)
        except (ValueError, UnicodeDecodeError) as e:
            line = getattr(e, "lineno", "?")
            raise DataError(f"{path}:{line}: invalid JSON ({e}); expected a JSON array of objects or one JSON object "
                            "per line") from None
        items = ((i, None, rec, None) for i, rec in enumerate(records, start=1))
    else:
        items = _iter_json_lines(path)
    for number, offset, rec, parse_error in items:
        where = f"element {number}" if array else str(number)
        if parse_error is not None:
            bad_record(where, f"invalid JSON ({parse_error}); expected one JSON object per line")
            continue
        cols, reason = check_record(rec, rules, file_cols)
        if reason is not None:
            bad_record(where, reason)
            continue
        if file_cols is None:
            file_cols = cols
        if q_chars and len(rec["query"]) > q_chars:
            long_q += 1
        if p_chars:
            long_p += sum(len(t) > p_chars for t in rec["pos"]) + sum(len(t) > p_chars for t in rec.get("neg") or ())
        line_numbers.append(number)
        num_pos.append(len(rec["pos"]))
        num_neg.append(len(rec.get("neg") or ()))
        if array:
            blobs.append(json.dumps(rec, ensure_ascii=False).encode())
        else:
            offsets.append(offset)
    if bad:
        logger.warning("%s: skipped %d bad example(s) (skip_bad_examples=True)", path, bad)
    file_cols = file_cols or {"type": None, "batch_size": None, "group_size_column": None, "has_scores": False}
    return FileIndex(
        path=path, line_numbers=np.asarray(line_numbers, np.int64), num_pos=np.asarray(num_pos, np.int32),
        num_neg=np.asarray(num_neg, np.int32), offsets=None if array else np.asarray(offsets, np.int64),
        blobs=blobs if array else None, bad_count=bad, long_texts=(long_q, long_p), **file_cols)


def scan_files(paths: Sequence[str], rules: ScanRules, num_workers: int,
               parallel_min_bytes: int = 64 << 20) -> list[FileIndex]:
    """scan_file over many files, in worker processes when there is enough data to repay starting them."""
    if num_workers > 1 and len(paths) > 1 and sum(os.path.getsize(p) for p in paths) >= parallel_min_bytes:
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(num_workers, len(paths)), mp_context=ctx) as pool:
            return list(pool.map(scan_file, paths, [rules] * len(paths)))
    return [scan_file(p, rules) for p in paths]


# ---- texts ---------------------------------------------------------------------------------------------------------

def query_text(rec: dict, ins: Instructions) -> str:
    """The query with its instruction: the example's `prompt` if it has one, else query_instruction_for_retrieval."""
    instruction = rec.get("prompt")
    if instruction is None:
        instruction = ins.query
    return rec["query"] if instruction is None else ins.query_format.format(instruction, rec["query"])


def passage_text(text: str, rec: dict, type_: str | None, ins: Instructions) -> str:
    """A passage with its instruction (symmetric_sts / symmetric_clustering data take the query's instruction)."""
    if type_ in SYMMETRIC_QUERY_INSTRUCTION_TYPES:
        instruction = rec.get("prompt")
        if instruction is None:
            instruction = ins.query
        return text if instruction is None else ins.query_format.format(instruction, text)
    return text if ins.passage is None else ins.passage_format.format(ins.passage, text)


# ---- token-length table (multi-host padding) ---------------------------------------------------------------------

def make_backend_tokenizer(tokenizer_json: str, max_length: int | None):
    """A `tokenizers.Tokenizer` that encodes exactly as `hf_tokenizer(texts, truncation=True, max_length=...)`."""
    import tokenizers
    tok = tokenizers.Tokenizer.from_str(tokenizer_json)
    tok.no_padding()
    if max_length is None:
        tok.no_truncation()
    else:
        tok.enable_truncation(max_length=max_length, stride=0, strategy="longest_first", direction="right")
    return tok


# ---- cutting long texts before tokenisation -----------------------------------------------------------------------
#
# A 10 MB text tokenised whole and then truncated to max_len costs seconds and gigabytes; `encode_truncated` cuts it
# first, at a space within CHARS_PER_TOKEN * max_len characters, and the result is the same token ids. Why that is
# exact, for the tokenizer pipeline `cut_is_exact` accepts (XLM-R / bge-m3's tokenizer.json; any other tokenizer is
# never cut): the text T is split at added tokens (whose contents hold no space), each piece normalised grapheme
# cluster by grapheme cluster (Precompiled: sentencepiece's charsmap), with the trailing whitespace stripped and runs
# of spaces collapsed, then split into words at spaces (Metaspace) and each word tokenised alone (Unigram). The cut
# is at a space T[p] such that T[p-1] is a letter, digit or punctuation that is not a grapheme Prepend character
# (so a cluster boundary lies at p) and T[p+1] is not a combining or joining character (so the space is a cluster of
# its own, which the charsmap keeps a space). Then T[:p] is whole clusters, normalises to a prefix of T's
# normalised text that ends in a non-space, right before a space of T's; every word of T[:p] is a word of T; and
# the tokens of T[:p] are the first tokens of T. When T[:p] has at least max_len - (special tokens) of them, the
# truncated encodings are equal; when it has fewer (a text of mostly spaces or symbols), T is tokenised whole. A
# text with no such space in its last half of the bound (unsegmented Chinese, Japanese, Thai, ...) is tokenised
# whole too. tests/test_data.py checks the equality on adversarial and random texts.

CHARS_PER_TOKEN = 16  # generous: bge-m3's pieces average 3-4 characters of prose; fewer only saves less
_PREV_OK = frozenset(("Lu", "Ll", "Lt", "Lo", "Nd", "Nl", "No", "Pc", "Pd", "Ps", "Pe", "Pi", "Pf", "Po"))
_PREPEND_BMP = frozenset("\u0d4e")  # the one Grapheme_Cluster_Break=Prepend letter of the BMP (Unicode 16)
_NEXT_BAD = frozenset(("Mn", "Mc", "Me", "Cf", "Sk", "Lm", "Co", "Cn", "Cs"))
_SPACING_MARK_LETTERS = frozenset("\u0e33\u0eb3")  # Thai / Lao AM: letters with Grapheme_Cluster_Break=SpacingMark


def cut_is_exact(tokenizer_json: str) -> bool:
    """True for a tokenizer whose pipeline makes the cut of `encode_truncated` exact (see the comment above):
    normaliser Precompiled / Strip / Replace(" {2,}" -> " " or "▁") in a Sequence, Metaspace words, a Unigram
    model, added tokens without spaces."""
    spec = json.loads(tokenizer_json)
    normalizer = spec.get("normalizer")
    parts = (normalizer or {}).get("normalizers", [normalizer]) if normalizer else []
    for n in parts:
        kind = n.get("type")
        if kind == "Replace":
            if n.get("pattern") not in ({"Regex": " {2,}"},) or n.get("content") not in (" ", "\u2581"):
                return False
        elif kind not in ("Precompiled", "Strip"):
            return False
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") != "Metaspace" or pre.get("replacement") != "\u2581" or pre.get("split", True) is not True:
        return False
    if (spec.get("model") or {}).get("type") != "Unigram":
        return False
    return all(" " not in t.get("content", "") for t in spec.get("added_tokens") or ())


def _prev_ok(ch: str) -> bool:
    if " " < ch < "\x7f":
        return True
    if ch in _PREPEND_BMP or ord(ch) > 0xFFFF:  # the supplementary planes' Prepend letters: leave them all out
        return False
    return unicodedata.category(ch) in _PREV_OK


def _next_ok(ch: str) -> bool:
    return ch < "\x7f" or (ch not in _SPACING_MARK_LETTERS and unicodedata.category(ch) not in _NEXT_BAD)


def cut_point(text: str, max_chars: int, tries: int = 64) -> int | None:
    """Where `encode_truncated` may cut `text` (a space of the second half of its first max_chars characters with
    safe neighbours), or None: not longer than max_chars, or no such space."""
    if len(text) <= max_chars:
        return None
    end = max_chars
    for _ in range(tries):
        p = text.rfind(" ", max_chars // 2, end)
        if p <= 0:
            return None
        if _prev_ok(text[p - 1]) and _next_ok(text[p + 1]):
            return p
        end = p
    return None


def encode_truncated(tokenizer, texts: Sequence[str], max_len: int, cut_chars: int | None) -> list:
    """`tokenizer.encode_batch(texts)` (a tokenizer truncating at max_len, make_backend_tokenizer), the texts
    longer than cut_chars cut first where that gives the same encoding (see the comment above). cut_chars None:
    no cut (cut_is_exact is False)."""
    cuts = [None] * len(texts) if cut_chars is None else [cut_point(t, cut_chars) for t in texts]
    if not any(c is not None for c in cuts):
        return tokenizer.encode_batch(list(texts))
    encs = tokenizer.encode_batch([t if c is None else t[:c] for t, c in zip(texts, cuts)])
    short = [i for i, c in enumerate(cuts) if c is not None and len(encs[i].ids) < max_len]
    for i, enc in zip(short, tokenizer.encode_batch([texts[i] for i in short]) if short else ()):
        encs[i] = enc  # the cut kept fewer than max_len tokens: the whole text decides
    return encs


_worker_tokenizers: dict = {}


def _init_length_worker(tokenizer_json: str, query_max_len: int, passage_max_len: int) -> None:
    _worker_tokenizers["q"] = make_backend_tokenizer(tokenizer_json, query_max_len)
    _worker_tokenizers["p"] = make_backend_tokenizer(tokenizer_json, passage_max_len)
    exact = cut_is_exact(tokenizer_json)
    _worker_tokenizers["cut"] = {n: CHARS_PER_TOKEN * n if exact else None for n in (query_max_len, passage_max_len)}
    _worker_tokenizers["max_len"] = (query_max_len, passage_max_len)


def _lengths_of_chunk(file: FileIndex, start: int, stop: int, type_: str | None, ins: Instructions):
    """Token lengths (after truncation) of query, every pos and every neg of records [start, stop)."""
    queries, passages = [], []
    for i in range(start, stop):
        rec = file.record(i)
        queries.append(query_text(rec, ins))
        passages.extend(passage_text(t, rec, type_, ins) for t in rec["pos"])
        passages.extend(passage_text(t, rec, type_, ins) for t in rec.get("neg") or ())
    file.close()
    lq, lp = _worker_tokenizers["max_len"]
    cut = _worker_tokenizers["cut"]
    qlen = np.fromiter((len(e) for e in encode_truncated(_worker_tokenizers["q"], queries, lq, cut[lq])), np.int32,
                       len(queries))
    plen = np.fromiter((len(e) for e in encode_truncated(_worker_tokenizers["p"], passages, lp, cut[lp])), np.int32,
                       len(passages))
    return qlen, plen


def init_split_worker(tokenizer_json: str) -> None:
    _worker_tokenizers["full"] = make_backend_tokenizer(tokenizer_json, None)


def max_text_lengths(file: FileIndex, start: int, stop: int) -> np.ndarray:
    """scripts/split_data_by_length.py: per record of [start, stop), the longest of query, pos and neg in tokens
    (special tokens included, no truncation). Runs after init_split_worker."""
    texts, counts = [], []
    for i in range(start, stop):
        rec = file.record(i)
        rec_texts = [rec["query"]] + list(rec["pos"]) + list(rec.get("neg") or ())
        texts.extend(rec_texts)
        counts.append(len(rec_texts))
    file.close()
    lens = np.fromiter((len(e) for e in _worker_tokenizers["full"].encode_batch(texts)), np.int64, len(texts))
    return np.maximum.reduceat(lens, np.concatenate([[0], np.cumsum(counts)[:-1]]))


@dataclasses.dataclass
class FileLengths:
    query: np.ndarray  # int32 [n]
    pos: np.ndarray  # int32 [sum num_pos], record i's at pos_start[i]:pos_start[i]+num_pos[i]
    neg: np.ndarray  # int32 [sum num_neg]


def tokenizer_fingerprint(tokenizer_json: str) -> str:
    return hashlib.sha256(tokenizer_json.encode()).hexdigest()[:16]


def token_length_table(files: Sequence[FileIndex], types: Sequence[str | None], tokenizer_json: str, *,
                       query_max_len: int, passage_max_len: int, ins: Instructions, num_workers: int,
                       cache_dir: str | None = None, chunk: int = 2048) -> list[FileLengths]:
    """Truncated token length of every text of every file, computed in worker processes and cached on disk.

    Cache key per file: its path, size and mtime, the tokenizer (hash of its JSON), the max lengths, the
    instructions, its type and the records kept (so skip_bad_examples / subsampling changes miss the cache).
    """
    cache_dir = os.path.join(cache_dir, "token_lengths") if cache_dir else storage.cache_dir("token_lengths")
    tok_id = tokenizer_fingerprint(tokenizer_json)
    results: list[FileLengths | None] = [None] * len(files)
    keys, todo = [], []
    for fi, (file, type_) in enumerate(zip(files, types)):
        st = os.stat(file.path)
        key_src = json.dumps([os.path.abspath(file.path), st.st_size, st.st_mtime_ns, tok_id, query_max_len,
                              passage_max_len, dataclasses.astuple(ins), type_,
                              hashlib.sha256(file.line_numbers.tobytes()).hexdigest()])
        key = hashlib.sha256(key_src.encode()).hexdigest()[:32]
        keys.append(key)
        cached = os.path.join(cache_dir, key + ".npz")
        if os.path.exists(cached):
            with np.load(cached) as z:
                results[fi] = FileLengths(z["query"], z["pos"], z["neg"])
        else:
            todo.extend((fi, s, min(s + chunk, len(file))) for s in range(0, len(file), chunk))
    if todo:
        logger.info("computing token lengths of %d file(s) for multi-host padding (%d worker process(es))",
                    sum(r is None for r in results), max(num_workers, 1))
        parts: dict[int, list] = {}
        jobs = [(files[fi], s, e, types[fi], ins) for fi, s, e in todo]
        if num_workers > 0:
            ctx = multiprocessing.get_context("spawn")  # fork is unsafe once JAX has started its threads
            with concurrent.futures.ProcessPoolExecutor(
                    num_workers, mp_context=ctx, initializer=_init_length_worker,
                    initargs=(tokenizer_json, query_max_len, passage_max_len)) as pool:
                outs = list(pool.map(_lengths_of_chunk, *zip(*jobs)))
        else:
            _init_length_worker(tokenizer_json, query_max_len, passage_max_len)
            outs = [_lengths_of_chunk(*job) for job in jobs]
        for (fi, _, _), out in zip(todo, outs):
            parts.setdefault(fi, []).append(out)
        os.makedirs(cache_dir, exist_ok=True)
        for fi, chunks in parts.items():
            file = files[fi]
            qlen = np.concatenate([c[0] for c in chunks])
            plen = np.concatenate([c[1] for c in chunks])
            # Per record the passages are pos then neg; split them into the two flat arrays.
            per_rec = file.num_pos + file.num_neg
            rec_start = np.concatenate([[0], np.cumsum(per_rec)[:-1]]).astype(np.int64)
            is_pos = np.zeros(len(plen), bool)
            for i in range(len(file)):  # vectorised enough: one slice assignment per record
                is_pos[rec_start[i]:rec_start[i] + file.num_pos[i]] = True
            results[fi] = FileLengths(qlen, plen[is_pos], plen[~is_pos])
            tmp = os.path.join(cache_dir, f"{keys[fi]}.{socket.gethostname()}.{os.getpid()}.tmp.npz")
            np.savez(tmp, query=results[fi].query, pos=results[fi].pos, neg=results[fi].neg)
            os.replace(tmp, os.path.join(cache_dir, keys[fi] + ".npz"))  # atomic: hosts may share the cache
    return results  # type: ignore[return-value]
