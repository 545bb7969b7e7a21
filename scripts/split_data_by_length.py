"""Split training files by token length, as FlagEmbedding's research/BGE_M3/split_data_by_length.py does.

    python scripts/split_data_by_length.py --input_path train_data --output_dir train_data_split \\
        --model_name_or_path BAAI/bge-m3 --length_list 0 500 1000 2000 3000 4000 5000 6000 7000 --num_proc 16

For each example the length is the longest tokenised text among query, pos and neg (special tokens included, no
truncation); an example goes to `<name>_len-LO-HI.jsonl` for the range LO <= length < HI (the last range's HI is
`inf`). Those tags give each part its batch size in training (config.batch_size_by_length, default the research
table). Differences from FlagEmbedding's tool, none of which changes which file an example lands in:
- no `datasets` dependency: files are read with m3jax's reader (same validation and file:line errors), lines are
  written out unchanged (so extra columns such as `type`, `prompt` or teacher scores survive), tokenised in
  `--num_proc` worker processes with the tokenizer's Rust backend;
- .json files (JSON lines or one JSON array) are split too, not only .jsonl.
Existing outputs are skipped unless --overwrite. A JSON line per input file is appended to `<output_dir>/.split_log`.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import time

import numpy as np

from m3jax.data.files import DataError, ScanRules, init_split_worker, max_text_lengths, scan_file


def length_ranges(length_list: list[int]) -> list[tuple[int, float]]:
    bounds = sorted(length_list)
    ranges = [(lo, bounds[i + 1] if i + 1 < len(bounds) else math.inf) for i, lo in enumerate(bounds)]
    for lo, hi in ranges:
        if not 0 <= lo < hi:
            raise ValueError(f"--length_list {length_list}: expected distinct non-negative lengths")
    return ranges


def split_file(path: str, output_prefix: str, ranges, tokenizer_json: str, num_proc: int, overwrite: bool,
               chunk: int = 1024) -> dict:
    start_time = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    # Group size 1 and no kd: every record with a query and a non-empty pos is accepted, negatives optional.
    file = scan_file(path, ScanRules(train_group_size=1, knowledge_distillation=False, per_dataset_columns=False,
                                     skip_bad_examples=False))
    jobs = [(file, s, min(s + chunk, len(file))) for s in range(0, len(file), chunk)]
    if num_proc > 1 and len(jobs) > 1:
        with concurrent.futures.ProcessPoolExecutor(
                num_proc, mp_context=multiprocessing.get_context("spawn"), initializer=init_split_worker,
                initargs=(tokenizer_json,)) as pool:
            parts = list(pool.map(max_text_lengths, *zip(*jobs)))
    else:
        init_split_worker(tokenizer_json)
        parts = [max_text_lengths(*job) for job in jobs]
    lengths = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    split_info = {}
    for lo, hi in ranges:
        tag = f"len-{lo}-{hi}"
        save_path = f"{output_prefix}_{tag}.jsonl"
        if os.path.exists(save_path) and not overwrite:
            print(f"{save_path} exists, skip")
            continue
        idx = np.nonzero((lengths >= lo) & (lengths < hi))[0]
        split_info[tag] = int(len(idx))
        if len(idx):
            with open(save_path + ".tmp", "wb") as out:
                for i in idx:
                    out.write(file.raw(int(i)) + b"\n")
            os.replace(save_path + ".tmp", save_path)
    file.close()
    return {"file_name": os.path.basename(path), "size": len(file),
            "avg_length": float(lengths.mean()) if len(lengths) else 0.0, "file_path": path,
            "start_time": start_time, "end_time": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime()),
            "split_info": split_info}


def run(input_path: str, output_dir: str, model_name_or_path: str, length_list: list[int], num_proc: int = 1,
        overwrite: bool = False, log_name: str = ".split_log") -> list[dict]:
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    ranges = length_ranges(length_list)
    os.makedirs(output_dir, exist_ok=True)
    if os.path.isdir(input_path):
        inputs = [os.path.join(input_path, f) for f in sorted(os.listdir(input_path))
                  if f.endswith((".json", ".jsonl"))]
    elif os.path.isfile(input_path):
        inputs = [input_path]
    else:
        raise DataError(f"--input_path {input_path!r} does not exist; expected a .json/.jsonl file or a directory")
    logs = []
    for path in inputs:
        prefix = os.path.join(output_dir, os.path.splitext(os.path.basename(path))[0])
        logs.append(split_file(path, prefix, ranges, tokenizer_json, num_proc, overwrite))
        print(json.dumps(logs[-1], ensure_ascii=False))
    with open(os.path.join(output_dir, log_name), "a", encoding="utf-8") as f:
        for log in logs:
            f.write(json.dumps(log, ensure_ascii=False) + "\n")
    return logs


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input_path", required=True, help="a .json/.jsonl file or a directory of them")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model_name_or_path", default="BAAI/bge-m3", help="tokenizer to measure lengths with")
    p.add_argument("--length_list", type=int, nargs="+", default=[0, 500, 1000, 2000, 3000, 4000, 5000, 6000, 7000])
    p.add_argument("--num_proc", type=int, default=max(1, os.cpu_count() or 1))
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--log_name", default=".split_log", help="log file (JSON lines) in output_dir")
    a = p.parse_args(argv)
    run(a.input_path, a.output_dir, a.model_name_or_path, a.length_list, a.num_proc, a.overwrite, a.log_name)
    print("\nDONE!")


if __name__ == "__main__":
    main()
