"""Write an `HFCheckpoint` as a bge-m3 directory (or a reranker's) that transformers `AutoModel`, FlagEmbedding
`BGEM3FlagModel` / `FlagReranker` and `sentence_transformers.SentenceTransformer` all load.

torch is imported lazily, and only when a `.bin`/`.pt` file is written.
"""
from __future__ import annotations

import collections
import logging
import os
import shutil

import numpy as np

from m3jax.core.storage import atomic_directory, write_json
from m3jax.io.hf_layout import (
    CLASSIFIER_PREFIX,
    COLBERT_NAME,
    CONFIG_DEFAULTS,
    CONFIG_NAME,
    PYTORCH_NAME,
    RERANKER_ARCHITECTURE,
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
)

logger = logging.getLogger(__name__)

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
    torch = import_torch(path)
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
    max_positions = config.get("max_position_embeddings", CONFIG_DEFAULTS["max_position_embeddings"])
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
    check_config(ckpt.config, f"{where}: config")
    check_encoder(ckpt.config, ckpt.encoder, f"{where}: encoder")
    if (ckpt.colbert is None) != (ckpt.sparse is None):
        raise CheckpointFormatError(f"{where}: colbert and sparse heads must both be given or both be None "
                                    f"(FlagEmbedding loads them only as a pair)")
    check_heads(ckpt.config["hidden_size"], ckpt.colbert, ckpt.sparse, f"{where}: colbert head",
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
    check_config(ckpt.config, f"{where}: config")
    if ckpt.classifier is None:
        raise CheckpointFormatError(f"{where}: the checkpoint has no classifier head")
    encoder = {k: v for k, v in ckpt.encoder.items() if not k.startswith("pooler.")}
    check_encoder(ckpt.config, encoder, f"{where}: encoder")
    check_classifier(ckpt.config, ckpt.classifier, f"{where}: classifier")
    from safetensors.numpy import save_file

    config = dict(ckpt.config)
    config.pop("dtype", None)
    config.update(architectures=[RERANKER_ARCHITECTURE], model_type="xlm-roberta", torch_dtype="float32",
                  id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    tensors = {f"roberta.{k}": v for k, v in encoder.items()}
    tensors.update({CLASSIFIER_PREFIX + k: v for k, v in ckpt.classifier.items()})
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in sorted(tensors.items())}
    with atomic_directory(out_dir, overwrite=overwrite, error=CheckpointFormatError) as folder:
        write_json(os.path.join(folder, CONFIG_NAME), config)
        save_file(tensors, os.path.join(folder, SAFETENSORS_NAME), metadata={"format": "pt"})
        os.chmod(os.path.join(folder, SAFETENSORS_NAME), 0o644)
        if tokenizer_dir is not None:
            _copy_tokenizer(os.fspath(tokenizer_dir), folder)
