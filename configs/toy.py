"""Toy fine-tune: the tiny random bge-m3 on toy_train_data, on a laptop CPU in a few minutes.

    python scripts/make_tiny_checkpoint.py runs/tiny_bge_m3     # first: the tiny checkpoint this config reads
    python train.py --config configs/toy.py

The tiny checkpoint has random weights, the bge-m3 file layout and a tokenizer trained on the toy data. Expected
(210 steps, under a minute on 2 CPU cores, a good part of it compiling; the same numbers with transformers 4.57.6
and 5.24.0, jax 0.10.2): the logged loss falls from about 3.3 (steps 1-10) to about 0.36 (steps 201-210),
loss_dense from about 8.4 to about 0.75, and the toy eval (held-out texts on the same topics) reaches nDCG@10 of
0.68 for sparse, 0.22 for dense and colbert and 0.60 for all three heads at step 105; at step 210 sparse and all
three drop (0.58, 0.45) as the 57 examples get memorised, dense and colbert rise (0.27, 0.29). The best checkpoint
is chosen by eval/all/ndcg@10 (metric_for_best_model's default when all three heads train; the log names it at
start and its value after each eval): step 105.
tests/test_toy_run.py checks these within margins. `runs/toy/checkpoints/` holds Orbax checkpoints to resume or
export from:

    python -m m3jax export --checkpoint runs/toy --output runs/toy_export
"""
import logging
import os

from m3jax.config import default_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config():
    c = default_config()
    c.model_name_or_path = os.path.join(REPO, "runs", "tiny_bge_m3")
    c.output_dir = os.path.join(REPO, "runs", "toy")
    c.train_data = os.path.join(REPO, "toy_train_data")

    c.train_group_size = 4
    c.query_max_len = 32
    c.passage_max_len = 128
    c.per_device_train_batch_size = 4
    c.num_train_epochs = 15
    c.learning_rate = 1e-3  # a random tiny model needs a large step to visibly learn
    c.warmup_ratio = 0.1
    c.temperature = 0.02
    c.unified_finetuning = True
    c.use_self_distill = True
    c.logging_steps = 10
    c.save_steps = 50
    c.num_data_workers = 0
    c.eval_steps = 105  # retrieval eval (nDCG@10, Recall@100, MRR@10 per mode) halfway and at the end
    c.eval.corpus = os.path.join(REPO, "toy_eval_data", "corpus.jsonl")
    c.eval.queries = os.path.join(REPO, "toy_eval_data", "queries.jsonl")
    c.eval.qrels = os.path.join(REPO, "toy_eval_data", "qrels.tsv")
    c.seq_len_buckets = (32, 64)  # 32-token queries; passages padded to 32, 64 or 128: few compiled shapes

    c.model.dtype = "float32"  # CPU: bfloat16 is emulated and slower
    c.model.remat_policy = "none"

    if not os.path.isdir(c.model_name_or_path):  # the run stops there unless --config.model_name_or_path says else
        logging.warning("%s does not exist: write the tiny checkpoint first, with "
                        "`python scripts/make_tiny_checkpoint.py runs/tiny_bge_m3`", c.model_name_or_path)
    return c
