"""Orbax checkpoints of a run: train state, data-iterator position and the run config, in `output_dir/checkpoints`.

Layout of one step (`checkpoints/<step>/`):
  state/   params, optimizer state and step (sharded arrays; restored straight into their target shardings)
  data/    the grain iterator state of every process, so a resumed run sees exactly the batches it would have seen
  config/  the run config as JSON (export and eval read it to rebuild the model)
The architecture files needed to export without the original model directory (config.json, tokenizer files) are
copied once to `output_dir/base_model/` when a run starts.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any

import orbax.checkpoint as ocp

logger = logging.getLogger(__name__)

BASE_MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "sentencepiece.bpe.model")


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(os.path.abspath(output_dir), "checkpoints")


def base_model_dir(output_dir: str) -> str:
    return os.path.join(os.path.abspath(output_dir), "base_model")


def copy_base_model_files(model_dir: str, output_dir: str) -> None:
    """Keep the architecture config and tokenizer next to the checkpoints (export needs them)."""
    target = base_model_dir(output_dir)
    os.makedirs(target, exist_ok=True)
    for name in BASE_MODEL_FILES:
        src = os.path.join(model_dir, name)
        if os.path.exists(src) and not os.path.exists(os.path.join(target, name)):
            shutil.copy2(src, os.path.join(target, name))


class Checkpointer:
    """Thin wrapper over ocp.CheckpointManager with the three items of a run."""

    def __init__(self, output_dir: str, *, max_to_keep: int | None = 3, read_only: bool = False):
        self.directory = checkpoint_dir(output_dir)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "data", "config"), options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator, config_dict: dict) -> None:
        """Asynchronous: arrays are copied to host, then written in the background (call wait() before exit)."""
        args = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_dict))
        if data_iterator is not None:
            import grain.python as grain  # lazily: benchmarks and export run without grain installed
            args["data"] = grain.PyGrainCheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> Any:
        """State restored into the shardings of `abstract_state`; the data iterator restored in place."""
        args = dict(state=ocp.args.StandardRestore(abstract_state))
        if data_iterator is not None:
            import grain.python as grain
            args["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        return self.manager.restore(step, args=ocp.args.Composite(**args)).state

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore())).config

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def config_to_json(config) -> dict:
    """ConfigDict -> plain JSON-able dict (tuples become lists)."""
    return json.loads(config.to_json())
