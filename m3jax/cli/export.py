"""`m3jax export`: a training checkpoint as a bge-m3 (Hugging Face) directory."""
from __future__ import annotations

import json
import sys

from m3jax import config as config_lib
from m3jax.cli.common import step_arg
from m3jax.core import storage
from m3jax.tools.export import export_checkpoint


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a training checkpoint as a bge-m3 (Hugging Face) directory",
        description="Write an m3jax training checkpoint in the bge-m3 layout: config.json, model.safetensors "
                    "(+ pytorch_model.bin), colbert_linear.pt, sparse_linear.pt, tokenizer and sentence-transformers "
                    "files. Loads in transformers AutoModel, FlagEmbedding BGEM3FlagModel and SentenceTransformer. "
                    "Written to a staging directory and renamed into place: never half-written.")
    p.add_argument("--checkpoint", required=True,
                   help="a run's output_dir (latest complete step), its checkpoints/ dir, or checkpoints/<step>")
    p.add_argument("--output", required=True, help="directory to create (must not exist or be empty)")
    p.add_argument("--step", type=step_arg, default=None,
                   help="export this step; 'best': the run's best step (best.json) (default: the latest complete step)")
    p.add_argument("--base-model", default=None,
                   help="directory with config.json and tokenizer files (default: <output_dir>/base_model, "
                        "copied there when the run started)")
    p.add_argument("--pytorch-bin", action="store_true", help="also write pytorch_model.bin (as bge-m3 ships)")
    p.add_argument("--heads-dtype", choices=("float32", "float16"), default="float32",
                   help="dtype of colbert_linear.pt / sparse_linear.pt; float32 (default) is exact, float16 is "
                        "what bge-m3 ships")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    p.add_argument("--lora-adapters", action="store_true",
                   help="a LoRA run: besides the merged model, write the adapters alone to <output>/lora_adapters "
                        "(PEFT layout: PeftModel.from_pretrained(<base bge-m3 AutoModel>, <that dir>))")
    p.add_argument("--merge-with", default=None, metavar="DIR",
                   help="a bge-m3 directory (e.g. the base model) to merge with: every tensor becomes W * fine-tuned "
                        "+ (1 - W) * DIR's (with --merge-weight W) (default: no merge)")
    p.add_argument("--merge-weight", type=float, default=None, metavar="W",
                   help="weight of the fine-tuned model in the merge, in [0, 1] (1: the fine-tuned model, 0: DIR); "
                        "required with --merge-with (default: none)")
    p.set_defaults(func=run)


def run(args) -> int:
    out = export_checkpoint(args.checkpoint, args.output, step=args.step, base_model=args.base_model,
                            pytorch_bin=args.pytorch_bin, heads_dtype=args.heads_dtype, overwrite=args.overwrite,
                            lora_adapters=args.lora_adapters, merge_with=args.merge_with,
                            merge_weight=args.merge_weight, card_settings=config_lib.model_card_settings())
    info = json.loads(storage.read_bytes(storage.join(out, "m3jax_export.json")))
    merged = info.get("merge")
    print(f"m3jax export: wrote step {info['step']} of {info['source_checkpoint']}"
          + (f", merged with {merged['models'][1]} (W={merged['weights'][0]:g})" if merged else "")
          + f" to {out}", file=sys.stderr)
    print(out)
    return 0
