"""Export m3jax params (a training checkpoint, or a train state in memory) to the bge-m3 Hugging Face layout.

    python -m m3jax export --checkpoint runs/toy --output runs/toy_export            # latest complete step
    python -m m3jax export --checkpoint runs/toy/checkpoints/150 --output out --pytorch-bin

What is read: `m3jax.model.loading` resolves the checkpoint (a run's output_dir, its checkpoints/ directory or a step
directory) and restores only the `params` subtree as host numpy arrays, whatever mesh / number of devices or
processes wrote it (the optimizer state is never read); config.json and the tokenizer come from the run's
base_model/ (copied there when the run started) or `base_model`.
What is written (m3jax.io.hf_write.write_hf_files): config.json, model.safetensors (and pytorch_model.bin on request),
colbert_linear.pt, sparse_linear.pt, tokenizer files, sentence-transformers files matching the run's pooling, plus
`m3jax_export.json` naming the source step and the head settings. Everything is written through
`storage.atomic_directory`: an interrupted or failed export never leaves a half-written output directory.
Both `checkpoint` and `output_dir` may be URLs (gs://bucket/...): Orbax reads the checkpoint in place, and an output
URL is built locally and uploaded file by file with m3jax_export.json last, as its commit marker.

LoRA: a run with adapters is exported merged -- each adapted kernel becomes W + (alpha / rank) * A B
(m3jax.model.encoder.merge_lora) -- so the output is a plain bge-m3 directory. `lora_adapters=True`
(`m3jax export --lora-adapters`) also writes the adapters alone to `lora_adapters/` in PEFT's layout
(adapter_model.safetensors + adapter_config.json): `PeftModel.from_pretrained(AutoModel.from_pretrained(<the base
bge-m3>), "<export>/lora_adapters")` computes the adapted encoder; the trained heads are the export's .pt files.
Every head file is written whatever heads were trained (an untrained head as it was loaded).

Heads dtype: the default is float32, so the export is exact (loading it back gives bitwise-equal params and the
three libraries reproduce m3jax's outputs to float32 precision). `heads_dtype="float16"` writes the heads the way
bge-m3 ships them (colbert_linear.pt is 4 MB instead of 8 MB for bge-m3; the heads are rounded to fp16).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

from m3jax.core import sharding as shard_lib
from m3jax.core import storage
from m3jax.core.errors import M3JaxError
from m3jax.core.storage import atomic_directory, check_output_dir, write_json
from m3jax.evaluation import selection
from m3jax.io import hf_layout, hf_write
from m3jax.model import encoder as m3model
from m3jax.model import loading
from m3jax.tools import merge_core, model_card

logger = logging.getLogger(__name__)

EXPORT_INFO_NAME = loading.EXPORT_INFO_NAME
HEADS_DTYPES = ("float32", "float16")
LORA_ADAPTERS_DIR = "lora_adapters"
CARD_NAME = "README.md"


class ExportError(M3JaxError, ValueError):
    """An export cannot be written as asked (output directory, options); the message says why."""


def _check_options(output_dir, heads_dtype: str, overwrite: bool) -> str:
    out_dir = storage.resolve(output_dir)
    if heads_dtype not in HEADS_DTYPES:
        raise ExportError(f"heads_dtype={heads_dtype!r}: expected one of {', '.join(HEADS_DTYPES)}")
    check_output_dir(out_dir, overwrite, ExportError)
    return out_dir


def export_params(params, hf_config: dict, output_dir, *, tokenizer_dir: str,
                  sentence_pooling_method: str = "cls", normalize_embeddings: bool = True,
                  pytorch_bin: bool = False, safetensors: bool = True, heads_dtype: str = "float32",
                  overwrite: bool = False, export_info: dict | None = None,
                  lora: m3model.LoRAConfig | None = None, lora_adapters: bool = False,
                  card_info: dict | None = None, extra_files: dict[str, str] | None = None) -> str:
    """Write m3jax params as a bge-m3 directory (the one function a training loop calls to export).

    `params`: the BGEM3 param tree (numpy or jax arrays; sharded arrays are fine; in a multi-process run every
    process must call this, process 0 writes). `hf_config`: the base model's config.json. `tokenizer_dir`: where the
    tokenizer files are copied from. `lora`: the adapters' settings when `params` hold LoRA adapters (the run's
    model config's `lora`); they are merged into the kernels, and with `lora_adapters` also written alone to
    lora_adapters/ (PEFT layout). `card_info`: what the model card (README.md, m3jax.tools.model_card) shows.
    Returns the absolute output path. Raises ExportError / CheckpointError.
    """
    import jax

    out_dir = _check_options(output_dir, heads_dtype, overwrite)
    if lora_adapters and lora is None:
        raise ExportError("lora_adapters: the params to export have no LoRA adapters (a run without lora.rank)")
    host_params = shard_lib.to_host(params)
    if jax.process_index() != 0:
        return out_dir
    settings = loading.ModelSettings(sentence_pooling_method=sentence_pooling_method,
                                     normalize_embeddings=normalize_embeddings,
                                     lora=lora or m3model.LoRAConfig(rank=0))
    cfg = loading.model_config(loading.ModelSource.of_params(hf_config, host_params, tokenizer_dir), settings)
    if lora is None and any(m3model.is_lora_param(n.split("/")) for n in m3model.param_names(host_params)):
        raise ExportError("the params to export hold LoRA adapters: pass lora=<the run's ModelConfig.lora> to merge "
                          "them")
    loading.check_params(host_params, cfg, "params to export")
    peft = m3model.lora_to_peft(host_params, cfg) if lora_adapters else None
    merged_cfg = dataclasses.replace(cfg, lora=None)
    encoder, colbert, sparse = m3model.params_to_hf(m3model.merge_lora(host_params, cfg), merged_cfg)
    hf_ckpt = hf_layout.HFCheckpoint(config=dict(hf_config), encoder=encoder, colbert=colbert, sparse=sparse)
    try:
        hf_write.check_hf_checkpoint(hf_ckpt, f"export to {out_dir}", safetensors=safetensors, pytorch_bin=pytorch_bin,
                                  heads_dtype=heads_dtype)
    except hf_layout.CheckpointFormatError as e:
        raise ExportError(str(e)) from e
    with atomic_directory(out_dir, overwrite=overwrite, error=ExportError, last=EXPORT_INFO_NAME) as folder:
        hf_write.write_hf_files(folder, hf_ckpt, tokenizer_dir=tokenizer_dir, safetensors=safetensors,
                             pytorch_bin=pytorch_bin, heads_dtype=heads_dtype,
                             sentence_pooling_method=sentence_pooling_method,
                             normalize_embeddings=normalize_embeddings)
        info = {"format": "bge-m3", "exported_by": "m3jax", "heads_dtype": heads_dtype,
                "sentence_pooling_method": sentence_pooling_method, "normalize_embeddings": normalize_embeddings,
                "colbert_dim": cfg.colbert_out_dim, **(export_info or {})}
        if lora is not None:
            info["lora"] = dict(dataclasses.asdict(lora), merged=True,
                                adapters=LORA_ADAPTERS_DIR if lora_adapters else None)
        if peft is not None:
            _write_peft(os.path.join(folder, LORA_ADAPTERS_DIR), *peft, base_model=info.get("base_model"))
        write_json(os.path.join(folder, EXPORT_INFO_NAME), info)
        with open(os.path.join(folder, CARD_NAME), "w", encoding="utf-8") as f:
            f.write(model_card.render(card_info or {}, pooling=sentence_pooling_method))
        for name, text in (extra_files or {}).items():
            with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
                f.write(text)
    if sentence_pooling_method != "cls":
        logger.warning("%s: trained with sentence_pooling_method=%s; FlagEmbedding users must pass "
                       "pooling_method=%r (sentence-transformers reads it from 1_Pooling/)", out_dir,
                       sentence_pooling_method, sentence_pooling_method)
    logger.info("exported to %s", out_dir)
    return out_dir


def _write_peft(folder: str, tensors: dict, config: dict, *, base_model: str | None) -> None:
    from safetensors.numpy import save_file

    os.makedirs(folder)
    save_file(tensors, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    os.chmod(os.path.join(folder, "adapter_model.safetensors"), 0o644)
    write_json(os.path.join(folder, "adapter_config.json"), dict(config, base_model_name_or_path=base_model))


def export_checkpoint(checkpoint, output_dir, *, step: int | str | None = None, base_model: str | None = None,
                      pytorch_bin: bool = False, heads_dtype: str = "float32", overwrite: bool = False,
                      lora_adapters: bool = False, merge_with: str | None = None, merge_weight: float | None = None,
                      card_settings: model_card.ModelCardSettings | None = None) -> str:
    """`m3jax export`: read a training checkpoint and write it as a bge-m3 directory (LoRA adapters merged; with
    `lora_adapters` also alone in lora_adapters/), with a model card (listing the config fields that differ from
    the defaults of `card_settings`, when given). `step`: a step number, "best" (the run's best.json) or None (the
    latest). `merge_with` (a bge-m3 directory, e.g. the base model) and `merge_weight` W: write W * fine-tuned +
    (1 - W) * that model, every tensor (m3jax.tools.merge_core). Returns the output path."""
    _check_options(output_dir, heads_dtype, overwrite)  # before the (possibly long) restore
    if (merge_with is None) != (merge_weight is None):
        raise ExportError("--merge-with and --merge-weight go together (merged = W * fine-tuned + (1 - W) * "
                          "merge-with)")
    if merge_weight is not None and lora_adapters:
        raise ExportError("--lora-adapters: the adapters of a merged export would not reproduce it; export without "
                          "merging to get them")
    step = selection.resolve_step(checkpoint, step)
    source = loading.find_model(checkpoint, step=step, base_model=base_model)
    if source.location is None:
        raise ExportError(f"{source.path}: is a Hugging Face model directory; export takes an m3jax run's "
                          f"output_dir, its checkpoints/ directory or a step directory checkpoints/<step>")
    cfg = loading.model_config(source)
    if lora_adapters and cfg.lora is None:
        raise ExportError(f"{source.location.step_dir}: --lora-adapters: this run has no LoRA adapters "
                          f"(lora.rank was 0)")
    params = loading.load_params(source, cfg)
    run = source.run_config or {}
    info: dict[str, Any] = {"source_checkpoint": source.location.step_dir, "step": source.location.step,
                            "base_model": run.get("model_name_or_path") or None}
    if "heads" in run:
        info["trained_heads"] = list(loading.trained_heads(run))
    if run.get("mrl_dims"):  # `m3jax eval` reports each size
        info["mrl_dims"], info["mrl_colbert"] = list(run["mrl_dims"]), bool(run.get("mrl_colbert"))
    card_info = model_card.card_info_from_run(source.location.work_dir, run, source.location.step, card_settings)
    lora = cfg.lora
    if merge_with is not None:
        params, lora = merge_core.merge_params([m3model.merge_lora(params, cfg), merge_core.load_for_merge(
            merge_with, like=(source.location.step_dir, dataclasses.replace(cfg, lora=None)))[1]],
            merge_core.check_weights([merge_weight, 1.0 - merge_weight], 2, exact_pair=True)), None
        info["merge"] = card_info["merge"] = {"models": [source.location.step_dir, storage.resolve(merge_with)],
                                         "weights": [float(merge_weight), 1.0 - float(merge_weight)]}
    return export_params(params, source.hf_config, output_dir, tokenizer_dir=source.tokenizer_dir,
                         sentence_pooling_method=cfg.sentence_pooling_method,
                         normalize_embeddings=cfg.normalize_embeddings, pytorch_bin=pytorch_bin,
                         heads_dtype=heads_dtype, overwrite=overwrite, export_info=info, lora=lora,
                         lora_adapters=lora_adapters, card_info=card_info)
