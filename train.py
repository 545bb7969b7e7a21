"""Fine-tune bge-m3 with the unified objective.

    python train.py --config configs/toy.py
    python train.py --config configs/bge_m3_unified.py --config.model_name_or_path=/models/bge-m3 \
        --config.train_data=data/a,data/b --config.output_dir=runs/m3

Any config field can be overridden as --config.<field>=<value>; unknown fields are rejected.
"""
import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from m3jax import config as config_lib
from m3jax import trainer
from m3jax.data_files import DataError
from m3jax.hf_io import CheckpointFormatError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", lock_config=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; use --config.<field>=<value>")
    logging.getLogger().setLevel(logging.WARNING)  # orbax / absl info lines drown the progress bar
    logging.getLogger("m3jax").setLevel(logging.INFO)
    try:
        summary = trainer.train(_CONFIG.value)
    except (config_lib.ConfigError, DataError, CheckpointFormatError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    logging.getLogger("m3jax").info("finished at step %d: %s", summary["step"], summary["metrics"])


if __name__ == "__main__":
    try:
        config_lib.check_override_flags(sys.argv[1:])
    except config_lib.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    flags.mark_flags_as_required(["config"])
    app.run(main)
