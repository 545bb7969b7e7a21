"""bge-m3 unified fine-tuning, FlagEmbedding's published example (examples/unified_finetune) in m3jax.

    python train.py --config configs/bge_m3_unified.py \
        --config.model_name_or_path=/path/to/bge-m3 \
        --config.train_data=/data/my_task_a,/data/my_task_b \
        --config.output_dir=runs/bge_m3_unified

FlagEmbedding's command it reproduces (torchrun ... -m FlagEmbedding.BGE_M3.run): --learning_rate 1e-5 --fp16
--num_train_epochs 5 --normlized True --temperature 0.02 --query_max_len 64 --passage_max_len 256
--train_group_size 2 --negatives_cross_device --same_task_within_batch True --unified_finetuning True
--use_self_distill True. `model_name_or_path` is a local copy of BAAI/bge-m3 (m3jax downloads nothing). Given
bare (`--learning_rate 1e-5`), those flags are answered with their m3jax spelling (`--config.learning_rate=1e-5`).
With eval sets (`--config.eval_steps`, README "Eval sets and the best checkpoint") the best checkpoint is chosen by
the first set's all/ndcg@10 unless metric_for_best_model says otherwise (all three heads train here).
"""
from m3jax.config import default_config


def get_config():
    c = default_config()
    c.model_name_or_path = ""  # required: a local bge-m3 directory
    c.output_dir = "runs/bge_m3_unified"  # checkpoints, TensorBoard events and logs
    c.train_data = ""  # required: directories of .jsonl datasets or .json/.jsonl files, comma-separated

    # Data: one dataset per batch, length-bucketed batch sizes (see README "Efficient batching").
    c.train_group_size = 2  # 1 positive + 1 negative per query
    c.query_max_len = 64
    c.passage_max_len = 256
    c.same_dataset_within_batch = True
    c.per_device_train_batch_size = 32  # per device, for datasets without a len-LO-HI tag

    # Objective: dense + sparse + colbert, self-distillation from the ensemble, global dense negatives.
    c.unified_finetuning = True
    c.use_self_distill = True
    c.self_distill_start_step = -1
    c.temperature = 0.02
    c.normalize_embeddings = True
    c.sentence_pooling_method = "cls"
    c.negatives_cross_device = True

    # Optimisation as HF Trainer runs it: AdamW, no warmup, linear decay to 0, clip 1.0, weight decay 0.
    c.learning_rate = 1e-5
    c.num_train_epochs = 5
    c.logging_steps = 10
    c.save_steps = 1000

    # Accelerator numerics: bf16 compute, fp32 master weights and optimizer state, full remat per layer (the
    # config default "auto" picks per step shape the least recomputation that fits, at a compile per candidate at
    # start: --config.model.remat_policy=auto).
    c.model.dtype = "bfloat16"
    c.model.remat_policy = "full"
    c.model.attention_implementation = "auto"
    c.mesh.data = -1
    return c
