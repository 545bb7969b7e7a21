"""Read and write BGE-M3 checkpoints in the Hugging Face directory layout, as numpy arrays.

A bge-m3 directory holds an HF XLM-RoBERTa encoder (`config.json` + `model.safetensors` or `pytorch_model.bin`,
possibly sharded with an `*.index.json`), the two extra heads FlagEmbedding adds (`colbert_linear.pt`,
`sparse_linear.pt`: torch state dicts, fp16 in bge-m3), tokenizer files and the sentence-transformers files
(`modules.json`, `1_Pooling/`, ...). This module turns such a directory into an `HFCheckpoint` of float32 numpy
arrays and writes one back so that transformers `AutoModel`, FlagEmbedding `BGEM3FlagModel` and
`sentence_transformers.SentenceTransformer` all load it.

A cross-encoder reranker in the layout of bge-reranker-v2-m3 (`XLMRobertaForSequenceClassification` with one label:
the same encoder under a `roberta.` prefix, plus `classifier.dense` [hidden, hidden] and `classifier.out_proj`
[1, hidden]) is read by `load_reranker_checkpoint` and written by `save_reranker_checkpoint` into the same
`HFCheckpoint`, its `classifier` field holding the head.

Only numpy (and `safetensors`) is needed; torch is imported lazily, and only when a `.bin`/`.pt` file must be
read or written. Mapping the arrays into Flax parameters is done elsewhere.

Every problem with a checkpoint raises `CheckpointFormatError` naming the file and the tensor concerned.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import shutil
import struct
import warnings
from typing import Any

import numpy as np

from m3jax.errors import M3JaxError
from m3jax.storage import atomic_directory, write_json

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PYTORCH_NAME = "pytorch_model.bin"
PYTORCH_INDEX_NAME = "pytorch_model.bin.index.json"
COLBERT_NAME = "colbert_linear.pt"
RERANKER_ARCHITECTURE = "XLMRobertaForSequenceClassification"
_CLASSIFIER_PREFIX = "classifier."
SPARSE_NAME = "sparse_linear.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model")

# Values XLMRobertaConfig uses when config.json leaves a field out (transformers defaults).
_CONFIG_DEFAULTS = {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                    "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2}
# Buffers some older transformers versions saved next to the weights; they are not parameters.
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
_ENCODER_PREFIXES = ("embeddings.", "encoder.", "pooler.")


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
    dims = {k: config.get(k, v) for k, v in _CONFIG_DEFAULTS.items()}
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
    h = config.get("hidden_size", _CONFIG_DEFAULTS["hidden_size"])
    return {"pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}


def classifier_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Name -> shape of a one-label XLMRobertaClassificationHead (names without the `classifier.` prefix)."""
    h = config.get("hidden_size", _CONFIG_DEFAULTS["hidden_size"])
    return {"dense.weight": (h, h), "dense.bias": (h,), "out_proj.weight": (1, h), "out_proj.bias": (1,)}


def is_reranker_config(config: dict) -> bool:
    """Whether config.json describes a sequence-classification model (a cross-encoder reranker)."""
    return RERANKER_ARCHITECTURE in (config.get("architectures") or [])


def _num_labels(config: dict) -> int:
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


def _check_classifier(config: dict, classifier: dict[str, np.ndarray], where: str) -> None:
    _check_tensors(classifier, classifier_shapes(config), where, prefix=_CLASSIFIER_PREFIX,
                   missing_hint="; a reranker needs XLMRobertaForSequenceClassification's classifier.dense and "
                                "classifier.out_proj",
                   shape_hint=f" (one label, hidden_size from {CONFIG_NAME})",
                   extra_hint="unexpected tensor {name} in the classification head")


def _check_config(config: Any, where: str) -> None:
    if not isinstance(config, dict):
        raise CheckpointFormatError(f"{where}: expected a JSON object, found {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type != "xlm-roberta":
        raise CheckpointFormatError(f"{where}: model_type must be 'xlm-roberta' (a bge-m3 / XLM-RoBERTa encoder), "
                                    f"found {model_type!r}")
    _config_dims(config, where)


def _check_encoder(config: dict, encoder: dict[str, np.ndarray], where: str) -> None:
    """Every needed tensor present with the right shape; pooler complete or absent; no stray encoder tensors."""
    expected = expected_encoder_shapes(config)
    pooler = _pooler_shapes(config)
    if any(k in encoder for k in pooler):  # optional, but all or nothing
        expected.update(pooler)
    _check_tensors(encoder, expected, where, shape_hint=f" from {CONFIG_NAME}",
                   extra_hint=f"tensor {{name}} is not part of an XLMRobertaModel with "
                              f"num_hidden_layers={config.get('num_hidden_layers')} ({{count}} such tensors); does "
                              f"{CONFIG_NAME} match the weights?")


def _check_heads(hidden: int, colbert: dict | None, sparse: dict | None, where_c: str, where_s: str) -> None:
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


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _import_torch(path: str):
    try:
        import torch
    except ImportError as e:
        raise CheckpointFormatError(f"{path}: reading or writing this file needs PyTorch; install it with "
                                    f"pip install 'm3jax[torch]' (or pip install torch)") from e
    return torch


def _to_f32(name: str, array: np.ndarray, where: str) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.floating):
        raise CheckpointFormatError(f"{where}: tensor {name!r} has dtype {array.dtype}, expected a float tensor")
    return np.array(array, dtype=np.float32)  # always a copy: never keep a view of a mmapped file


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    try:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        out = {}
        with safe_open(path, framework="np") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                if header[name]["dtype"] == "BF16":  # numpy has no bfloat16: widen the raw bits by hand
                    begin, end = header[name]["data_offsets"]
                    raw = np.fromfile(path, dtype="<u2", count=(end - begin) // 2, offset=8 + header_len + begin)
                    array = (raw.astype(np.uint32) << 16).view(np.float32).reshape(header[name]["shape"])
                else:
                    array = f.get_tensor(name)
                out[name] = array  # converted (and copied) to float32 by the caller
    except Exception as e:  # corrupt or truncated file
        raise CheckpointFormatError(f"{path}: cannot read safetensors file: {e}") from e
    return out


def _torch_state(path: str, mmap: bool = False) -> dict:
    torch = _import_torch(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointFormatError(f"{path}: cannot read torch file: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _torch_load(path: str) -> dict:
    torch = _import_torch(path)
    state = _torch_state(path)
    out = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointFormatError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        # float32 here because numpy has no bfloat16; the callers copy (_to_f32). Integer buffers are kept as they
        # are: they are dropped later, and anything else is reported.
        out[name] = t.detach().to(torch.float32).numpy() if t.is_floating_point() else t.numpy()
    return out


def _read_weight_file(path: str) -> dict[str, np.ndarray]:
    return _read_safetensors(path) if path.endswith(".safetensors") else _torch_load(path)


def _read_sharded(index_path: str) -> dict[str, np.ndarray]:
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except Exception as e:
        raise CheckpointFormatError(f"{index_path}: not a valid index file (needs a 'weight_map'): {e}") from e
    folder = os.path.dirname(index_path)
    out: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            names = [k for k, v in weight_map.items() if v == shard]
            raise CheckpointFormatError(f"{index_path}: shard file {shard!r} (holding e.g. tensor {names[0]!r}) "
                                        f"does not exist")
        tensors = _read_weight_file(shard_path)
        for name in weight_map:
            if weight_map[name] == shard and name not in tensors:
                raise CheckpointFormatError(f"{shard_path}: missing tensor {name!r} listed in {index_path}")
        out.update(tensors)
    return out


def _strip_and_filter(tensors: dict[str, np.ndarray], where: str,
                      classifier: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Drop a `roberta.` prefix (XLMRobertaForXXX checkpoints), buffers, and non-encoder tensors (e.g. lm_head).
    With a `classifier` dict, the `classifier.*` tensors go there (without the prefix) instead of being dropped."""
    if any(k.startswith("roberta.") for k in tensors):
        tensors = {k[len("roberta."):] if k.startswith("roberta.") else k: v for k, v in tensors.items()}
    encoder, dropped = {}, []
    for name, value in tensors.items():
        if name in _BUFFERS:
            continue
        if name.startswith(_ENCODER_PREFIXES):
            encoder[name] = _to_f32(name, value, where)
        elif classifier is not None and name.startswith(_CLASSIFIER_PREFIX):
            classifier[name[len(_CLASSIFIER_PREFIX):]] = _to_f32(name, value, where)
        else:
            dropped.append(name)
    if dropped:
        logger.warning("%s: ignoring %d tensors that are not part of the encoder: %s", where, len(dropped),
                       ", ".join(sorted(dropped)[:8]) + (", ..." if len(dropped) > 8 else ""))
    return encoder


def _load_heads(path: str, hidden: int) -> tuple[dict | None, dict | None]:
    colbert_path, sparse_path = os.path.join(path, COLBERT_NAME), os.path.join(path, SPARSE_NAME)
    have_c, have_s = os.path.isfile(colbert_path), os.path.isfile(sparse_path)
    if not (have_c and have_s):
        # FlagEmbedding (runner.get_model) only loads the heads when both files exist and silently re-initialises
        # them otherwise. Say so loudly: such a checkpoint can be fine-tuned, but its sparse/colbert outputs are noise.
        if have_c or have_s:
            missing = SPARSE_NAME if have_c else COLBERT_NAME
            what = f"{missing} is missing (only {COLBERT_NAME if have_c else SPARSE_NAME} found)"
        else:
            what = f"neither {COLBERT_NAME} nor {SPARSE_NAME} exists"
        warnings.warn(f"{path}: {what}; the colbert and sparse heads will be freshly initialised. The checkpoint is "
                      f"fit for training, not for inference with sparse/colbert scores.", stacklevel=3)
        return None, None
    colbert = {k: _to_f32(k, v, colbert_path) for k, v in _torch_load(colbert_path).items()}
    sparse = {k: _to_f32(k, v, sparse_path) for k, v in _torch_load(sparse_path).items()}
    _check_heads(hidden, colbert, sparse, colbert_path, sparse_path)
    return colbert, sparse


def load_hf_config(path: str) -> dict:
    """config.json of a bge-m3 style directory, checked (model_type, positive dimensions)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointFormatError(f"{path}: checkpoint directory does not exist")
    if not os.path.isdir(path):
        raise CheckpointFormatError(f"{path}: is a file; pass the checkpoint directory that contains {CONFIG_NAME}")
    config_path = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise CheckpointFormatError(f"{config_path}: not found; {path} is not an HF checkpoint directory")
    try:
        with open(config_path) as f:
            config = json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(f"{config_path}: invalid JSON: {e}") from e
    _check_config(config, config_path)
    return config


def _weights_path(path: str) -> str:
    # Same preference as transformers: safetensors first, then sharded safetensors, then torch pickles.
    for name in (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, PYTORCH_NAME, PYTORCH_INDEX_NAME):
        weights_path = os.path.join(path, name)
        if os.path.isfile(weights_path):
            return weights_path
    raise CheckpointFormatError(f"{path}: no weights file; looked for {SAFETENSORS_NAME}, "
                                f"{SAFETENSORS_INDEX_NAME}, {PYTORCH_NAME} and {PYTORCH_INDEX_NAME}")


def has_pooler(path: str) -> bool:
    """Whether the directory's weights hold pooler.dense.* (read from the safetensors header / the index when
    there is one, so no weights are loaded for those)."""
    weights_path = _weights_path(path)
    try:
        if weights_path.endswith(".index.json"):
            with open(weights_path) as f:
                names = list(json.load(f)["weight_map"])
        elif weights_path.endswith(".safetensors"):
            with open(weights_path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                names = list(json.loads(f.read(header_len)))
        else:
            try:  # mmap: the names without reading the data (zip-format files)
                names = list(_torch_state(weights_path, mmap=True))
            except CheckpointFormatError:
                names = list(_torch_state(weights_path))
    except (OSError, ValueError, KeyError, struct.error) as e:  # corrupt or truncated file
        if isinstance(e, CheckpointFormatError):
            raise
        raise CheckpointFormatError(f"{weights_path}: cannot read the tensor names: {e}") from e
    return any(n.removeprefix("roberta.") == "pooler.dense.weight" for n in names)


def colbert_head_dim(path: str) -> int | None:
    """Output size of colbert_linear.pt, or None when the heads are not both there (they would start fresh)."""
    colbert_path, sparse_path = os.path.join(path, COLBERT_NAME), os.path.join(path, SPARSE_NAME)
    if not (os.path.isfile(colbert_path) and os.path.isfile(sparse_path)):
        return None
    weight = _torch_load(colbert_path).get("weight")
    if weight is None or np.ndim(weight) != 2:
        raise CheckpointFormatError(f"{colbert_path}: expected a tensor 'weight' of shape [colbert_dim, hidden]")
    return int(np.shape(weight)[0])


def load_hf_checkpoint(path: str) -> HFCheckpoint:
    """Load a bge-m3 style directory into float32 numpy arrays.

    Weights come from model.safetensors, else model.safetensors.index.json, else pytorch_model.bin, else
    pytorch_model.bin.index.json. A `roberta.` prefix is stripped; tensors outside the encoder (lm_head, ...) are
    dropped with a logged warning. Every encoder tensor is checked against the shapes config.json implies.
    The heads are returned only when both colbert_linear.pt and sparse_linear.pt exist (FlagEmbedding's rule);
    otherwise colbert = sparse = None and a UserWarning says the heads will be freshly initialised.
    Raises CheckpointFormatError naming the file and tensor on any problem.
    """
    path = os.fspath(path)
    config = load_hf_config(path)
    weights_path, tensors = _read_weights(path)
    encoder = _strip_and_filter(tensors, weights_path)
    _check_encoder(config, encoder, weights_path)

    colbert, sparse = _load_heads(path, config.get("hidden_size", _CONFIG_DEFAULTS["hidden_size"]))
    return HFCheckpoint(config=config, encoder=encoder, colbert=colbert, sparse=sparse)


def load_tokenizer(path: str, **kwargs):
    """`AutoTokenizer.from_pretrained(path, **kwargs)` that tokenises as the directory's tokenizer.json says.

    transformers 4 runs tokenizer.json as written. transformers 5 keeps only its vocabulary, post-processor and
    charsmap and rebuilds an XLM-R tokenizer's normalizer, pre-tokenizer and decoder from its class (no Strip /
    Replace normalizers, a whitespace split before Metaspace): bge-m3's tokenizer then gives other ids for texts
    with U+0085 (NEXT LINE). Those three are put back from the file, so a directory gives the same ids under both.
    """
    from transformers import AutoTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointFormatError(f"{path}: checkpoint directory does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    tokenizer_json = os.path.join(path, TOKENIZER_FILES[0])
    if backend is not None and os.path.isfile(tokenizer_json):
        import tokenizers

        written = tokenizers.Tokenizer.from_file(tokenizer_json)
        backend.normalizer, backend.pre_tokenizer, backend.decoder = (
            written.normalizer, written.pre_tokenizer, written.decoder)
    return tokenizer


def _read_weights(path: str) -> tuple[str, dict[str, np.ndarray]]:
    weights_path = _weights_path(path)
    if weights_path.endswith(".index.json"):
        return weights_path, _read_sharded(weights_path)
    return weights_path, _read_weight_file(weights_path)


def load_reranker_checkpoint(path: str) -> HFCheckpoint:
    """Load a cross-encoder reranker directory (bge-reranker-v2-m3's layout) into float32 numpy arrays.

    config.json must be an XLM-RoBERTa with one label (id2label of one entry, or num_labels=1); the weights hold the
    encoder (under `roberta.`, a pooler is ignored as transformers ignores it) and `classifier.dense.*`,
    `classifier.out_proj.*`. Returns an HFCheckpoint with `classifier` set and no colbert / sparse heads.
    """
    path = os.fspath(path)
    config = load_hf_config(path)
    config_path = os.path.join(path, CONFIG_NAME)
    if not is_reranker_config(config):
        raise CheckpointFormatError(f"{config_path}: architectures {config.get('architectures')} is not "
                                    f"[{RERANKER_ARCHITECTURE!r}]; not a cross-encoder reranker directory")
    labels = _num_labels(config)
    if labels != 1:
        raise CheckpointFormatError(f"{config_path}: the reranker has {labels} labels; m3jax reads one-logit "
                                    f"rerankers (id2label with one entry, like bge-reranker-v2-m3)")
    weights_path, tensors = _read_weights(path)
    classifier: dict[str, np.ndarray] = {}
    encoder = _strip_and_filter(tensors, weights_path, classifier)
    encoder = {k: v for k, v in encoder.items() if not k.startswith("pooler.")}  # unused by the classifier
    _check_encoder(config, encoder, weights_path)
    _check_classifier(config, classifier, weights_path)
    return HFCheckpoint(config=config, encoder=encoder, colbert=None, sparse=None, classifier=classifier)


# ---------------------------------------------------------------------------------------------------------------
# Saving

_ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
]


def _export_config(config: dict) -> dict:
    out = dict(config)
    out.pop("dtype", None)  # one spelling only; torch_dtype is what bge-m3 ships and every transformers reads
    out.update(architectures=["XLMRobertaModel"], model_type="xlm-roberta", torch_dtype="float32")
    return out


def _save_torch(path: str, tensors: dict[str, np.ndarray], dtype: str) -> None:
    torch = _import_torch(path)
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    state = collections.OrderedDict(
        (k, torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)).to(torch_dtype)) for k, v in tensors.items())
    torch.save(state, path)


def _write_sentence_transformers(folder: str, config: dict, pooling: str = "cls", normalize: bool = True) -> None:
    # bge-m3's files are CLS pooling then L2 normalisation (= BGEM3FlagModel's dense embedding); a model trained
    # with mean pooling or without normalisation gets modules that reproduce its own dense embedding.
    modules = _ST_MODULES if normalize else [m for m in _ST_MODULES if not m["type"].endswith(".Normalize")]
    write_json(os.path.join(folder, "modules.json"), modules)
    os.makedirs(os.path.join(folder, "1_Pooling"))
    write_json(os.path.join(folder, "1_Pooling", "config.json"), {
        "word_embedding_dimension": config["hidden_size"],
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
        "pooling_mode_weightedmean_tokens": False,
        "pooling_mode_lasttoken": False,
    })
    if normalize:
        os.makedirs(os.path.join(folder, "2_Normalize"))  # Normalize has no config; the folder is what ST writes
    max_positions = config.get("max_position_embeddings", _CONFIG_DEFAULTS["max_position_embeddings"])
    write_json(os.path.join(folder, "sentence_bert_config.json"),
               {"max_seq_length": min(8192, max_positions - 2), "do_lower_case": False})
    # The oldest sentence-transformers version whose format this is; a newer one would make old versions warn.
    write_json(os.path.join(folder, "config_sentence_transformers.json"),
               {"__version__": {"sentence_transformers": "2.2.2"}, "prompts": {}, "default_prompt_name": None})


def _copy_tokenizer(tokenizer_dir: str, folder: str) -> None:
    if not os.path.isdir(tokenizer_dir):
        raise CheckpointFormatError(f"{tokenizer_dir}: tokenizer directory does not exist")
    found = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(tokenizer_dir, n))]
    if "tokenizer.json" not in found and "sentencepiece.bpe.model" not in found:
        raise CheckpointFormatError(f"{tokenizer_dir}: no tokenizer.json or sentencepiece.bpe.model to copy")
    for name in found:
        shutil.copyfile(os.path.join(tokenizer_dir, name), os.path.join(folder, name))


def save_hf_checkpoint(out_dir, ckpt: HFCheckpoint, *, tokenizer_dir: str | None, safetensors: bool = True,
                       pytorch_bin: bool = False, heads_dtype: str = "float32", sentence_transformers: bool = True,
                       overwrite: bool = False) -> None:
    """Write `ckpt` as a bge-m3 directory loadable by transformers, FlagEmbedding and sentence-transformers.

    Checked first, then written through `storage.atomic_directory`: a failure never leaves a half-written
    `out_dir`. An existing non-empty `out_dir` is refused unless `overwrite`. `heads_dtype` is the dtype of
    colbert_linear.pt / sparse_linear.pt (bge-m3 ships float16).
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    check_hf_checkpoint(ckpt, f"HFCheckpoint saved to {out_dir}", safetensors=safetensors, pytorch_bin=pytorch_bin,
                        heads_dtype=heads_dtype)
    with atomic_directory(out_dir, overwrite=overwrite, error=CheckpointFormatError) as folder:
        write_hf_files(folder, ckpt, tokenizer_dir=tokenizer_dir, safetensors=safetensors, pytorch_bin=pytorch_bin,
                       heads_dtype=heads_dtype, sentence_transformers=sentence_transformers)


def check_hf_checkpoint(ckpt: HFCheckpoint, where: str, *, safetensors: bool = True, pytorch_bin: bool = False,
                        heads_dtype: str = "float32") -> None:
    """Everything save_hf_checkpoint would refuse, before anything is written."""
    if not (safetensors or pytorch_bin):
        raise CheckpointFormatError(f"{where}: choose at least one of safetensors / pytorch_bin")
    if heads_dtype not in ("float32", "float16", "bfloat16"):
        raise CheckpointFormatError(f"{where}: heads_dtype must be float32, float16 or bfloat16, not {heads_dtype!r}")
    _check_config(ckpt.config, f"{where}: config")
    _check_encoder(ckpt.config, ckpt.encoder, f"{where}: encoder")
    if (ckpt.colbert is None) != (ckpt.sparse is None):
        raise CheckpointFormatError(f"{where}: colbert and sparse heads must both be given or both be None "
                                    f"(FlagEmbedding loads them only as a pair)")
    _check_heads(ckpt.config["hidden_size"], ckpt.colbert, ckpt.sparse, f"{where}: colbert head",
                 f"{where}: sparse head")


def write_hf_files(folder: str, ckpt: HFCheckpoint, *, tokenizer_dir: str | None, safetensors: bool = True,
                   pytorch_bin: bool = False, heads_dtype: str = "float32", sentence_transformers: bool = True,
                   sentence_pooling_method: str = "cls", normalize_embeddings: bool = True) -> None:
    """The files of a bge-m3 directory, written into the (empty, staging) `folder`; see save_hf_checkpoint.
    The sentence-transformers modules follow `sentence_pooling_method` / `normalize_embeddings`."""
    write_json(os.path.join(folder, CONFIG_NAME), _export_config(ckpt.config))
    encoder = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(ckpt.encoder.items())}
    if safetensors:
        from safetensors.numpy import save_file

        # metadata format=pt: transformers refuses safetensors files without it.
        save_file(encoder, os.path.join(folder, SAFETENSORS_NAME), metadata={"format": "pt"})
        os.chmod(os.path.join(folder, SAFETENSORS_NAME), 0o644)  # recent safetensors writes 0600
    if pytorch_bin:
        _save_torch(os.path.join(folder, PYTORCH_NAME), encoder, "float32")
    if ckpt.colbert is not None:
        _save_torch(os.path.join(folder, COLBERT_NAME), ckpt.colbert, heads_dtype)
        _save_torch(os.path.join(folder, SPARSE_NAME), ckpt.sparse, heads_dtype)
    else:
        logger.info("no colbert/sparse heads to save; FlagEmbedding will initialise them randomly")
    if tokenizer_dir is not None:
        _copy_tokenizer(os.fspath(tokenizer_dir), folder)
    else:
        logger.warning("saved without tokenizer files (tokenizer_dir=None)")
    if sentence_transformers:
        _write_sentence_transformers(folder, ckpt.config, sentence_pooling_method, normalize_embeddings)


def save_reranker_checkpoint(out_dir, ckpt: HFCheckpoint, *, tokenizer_dir: str | None,
                             overwrite: bool = False) -> None:
    """Write a reranker (ckpt.classifier set) in bge-reranker-v2-m3's layout: config.json
    (XLMRobertaForSequenceClassification, one label), model.safetensors (`roberta.` encoder + `classifier.*`) and the
    tokenizer files; transformers' AutoModelForSequenceClassification and FlagEmbedding's FlagReranker load it.
    Written through `storage.atomic_directory`."""
    out_dir = os.path.abspath(os.fspath(out_dir))
    where = f"reranker saved to {out_dir}"
    _check_config(ckpt.config, f"{where}: config")
    if ckpt.classifier is None:
        raise CheckpointFormatError(f"{where}: the checkpoint has no classifier head")
    encoder = {k: v for k, v in ckpt.encoder.items() if not k.startswith("pooler.")}
    _check_encoder(ckpt.config, encoder, f"{where}: encoder")
    _check_classifier(ckpt.config, ckpt.classifier, f"{where}: classifier")
    from safetensors.numpy import save_file

    config = dict(ckpt.config)
    config.pop("dtype", None)
    config.update(architectures=[RERANKER_ARCHITECTURE], model_type="xlm-roberta", torch_dtype="float32",
                  id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    tensors = {f"roberta.{k}": v for k, v in encoder.items()}
    tensors.update({_CLASSIFIER_PREFIX + k: v for k, v in ckpt.classifier.items()})
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(tensors.items())}
    with atomic_directory(out_dir, overwrite=overwrite, error=CheckpointFormatError) as folder:
        write_json(os.path.join(folder, CONFIG_NAME), config)
        save_file(tensors, os.path.join(folder, SAFETENSORS_NAME), metadata={"format": "pt"})
        os.chmod(os.path.join(folder, SAFETENSORS_NAME), 0o644)
        if tokenizer_dir is not None:
            _copy_tokenizer(os.fspath(tokenizer_dir), folder)
