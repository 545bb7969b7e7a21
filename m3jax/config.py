"""The one schema of every m3jax run: defaults, documentation and validation, and the conversion of a run config
into the frozen settings each part takes (`<part>_settings(config)`, at the end: only the commands call them).

Field names follow FlagEmbedding's training arguments wherever a FlagEmbedding user would look for them
(`train_group_size`, `query_max_len`, `temperature`, `use_self_distill`, ...). Settings FlagEmbedding does not
have (mesh, dtype policy, attention kernel, remat) live in the `model`, `mesh` and `distributed` sub-dicts.

`configs/*.py` start from `default_config()` and change fields; the returned ConfigDict is locked, so a mistyped
field (in a config file or as `--config.<field>=...`) fails at once instead of being silently ignored.
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import ml_collections

from m3jax.core import storage
from m3jax.core.distributed import DistributedSettings
from m3jax.core.errors import ConfigError
from m3jax.core.padding import length_buckets
from m3jax.core.scores import HEADS
from m3jax.core.sharding import MeshSettings
from m3jax.data.datasets import DataSettings
from m3jax.data.files import Instructions
from m3jax.evaluation import selection
from m3jax.evaluation.evaluate import LEGACY_EVAL_SET, EvalSetSpec, EvalSettings
from m3jax.evaluation.options import check_weights, parse_metrics, parse_modes
from m3jax.evaluation.selection import SelectionSettings
from m3jax.model.encoder import LORA_TARGETS
from m3jax.model.loading import (
    ModelSettings,
    lora_config,
    lora_targets,  # noqa: F401 -- still config.lora_targets to its callers
    max_tokens,
    trained_heads,
)
from m3jax.model.loading import config_names as _names
from m3jax.tools.model_card import ModelCardSettings
from m3jax.train.losses import LossConfig
from m3jax.train.optimizer import OptimizerSettings
from m3jax.train.step import GRADIENT_CACHE_CHUNK_ROWS, StepSettings

# Per-device batch size by token-length range of the dataset file (FlagEmbedding research/BGE_M3 recipe, 80 GB
# GPUs). Keys are the `len-LO-HI` tags written by scripts/split_data_by_length.py; datasets without a tag use
# per_device_train_batch_size.
RESEARCH_BATCH_SIZE_BY_LENGTH = {
    8: {"0-500": 48, "500-1000": 32, "1000-2000": 20, "2000-3000": 18, "3000-4000": 14, "4000-5000": 14,
        "5000-6000": 12, "6000-7000": 10, "7000-inf": 8},
    1: {"0-500": 700, "500-1000": 570, "1000-2000": 388, "2000-3000": 288, "3000-4000": 224, "4000-5000": 180,
        "5000-6000": 157, "6000-7000": 128, "7000-inf": 104},
}


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # ---- model / checkpoint in and out --------------------------------------------------------------------
    c.model_name_or_path = ""  # a bge-m3 directory (HF layout + colbert_linear.pt / sparse_linear.pt); a URL is staged
    c.output_dir = ""  # work directory: checkpoints, TensorBoard events, logs; a local path or gs://bucket/path
    c.overwrite_output_dir = False  # False: resume from the latest checkpoint in output_dir when there is one
    c.seed = 42

    # ---- data (FlagEmbedding AbsEmbedderDataArguments) -----------------------------------------------------
    # One or more directories of .json/.jsonl datasets or .json/.jsonl files (one dataset each, as FlagEmbedding
    # 1.4.2 takes them), comma-separated (URLs are staged).
    c.train_data = ""
    c.train_group_size = 8  # passages per query: 1 positive + (G-1) negatives
    c.query_max_len = 32
    c.passage_max_len = 128
    c.max_example_num_per_dataset = 100_000_000
    c.query_instruction_for_retrieval = ml_collections.config_dict.placeholder(str)
    c.query_instruction_format = "{}{}"
    c.passage_instruction_for_retrieval = ml_collections.config_dict.placeholder(str)
    c.passage_instruction_format = "{}{}"
    c.knowledge_distillation = False  # use pos_scores / neg_scores from the data as teacher scores
    c.shuffle_ratio = 0.0
    c.same_dataset_within_batch = True  # every batch from one dataset (research name: same_task_within_batch)
    c.small_threshold = 0
    c.drop_threshold = 0
    c.per_device_train_batch_size = 1  # batch size for datasets without a length tag in batch_size_by_length
    # {"LO-HI": per-device batch size}; None = the research recipe's table for train_group_size 8 or 1.
    # "auto": each bucket's batch is the largest whose compiled step fits the device (m3jax/plan.py, cached on disk,
    # saved as <output_dir>/auto_batch_sizes.json); the buckets are the len-LO-HI tags of the data's files.
    c.batch_size_by_length = ml_collections.config_dict.placeholder(object)
    # Memory per device that batch_size_by_length="auto" and model.remat_policy="auto" size against: -1 = the
    # device's own limit (the TPU compiler's, the GPU allocator's); CPU has none (batch sizes need one; remat
    # "auto" then takes "none").
    c.auto_batch_memory_gib = -1.0
    # Texts are padded to the smallest of these lengths that fits (capped at the max_len); bounds the number of
    # compiled step shapes. Empty = powers of two from 32 up (m3jax/core/padding.py).
    c.seq_len_buckets = ()
    c.skip_bad_examples = False  # False: stop at the first malformed example; True: log, count and skip them
    c.num_data_workers = 2  # grain worker processes (tokenisation runs there); 0 = in the main process
    c.data_prefetch = 4  # batches buffered ahead per worker

    # ---- loss (FlagEmbedding EncoderOnlyEmbedderM3 training arguments) ------------------------------------
    c.temperature = 0.02
    c.unified_finetuning = True  # train dense + sparse + colbert (False: dense only)
    c.use_self_distill = False
    c.self_distill_start_step = -1
    c.kd_loss_type = "kl_div"  # kl_div | m3_kd_loss (only with knowledge_distillation)
    c.negatives_cross_device = False  # dense in-batch negatives over the whole global batch (FlagEmbedding)
    c.cross_device_all_heads = False  # m3jax option: global negatives for sparse / colbert / ensemble too
    c.sentence_pooling_method = "cls"  # cls | mean
    c.normalize_embeddings = True
    c.colbert_dim = -1  # -1: hidden size
    c.fix_encoder = False  # train only colbert_linear and sparse_linear
    c.fix_position_embedding = False

    # ---- fine-tuning control (m3jax options; README "Fine-tuning control") ---------------------------------
    # Heads the loss trains: a non-empty subset of dense, sparse, colbert (`--config.heads=dense,sparse`). The
    # unified loss and its ensemble use only these (formula: m3jax/train/losses.py); the other heads' linears get no
    # gradient, no update and no optimizer state, and an export still carries them as loaded. One head: its CE
    # alone (weight 1, no ensemble, no self-distillation). unified_finetuning=False is FlagEmbedding's name for
    # heads=("dense",): with it, heads must be left at all three or be ("dense",) (anything else is an error).
    c.heads = ("dense", "sparse", "colbert")
    # Parameter freezing by name. Names are paths joined by "/", e.g. encoder/embeddings/word_embeddings/embedding,
    # encoder/layers/query/kernel (stacked over layers), encoder/layers/query_lora/a, colbert_linear/kernel,
    # sparse_linear/bias; patterns are Python regexes matched anywhere in the name (re.search; anchor with ^ $).
    # trainable: if non-empty, only parameters matching one of them train (replaces the default set: everything,
    # or with LoRA the adapters and the trained heads). frozen: parameters matching one of them never train.
    # Every pattern must match some parameter. Pooler, fix_encoder, fix_position_embedding and untrained heads
    # are frozen whatever the patterns say.
    c.trainable = ()
    c.frozen = ()
    # Layers 0..N-1 of the encoder (base weights and LoRA adapters) get no update. The layers are stacked on a
    # leading axis (nn.scan), so this masks rows of those arrays: the frozen rows get no update, no weight decay,
    # no part in the clip norm, but their Adam moments are allocated (kept exactly zero) -- see
    # m3jax/train/optimizer.py.
    c.freeze_layers_below = 0
    # LoRA adapters on the encoder's linear layers: y = W x + b + (alpha / rank) * B A dropout(x), A [in, rank]
    # uniform +-1/sqrt(in), B [rank, out] zero. rank 0 = off. With LoRA the encoder's own weights are frozen by
    # default (only adapters and the trained heads train; `trainable` can change that). The export merges the
    # adapters into the weights (a plain bge-m3 directory); `m3jax export --lora-adapters` also writes them alone.
    c.lora = ml_collections.ConfigDict(dict(
        rank=0, alpha=16.0, dropout=0.0,
        targets=("query", "value"),  # some of query, key, value, attention_output, intermediate, output
    ))
    # Matryoshka embeddings: the dense head's loss is the (weighted) mean of its loss over these sizes, each the
    # cut of the embedding re-normalised (as inference's truncate_dim); the ensemble and self-distillation use the
    # full size. Empty = off; e.g. (1024, 512, 256, 128). mrl_weights: one per dim (empty = equal).
    # mrl_colbert: the same for the colbert head's token vectors (sizes above colbert_dim count as full size).
    c.mrl_dims = ()
    c.mrl_weights = ()
    c.mrl_colbert = False

    # ---- optimisation (HF TrainingArguments names) ---------------------------------------------------------
    c.learning_rate = 1e-5
    c.weight_decay = 0.0
    c.adam_beta1 = 0.9
    c.adam_beta2 = 0.999
    c.adam_epsilon = 1e-8
    c.max_grad_norm = 1.0
    c.warmup_ratio = 0.0
    c.warmup_steps = 0  # overrides warmup_ratio when > 0
    c.lr_scheduler_type = "linear"  # linear | constant | cosine
    c.num_train_epochs = 1
    c.max_steps = -1  # > 0 overrides num_train_epochs
    c.sub_batch_size = -1  # encode passages in chunks of this many (per device) to cap activation memory
    # Packed sequences (README "Packed training steps"): each device's queries and passages go several to a row
    # (segment ids instead of right padding, positions restarting per text, attention inside each text), one
    # encoder pass per step, and the heads read each text's tokens gathered back into the padded layout, so the
    # loss and gradients are the padded step's (within float rounding) while the encoder computes on few pad
    # tokens. Rows are one length per batch (chosen from the first batches at start, or the batch's longest
    # text's ladder length), their count per device a ladder with 16 steps per octave. Not with sub_batch_size
    # or gradient_cache, and one process only (for now).
    c.packing = False
    # Gradient cache (README "Gradient cache"): encode queries and passages chunk by chunk without activations,
    # take the loss and its gradient w.r.t. the cached representations over the whole batch, then re-encode each
    # chunk and backpropagate its slice. Same loss and gradients; memory grows with the batch only through the
    # cached representations. Replaces sub_batch_size (which must stay -1); remat_policy="none" is the usual
    # pairing (the re-encode already recomputes the forward). Chunks: gradient_cache_chunk_size rows per device,
    # or, when gradient_cache_chunk_tokens > 0, max(1, tokens // padded length) rows (queries and passages each),
    # rounded down to a divisor of the rows per device. gradient_cache_chunk_size="auto": per compiled step shape,
    # the largest chunk (the passages per device, halved down to a divisor) whose compiled step fits the device's
    # memory (auto_batch_memory_gib where set), judged by XLA's memory analysis and logged at start with every
    # candidate's memory; with remat_policy="auto" the pair (least recomputation first, then the largest chunk);
    # 16 rows where no limit is known (CPU without auto_batch_memory_gib).
    c.gradient_cache = False
    c.gradient_cache_chunk_size = ml_collections.FieldReference("auto", field_type=object)  # "auto" or an int
    c.gradient_cache_chunk_tokens = 0

    # ---- logging / checkpoints ----------------------------------------------------------------------------
    c.logging_steps = 10
    c.save_steps = 500
    c.save_total_limit = 3
    c.eval_steps = 0  # > 0: run the retrieval eval (c.eval) every eval_steps
    # BEIR-style files (corpus.jsonl, queries.jsonl, qrels.tsv); max_len -1 = the training one. Modes / weights /
    # metrics as `m3jax eval` takes them (weights: dense, sparse, colbert, as FlagEmbedding's compute_score).
    c.eval = ml_collections.ConfigDict(dict(
        corpus="", queries="", qrels="", batch_size=64, query_max_len=-1, passage_max_len=-1,
        modes=("dense", "sparse", "colbert", "dense+sparse", "all"), weights=(1.0, 1.0, 1.0),
        metrics=("ndcg@10", "recall@100", "mrr@10")))
    # Several named eval sets, all evaluated every eval_steps and at the end (README "Eval sets and the best
    # checkpoint"), e.g. in a config file:
    #   c.eval_sets = {"domain": dict(corpus=..., queries=..., qrels=...),
    #                  "general": dict(corpus=..., queries=..., qrels=..., modes=("dense",), passage_max_len=512)}
    # Each set takes the fields of `eval` (corpus, queries, qrels required; the rest default to `eval`'s). Metrics
    # are logged as eval/<set>/<mode>/<metric>; a non-empty `eval.corpus` is one more set named "eval", logged as
    # eval/<mode>/<metric> as before. Set names: letters, digits, _ - . (no "/").
    c.eval_sets = ml_collections.ConfigDict()
    c.eval_on_start = False  # also evaluate the base model at step 0 (the model card's "base" column)
    # The eval metric that picks the best checkpoint (HF Trainer's names): "<set>/<mode>/<metric>", e.g.
    # "domain/all/ndcg@10", or a weighted sum "0.7*domain/all/ndcg@10 + 0.3*general/dense/ndcg@10". Empty: the
    # first set's mode for the trained heads and its nDCG@10 -- all/ndcg@10 when all three heads train,
    # dense+sparse/ndcg@10 for heads=dense,sparse, the head's own mode for one head, dense for dense,colbert
    # (m3jax/evaluation/selection.py default_mode; the set's first mode / metric when it does not evaluate those). The
    # run logs the metric at start and its value after every eval. The best step's checkpoint is kept whatever
    # save_total_limit says, and recorded in output_dir/best.json (`m3jax export --step best`).
    c.metric_for_best_model = ""
    c.greater_is_better = True

    # ---- JAX: numerics, kernels, memory -------------------------------------------------------------------
    c.model = ml_collections.ConfigDict(dict(
        dtype="bfloat16",  # compute dtype: bfloat16 | float32 (params and optimizer state stay float32)
        # auto: cudnn on GPU, flash-dropout on TPU, xla elsewhere. flash-dropout: the Pallas TPU flash kernel with
        # attention-probability dropout (bge-m3's 0.1; m3jax.model.flash_dropout). splash: the fused TPU kernel WITHOUT
        # attention dropout (the old default; the last bit of speed, a slightly different model). cudnn (GPU)
        # applies attention dropout inside cuDNN's kernel (with the layer loop, scan_layers); xla applies it on
        # materialised probabilities (same mask as flash-dropout).
        attention_implementation="auto",  # auto | xla | cudnn | flash-dropout | splash
        # auto | none | full | dots | dots_no_batch. auto: per compiled step shape, the policy with the least
        # recomputation whose compiled step fits the device's memory (auto_batch_memory_gib where set), judged by
        # XLA's memory analysis and logged at start with every candidate's memory; none where no limit is known.
        remat_policy="auto",
        # XLA's GPU command buffers (CUDA graphs). Off: inside the layer scan they hold the host for every layer
        # (the host cannot run ahead of the device) and cuDNN's attention dropout cannot be recorded in them.
        gpu_command_buffers=False,
        # The encoder layers in training: True = nn.scan (fast compiles), False = a loop over the layers (faster
        # steps, 4x the compile time; needed by cuDNN's attention dropout). None: False on GPU, True elsewhere.
        scan_layers=ml_collections.config_dict.placeholder(bool),
        # None: take the checkpoint's config.json values (bge-m3: 0.1 / 0.1), as FlagEmbedding trains with.
        hidden_dropout_prob=ml_collections.config_dict.placeholder(float),
        attention_probs_dropout_prob=ml_collections.config_dict.placeholder(float),
    ))

    # ---- devices ------------------------------------------------------------------------------------------
    # Mesh axis sizes; -1 takes the remaining devices. Batches shard over data x fsdp, params by the rules.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
    # Logical parameter/activation axis -> mesh axes. The model names every parameter axis with these names.
    c.sharding_rules = (
        ("batch", ("data", "fsdp")),
        ("vocab", "tensor"),
        ("embed", "fsdp"),
        ("heads", "tensor"),
        ("kv", None),
        ("mlp", "tensor"),
        ("colbert", None),
        ("layers", None),
        ("lora", None),  # the rank axis of LoRA adapters
        ("positions", None),
        ("types", None),
        ("one", None),
    )
    c.distributed = ml_collections.ConfigDict(dict(
        initialize="auto",  # auto (when the launcher's environment asks for it) | always | never
        coordinator_address=ml_collections.config_dict.placeholder(str),
        num_processes=ml_collections.config_dict.placeholder(int),
        process_id=ml_collections.config_dict.placeholder(int),
    ))

    c.lock()
    return c


def _require(ok: bool, field: str, expected: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config.{field}={value!r}: expected {expected}")


# FlagEmbedding / HF Trainer flags whose m3jax spelling is not `--config.<same name>`: name -> (field, value to
# suggest or None for the user's own, note). Every other config field given bare (`--learning_rate 2e-5`) is
# answered with `--config.<name>=<value>`; the flags FlagEmbedding needs and m3jax does not are named as such.
FOREIGN_FLAGS = {
    "same_task_within_batch": ("same_dataset_within_batch", None, ""),
    "normlized": ("normalize_embeddings", None, ""),
    "fp16": ("model.dtype", "bfloat16", "bfloat16 is the default; params and optimizer state stay float32"),
    "bf16": ("model.dtype", "bfloat16", "the default"),
    "gradient_checkpointing": ("model.remat_policy", "full", "the default"),
    "pad_to_multiple_of": ("seq_len_buckets", None, "a ladder of lengths, e.g. (64,128,256)"),
    "use_mrl": ("mrl_dims", "(1024,512,256,128)", ""),
}
NOT_NEEDED_FLAGS = {
    "deepspeed": "sharding is config.mesh", "dataloader_drop_last": "batches are always complete",
    "cache_path": "nothing is downloaded", "cache_dir": "nothing is downloaded", "token": "nothing is downloaded",
    "trust_remote_code": "nothing is downloaded", "local_rank": "processes start from the launcher's environment",
    "ddp_find_unused_parameters": "sharding is config.mesh", "report_to": "TensorBoard events and metrics.jsonl "
    "are always written", "do_train": "m3jax train trains",
}
_ABSL_FLAGS = ("help", "helpfull", "helpshort", "helpxml", "flagfile", "undefok", "only_check_args")


def check_foreign_flags(argv: list[str], schema=None) -> None:
    """Answer a FlagEmbedding / HF Trainer flag given bare (`--model_name_or_path X`, `--learning_rate=1e-5`) with
    its m3jax spelling (`--config.model_name_or_path=X`), instead of absl's "Unknown command line flag"."""
    schema = schema if schema is not None else default_config()
    for i, arg in enumerate(argv):
        if not arg.startswith("-") or arg == "--" or arg.startswith(("--config.", "--config=")) or arg == "--config":
            continue
        raw, sep, value = arg.lstrip("-").partition("=")
        name = raw.replace("-", "_")
        if not name or name in _ABSL_FLAGS or (name.startswith("no") and name[2:] in _ABSL_FLAGS):
            continue
        if not sep and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
            value = argv[i + 1]  # `--flag value`
        if name in NOT_NEEDED_FLAGS:
            raise ConfigError(f"{arg}: FlagEmbedding's --{name} is not needed in m3jax ({NOT_NEEDED_FLAGS[name]}); "
                              f"leave it out")
        if name in FOREIGN_FLAGS:
            field, suggested, note = FOREIGN_FLAGS[name]
        elif name in schema and not isinstance(schema[name], ml_collections.ConfigDict):
            field, suggested, note = name, None, ""
        else:
            continue  # absl's message (and check_override_flags' suggestions) cover the rest
        shown = value if value else (suggested or ("True" if isinstance(schema.get(field), bool) else "VALUE"))
        if suggested and not value:
            shown = suggested
        raise ConfigError(f"--{raw}: m3jax takes config fields as --config.<field>=<value>: use "
                          f"--config.{field}={shown}" + (f" ({note})" if note else ""))


def check_override_flags(argv: list[str]) -> None:
    """Reject `--config.<field>=...` flags naming no field, before absl's parser turns them into a traceback, and
    answer FlagEmbedding's bare flags with their m3jax spelling (check_foreign_flags)."""
    import difflib

    schema = default_config()
    check_foreign_flags(argv, schema)
    known = set()

    def walk(d, prefix):
        for k, v in d.items():
            known.add(prefix + k)
            if isinstance(v, ml_collections.ConfigDict):
                walk(v, prefix + k + ".")

    walk(schema, "")
    for arg in argv:
        if not arg.startswith("--config."):
            continue
        field = arg[len("--config."):].split("=", 1)[0]
        if field.startswith("eval_sets."):  # the sets a config file defines; absl rejects unknown ones
            continue
        if field not in known:
            close = difflib.get_close_matches(field, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--config.{field}: no such config field{hint} (fields are listed in m3jax/config.py)")


def config_from_argv(argv: list[str], command: str = "m3jax train") -> ml_collections.ConfigDict:
    """The run config of `--config FILE [--config.<field>=<value> ...]` (absl's config flags; ConfigError on a
    mistyped field, a bad value or a missing --config)."""
    from absl import flags
    from ml_collections import config_flags

    check_override_flags(argv)
    # A fresh flag set per call, told the argv to find the overrides in (by default absl's config flag reads them
    # from sys.argv, which is not `argv` when the command is called in-process).
    values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "Path to a configs/*.py file.", flag_values=values,
                                    lock_config=True, sys_argv=[command, *argv])
    try:
        rest = values([command, *argv])
    except flags.Error as e:
        raise ConfigError(str(e)) from None
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments {rest[1:]}; use --config.<field>=<value>")
    if values.config is None:
        raise ConfigError("--config is required: a configs/*.py file (e.g. --config configs/toy.py)")
    return values.config


def train_data_dirs(config: ml_collections.ConfigDict) -> list[str]:
    """`train_data` as a list of paths (the command line gives one comma-separated string)."""
    value = config.train_data
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    return [str(p) for p in value]


def _patterns(value) -> tuple[str, ...]:
    """Regexes from a config value: one string or a tuple of them (not split at commas: a regex may hold one)."""
    return (value,) if isinstance(value, str) else tuple(str(v) for v in value)


def trainable_patterns(config) -> tuple[str, ...]:
    return _patterns(config.trainable)


def frozen_patterns(config) -> tuple[str, ...]:
    return _patterns(config.frozen)


def mrl_dims(config) -> tuple[int, ...]:
    return tuple(int(d) for d in config.mrl_dims)


def mrl_weights(config) -> tuple[float, ...]:
    """One weight per Matryoshka dim (equal weights when mrl_weights is empty)."""
    dims = mrl_dims(config)
    return tuple(float(w) for w in config.mrl_weights) if len(config.mrl_weights) else (1.0,) * len(dims)


def _validate_finetune_control(c) -> None:
    heads = _names(c.heads)
    _require(bool(heads) and all(h in HEADS for h in heads) and len(set(heads)) == len(heads), "heads",
             f"a non-empty subset of {', '.join(HEADS)} (e.g. --config.heads=dense,sparse)", c.heads)
    _require(c.unified_finetuning or set(heads) in (set(HEADS), {"dense"}), "heads",
             "all three heads or ('dense',) with unified_finetuning=False (which means dense only); set "
             "unified_finetuning=True to choose heads", c.heads)
    import re

    for field, patterns in (("trainable", _patterns(c.trainable)), ("frozen", _patterns(c.frozen))):
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as e:
                raise ConfigError(f"config.{field}: {pattern!r} is not a regular expression ({e})") from None
    _require(isinstance(c.freeze_layers_below, int) and c.freeze_layers_below >= 0, "freeze_layers_below",
             "an int >= 0 (layers 0..N-1 are frozen)", c.freeze_layers_below)
    lora = c.lora
    _require(isinstance(lora.rank, int) and lora.rank >= 0, "lora.rank", "an int >= 0 (0: no LoRA)", lora.rank)
    if lora.rank > 0:
        _require(isinstance(lora.alpha, (int, float)) and lora.alpha > 0, "lora.alpha", "a positive float",
                 lora.alpha)
        _require(isinstance(lora.dropout, (int, float)) and 0.0 <= lora.dropout < 1.0, "lora.dropout",
                 "a probability in [0, 1)", lora.dropout)
        targets = _names(lora.targets)
        _require(bool(targets) and all(t in LORA_TARGETS for t in targets), "lora.targets",
                 f"a non-empty subset of {', '.join(LORA_TARGETS)}", lora.targets)
        _require(not c.fix_encoder, "fix_encoder", "False with LoRA (fix_encoder stops every gradient into the "
                 "encoder, adapters included)", c.fix_encoder)
    dims = tuple(c.mrl_dims)
    _require(all(isinstance(d, int) and d >= 1 for d in dims) and len(set(dims)) == len(dims), "mrl_dims",
             "distinct positive ints, e.g. (1024, 512, 256, 128) (empty: off)", dims)
    weights = tuple(c.mrl_weights)
    _require(not weights or (len(weights) == len(dims) and all(isinstance(w, (int, float)) and w >= 0
                                                               for w in weights) and sum(weights) > 0),
             "mrl_weights", f"empty or {len(dims)} non-negative numbers (one per mrl_dims entry) with a positive "
             f"sum", weights)
    trained = trained_heads(c)
    if dims:
        _require("dense" in trained or (c.mrl_colbert and "colbert" in trained), "mrl_dims",
                 "a trained head to apply to: dense in heads (or colbert with mrl_colbert=True)", dims)
    if c.mrl_colbert:
        _require(bool(dims) and "colbert" in trained, "mrl_colbert",
                 "False unless mrl_dims is set and colbert is a trained head", c.mrl_colbert)


def validate_against_model(config, model_cfg) -> None:
    """The fields whose bounds depend on the model: the max lengths (training and every eval set's, against the
    position table), freeze_layers_below, mrl_dims, sub_batch_size and model.scan_layers with cuDNN's attention
    dropout (the trainer calls this as soon as it knows the model, before reading any data; Stepper.build again)."""
    limit = max_tokens(model_cfg)
    why = (f"at most {limit}, the model's position limit (max_position_embeddings {model_cfg.max_position_embeddings}"
           f" - {int(model_cfg.pad_token_id) + 1} for XLM-R's padding offset)")
    for field in ("query_max_len", "passage_max_len"):
        _require(config[field] <= limit, field, why, config[field])
    for spec in _eval_set_specs(config):
        where = "eval" if spec.name == LEGACY_EVAL_SET and config["eval"]["corpus"] else f"eval_sets.{spec.name}"
        for field in ("query_max_len", "passage_max_len"):
            _require(getattr(spec, field) <= limit, f"{where}.{field}", why, getattr(spec, field))
    _require(config.freeze_layers_below <= model_cfg.num_hidden_layers, "freeze_layers_below",
             f"at most the model's {model_cfg.num_hidden_layers} layers", config.freeze_layers_below)
    cudnn_dropout = model_cfg.attention_implementation == "cudnn" and model_cfg.attention_probs_dropout_prob > 0
    _require(not (cudnn_dropout and model_cfg.scan_layers), "model.scan_layers",
             "False (or None) with cuDNN's attention dropout: inside the layer scan its keep masks differ between the "
             "forward and the backward pass; or set model.attention_probs_dropout_prob=0.0 or "
             "model.attention_implementation='xla'", model_cfg.scan_layers)
    _require(not (cudnn_dropout and config.sub_batch_size > 0), "sub_batch_size",
             "-1 with cuDNN's attention dropout (its keep masks follow the kernel's execution order, which the "
             "sub-batched backward pass reverses): use gradient_cache=True to bound memory, or "
             "model.attention_implementation='xla'", config.sub_batch_size)
    largest = max([model_cfg.hidden_size] + ([model_cfg.colbert_out_dim] if config.mrl_colbert else []))
    _require(all(d <= largest for d in mrl_dims(config)), "mrl_dims",
             f"sizes of at most the embedding size ({largest})", tuple(config.mrl_dims))


def validate(config: ml_collections.ConfigDict, *, for_training: bool = True) -> None:
    """Fail fast, naming the field, on values that would otherwise fail deep inside a run."""
    c = config
    if for_training:
        _require(bool(c.model_name_or_path), "model_name_or_path", "a bge-m3 checkpoint directory",
                 c.model_name_or_path)
        _require(bool(c.output_dir), "output_dir", "a work directory for checkpoints and logs", c.output_dir)
        # Orbax (0.12) writes checkpoint arrays through tensorstore's gcs driver for gs:// and its file driver
        # otherwise, so an s3:// (or other) URL cannot hold the checkpoints.
        scheme = str(c.output_dir).split("://", 1)[0] if "://" in str(c.output_dir) else None
        _require(scheme is not None or not os.path.isfile(str(c.output_dir)), "output_dir",
                 "a directory to write checkpoints and logs to (this is an existing file)", c.output_dir)
        _require(scheme in (None, "gs"), "output_dir", "a local (or mounted) directory or a gs:// URL (Orbax writes "
                 "checkpoints to no other object store; inputs and exports may be any URL etils.epath reads)",
                 c.output_dir)
        _require(bool(train_data_dirs(c)), "train_data",
                 "one or more data directories or .json/.jsonl files (comma-separated)", c.train_data)
        urls = [("output_dir", c.output_dir), ("model_name_or_path", c.model_name_or_path)]
        urls += [("train_data", d) for d in train_data_dirs(c)]
        for field, path in urls:
            problem = storage.missing_client(path)
            if problem:
                raise ConfigError(f"config.{field}={path!r}: {problem}")
    _require(isinstance(c.train_group_size, int) and c.train_group_size >= 1, "train_group_size", "an int >= 1",
             c.train_group_size)
    for f, low in (("query_max_len", 2), ("passage_max_len", 2), ("per_device_train_batch_size", 1)):
        _require(isinstance(c[f], int) and c[f] >= low, f, f"an int >= {low}", c[f])
    _require(isinstance(c.temperature, (int, float)) and c.temperature > 0 and math.isfinite(c.temperature),
             "temperature", "a positive float", c.temperature)
    _require(c.kd_loss_type in ("kl_div", "m3_kd_loss"), "kd_loss_type", "'kl_div' or 'm3_kd_loss'", c.kd_loss_type)
    _require(c.sentence_pooling_method in ("cls", "mean"), "sentence_pooling_method", "'cls' or 'mean'",
             c.sentence_pooling_method)
    _require(c.colbert_dim == -1 or c.colbert_dim >= 1, "colbert_dim", "-1 (hidden size) or a positive int",
             c.colbert_dim)
    _require(0.0 <= c.shuffle_ratio <= 1.0, "shuffle_ratio", "a probability in [0, 1]", c.shuffle_ratio)
    _require(c.learning_rate >= 0, "learning_rate", "a non-negative float", c.learning_rate)
    _require(0.0 <= c.warmup_ratio <= 1.0, "warmup_ratio", "a fraction in [0, 1]", c.warmup_ratio)
    _require(c.lr_scheduler_type in ("linear", "constant", "cosine"), "lr_scheduler_type",
             "'linear', 'constant' or 'cosine'", c.lr_scheduler_type)
    _require(c.max_steps > 0 or c.num_train_epochs > 0, "max_steps",
             "max_steps > 0 or num_train_epochs > 0", (c.max_steps, c.num_train_epochs))
    _require(c.logging_steps >= 1, "logging_steps", "an int >= 1", c.logging_steps)
    _require(c.save_steps >= 1, "save_steps", "an int >= 1", c.save_steps)
    _require(c.eval_steps >= 0, "eval_steps", "0 (off) or a positive int", c.eval_steps)
    specs = _eval_set_specs(c)  # checks every eval set's fields
    if c.eval_steps > 0 and not specs:
        for f in ("corpus", "queries", "qrels"):
            _require(bool(c.eval[f]), f"eval.{f}", "a file path (eval_steps > 0 turns the periodic eval on)", c.eval[f])
    _require(isinstance(c.greater_is_better, bool), "greater_is_better", "True or False", c.greater_is_better)
    _require(isinstance(c.eval_on_start, bool), "eval_on_start", "True or False", c.eval_on_start)
    if c.metric_for_best_model:
        _require(bool(specs), "metric_for_best_model", "empty unless eval sets are configured (eval_sets or "
                 "eval.corpus)", c.metric_for_best_model)

        try:
            selection.parse_metric(c.metric_for_best_model, specs, extra_modes=_matryoshka_eval_modes(c))
        except ValueError as e:
            raise ConfigError(f"config.metric_for_best_model={c.metric_for_best_model!r}: {e}") from None
    _require(c.sub_batch_size == -1 or c.sub_batch_size >= 1, "sub_batch_size", "-1 (off) or a positive int",
             c.sub_batch_size)
    chunk = c.gradient_cache_chunk_size
    _require(chunk == "auto" or (isinstance(chunk, int) and not isinstance(chunk, bool) and chunk >= 1),
             "gradient_cache_chunk_size", "'auto' (chosen per step shape by memory) or a positive int (rows per "
             "device per chunk)", chunk)
    _require(isinstance(c.gradient_cache_chunk_tokens, int) and c.gradient_cache_chunk_tokens >= 0,
             "gradient_cache_chunk_tokens", "0 (chunk by gradient_cache_chunk_size rows) or a positive int",
             c.gradient_cache_chunk_tokens)
    _require(not c.gradient_cache or c.sub_batch_size == -1, "sub_batch_size",
             "-1 with gradient_cache=True (the gradient cache chunks queries and passages itself: set "
             "gradient_cache_chunk_size)", c.sub_batch_size)
    _require(isinstance(c.packing, bool), "packing", "True or False", c.packing)
    _require(not c.packing or (c.sub_batch_size == -1 and not c.gradient_cache), "packing",
             "False with sub_batch_size or gradient_cache (a packed step encodes each device's texts in one pass)",
             c.packing)
    _require(c.num_data_workers >= 0, "num_data_workers", "an int >= 0", c.num_data_workers)
    _require(c.model.dtype in ("bfloat16", "float32"), "model.dtype", "'bfloat16' or 'float32'", c.model.dtype)
    _require(c.model.attention_implementation in ("auto", "xla", "cudnn", "flash-dropout", "splash"),
             "model.attention_implementation", "'auto', 'xla', 'cudnn', 'flash-dropout' or 'splash'",
             c.model.attention_implementation)
    _require(isinstance(c.model.gpu_command_buffers, bool), "model.gpu_command_buffers", "True or False",
             c.model.gpu_command_buffers)
    _require(c.model.remat_policy in ("auto", "none", "full", "dots", "dots_no_batch"), "model.remat_policy",
             "'auto', 'none', 'full', 'dots' or 'dots_no_batch'", c.model.remat_policy)
    for axis in ("data", "fsdp", "tensor"):
        size = c.mesh[axis]
        _require(isinstance(size, int) and (size == -1 or size >= 1), f"mesh.{axis}", "-1 or a positive int", size)
    _require(sum(1 for a in ("data", "fsdp", "tensor") if c.mesh[a] == -1) <= 1, "mesh",
             "at most one axis of size -1", dict(c.mesh))
    _require(c.distributed.initialize in ("auto", "always", "never"), "distributed.initialize",
             "'auto', 'always' or 'never'", c.distributed.initialize)
    _validate_finetune_control(c)
    rules = tuple(c.sharding_rules)
    for rule in rules:
        ok = isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
        axes = (rule[1] if isinstance(rule[1], (tuple, list)) else (rule[1],)) if ok and rule[1] is not None else ()
        _require(ok and all(a in ("data", "fsdp", "tensor") for a in axes), "sharding_rules",
                 "(logical_name, None | mesh axis | tuple of mesh axes) pairs over the axes data, fsdp, tensor", rule)
    _require(any(r[0] == "batch" for r in rules), "sharding_rules",
             'a rule for "batch" (the mesh axes batches are split over, e.g. ("batch", ("data", "fsdp")))', rules)
    buckets = tuple(c.seq_len_buckets)
    _require(all(isinstance(b, int) and b >= 2 for b in buckets) and list(buckets) == sorted(set(buckets)),
             "seq_len_buckets", "strictly increasing ints >= 2 (or empty for the default)", buckets)
    _require(c.auto_batch_memory_gib == -1 or c.auto_batch_memory_gib > 0, "auto_batch_memory_gib",
             "-1 (the device's limit) or a positive number of GiB", c.auto_batch_memory_gib)
    if c.batch_size_by_length is not None and c.batch_size_by_length != "auto":
        _require(hasattr(c.batch_size_by_length, "items"), "batch_size_by_length",
                 "None (the research table), 'auto' or {'LO-HI': per-device batch size, ...}", c.batch_size_by_length)
        for k, v in dict(c.batch_size_by_length).items():
            lo, _, hi = str(k).partition("-")
            _require(lo.isdigit() and (hi.isdigit() or hi == "inf") and isinstance(v, int) and v >= 1,
                     "batch_size_by_length", "{'LO-HI': positive int, ...} with HI an int or 'inf'", {k: v})


# --- data settings (conversion at the edge) ---


def data_settings(config) -> DataSettings:
    """The training data's settings: train_data split into paths, the pad-length ladders of seq_len_buckets, the
    instructions, and batch_size_by_length None as the research table for train_group_size ("auto" stays "auto"
    until the trainer sizes it)."""
    table = config.batch_size_by_length
    if table is None:
        table = RESEARCH_BATCH_SIZE_BY_LENGTH.get(config.train_group_size, {})
    return DataSettings(
        train_data=tuple(train_data_dirs(config)), seed=int(config.seed),
        train_group_size=int(config.train_group_size),
        query_max_len=int(config.query_max_len), passage_max_len=int(config.passage_max_len),
        query_buckets=tuple(length_buckets(config.query_max_len, tuple(config.seq_len_buckets))),
        passage_buckets=tuple(length_buckets(config.passage_max_len, tuple(config.seq_len_buckets))),
        max_example_num_per_dataset=int(config.max_example_num_per_dataset),
        instructions=Instructions(config.query_instruction_for_retrieval, config.query_instruction_format,
                                  config.passage_instruction_for_retrieval, config.passage_instruction_format),
        knowledge_distillation=bool(config.knowledge_distillation), shuffle_ratio=float(config.shuffle_ratio),
        same_dataset_within_batch=bool(config.same_dataset_within_batch),
        small_threshold=int(config.small_threshold), drop_threshold=int(config.drop_threshold),
        per_device_train_batch_size=int(config.per_device_train_batch_size),
        batch_size_by_length=table if isinstance(table, str) else tuple(dict(table).items()),
        skip_bad_examples=bool(config.skip_bad_examples), num_data_workers=int(config.num_data_workers),
        data_prefetch=int(config.data_prefetch), packing=bool(config.packing))


# --- eval settings (conversion at the edge) ---

EVAL_SET_FIELDS = ("corpus", "queries", "qrels", "batch_size", "query_max_len", "passage_max_len", "modes", "weights",
                   "metrics")


def _get(d, key, default):
    try:
        value = d[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


def _eval_set_spec(config, name: str, where: str, f: dict, *, check_paths: bool = True) -> EvalSetSpec:
    """An eval set from its fields `f` (those of config.eval), resolved and checked (ConfigError naming
    config.<where>.<field>); `check_paths`: corpus, queries and qrels must be given (validate's check)."""
    for key in ("corpus", "queries", "qrels"):
        _require(isinstance(f.get(key), str) and (bool(f.get(key)) or not check_paths), f"{where}.{key}",
                 "a file path", f.get(key))
    _require(isinstance(f["batch_size"], int) and f["batch_size"] >= 1, f"{where}.batch_size", "an int >= 1",
             f["batch_size"])
    lengths = {}
    for key, train_len in (("query_max_len", config["query_max_len"]), ("passage_max_len", config["passage_max_len"])):
        value = f[key] if f[key] is not None else -1
        _require(isinstance(value, int) and (value == -1 or value >= 2), f"{where}.{key}",
                 "-1 (the training one) or an int >= 2", value)
        lengths[key] = value if value > 0 else train_len
    try:
        modes = parse_modes(tuple(f["modes"]) if not isinstance(f["modes"], str) else f["modes"])
    except ValueError as e:
        raise ConfigError(f"config.{where}.modes={f['modes']!r}: {e}") from None
    try:
        metrics = parse_metrics(tuple(f["metrics"]) if not isinstance(f["metrics"], str) else f["metrics"])
    except ValueError as e:
        raise ConfigError(f"config.{where}.metrics={f['metrics']!r}: {e}") from None
    try:
        weights = check_weights(tuple(f["weights"]), modes)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.{where}.weights={f['weights']!r}: {e}") from None
    return EvalSetSpec(name=name, corpus=f["corpus"], queries=f["queries"], qrels=f["qrels"],
                       batch_size=f["batch_size"], modes=modes, weights=weights, metrics=metrics, **lengths)


def _eval_set_specs(config, *, check_paths: bool = True) -> list[EvalSetSpec]:
    """The run's eval sets: config.eval as "eval" when its corpus is set, then config.eval_sets in order. Checks
    every field (ConfigError naming config.eval_sets.<name>.<field>). `config`: a run config or its saved JSON."""
    base = config["eval"]
    raw = []
    if _get(base, "corpus", ""):
        raw.append((LEGACY_EVAL_SET, "eval", dict(base)))
    sets = _get(config, "eval_sets", {}) or {}
    for name, fields in dict(sets).items():
        where = f"eval_sets.{name}"
        _require(isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_.-]+", name) is not None, "eval_sets",
                 "set names of letters, digits, _ - . (no '/')", name)
        _require(name != LEGACY_EVAL_SET or not _get(base, "corpus", ""), where,
                 "another name: 'eval' is config.eval's set when eval.corpus is set", name)
        _require(hasattr(fields, "keys"), where, "a dict of eval fields (corpus, queries, qrels, ...)", fields)
        unknown = sorted(set(fields.keys()) - set(EVAL_SET_FIELDS))
        if unknown:
            raise ConfigError(f"config.{where}.{unknown[0]}: no such eval set field (fields: "
                              f"{', '.join(EVAL_SET_FIELDS)})")
        raw.append((name, where, {k: _get(fields, k, _get(base, k, None)) for k in EVAL_SET_FIELDS}))
    return [_eval_set_spec(config, name, where, f, check_paths=check_paths) for name, where, f in raw]


def _matryoshka_eval_modes(config) -> tuple[str, ...]:
    """dense@K / colbert@K of mrl_dims, which every eval set reports besides its modes (any size is accepted here;
    the model's size is only known when the run starts)."""
    dims = tuple(config["mrl_dims"]) if "mrl_dims" in config else ()
    out = tuple(f"dense@{d}" for d in dims)
    return out + (tuple(f"colbert@{d}" for d in dims) if config.get("mrl_colbert") else ())


def eval_settings(config) -> EvalSettings:
    """The run's eval (m3jax.evaluation.evaluate.EvalSettings). Its sets are checked as validate() checks them, except
    that config.eval's corpus, queries and qrels may be empty here (evaluate_legacy_set says so)."""
    return EvalSettings(
        eval=_eval_set_spec(config, LEGACY_EVAL_SET, "eval", dict(config.eval), check_paths=False),
        eval_set_specs=tuple(_eval_set_specs(config, check_paths=False)),
        eval_steps=int(config.eval_steps), eval_on_start=bool(config.eval_on_start),
        mrl_dims=tuple(int(d) for d in config.mrl_dims), mrl_colbert=bool(config.mrl_colbert),
        query_instruction_for_retrieval=config.query_instruction_for_retrieval,
        query_instruction_format=config.query_instruction_format,
        passage_instruction_for_retrieval=config.passage_instruction_for_retrieval,
        passage_instruction_format=config.passage_instruction_format)


# --- selection settings (conversion at the edge) ---


def selection_settings(config) -> SelectionSettings:
    """How the run picks its best checkpoint (m3jax.evaluation.selection.SelectionSettings): metric_for_best_model
    resolved against the sets the run evaluates and its trained heads (selection.parse_metric); None when it evaluates
    none."""
    evals = eval_settings(config)
    metric = selection.parse_metric(config.metric_for_best_model, evals.eval_set_specs, heads=trained_heads(config),
                                    extra_modes=_matryoshka_eval_modes(config)) \
        if evals.evaluates and evals.eval_set_specs else None
    return SelectionSettings(metric_for_best_model=metric, greater_is_better=bool(config.greater_is_better))


# --- model card settings (conversion at the edge) ---


def model_card_settings() -> ModelCardSettings:
    """What an export's model card compares the run's saved config with: default_config(), as a run saves it."""
    return ModelCardSettings(default_config=json.loads(default_config().to_json()))


# --- training settings (conversion at the edge) ---
# The run config -> the frozen settings of the training parts: the mesh, processes, the model's choices, the loss,
# the optimizer and the step (m3jax.trainer, m3jax.plan and the benchmarks call these; nothing below them sees the
# ConfigDict).


def config_to_json(config) -> dict:
    """ConfigDict -> plain JSON-able dict (tuples become lists): the run config saved with every checkpoint."""
    return json.loads(config.to_json())


def mesh_settings(config) -> MeshSettings:
    mesh = config.mesh
    return MeshSettings(data=mesh.data, fsdp=mesh.fsdp, tensor=mesh.tensor,
                        sharding_rules=tuple(tuple(r) for r in config.sharding_rules))


def distributed_settings(config) -> DistributedSettings:
    d = config.distributed
    return DistributedSettings(initialize=d.initialize, coordinator_address=d.coordinator_address,
                               num_processes=d.num_processes, process_id=d.process_id)


def model_settings(config) -> ModelSettings:
    """The model fields of a run config, on top of the checkpoint's architecture (loading.model_config)."""
    return ModelSettings(sentence_pooling_method=config.sentence_pooling_method,
                         normalize_embeddings=config.normalize_embeddings, colbert_dim=int(config.colbert_dim),
                         dtype=config.model.dtype, attention_implementation=config.model.attention_implementation,
                         # "auto" is chosen per compiled shape by the trainer (m3jax.plan.choose_remat); the
                         # model's own default is the policy that always fits best
                         remat_policy="full" if config.model.remat_policy == "auto" else config.model.remat_policy,
                         scan_layers=config.model.get("scan_layers"),
                         hidden_dropout_prob=config.model.hidden_dropout_prob,
                         attention_probs_dropout_prob=config.model.attention_probs_dropout_prob,
                         lora=lora_config(config.lora.rank, config.lora.alpha, config.lora.dropout,
                                          lora_targets(config)))


def loss_settings(config) -> LossConfig:
    """The run config's loss fields; the model's (vocabulary, normalisation) and the mesh's (num_blocks) are
    filled in when the step is built (step.loss_config_from)."""
    return LossConfig(
        temperature=float(config.temperature), unified_finetuning=config.unified_finetuning,
        use_self_distill=config.use_self_distill, self_distill_start_step=config.self_distill_start_step,
        kd_loss_type=config.kd_loss_type, negatives_cross_device=config.negatives_cross_device,
        cross_device_all_heads=config.cross_device_all_heads, heads=trained_heads(config),
        mrl_dims=mrl_dims(config), mrl_weights=mrl_weights(config), mrl_colbert=bool(config.mrl_colbert))


def optimizer_settings(config) -> OptimizerSettings:
    return OptimizerSettings(
        learning_rate=config.learning_rate, weight_decay=config.weight_decay, adam_beta1=config.adam_beta1,
        adam_beta2=config.adam_beta2, adam_epsilon=config.adam_epsilon, max_grad_norm=config.max_grad_norm,
        warmup_ratio=config.warmup_ratio, warmup_steps=config.warmup_steps,
        lr_scheduler_type=config.lr_scheduler_type, trainable=trainable_patterns(config),
        frozen=frozen_patterns(config), trained_heads=trained_heads(config), fix_encoder=bool(config.fix_encoder),
        fix_position_embedding=bool(config.fix_position_embedding), freeze_layers_below=config.freeze_layers_below)


def gradient_cache_chunk_auto(config) -> bool:
    """Whether the gradient cache's chunk is chosen per step shape (m3jax.plan.choose_chunk): gradient_cache with
    gradient_cache_chunk_size="auto" and no gradient_cache_chunk_tokens (which keeps its meaning)."""
    return (bool(config.gradient_cache) and config.gradient_cache_chunk_size == "auto"
            and not config.gradient_cache_chunk_tokens)


def step_settings(config) -> StepSettings:
    # gradient_cache_chunk_size="auto" is chosen per compiled shape by the trainer (m3jax.plan.choose_chunk): the
    # step's own default is the chunk used where nothing can be judged
    chunk = config.gradient_cache_chunk_size
    return StepSettings(
        seed=config.seed, sub_batch_size=config.sub_batch_size, fix_encoder=bool(config.fix_encoder),
        gradient_cache=bool(config.gradient_cache),
        gradient_cache_chunk_size=GRADIENT_CACHE_CHUNK_ROWS if chunk == "auto" else int(chunk),
        gradient_cache_chunk_tokens=config.gradient_cache_chunk_tokens,
        sharding_rules=mesh_settings(config).sharding_rules,
        gpu_command_buffers=bool(config.model.gpu_command_buffers), loss=loss_settings(config),
        optimizer=optimizer_settings(config))
