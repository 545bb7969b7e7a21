"""BGE-M3 in Flax Linen: the XLM-RoBERTa encoder and the three M3 heads.

Parameter names mirror HF's XLMRobertaModel so the mapping in `params_from_hf` / `params_to_hf` reads one to one.
Every parameter carries logical axis names (vocab, embed, heads, kv, mlp, colbert, layers, ...); the train loop
maps them to mesh axes with the rules in the config. The encoder layers run under `nn.scan` (compile time does not
grow with depth) wrapped in `nn.remat` with a configurable policy.

Output of `BGEM3.__call__` per text, from the last hidden state h [B, L, H] and attention mask m [B, L]
(FlagEmbedding's EncoderOnlyEmbedderM3Model; docs/flagembedding_semantics.md, "The three heads"):
  dense           [B, H]      h[:, 0] (cls) or masked mean, L2-normalised when normalize_embeddings   (float32)
  sparse_weights  [B, L]      relu(sparse_linear(h))  -- per-token weights; `scores.lexical_vectors` pools them
  colbert         [B, L-1, D] colbert_linear(h[:, 1:]) * m[:, 1:], L2-normalised per token when normalize_embeddings

`Reranker` is the same encoder under XLMRobertaForSequenceClassification's head (bge-reranker-v2-m3): one logit per
(query, passage) pair, out_proj(tanh(dense(h[:, 0]))).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from m3jax.core import scores, sharding
from m3jax.model import attention, flash_dropout

logger = logging.getLogger(__name__)

# The linear modules of an encoder layer LoRA can adapt (Layer's names), in the layer's order.
LORA_TARGETS = ("query", "key", "value", "attention_output", "intermediate", "output")

# XLM-R special ids: cls (<s>), eos (</s>), pad, unk -- zeroed in the sparse (lexical) vector.
XLMR_UNUSED_TOKEN_IDS = (0, 2, 1, 3)

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


# The heads' own parameters (the dense head has none): top-level param name -> head.
HEAD_PARAMS = {"colbert_linear": "colbert", "sparse_linear": "sparse"}
LORA_SUFFIX = "_lora"  # the adapter of module "query" is module "query_lora", params "a" and "b"


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the encoder's linear layers: y = W x + b + (alpha / rank) * (dropout(x) A) B."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("query", "value")

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if self.rank < 0 or unknown:
            raise ValueError(f"LoRAConfig(rank={self.rank}, targets={self.targets}): expected rank >= 0 and targets "
                             f"among {', '.join(LORA_TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def path_names(path) -> list[str]:
    """The names along a tree path (dict keys, attribute names)."""
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_names(params) -> list[str]:
    """Every parameter's name, its path joined by "/" ("encoder/layers/query/kernel", ...), in tree order."""
    return ["/".join(path_names(path)) for path, _ in jax.tree_util.tree_leaves_with_path(params)]


def is_lora_param(names) -> bool:
    """Whether a parameter path (a list of names) is a LoRA adapter's."""
    return len(names) >= 2 and str(names[-2]).endswith(LORA_SUFFIX)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture (from the checkpoint's config.json) plus the M3 head and numerics settings."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int = 1
    pad_token_id: int = 1
    layer_norm_eps: float = 1e-5
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    has_pooler: bool = False  # carried through unchanged so an export reproduces the checkpoint's pooler
    # M3 heads
    colbert_dim: int = -1  # -1: hidden_size
    sentence_pooling_method: str = "cls"  # cls | mean
    normalize_embeddings: bool = True
    unused_token_ids: tuple[int, ...] = XLMR_UNUSED_TOKEN_IDS
    # numerics / kernels
    dtype: str = "float32"  # compute dtype; params are always float32
    attention_implementation: str = "xla"  # xla | cudnn | flash-dropout[-interpret] | splash[-interpret]
    remat_policy: str = "none"  # none | full | dots | dots_no_batch
    # Training runs the layers as nn.scan (one compiled layer, small programs, fast compiles) or, when False, as a
    # Python loop over the same stacked parameters (one call site per layer: no per-layer copies of weights and
    # saved activations, 16% faster at 32x8:64:256 on an H200, 4x the compile time; required by cuDNN's attention
    # dropout). Inference always scans. loading.model_config resolves the run config's None: False on GPU.
    scan_layers: bool = True
    dropout_seed: int = 0  # cuDNN's attention dropout: the first layer's seed (static; layer i uses seed + i)
    lora: LoRAConfig | None = None  # adapters on the encoder (None: none)

    @property
    def has_dropout(self) -> bool:
        """Whether training draws dropout masks (hidden, attention or LoRA dropout)."""
        lora_dropout = self.lora.dropout if self.lora is not None else 0.0
        return max(self.hidden_dropout_prob, self.attention_probs_dropout_prob, lora_dropout) > 0

    @property
    def colbert_out_dim(self) -> int:
        return self.hidden_size if self.colbert_dim <= 0 else self.colbert_dim

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @classmethod
    def from_hf_config(cls, hf_config: dict, **overrides) -> ModelConfig:
        """Architecture fields from an HF config.json dict; head/numerics settings from `overrides`."""
        act = hf_config.get("hidden_act", "gelu")
        if act != "gelu":
            raise ValueError(f"config.json hidden_act={act!r}: m3jax implements XLM-R's exact 'gelu' only")
        pos_type = hf_config.get("position_embedding_type", "absolute")
        if pos_type != "absolute":
            raise ValueError(f"config.json position_embedding_type={pos_type!r}: only 'absolute' is supported")
        if hf_config["hidden_size"] % hf_config["num_attention_heads"]:
            raise ValueError("config.json hidden_size must be a multiple of num_attention_heads")
        fields = dict(
            vocab_size=hf_config["vocab_size"],
            hidden_size=hf_config["hidden_size"],
            num_hidden_layers=hf_config["num_hidden_layers"],
            num_attention_heads=hf_config["num_attention_heads"],
            intermediate_size=hf_config["intermediate_size"],
            max_position_embeddings=hf_config["max_position_embeddings"],
            type_vocab_size=hf_config.get("type_vocab_size", 1),
            pad_token_id=hf_config.get("pad_token_id", 1),
            layer_norm_eps=hf_config.get("layer_norm_eps", 1e-5),
            hidden_dropout_prob=hf_config.get("hidden_dropout_prob", 0.1),
            attention_probs_dropout_prob=hf_config.get("attention_probs_dropout_prob", 0.1),
        )
        fields.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**fields)


def _dense(features, axes, name, dtype, *, in_axes=-1):
    kernel_init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
    bias_axes = axes[len(axes) - (1 if isinstance(features, int) else len(features)):]
    return nn.DenseGeneral(features, axis=in_axes, dtype=dtype, param_dtype=jnp.float32, name=name,
                           kernel_init=kernel_init,
                           bias_init=nn.with_logical_partitioning(nn.initializers.zeros, bias_axes))


def _layer_norm(cfg: ModelConfig, name: str):
    # Statistics in float32 whatever the compute dtype (flax promotes reductions to float32).
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, param_dtype=jnp.float32, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))


def xlmr_position_ids(input_ids: jax.Array, pad_token_id: int) -> jax.Array:
    """XLM-R positions: pad_token_id+1, +2, ... over non-pad tokens; pad tokens get pad_token_id."""
    not_pad = (input_ids != pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + pad_token_id


class Embeddings(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, deterministic: bool, position_ids=None):
        cfg = self.cfg
        if position_ids is None:
            position_ids = xlmr_position_ids(input_ids, cfg.pad_token_id)

        def table(n, axes, name):
            init = nn.with_logical_partitioning(nn.initializers.normal(0.02), axes)
            return nn.Embed(n, cfg.hidden_size, dtype=jnp.float32, param_dtype=jnp.float32, embedding_init=init,
                            name=name)

        words = table(cfg.vocab_size, ("vocab", "embed"), "word_embeddings")(input_ids)
        positions = table(cfg.max_position_embeddings, ("positions", "embed"), "position_embeddings")(position_ids)
        token_types = table(cfg.type_vocab_size, ("types", "embed"), "token_type_embeddings")(
            jnp.zeros_like(input_ids))
        x = _layer_norm(cfg, "LayerNorm")(words + positions + token_types)
        return nn.Dropout(cfg.hidden_dropout_prob)(x, deterministic=deterministic)


def projections(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[str, ...]]]:
    """The linear layers of an encoder layer: name -> (input shape, output shape, logical axes of the kernel)."""
    h, n, d, i = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.intermediate_size
    return {"query": ((h,), (n, d), ("embed", "heads", "kv")), "key": ((h,), (n, d), ("embed", "heads", "kv")),
            "value": ((h,), (n, d), ("embed", "heads", "kv")),
            "attention_output": ((n, d), (h,), ("heads", "kv", "embed")),
            "intermediate": ((h,), (i,), ("embed", "mlp")), "output": ((i,), (h,), ("mlp", "embed"))}


def _uniform(bound: float):
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class LoRA(nn.Module):
    """The adapter of one linear layer: scale * (dropout(x) A) B, contracting x's trailing input axes.

    A [in..., rank] starts uniform in +-1/sqrt(fan_in) (PEFT's kaiming-uniform), B [rank, out...] at zero, so the
    adapted layer starts as the layer itself. Both carry the kernel's logical axis names plus "lora" for the rank,
    so the sharding rules shard them like the kernel they adapt.
    """

    lora: LoRAConfig
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    axes: tuple[str, ...]  # the kernel's: input axes, then output axes
    dtype: Any
    deterministic: bool

    @nn.compact
    def __call__(self, x):
        n_in, r = len(self.in_shape), self.lora.rank
        bound = 1.0 / np.sqrt(np.prod(self.in_shape))
        a = self.param("a", nn.with_logical_partitioning(_uniform(bound), self.axes[:n_in] + ("lora",)),
                       self.in_shape + (r,), jnp.float32)
        b = self.param("b", nn.with_logical_partitioning(nn.initializers.zeros, ("lora",) + self.axes[n_in:]),
                       (r,) + self.out_shape, jnp.float32)
        x = nn.Dropout(self.lora.dropout)(x, deterministic=self.deterministic)
        low = jnp.tensordot(x.astype(self.dtype), a.astype(self.dtype), axes=n_in)
        return jnp.tensordot(low, b.astype(self.dtype), axes=1) * jnp.asarray(self.lora.scale, self.dtype)


class Layer(nn.Module):
    """One post-LN transformer layer (HF XLMRobertaLayer), with LoRA adapters on cfg.lora's targets."""

    cfg: ModelConfig
    deterministic: bool = True
    max_segments: int | None = None  # packed rows: the bound on segments per row (m3jax.model.attention)
    layer_index: int = 0  # static: the cuDNN dropout seed's offset (layers unrolled); 0 under the layer scan

    @nn.compact
    def __call__(self, x, lengths, segment_ids=None):
        cfg, dt = self.cfg, self.cfg.compute_dtype
        shapes = projections(cfg)

        def linear(name, inputs):
            in_shape, out_shape, axes = shapes[name]
            features = out_shape if len(out_shape) > 1 else out_shape[0]
            in_axes = tuple(range(-len(in_shape), 0)) if len(in_shape) > 1 else -1
            y = _dense(features, axes, name, dt, in_axes=in_axes)(inputs)
            if cfg.lora is not None and name in cfg.lora.targets:
                y = y + LoRA(cfg.lora, in_shape, out_shape, axes, dt, self.deterministic,
                             name=name + LORA_SUFFIX)(inputs)
            return y

        q, k, v = linear("query", x), linear("key", x), linear("value", x)
        dropout = None
        if cfg.attention_probs_dropout_prob > 0 and not self.deterministic:  # the hash rule's seed: this layer's rng
            seed = flash_dropout.seed_words(self.make_rng("dropout"))
            dropout = attention.Dropout(cfg.attention_probs_dropout_prob, seed)
        attn = attention.attention(q, k, v, lengths, implementation=cfg.attention_implementation, dropout=dropout,
                                   cudnn_seed=cfg.dropout_seed + self.layer_index, segment_ids=segment_ids,
                                   max_segments=self.max_segments)
        attn = linear("attention_output", attn)
        attn = nn.Dropout(cfg.hidden_dropout_prob)(attn, deterministic=self.deterministic)
        x = _layer_norm(cfg, "attention_LayerNorm")(attn + x)

        y = linear("intermediate", x)
        y = nn.gelu(y, approximate=False)
        y = linear("output", y)
        y = nn.Dropout(cfg.hidden_dropout_prob)(y, deterministic=self.deterministic)
        x = _layer_norm(cfg, "output_LayerNorm")(y + x)
        return x, None


def unrolls_layers(cfg: ModelConfig, deterministic: bool) -> bool:
    """Whether the encoder runs its layers as a Python loop instead of the layer scan: in training with
    cfg.scan_layers False. cuDNN's attention dropout needs it: cuDNN draws its keep mask at (seed, a counter of the
    kernel's executions kept per call site), so a call site inside the layer scan gives the backward pass (layers in
    reverse) other masks than the forward pass had (benchmarks/cudnn_dropout.py shows it on the device); one call
    site per layer, each run once a step, with its own seed (cfg.dropout_seed + stream * layers + layer) keeps
    them the same."""
    return not cfg.scan_layers and not deterministic


class Encoder(nn.Module):
    """XLMRobertaModel without pooler: input ids [B, L] (right-padded) -> last hidden state [B, L, H].

    Packed rows (m3jax.core.packing) pass `packed=(segment_ids [B, L], position_ids [B, L], max_segments)`: several
    texts per row, attention confined to each, positions restarting per text; attention_mask is then
    segment_ids != 0. `dropout_stream` (a static int) separates the cuDNN dropout seeds of different encodes in one
    step (queries 0, passages 1); the layer scan's dropout keys already differ by call."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask, deterministic: bool = True, packed=None, dropout_stream: int = 0):
        cfg = self.cfg
        segment_ids, position_ids, max_segments = packed if packed is not None else (None, None, None)
        x = Embeddings(cfg, name="embeddings")(input_ids, deterministic, position_ids).astype(cfg.compute_dtype)
        x = sharding.rows_over_batch_axes(x)  # rows over the batch axes, not hidden like the embedding table
        lengths = attention_mask.astype(jnp.int32).sum(axis=-1)
        layer = Layer
        if cfg.remat_policy != "none":
            layer = nn.remat(Layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
        layers = nn.scan(layer, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                         in_axes=nn.broadcast, length=cfg.num_hidden_layers,
                         metadata_params={nn.PARTITION_NAME: "layers"})(cfg, deterministic, max_segments,
                                                                        name="layers")
        extra = () if segment_ids is None else (segment_ids,)
        if self.is_initializing() or not unrolls_layers(cfg, deterministic):
            x, _ = layers(x, lengths, *extra)
            return x
        # The same stacked parameters as the scan's ("layers", leading axis = layer), one layer at a time.
        stacked = nn.unbox(self.variables["params"]["layers"])
        rng = self.make_rng("dropout")
        for i in range(cfg.num_hidden_layers):
            module = Layer(cfg, deterministic, max_segments=max_segments,
                           layer_index=dropout_stream * cfg.num_hidden_layers + i, parent=None)

            def run(p, x, key, module=module):
                return module.apply({"params": p}, x, lengths, *extra, rngs={"dropout": key})[0]

            if cfg.remat_policy != "none":
                run = jax.checkpoint(run, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
            x = run(jax.tree.map(lambda a, i=i: a[i], stacked), x, jax.random.fold_in(rng, i))
        return x


class BGEM3(nn.Module):
    """Encoder + dense / sparse / colbert heads (+ the checkpoint's pooler, created at init only)."""

    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg)
        self.colbert_linear = _dense(cfg.colbert_out_dim, ("embed", "colbert"), "colbert_linear", jnp.float32)
        self.sparse_linear = _dense(1, ("embed", "one"), "sparse_linear", jnp.float32)
        if cfg.has_pooler:
            self.pooler = _dense(cfg.hidden_size, ("embed", "mlp"), "pooler", jnp.float32)

    def __call__(self, input_ids, attention_mask, deterministic: bool = True, train_encoder: bool = True,
                 dropout_stream: int = 0):
        hidden = self.encoder(input_ids, attention_mask, deterministic, dropout_stream=dropout_stream)
        if not train_encoder:  # fix_encoder: no backward pass through the encoder at all
            hidden = jax.lax.stop_gradient(hidden)
        if self.is_initializing() and self.cfg.has_pooler:
            self.pooler(hidden[:, 0])  # params only; M3 never uses the pooler
        return self.heads(hidden, attention_mask)

    def heads(self, hidden, attention_mask):
        cfg = self.cfg
        mask = attention_mask.astype(jnp.float32)
        dense = scores.pool(hidden.astype(jnp.float32), mask, cfg.sentence_pooling_method)
        sparse_weights = jax.nn.relu(self.sparse_linear(hidden.astype(jnp.float32)))[..., 0]
        colbert = self.colbert_linear(hidden[:, 1:].astype(jnp.float32)) * mask[:, 1:, None]
        if cfg.normalize_embeddings:
            dense = scores.l2_normalize(dense)
            colbert = scores.l2_normalize(colbert)
        return dict(dense=dense, sparse_weights=sparse_weights, colbert=colbert.astype(cfg.compute_dtype))

    def packed(self, input_ids, segment_ids, position_ids, starts):
        """The heads over packed rows (m3jax.core.packing): input_ids / segment_ids / position_ids [R, L], starts [R,
        S] (each segment's first token; a row's unused slots any index). Returns, per segment, dense [R, S, H] (its
        first token's state, or the mean over its tokens), and per token sparse_weights [R, L] and colbert
        [R, L, D] (every token, the <s> of each text included: m3jax.core.packing.unpack cuts each text's own)."""
        cfg = self.cfg
        real = segment_ids != 0
        hidden = self.encoder(input_ids, real.astype(jnp.int32), True,
                              packed=(segment_ids, position_ids, starts.shape[1]))
        hidden = jnp.where(real[..., None], hidden.astype(jnp.float32), 0.0)  # padding: zeros (never NaN)
        if cfg.sentence_pooling_method == "cls":
            dense = jnp.take_along_axis(hidden, starts[..., None], axis=1)
        elif cfg.sentence_pooling_method == "mean":
            member = (segment_ids[:, None, :] == jnp.arange(1, starts.shape[1] + 1)[None, :, None])
            member = member.astype(jnp.float32)  # [R, S, L]
            total = jnp.einsum("rsl,rlh->rsh", member, hidden, precision=jax.lax.Precision.HIGHEST)
            dense = total / jnp.maximum(member.sum(-1), 1.0)[..., None]
        else:
            raise ValueError(f"sentence_pooling_method={cfg.sentence_pooling_method!r}: expected 'cls' or 'mean'")
        sparse_weights = jax.nn.relu(self.sparse_linear(hidden))[..., 0]
        colbert = self.colbert_linear(hidden) * real[..., None]
        if cfg.normalize_embeddings:
            dense = scores.l2_normalize(dense)
            colbert = scores.l2_normalize(colbert)
        return dict(dense=dense, sparse_weights=sparse_weights, colbert=colbert.astype(cfg.compute_dtype))

    def packed_hidden(self, input_ids, segment_ids, position_ids, max_segments: int, deterministic: bool = True,
                      train_encoder: bool = True, dropout_stream: int = 0):
        """The encoder's last hidden state [R, L, H] over packed rows (m3jax.core.packing), padding tokens zeroed: what
        the train step gathers each text's tokens from before `heads` (m3jax.train.step.packed_outputs)."""
        real = segment_ids != 0
        hidden = self.encoder(input_ids, real.astype(jnp.int32), deterministic,
                              packed=(segment_ids, position_ids, max_segments), dropout_stream=dropout_stream)
        if not train_encoder:  # fix_encoder: no backward pass through the encoder at all
            hidden = jax.lax.stop_gradient(hidden)
        return jnp.where(real[..., None], hidden, jnp.zeros((), hidden.dtype))

    def encode_hidden(self, input_ids, attention_mask):
        """The encoder's last hidden state alone (parity checks against HF)."""
        return self.encoder(input_ids, attention_mask, True)


class Reranker(nn.Module):
    """Cross-encoder: encoder + XLMRobertaClassificationHead on the <s> token -> one logit per row [B] (float32).

    HF's head: dropout, dense (hidden -> hidden), tanh, dropout, out_proj (hidden -> 1); dropout is off here
    (inference only)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, input_ids, attention_mask):
        hidden = Encoder(self.cfg, name="encoder")(input_ids, attention_mask, True)
        x = hidden[:, 0].astype(jnp.float32)
        x = jnp.tanh(_dense(self.cfg.hidden_size, ("embed", "mlp"), "classifier_dense", jnp.float32)(x))
        return _dense(1, ("mlp", "one"), "classifier_out_proj", jnp.float32)(x)[:, 0]


# ---------------------------------------------------------------------------------------------------------------
# HF state dict  <->  Flax params. Names on the left are HF XLMRobertaModel's (no "roberta." prefix).
# ---------------------------------------------------------------------------------------------------------------

def _layer_map(cfg: ModelConfig) -> dict[str, tuple[tuple[str, ...], Any, Any]]:
    """Per-layer HF name -> (flax path inside 'layers', hf->flax transform, flax->hf transform)."""
    h, n, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    to_heads = lambda w: w.T.reshape(h, n, d)  # Linear [out, in] -> [in, heads, head_dim]
    from_heads = lambda k: k.reshape(h, n * d).T
    heads_bias = lambda b: b.reshape(n, d)
    flat = lambda b: b.reshape(-1)
    t = lambda w: w.T
    ident = lambda x: x
    m = {}
    for name in ("query", "key", "value"):
        m[f"attention.self.{name}.weight"] = ((name, "kernel"), to_heads, from_heads)
        m[f"attention.self.{name}.bias"] = ((name, "bias"), heads_bias, flat)
    m["attention.output.dense.weight"] = (("attention_output", "kernel"), lambda w: w.T.reshape(n, d, h),
                                          lambda k: k.reshape(n * d, h).T)
    m["attention.output.dense.bias"] = (("attention_output", "bias"), ident, ident)
    m["attention.output.LayerNorm.weight"] = (("attention_LayerNorm", "scale"), ident, ident)
    m["attention.output.LayerNorm.bias"] = (("attention_LayerNorm", "bias"), ident, ident)
    m["intermediate.dense.weight"] = (("intermediate", "kernel"), t, t)
    m["intermediate.dense.bias"] = (("intermediate", "bias"), ident, ident)
    m["output.dense.weight"] = (("output", "kernel"), t, t)
    m["output.dense.bias"] = (("output", "bias"), ident, ident)
    m["output.LayerNorm.weight"] = (("output_LayerNorm", "scale"), ident, ident)
    m["output.LayerNorm.bias"] = (("output_LayerNorm", "bias"), ident, ident)
    return m


_EMBEDDING_MAP = {
    "embeddings.word_embeddings.weight": ("word_embeddings", "embedding"),
    "embeddings.position_embeddings.weight": ("position_embeddings", "embedding"),
    "embeddings.token_type_embeddings.weight": ("token_type_embeddings", "embedding"),
    "embeddings.LayerNorm.weight": ("LayerNorm", "scale"),
    "embeddings.LayerNorm.bias": ("LayerNorm", "bias"),
}


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _get(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


# XLMRobertaClassificationHead (names without "classifier.") -> Reranker params (Linear [out, in] -> kernel [in, out])
_CLASSIFIER_MAP = {
    "dense.weight": ("classifier_dense", "kernel"),
    "dense.bias": ("classifier_dense", "bias"),
    "out_proj.weight": ("classifier_out_proj", "kernel"),
    "out_proj.bias": ("classifier_out_proj", "bias"),
}


def _encoder_params_from_hf(encoder: dict[str, np.ndarray], cfg: ModelConfig) -> dict:
    """HF XLMRobertaModel tensors -> the params of `Encoder` (embeddings + scanned layers)."""
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    params: dict = {}
    for hf_name, path in _EMBEDDING_MAP.items():
        _set(params, ("embeddings",) + path, f32(encoder[hf_name]))
    for hf_name, (path, to_flax, _) in _layer_map(cfg).items():
        stacked = np.stack([to_flax(f32(encoder[f"encoder.layer.{i}.{hf_name}"]))
                            for i in range(cfg.num_hidden_layers)])
        _set(params, ("layers",) + path, stacked)
    return params


def reranker_params_from_hf(encoder: dict[str, np.ndarray], classifier: dict[str, np.ndarray],
                            cfg: ModelConfig) -> dict:
    """A reranker's HF tensors (hf_read.load_reranker_checkpoint) -> `Reranker` params (float32 numpy)."""
    params: dict = {"encoder": _encoder_params_from_hf(encoder, cfg)}
    for hf_name, path in _CLASSIFIER_MAP.items():
        value = np.asarray(classifier[hf_name], dtype=np.float32)
        _set(params, path, value.T if path[-1] == "kernel" else value)
    return params


def params_from_hf(encoder: dict[str, np.ndarray], colbert: dict | None, sparse: dict | None,
                   cfg: ModelConfig, *, seed: int = 0) -> dict:
    """HF numpy tensors -> Flax params (float32 numpy). Missing heads (None) are freshly initialised from `seed`,
    as FlagEmbedding does when colbert_linear.pt / sparse_linear.pt are absent; so are LoRA adapters when cfg has
    them (init_lora_params)."""
    f32 = lambda a: np.asarray(a, dtype=np.float32)
    params: dict = {"encoder": _encoder_params_from_hf(encoder, cfg)}
    if cfg.has_pooler:
        params["pooler"] = {"kernel": f32(encoder["pooler.dense.weight"]).T, "bias": f32(encoder["pooler.dense.bias"])}
    if colbert is None or sparse is None:
        fresh = init_head_params(cfg, seed)
        colbert = colbert or fresh["colbert"]
        sparse = sparse or fresh["sparse"]
    params["colbert_linear"] = {"kernel": f32(colbert["weight"]).T, "bias": f32(colbert["bias"])}
    params["sparse_linear"] = {"kernel": f32(sparse["weight"]).T, "bias": f32(sparse["bias"])}
    if cfg.lora is not None:  # fresh adapters (B = 0: the model starts as the checkpoint)
        params["encoder"]["layers"].update(init_lora_params(cfg, seed))
    return params


def init_head_params(cfg: ModelConfig, seed: int) -> dict:
    """torch.nn.Linear's default init (uniform +-1/sqrt(fan_in)) for both heads, in HF layout."""
    rng = np.random.default_rng(seed)
    bound = 1.0 / np.sqrt(cfg.hidden_size)
    u = lambda *shape: rng.uniform(-bound, bound, size=shape).astype(np.float32)
    return {"colbert": {"weight": u(cfg.colbert_out_dim, cfg.hidden_size), "bias": u(cfg.colbert_out_dim)},
            "sparse": {"weight": u(1, cfg.hidden_size), "bias": u(1)}}


def params_to_hf(params: dict, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], dict, dict]:
    """Flax params -> (encoder state dict, colbert {weight, bias}, sparse {weight, bias}) as float32 numpy."""
    p = jax.tree.map(lambda a: np.asarray(a, dtype=np.float32), params)
    encoder = {hf_name: _get(p["encoder"]["embeddings"], path) for hf_name, path in _EMBEDDING_MAP.items()}
    for hf_name, (path, _, to_hf) in _layer_map(cfg).items():
        stacked = _get(p["encoder"]["layers"], path)
        for i in range(cfg.num_hidden_layers):
            encoder[f"encoder.layer.{i}.{hf_name}"] = np.ascontiguousarray(to_hf(stacked[i]))
    if "pooler" in p:
        encoder["pooler.dense.weight"] = np.ascontiguousarray(p["pooler"]["kernel"].T)
        encoder["pooler.dense.bias"] = p["pooler"]["bias"]
    colbert = {"weight": np.ascontiguousarray(p["colbert_linear"]["kernel"].T), "bias": p["colbert_linear"]["bias"]}
    sparse = {"weight": np.ascontiguousarray(p["sparse_linear"]["kernel"].T), "bias": p["sparse_linear"]["bias"]}
    return encoder, colbert, sparse


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters: fresh init, merge into the kernels, and PEFT's layout
# ---------------------------------------------------------------------------------------------------------------

# The HF (and PEFT) module of each LoRA target inside encoder.layer.<i>.
HF_LORA_MODULES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                   "attention_output": "attention.output.dense", "intermediate": "intermediate.dense",
                   "output": "output.dense"}


def init_lora_params(cfg: ModelConfig, seed: int) -> dict:
    """Fresh adapters for every layer, {"<target>_lora": {"a", "b"}} stacked over layers (float32 numpy): A
    uniform in +-1/sqrt(fan_in) from `seed`, B zero (the LoRA module's init)."""
    rng = np.random.default_rng([seed, 0x10FA])
    out = {}
    for name in cfg.lora.targets:
        in_shape, out_shape, _ = projections(cfg)[name]
        bound = 1.0 / np.sqrt(np.prod(in_shape))
        layers = cfg.num_hidden_layers
        out[name + LORA_SUFFIX] = {
            "a": rng.uniform(-bound, bound, size=(layers,) + in_shape + (cfg.lora.rank,)).astype(np.float32),
            "b": np.zeros((layers, cfg.lora.rank) + out_shape, np.float32)}
    return out


def _lora_matrices(adapter: dict, cfg: ModelConfig, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A [layers, in, rank] and B [layers, rank, out] of one target, input / output axes flattened (float32)."""
    in_shape, out_shape, _ = projections(cfg)[name]
    layers, rank = cfg.num_hidden_layers, cfg.lora.rank
    a = np.asarray(adapter["a"], np.float32).reshape(layers, int(np.prod(in_shape)), rank)
    b = np.asarray(adapter["b"], np.float32).reshape(layers, rank, int(np.prod(out_shape)))
    return a, b


def merge_lora(params: dict, cfg: ModelConfig) -> dict:
    """Params without adapters whose kernels are W + (alpha / rank) * A B (float32 numpy; the plain model computes
    what the adapted one does, without dropout). Params of a config without LoRA come back as they are."""
    if cfg.lora is None:
        return params
    layers = dict(params["encoder"]["layers"])
    for name in cfg.lora.targets:
        a, b = _lora_matrices(layers.pop(name + LORA_SUFFIX), cfg, name)
        kernel = np.asarray(layers[name]["kernel"], np.float32)
        delta = np.float32(cfg.lora.scale) * np.matmul(a, b)
        layers[name] = dict(layers[name], kernel=kernel + delta.reshape(kernel.shape))
    return dict(params, encoder=dict(params["encoder"], layers=layers))


def lora_to_peft(params: dict, cfg: ModelConfig) -> tuple[dict[str, np.ndarray], dict]:
    """The adapters as PEFT saves a LoRA of transformers' XLMRobertaModel: (adapter_model.safetensors tensors,
    adapter_config.json fields). lora_A.weight [rank, in] = A^T, lora_B.weight [out, rank] = B^T, scaling
    lora_alpha / r -- so PeftModel.from_pretrained(AutoModel.from_pretrained(<base bge-m3>), <dir>) computes the
    adapted encoder."""
    tensors = {}
    for name in cfg.lora.targets:
        a, b = _lora_matrices(params["encoder"]["layers"][name + LORA_SUFFIX], cfg, name)
        for i in range(cfg.num_hidden_layers):
            prefix = f"base_model.model.encoder.layer.{i}.{HF_LORA_MODULES[name]}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    modules = "|".join(HF_LORA_MODULES[t].replace(".", r"\.") for t in cfg.lora.targets)
    config = {"peft_type": "LORA", "r": cfg.lora.rank, "lora_alpha": cfg.lora.alpha,
              "lora_dropout": cfg.lora.dropout, "target_modules": rf"encoder\.layer\.\d+\.({modules})",
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True, "task_type": None,
              "modules_to_save": None, "init_lora_weights": True}
    return tensors, config


def abstract_params(cfg: ModelConfig):
    """Shapes, dtypes and logical axis names of every parameter, without allocating any (for sharding)."""
    model = BGEM3(cfg)
    ids = jnp.zeros((1, 4), jnp.int32)
    return jax.eval_shape(functools.partial(model.init, deterministic=True), jax.random.key(0), ids, jnp.ones_like(ids))
