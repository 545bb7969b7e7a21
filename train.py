"""Fine-tune bge-m3 with the unified objective (the same as `m3jax train`).

    python train.py --config configs/toy.py
    python train.py --config configs/bge_m3_unified.py --config.model_name_or_path=/models/bge-m3 \
        --config.train_data=data/a,data/b --config.output_dir=runs/m3

Any config field can be overridden as --config.<field>=<value>; unknown fields are rejected.
"""
import sys

from m3jax.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
