"""Read a BGE-M3 (or reranker) directory in the Hugging Face layout (`hf_layout`) into an `HFCheckpoint` of float32
numpy arrays, and its tokenizer.

Only numpy (and `safetensors`) is needed; torch is imported lazily, and only when a `.bin`/`.pt` file must be read.
Mapping the arrays into Flax parameters is done elsewhere (`loading`).
"""
from __future__ import annotations

import json
import logging
import os
import struct
import warnings

import numpy as np

from m3jax.io.hf_layout import (
    BUFFERS,
    CLASSIFIER_PREFIX,
    COLBERT_NAME,
    CONFIG_DEFAULTS,
    CONFIG_NAME,
    ENCODER_PREFIXES,
    PYTORCH_INDEX_NAME,
    PYTORCH_NAME,
    RERANKER_ARCHITECTURE,
    SAFETENSORS_INDEX_NAME,
    SAFETENSORS_NAME,
    SPARSE_NAME,
    TOKENIZER_FILES,
    CheckpointFormatError,
    HFCheckpoint,
    check_classifier,
    check_config,
    check_encoder,
    check_heads,
    import_torch,
    is_reranker_config,
    num_labels,
)

logger = logging.getLogger(__name__)




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
    torch = import_torch(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise CheckpointFormatError(f"{path}: cannot read torch file: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: expected a state dict, found {type(state).__name__}")
    return state


def _torch_load(path: str) -> dict:
    torch = import_torch(path)
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
        if name in BUFFERS:
            continue
        if name.startswith(ENCODER_PREFIXES):
            encoder[name] = _to_f32(name, value, where)
        elif classifier is not None and name.startswith(CLASSIFIER_PREFIX):
            classifier[name[len(CLASSIFIER_PREFIX):]] = _to_f32(name, value, where)
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
    check_heads(hidden, colbert, sparse, colbert_path, sparse_path)
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
    check_config(config, config_path)
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
    check_encoder(config, encoder, weights_path)

    colbert, sparse = _load_heads(path, config.get("hidden_size", CONFIG_DEFAULTS["hidden_size"]))
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
    labels = num_labels(config)
    if labels != 1:
        raise CheckpointFormatError(f"{config_path}: the reranker has {labels} labels; m3jax reads one-logit "
                                    f"rerankers (id2label with one entry, like bge-reranker-v2-m3)")
    weights_path, tensors = _read_weights(path)
    classifier: dict[str, np.ndarray] = {}
    encoder = _strip_and_filter(tensors, weights_path, classifier)
    encoder = {k: v for k, v in encoder.items() if not k.startswith("pooler.")}  # unused by the classifier
    check_encoder(config, encoder, weights_path)
    check_classifier(config, classifier, weights_path)
    return HFCheckpoint(config=config, encoder=encoder, colbert=None, sparse=None, classifier=classifier)
