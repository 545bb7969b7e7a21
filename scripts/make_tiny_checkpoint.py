"""Write a tiny random BGE-M3 checkpoint (bge-m3 directory layout) for tests and smoke runs.

    python scripts/make_tiny_checkpoint.py tiny_bge_m3 [--seed 0] [--colbert-dim N] [--pytorch-bin] ...
    python scripts/make_tiny_checkpoint.py tiny_reranker --reranker [--seed 0]     (bge-reranker-v2-m3's layout)

See m3jax/io/tiny_checkpoint.py for what is written.
"""
import argparse

from m3jax.io.hf_layout import CheckpointFormatError
from m3jax.io.tiny_checkpoint import make_tiny_checkpoint, make_tiny_reranker


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--colbert-dim", type=int, default=-1, help="colbert_linear output size; -1: hidden size")
    p.add_argument("--pytorch-bin", action="store_true", help="also write pytorch_model.bin")
    p.add_argument("--no-safetensors", action="store_true", help="do not write model.safetensors")
    p.add_argument("--heads-dtype", choices=["float16", "float32"], default="float16",
                   help="dtype of colbert_linear.pt / sparse_linear.pt (bge-m3 ships float16)")
    p.add_argument("--no-pooler", action="store_true", help="leave out pooler.dense.*")
    p.add_argument("--no-heads", action="store_true", help="leave out colbert_linear.pt / sparse_linear.pt")
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=64)
    p.add_argument("--max-position", type=int, default=514)
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    p.add_argument("--reranker", action="store_true",
                   help="write a cross-encoder reranker (XLMRobertaForSequenceClassification, one logit) instead; "
                        "only --seed, --hidden, --layers, --heads, --intermediate, --max-position apply")
    a = p.parse_args(argv)
    try:
        if a.reranker:
            print(make_tiny_reranker(a.out_dir, seed=a.seed, hidden=a.hidden, layers=a.layers, heads=a.heads,
                                     intermediate=a.intermediate, max_position=a.max_position,
                                     overwrite=a.overwrite))
            return
        path = make_tiny_checkpoint(
            a.out_dir, seed=a.seed, colbert_dim=a.colbert_dim, hidden=a.hidden, layers=a.layers, heads=a.heads,
            intermediate=a.intermediate, max_position=a.max_position, pooler=not a.no_pooler,
            with_heads=not a.no_heads, heads_dtype=a.heads_dtype, safetensors=not a.no_safetensors,
            pytorch_bin=a.pytorch_bin, overwrite=a.overwrite)
    except CheckpointFormatError as e:
        p.error(str(e).replace("overwrite=True", "--overwrite"))
    print(path)


if __name__ == "__main__":
    main()
