"""What a run reports: a console progress bar with ETA, log lines, TensorBoard events and metrics.jsonl.

The step returns its metrics as device arrays; `MetricsLogger.add` queues them without a host sync, and `flush`
(every logging_steps, before a save and before an eval) reads the queue in one transfer, stops the run on a
non-finite loss or gradient norm, and logs the averages with the step time and tokens per second. Only process 0
writes; every process runs the checks.

On a URL output_dir (gs://...; an object store cannot append): the TensorBoard events are written to a local
temporary directory and each event file is uploaded whole to output_dir/tensorboard/ at every flush (a new event
file is started past 1 MiB, so an upload stays small), and metrics.jsonl is kept in memory (its earlier lines read
back when a run resumes) and rewritten in one PUT at every log.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from m3jax.core import storage
from m3jax.core.errors import M3JaxError

EVENT_FILE_ROLLOVER_BYTES = 1 << 20  # URL output_dir: start a new TensorBoard event file past this size


class NonFiniteLossError(M3JaxError, RuntimeError):
    """The loss or the gradient norm stopped being finite; the message names the step and the last good checkpoint."""


class MetricsLogger:
    def __init__(self, output_dir: str, total_steps: int, start_step: int, *,
                 last_good_checkpoint: Callable[[], str] = lambda: "", resumed: bool = False):
        self.enabled = jax.process_index() == 0
        self.last_good_checkpoint = last_good_checkpoint
        self.history: dict[int, float] = {}  # step -> loss (steps counted from 0)
        self.last: dict[str, float] = {}  # the last logged averages
        self._pending: list[tuple[int, Any, int]] = []  # (step, device metrics, tokens) since the last flush
        self._window_start = time.perf_counter()
        self.writer = self.bar = self.jsonl = None
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        from tqdm.auto import tqdm

        jsonl = storage.join(output_dir, "metrics.jsonl")
        kept = _rows_up_to(jsonl, start_step if resumed else -1)
        if storage.is_url(output_dir):
            self.writer = _SyncedEventWriter(storage.join(output_dir, "tensorboard"))
            self.jsonl = _RewrittenObject(jsonl, kept)
        else:
            self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            if kept is not None:
                with storage.atomic_file(jsonl) as f:
                    f.write(kept)
            self.jsonl = open(jsonl, "a", encoding="utf-8")  # noqa: SIM115
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)

    def add(self, step: int, device_metrics: dict, tokens: int) -> None:
        """Queue one step's metrics (device arrays; not read yet) and advance the progress bar."""
        self._pending.append((step, device_metrics, tokens))
        if self.enabled:
            self.bar.update(1)

    def flush(self) -> None:
        """Read the queued metrics to host (the only host sync of the loop), fail on non-finite values, log the
        averages over the window."""
        if not self._pending:
            return
        host = jax.device_get([m for _, m, _ in self._pending])
        for (step, _, _), m in zip(self._pending, host):
            if not (np.isfinite(m["loss"]) and np.isfinite(m["grad_norm"])):
                raise NonFiniteLossError(f"step {step}: loss={m['loss']} grad_norm={m['grad_norm']} is not finite; "
                                         f"stopping. {self.last_good_checkpoint()}".rstrip())
            self.history[step] = float(m["loss"])
        elapsed = time.perf_counter() - self._window_start
        tokens = sum(t for _, _, t in self._pending)
        self.last = {k: float(np.mean([m[k] for m in host])) for k in host[-1]}
        self.last.update(step_time_s=elapsed / len(self._pending), tokens_per_s=tokens / elapsed)
        self.log(self._pending[-1][0] + 1, self.last)
        self._pending.clear()
        self._window_start = time.perf_counter()

    def log(self, step: int, metrics: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in metrics.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.writer.flush()
        self.jsonl.write(json.dumps({"step": step, "split": prefix, **metrics}) + "\n")
        self.jsonl.flush()
        if prefix == "train":
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['learning_rate']:.2e}")
        line = " ".join(f"{k}={v:.5g}" for k, v in metrics.items())
        self.bar.write(f"{prefix} step {step}: {line}" if prefix != "train" else f"step {step}: {line}")

    def close(self) -> None:
        if self.enabled:
            self.bar.close()
            self.writer.close()
            self.jsonl.close()


def _rows_up_to(path: str, step: int) -> str | None:
    """The text of metrics.jsonl keeping only the rows of steps <= `step` (a run resumed from that step logs the
    later ones again; -1: a run starting over keeps none), or None when nothing is dropped."""
    if not storage.isfile(path):
        return None
    lines = storage.read_bytes(path).decode("utf-8", errors="replace").splitlines(keepends=True)
    kept = []
    for line in lines:
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a killed run
        if row_step <= step:
            kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
        return None
    what = (f"after step {step} (the resumed run logs those steps again)" if step >= 0
            else "of an earlier start (the run starts over)")
    logging.getLogger(__name__).info("%s: dropped %d row(s) %s", path, len(lines) - len(kept), what)
    return "".join(kept)


class _RewrittenObject:
    """A text file on an object store opened for appending: the whole content is rewritten (one PUT) at flush.
    `text`: the content to start from (None: the object's)."""

    def __init__(self, url: str, text: str | None = None):
        self.url = url
        if text is None:
            self.text = storage.read_bytes(url).decode("utf-8") if storage.isfile(url) else ""
            self._flushed = len(self.text)
        else:
            self.text, self._flushed = text, -1  # written at the first flush

    def write(self, text: str) -> None:
        self.text += text

    def flush(self) -> None:
        if len(self.text) != self._flushed:
            storage.write_bytes(self.url, self.text.encode("utf-8"))
            self._flushed = len(self.text)

    def close(self) -> None:
        self.flush()


class _SyncedEventWriter:
    """tensorboardX's SummaryWriter on a local temporary directory, its event files uploaded to a URL at flush."""

    def __init__(self, url: str):
        from tensorboardX import SummaryWriter

        self._make = SummaryWriter
        self.url = url
        self.local = tempfile.mkdtemp(prefix="m3jax-tensorboard-")
        self.uploaded: dict[str, int] = {}  # event file name -> size uploaded
        self.files = 0
        self.writer = self._make(self.local, filename_suffix=".0")

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self.writer.add_scalar(tag, value, step)

    def flush(self) -> None:
        self.writer.flush()
        big = False
        for name in sorted(os.listdir(self.local)):
            path = os.path.join(self.local, name)
            size = os.path.getsize(path)
            if self.uploaded.get(name) != size:
                with open(path, "rb") as f:
                    storage.write_bytes(storage.join(self.url, name), f.read())
                self.uploaded[name] = size
            big = big or size > EVENT_FILE_ROLLOVER_BYTES
        if big:  # later events go to a new file; the full ones are uploaded and need no more uploads
            self.writer.close()
            for name in os.listdir(self.local):
                os.remove(os.path.join(self.local, name))
            self.files += 1
            self.writer = self._make(self.local, filename_suffix=f".{self.files}")

    def close(self) -> None:
        self.flush()
        self.writer.close()
        shutil.rmtree(self.local, ignore_errors=True)
