"""The Hugging Face directory layout of a BGE-M3 checkpoint: its file names, `HFCheckpoint` (float32 numpy arrays),
`CheckpointFormatError`, and the tensor shapes config.json implies, checked before anything is read or written.

A bge-m3 directory holds an HF XLM-RoBERTa encoder (`config.json` + `model.safetensors` or `pytorch_model.bin`,
possibly sharded with an `*.index.json`), the two extra heads FlagEmbedding adds (`colbert_linear.pt`,
`sparse_linear.pt`: torch state dicts, fp16 in bge-m3), tokenizer files and the sentence-transformers files
(`modules.json`, `1_Pooling/`, ...). A cross-encoder reranker in the layout of bge-reranker-v2-m3
(`XLMRobertaForSequenceClassification` with one label: the same encoder under a `roberta.` prefix, plus
`classifier.dense` [hidden, hidden] and `classifier.out_proj` [1, hidden]) uses the same `HFCheckpoint`, its
`classifier` field holding the head. `hf_read` reads such directories, `hf_write` writes them.

Every problem with a checkpoint raises `CheckpointFormatError` naming the file and the tensor concerned.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from m3jax.core.errors import M3JaxError

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
COLBERT_NAME = "colbert_linear.pt"
RERANKER_ARCHITECTURE = "XLMRobertaForSequenceClassification"
CLASSIFIER_PREFIX = "classifier."
SPARSE_NAME = "sparse_linear.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")

# Values XLMRobertaConfig uses when config.json leaves a field out (transformers defaults).
CONFIG_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2}
# Buffers some older transformers versions saved next to the weights; they are not parameters.
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")


class CheckpointFormatError(M3JaxError, ValueError):
    """A checkpoint directory (or an HFCheckpoint being saved) does not have the expected layout."""


@dataclasses.dataclass
class HFCheckpoint:
    config: dict  # config.json contents
    # HF XLMRobertaModel state-dict names without a "roberta." prefix -> float32 arrays; pooler.* kept if present.
    encoder: dict[str, np.ndarray]
    colbert: dict[str, np.ndarray] | None  # {"weight": [colbert_dim, hidden], "bias": [colbert_dim]}
    sparse: dict[str, np.ndarray] | None  # {"weight": [1, hidden], "bias": [1]}
    # A reranker's classification head (XLMRobertaClassificationHead's state dict, without "classifier."):
    # {"dense.weight": [hidden, hidden], "dense.bias": [hidden], "out_proj.weight": [1, hidden], "out_proj.bias": [1]}
    classifier: dict[str, np.ndarray] | None = None


# ---------------------------------------------------------------------------------------------------------------
# Shapes implied by config.json


def _config_dims(config: dict, where: str) -> dict[str, int]:
    dims = {k: config.get(k, v) for k, v in CONFIG_DEFAULTS.items()}
    for k, v in dims.items():
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise CheckpointFormatError(f"{where}: {k} must be a positive integer, found {v!r}")
    if dims["hidden_size"] % dims["num_attention_heads"]:
        raise CheckpointFormatError(f"{where}: hidden_size {dims['hidden_size']} is not a multiple of "
                                    f"num_attention_heads {dims['num_attention_heads']}")
    return dims


def expected_encoder_shapes(config: dict, where: str = CONFIG_NAME) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor an XLMRobertaModel encoder (without pooler) needs, as implied by config."""
    d = _config_dims(config, where)
    h, i = d["hidden_size"], d["intermediate_size"]
    shapes = {
        "embeddings.word_embeddings.weight": (d["vocab_size"], h),
        "embeddings.position_embeddings.weight": (d["max_position_embeddings"], h),
        "embeddings.token_type_embeddings.weight": (d["type_vocab_size"], h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
    }
    for n in range(d["num_hidden_layers"]):
        p = f"encoder.layer.{n}."
        for proj in ("query", "key", "value"):
            shapes[f"{p}attention.self.{proj}.weight"] = (h, h)
            shapes[f"{p}attention.self.{proj}.bias"] = (h,)
        shapes.update({
            f"{p}attention.output.dense.weight": (h, h), f"{p}attention.output.dense.bias": (h,),
            f"{p}attention.output.LayerNorm.weight": (h,), f"{p}attention.output.LayerNorm.bias": (h,),
            f"{p}intermediate.dense.weight": (i, h), f"{p}intermediate.dense.bias": (i,),
            f"{p}output.dense.weight": (h, i), f"{p}output.dense.bias": (h,),
            f"{p}output.LayerNorm.weight": (h,), f"{p}output.LayerNorm.bias": (h,),
        })
    return shapes


def _pooler_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    h = config.get("hidden_size", CONFIG_DEFAULTS["hidden_size"])
    return {"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}


def classifier_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a one-label XLMRobertaClassificationHead (names without the `classifier.` prefix)."""
    h = config.get("hidden_size", CONFIG_DEFAULTS["hidden_size"])
    return {"dense.weight": (h, h), "dense.bias": (h,), "out_proj.weight": (1, h), "out_proj.bias": (1,)}


def is_reranker_config(config: dict) -> bool:
    """Whether config.json describes a sequence-classification model (a cross-encoder reranker)."""
    return RERANKER_ARCHITECTURE in (config.get("architectures") or [])


def num_labels(config: dict) -> int:
    # transformers' PretrainedConfig: id2label decides; without it num_labels, default 2
    if config.get("id2label"):
        return len(config["id2label"])
    return int(config.get("num_labels", 2))


def _check_tensors(tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], where: str, *,
                   prefix: str = "", missing_hint: str = "", shape_hint: str = "", extra_hint: str) -> None:
    """Every expected tensor present with its shape and nothing else; the first problem raises, naming the tensor
    (with `prefix`, as it is spelled in the file)."""
    for name, shape in expected.items():
        if name not in tensors:
            raise CheckpointFormatError(f"{where}: missing tensor {prefix + name!r} (expected shape {list(shape)})"
                                        f"{missing_hint}")
        found = tuple(np.shape(tensors[name]))
        if found != shape:
            raise CheckpointFormatError(f"{where}: tensor {prefix + name!r} has shape {list(found)}, expected "
                                        f"{list(shape)}{shape_hint}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise CheckpointFormatError(f"{where}: {extra_hint.format(name=repr(prefix + extra[0]), count=len(extra))}")


def check_classifier(config: dict, classifier: dict[str, np.ndarray], where: str) -> None:
    _check_tensors(classifier, classifier_shapes(config), where, prefix=CLASSIFIER_PREFIX,
                   missing_hint="; a reranker needs XLMRobertaForSequenceClassification's classifier.dense and "
                                "classifier.out_proj",
                   shape_hint=f" (one label, hidden_size from {CONFIG_NAME})",
                   extra_hint="unexpected tensor {name} in the classification head")


def check_config(config: Any, where: str) -> None:
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{where}: expected a JSON object, found {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type != "xlm-roberta":
        raise CheckpointFormatError(f"{where}: model_type must be 'xlm-roberta' (a bge-m3 / XLM-RoBERTa encoder), "
                                    f"found {model_type!r}")
    _config_dims(config, where)


def check_encoder(config: dict, encoder: dict[str, np.ndarray], where: str) -> None:
    """Every needed tensor present with the right shape; pooler complete or absent; no stray encoder tensors."""
    expected = expected_encoder_shapes(config)
    pooler = _pooler_shapes(config)
    if any(k in encoder for k in pooler):  # optional, but all or nothing
        expected.update(pooler)
    _check_tensors(encoder, expected, where, shape_hint=f" from {CONFIG_NAME}",
                   extra_hint=f"tensor {{name}} is not part of an XLMRobertaModel with "
                              f"num_hidden_layers={config.get('num_hidden_layers')} ({{count}} such tensors); does "
                              f"{CONFIG_NAME} match the weights?")


def check_heads(hidden: int, colbert: dict | None, sparse: dict | None, where_c: str, where_s: str) -> None:
    if colbert is None or sparse is None:
        return
    for where, head in ((where_c, colbert), (where_s, sparse)):
        for key in ("weight", "bias"):
            if key not in head:
                raise CheckpointFormatError(f"{where}: missing tensor {key!r} (found {sorted(head)})")
        extra = sorted(set(head) - {"weight", "bias"})
        if extra:
            raise CheckpointFormatError(f"{where}: unexpected tensor {extra[0]!r}; a head has only weight and bias")
    cw, cb = np.shape(colbert["weight"]), np.shape(colbert["bias"])
    if len(cw) != 2 or cw[1] != hidden or cb != (cw[0],):
        raise CheckpointFormatError(f"{where_c}: tensors 'weight' {list(cw)} and 'bias' {list(cb)} must have shapes "
                                    f"[colbert_dim, {hidden}] and [colbert_dim]")
    sw, sb = tuple(np.shape(sparse["weight"])), tuple(np.shape(sparse["bias"]))
    if sw != (1, hidden) or sb != (1,):
        raise CheckpointFormatError(f"{where_s}: tensors 'weight' {list(sw)} and 'bias' {list(sb)} must have shapes "
                                    f"[1, {hidden}] and [1]")


def import_torch(path: str):
    try:
        import torch
    except ImportError as e:
        raise CheckpointFormatError(f"{path}: reading or writing this file needs PyTorch; install it with "
                                    f"pip install 'm3jax[torch]' (or pip install torch)") from e
    return torch
