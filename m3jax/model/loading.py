"""The one loading path: a bge-m3 directory or an m3jax checkpoint -> (ModelConfig, params).

    source = find_model(path)                 # what `path` is; config.json, head sizes, pooler -- no weights read
    cfg = model_config(source, settings)      # the one place a ModelConfig is built
    params = load_params(source, cfg)         # float32 numpy params in the layout of m3jax.model.encoder.BGEM3
    loaded = load_model(path, settings)       # all three: loaded.cfg, loaded.params, loaded.source

`path` (a local path or a URL such as gs://bucket/...) may be
  - a bge-m3 (Hugging Face) directory: config.json + weights + colbert_linear.pt / sparse_linear.pt (m3jax.io.hf_read);
    an export of m3jax also carries m3jax_export.json, whose pooling / normalisation become the defaults; on a URL
    it is copied to the local cache once per host first (storage.stage);
  - an m3jax run directory, its checkpoints/ directory or one step directory checkpoints/<step> (its latest complete
    step unless `step` is given; config.json and the tokenizer come from the run's base_model/ or `base_model`), with
    the run config's pooling / normalisation / colbert_dim as defaults (Orbax reads a URL in place; base_model/
    is staged locally for the tokenizer).
`ModelSettings` holds what a user chooses on top of the checkpoint's architecture (the run config's model fields, or
BGEM3FlagModel's arguments): pooling, normalisation, colbert_dim, compute dtype, attention kernel, remat, dropout,
LoRA adapters (an m3jax checkpoint of a LoRA run keeps its adapters unmerged; export merges them).
A resumed run calls `find_model` + `model_config` on its own checkpoint and never reads the pretrained weights.

`load_reranker(path)` is the path for a cross-encoder reranker directory (bge-reranker-v2-m3's layout): a
ModelConfig from its config.json and the params of m3jax.model.encoder.Reranker.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, NamedTuple

import numpy as np

from m3jax.core import storage
from m3jax.core.scores import HEADS
from m3jax.io import checkpoint as ckpt_lib
from m3jax.io import hf_layout, hf_read
from m3jax.model.encoder import (
    LORA_TARGETS,
    LoRAConfig,
    ModelConfig,
    abstract_params,
    init_head_params,
    params_from_hf,
    reranker_params_from_hf,
)

logger = logging.getLogger(__name__)

EXPORT_INFO_NAME = "m3jax_export.json"  # written next to an export: source step and head settings
ATTENTION_IMPLEMENTATIONS = ("auto", "xla", "cudnn", "flash-dropout", "splash")


@dataclasses.dataclass(frozen=True)
class ModelSettings:
    """Head and numerics choices on top of a checkpoint's architecture. None = the checkpoint's own value."""

    sentence_pooling_method: str | None = None  # cls | mean; None: the source's (a run's config, an export's info)
    normalize_embeddings: bool | None = None
    colbert_dim: int = -1  # -1: the saved head's size (hidden size for fresh heads); > 0 must match a saved head
    dtype: str = "float32"  # compute dtype; params stay float32
    attention_implementation: str = "auto"  # auto | xla | cudnn | flash-dropout | splash (resolve_attention)
    remat_policy: str = "none"
    scan_layers: bool | None = None  # None: the layer loop (False) in training on GPU, the scan elsewhere
    hidden_dropout_prob: float | None = None  # None: config.json's
    attention_probs_dropout_prob: float | None = None
    # LoRA adapters: None = the source's (a run's config; an HF directory has none); LoRAConfig(rank=0) = none.
    lora: LoRAConfig | None = None


def config_names(value) -> tuple[str, ...]:
    """Names from a config value: ("a", "b"), "a,b", or ("a,b",) (what `--config.<field>=a,b` gives a tuple)."""
    items = [value] if isinstance(value, str) else list(value)
    return tuple(n.strip() for item in items for n in str(item).split(",") if n.strip())


def lora_targets(config) -> tuple[str, ...]:
    """LoRA target modules in the encoder layer's order (empty when LoRA is off). `config`: a run config or its
    saved JSON dict."""
    if config["lora"]["rank"] <= 0:
        return ()
    chosen = config_names(config["lora"]["targets"])
    return tuple(t for t in LORA_TARGETS if t in chosen)


def lora_config(rank: int, alpha: float, dropout: float, targets) -> LoRAConfig:
    """A LoRAConfig from run-config values (rank 0: LoRA off)."""
    return LoRAConfig(rank=int(rank), alpha=float(alpha), dropout=float(dropout), targets=tuple(targets))


def _lora_of_run_config(run_config: dict) -> LoRAConfig | None:
    """The LoRA settings a run was trained with (its saved config), None if none."""
    lora = run_config.get("lora") or {}
    if int(lora.get("rank", 0)) <= 0:
        return None
    return lora_config(lora["rank"], lora["alpha"], lora["dropout"], lora_targets(run_config))


def trained_heads(run_config) -> tuple[str, ...]:
    """The heads a run trains (its config, or the config a checkpoint saved), in the order dense, sparse, colbert: its
    `heads`, or ("dense",) when unified_finetuning is False (validate() rejects the two contradicting each other)."""
    if not run_config["unified_finetuning"]:
        return ("dense",)
    chosen = config_names(run_config["heads"])
    return tuple(h for h in HEADS if h in chosen)


def max_tokens(model_cfg) -> int:
    """The longest text (special tokens included) the model's position table holds: XLM-R numbers positions from
    pad_token_id + 1, so bge-m3's 8194 positions hold 8192 tokens and a 514-position model 512."""
    return int(model_cfg.max_position_embeddings) - int(model_cfg.pad_token_id) - 1


def platform_of(platform: str | None) -> str:
    """`platform`, or jax's default backend when None."""
    if platform is None:
        import jax

        platform = jax.default_backend()
    return platform


def resolve_attention(implementation: str, platform: str | None = None) -> str:
    """The attention kernel for `platform` (the devices the step runs or is compiled for; default: jax's default
    backend): 'auto' is cuDNN's fused attention on GPU, the Pallas flash kernel with attention dropout on TPU
    ('flash-dropout': m3jax.model.flash_dropout; splash where no dropout applies, in inference) and XLA's elsewhere.
    'splash' is the fused TPU kernel without attention dropout (the last bit of speed; bge-m3's attention dropout
    is then not applied). The Pallas kernels off TPU run interpreted ('flash-dropout-interpret',
    'splash-interpret': numerics tests, slow)."""
    if implementation not in ATTENTION_IMPLEMENTATIONS + ("splash-interpret", "flash-dropout-interpret"):
        raise ValueError(f"attention_implementation={implementation!r}: expected one of "
                         f"{', '.join(ATTENTION_IMPLEMENTATIONS)}")
    platform = platform_of(platform)
    if implementation == "auto":
        return {"gpu": "cudnn", "tpu": "flash-dropout"}.get(platform, "xla")
    for pallas in ("splash", "flash-dropout"):
        if implementation.startswith(pallas):
            return pallas if platform == "tpu" else pallas + "-interpret"
    return implementation


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """What a model path is, read without its weights."""

    path: str
    hf_config: dict  # config.json
    tokenizer_dir: str | None
    colbert_dim: int | None  # output size of the saved colbert head; None: no head files (heads start fresh)
    has_pooler: bool
    colbert_where: str = ""  # where the saved colbert head lives (error messages)
    defaults: dict = dataclasses.field(default_factory=dict)  # pooling / normalisation / colbert_dim it was made with
    location: ckpt_lib.CheckpointLocation | None = None  # set for an m3jax checkpoint
    run_config: dict | None = None  # the run config saved with an m3jax checkpoint

    @classmethod
    def of_params(cls, hf_config: dict, params: dict, tokenizer_dir: str | None = None) -> ModelSource:
        """In-memory params (a train state) with their base config.json."""
        try:
            colbert_dim = int(np.shape(params["colbert_linear"]["kernel"])[-1])
        except (KeyError, TypeError, IndexError) as e:
            raise ckpt_lib.CheckpointError(
                f"params have no colbert_linear kernel (top-level keys: {sorted(params)})") from e
        return cls(path="<params>", hf_config=hf_config, tokenizer_dir=tokenizer_dir, colbert_dim=colbert_dim,
                   has_pooler="pooler" in params, colbert_where="params: colbert_linear")


def find_model(path, *, step: int | None = None, base_model: str | None = None, verify: bool = True) -> ModelSource:
    """Resolve `path` (see the module docstring) to a ModelSource, reading no weights. Raises CheckpointFormatError
    (a Hugging Face directory) or its subclass CheckpointError (an m3jax checkpoint) naming the file and what was
    expected. An m3jax checkpoint step is verified against its manifest (checkpoint.locate_checkpoint) unless
    `verify=False` (a resuming run, which has verified it)."""
    path = storage.resolve(path)
    if storage.isfile(storage.join(path, hf_layout.CONFIG_NAME)):
        if step is not None or base_model is not None:
            raise hf_layout.CheckpointFormatError(f"{path}: step and base_model apply to an m3jax run directory, "
                                                  f"not to a Hugging Face model directory")
        return _hf_source(storage.stage(path, what="model directory"))
    return _checkpoint_source(path, step, base_model, verify)


def _hf_source(path: str) -> ModelSource:
    hf_config = hf_read.load_hf_config(path)
    colbert_path = os.path.join(path, hf_layout.COLBERT_NAME)
    colbert_dim = hf_read.colbert_head_dim(path)
    defaults = {}
    info_path = os.path.join(path, EXPORT_INFO_NAME)
    if os.path.isfile(info_path):
        try:
            with open(info_path) as f:
                info = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise hf_layout.CheckpointFormatError(f"{info_path}: cannot read: {e}") from e
        defaults = {k: info[k] for k in ("sentence_pooling_method", "normalize_embeddings", "mrl_dims", "mrl_colbert")
                    if k in info}
    return ModelSource(path=path, hf_config=hf_config, tokenizer_dir=path, colbert_dim=colbert_dim,
                       has_pooler=hf_read.has_pooler(path), colbert_where=colbert_path, defaults=defaults)


def _checkpoint_source(path: str, step: int | None, base_model: str | None, verify: bool = True) -> ModelSource:
    location = ckpt_lib.locate_checkpoint(path, step, verify=verify)
    run_config = ckpt_lib.restore_run_config(storage.join(location.step_dir, "config"))
    base_dir = storage.resolve(base_model) if base_model else ckpt_lib.base_model_dir(location.work_dir)
    hf_config = ckpt_lib.read_base_model(base_dir)
    base_dir = storage.stage(base_dir, what="base model files")  # the tokenizer is read from a local directory
    params = ckpt_lib.params_metadata(storage.join(location.step_dir, "state"))
    try:
        colbert_dim = int(params["colbert_linear"]["kernel"].shape[-1])
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ckpt_lib.CheckpointError(f"{location.step_dir}: the saved params have no colbert_linear kernel "
                                       f"(top-level keys: {sorted(params)})") from e
    defaults = {k: run_config[k] for k in ("sentence_pooling_method", "normalize_embeddings", "colbert_dim",
                                           "mrl_dims", "mrl_colbert") if k in run_config}
    defaults["lora"] = _lora_of_run_config(run_config)
    return ModelSource(path=path, hf_config=hf_config, tokenizer_dir=base_dir, colbert_dim=colbert_dim,
                       has_pooler="pooler" in params, colbert_where=f"{location.step_dir}: the saved colbert_linear",
                       defaults=defaults, location=location, run_config=run_config)


def model_config(source: ModelSource, settings: ModelSettings = ModelSettings(), *,
                 platform: str | None = None) -> ModelConfig:
    """The ModelConfig of `source` under `settings`: architecture from config.json, head sizes from the saved
    heads, the rest from settings (falling back to the source's defaults). `platform` resolves attention 'auto'
    (default: jax's default backend)."""
    requested = settings.colbert_dim if settings.colbert_dim > 0 else int(source.defaults.get("colbert_dim", -1))
    if source.colbert_dim is not None and requested > 0 and requested != source.colbert_dim:
        raise hf_layout.CheckpointFormatError(
            f"{source.colbert_where}: weight has {source.colbert_dim} output dims but colbert_dim={requested} was "
            f"requested (use colbert_dim=-1 to take the checkpoint's)")
    colbert_dim = source.colbert_dim if source.colbert_dim is not None else requested

    def pick(name, default):
        value = getattr(settings, name)
        return value if value is not None else source.defaults.get(name, default)

    lora = pick("lora", None)

    fields: dict[str, Any] = dict(
        colbert_dim=colbert_dim, has_pooler=source.has_pooler,
        sentence_pooling_method=pick("sentence_pooling_method", "cls"),
        normalize_embeddings=bool(pick("normalize_embeddings", True)), dtype=settings.dtype,
        attention_implementation=resolve_attention(settings.attention_implementation, platform),
        remat_policy=settings.remat_policy, hidden_dropout_prob=settings.hidden_dropout_prob,
        attention_probs_dropout_prob=settings.attention_probs_dropout_prob,
        scan_layers=settings.scan_layers if settings.scan_layers is not None else platform_of(platform) != "gpu",
        lora=lora if lora is not None and lora.rank > 0 else None)
    try:
        return ModelConfig.from_hf_config(source.hf_config, **fields)
    except (KeyError, ValueError) as e:
        raise hf_layout.CheckpointFormatError(f"{source.path}: config.json cannot describe an m3jax model: {e}") from e


def with_settings(cfg: ModelConfig, *, platform: str | None = None, **changes) -> ModelConfig:
    """`cfg` with other head / numerics settings (e.g. inference on a training config: bf16, no remat)."""
    if "attention_implementation" in changes:
        changes["attention_implementation"] = resolve_attention(changes["attention_implementation"], platform)
    return dataclasses.replace(cfg, **changes)


def load_params(source: ModelSource, cfg: ModelConfig, *, seed: int = 0) -> dict:
    """The params of `source` as float32 numpy arrays, checked against `cfg`. An HF directory without head files
    gets freshly initialised heads (torch.nn.Linear's init from `seed`, as FlagEmbedding does)."""
    if source.location is not None:
        params = ckpt_lib.restore_params(storage.join(source.location.step_dir, "state"))
        check_params(params, cfg, source.location.step_dir)
        return params
    ckpt = hf_read.load_hf_checkpoint(source.path)
    return params_from_hf(ckpt.encoder, ckpt.colbert, ckpt.sparse, cfg, seed=seed)


def check_params(params: dict, cfg: ModelConfig, where: str) -> None:
    """Same tree and shapes as BGEM3(cfg) would create; names the first mismatch."""
    import flax.linen as nn
    import jax

    expected = nn.unbox(abstract_params(cfg)["params"])
    flat_expected = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
    flat_found = {jax.tree_util.keystr(k): np.shape(v) for k, v in jax.tree_util.tree_leaves_with_path(params)}
    for key, shape in flat_expected.items():
        if key not in flat_found:
            raise ckpt_lib.CheckpointError(f"{where}: params lack {key} (shape {list(shape)}); does the base model's "
                                           f"config.json describe the model that was trained?")
        if tuple(flat_found[key]) != tuple(shape):
            raise ckpt_lib.CheckpointError(
                f"{where}: param {key} has shape {list(flat_found[key])} but the base model's config.json implies "
                f"{list(shape)}; is --base-model the model that was trained?")
    extra = sorted(set(flat_found) - set(flat_expected))
    if extra:
        raise ckpt_lib.CheckpointError(f"{where}: unexpected param {extra[0]} ({len(extra)} in all) for the base "
                                       f"model's config.json")


class LoadedModel(NamedTuple):
    cfg: ModelConfig
    params: dict
    source: ModelSource


def load_model(path, settings: ModelSettings = ModelSettings(), *, step: int | None = None,
               base_model: str | None = None, seed: int = 0, platform: str | None = None) -> LoadedModel:
    """find_model + model_config + load_params."""
    source = find_model(path, step=step, base_model=base_model)
    cfg = model_config(source, settings, platform=platform)
    return LoadedModel(cfg, load_params(source, cfg, seed=seed), source)


def is_reranker(path) -> bool:
    """Whether `path` is a Hugging Face directory whose config.json describes a sequence-classification model."""
    config_path = storage.join(os.fspath(path), hf_layout.CONFIG_NAME)
    return storage.isfile(config_path) and hf_layout.is_reranker_config(hf_read.load_hf_config(
        storage.stage(os.fspath(path), what="model directory")))


def load_reranker(path, *, dtype: str = "float32", attention_implementation: str = "auto",
                  platform: str | None = None) -> tuple[ModelConfig, dict]:
    """A reranker directory -> (ModelConfig, Reranker params as float32 numpy); errors are CheckpointFormatError."""
    ckpt = hf_read.load_reranker_checkpoint(storage.stage(os.fspath(path), what="model directory"))
    try:
        cfg = ModelConfig.from_hf_config(
            ckpt.config, has_pooler=False, dtype=dtype, remat_policy="none",
            attention_implementation=resolve_attention(attention_implementation, platform))
    except (KeyError, ValueError) as e:
        raise hf_layout.CheckpointFormatError(f"{path}: config.json cannot describe an m3jax model: {e}") from e
    return cfg, reranker_params_from_hf(ckpt.encoder, ckpt.classifier, cfg)


def load_tokenizer(source: ModelSource, **kwargs):
    """The source's Hugging Face tokenizer (the run's base_model/ for an m3jax checkpoint), giving the same ids
    under transformers 4 and 5 (hf_read.load_tokenizer)."""
    if source.tokenizer_dir is None:
        raise hf_layout.CheckpointFormatError(f"{source.path}: no tokenizer directory known")
    return hf_read.load_tokenizer(source.tokenizer_dir, **kwargs)


__all__ = ["ModelSettings", "ModelSource", "LoadedModel", "resolve_attention", "find_model", "model_config",
           "with_settings", "load_params", "check_params", "load_model", "load_tokenizer", "init_head_params",
           "is_reranker", "load_reranker"]
