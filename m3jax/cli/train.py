"""`m3jax train`: a training run from a config file (the same as `python train.py`)."""
from __future__ import annotations

from m3jax import config as config_lib
from m3jax import trainer


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="fine-tune (or resume) from a config file: m3jax train --config configs/toy.py",
        description="Run train.py's training: --config FILE (a configs/*.py file) and any --config.<field>=<value> "
                    "overrides (fields: m3jax/config.py; a mistyped field is rejected with a suggestion).")
    p.add_argument("--config", required=True, help="a configs/*.py file")
    p.add_argument("--config.FIELD", metavar="VALUE", dest="_override", help="override any config field, e.g. "
                   "--config.learning_rate=2e-5 --config.mesh.fsdp=4 (repeatable; default: the config file's "
                   "values)")
    p.set_defaults(func=run)


def run(args) -> int:
    config_lib.check_override_flags(args.train_argv)  # a FlagEmbedding flag or a mistyped field: before training
    return trainer.main(args.train_argv)
