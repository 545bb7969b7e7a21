"""FlagEmbedding 1.4.2's EncoderOnlyEmbedderM3Model as a reference for m3jax parity tests (torch only, no JAX).

What this module gives:
- `read_jsonl`, `make_group`, `make_batch`: deterministic batches from toy_train_data-style jsonl files (one
  positive, G-1 negatives with FlagEmbedding's repeat rule, negatives sorted by teacher score when there are
  scores), tokenized with truncation and padding to a fixed length so that JAX sees one shape;
- `load_fe_base` (cached per checkpoint / colbert_dim), `make_fe` (training mode with dropout off), `run_fe`
  (loss + every parameter's gradient by HF name, after `loss.backward()`);
- `PatchedM3Model`: the upstream class with its two no_in_batch_neg index bugs fixed (see the class), and
  `fe_needs_patch`, which says when a setting hits them;
- `python tests/fe_reference.py ddp SPEC.json OUT.npz`: the same model under torch.distributed (gloo, 2 CPU
  processes, negatives_cross_device=True), writing each rank's loss and the DDP-averaged gradients.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from pathlib import Path

import numpy as np
import torch
from FlagEmbedding.finetune.embedder.encoder_only.m3.modeling import EncoderOnlyEmbedderM3Model
from FlagEmbedding.finetune.embedder.encoder_only.m3.runner import EncoderOnlyEmbedderM3Runner

TOY_DATA_DIR = Path(__file__).resolve().parent.parent / "toy_train_data"
TEMPERATURE = 0.02  # the recipe's


# ---------------------------------------------------------------------------------------------------------------
# batches


def read_jsonl(path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def has_teacher_scores(example: dict) -> bool:
    return "pos_scores" in example and "neg_scores" in example


def make_group(example: dict, group_size: int, use_teacher: bool, pos_index: int = 0):
    """(passages, teacher scores or None) of one example: 1 positive then group_size-1 negatives.

    Negatives: the first G-1 in file order; when there are too few, the negatives repeated ceil((G-1)/n) times (the
    pool FlagEmbedding samples from) and the first G-1 of those. With teacher scores the chosen negatives are
    sorted by score, descending (as the m3jax sampler and the KD recipe order them).
    """
    k = group_size - 1
    negs = list(range(len(example["neg"])))
    if k > 0 and not negs:
        raise ValueError(f"example {example['query']!r} has no negatives for group size {group_size}")
    chosen = list(np.tile(negs, math.ceil(k / len(negs)))[:k]) if k > 0 else []
    pos = pos_index % len(example["pos"])
    if use_teacher:
        chosen.sort(key=lambda j: -example["neg_scores"][j])  # stable: repeats stay together
        scores = [float(example["pos_scores"][pos])] + [float(example["neg_scores"][j]) for j in chosen]
    else:
        scores = None
    return [example["pos"][pos]] + [example["neg"][j] for j in chosen], scores


@dataclasses.dataclass
class Batch:
    queries: list[str]
    passages: list[str]
    teacher: list[float] | None  # B*G raw teacher scores (FlagEmbedding's teacher_scores argument)
    group_size: int
    q_ids: np.ndarray  # [B, L] int64
    q_mask: np.ndarray
    p_ids: np.ndarray  # [B*G, L]
    p_mask: np.ndarray

    @property
    def batch_size(self) -> int:
        return len(self.queries)

    def rows(self, start: int, stop: int) -> Batch:
        """Queries start..stop-1 with their groups (one rank's share of a global batch)."""
        g = self.group_size
        return Batch(self.queries[start:stop], self.passages[start * g:stop * g],
                     None if self.teacher is None else self.teacher[start * g:stop * g], g,
                     self.q_ids[start:stop], self.q_mask[start:stop],
                     self.p_ids[start * g:stop * g], self.p_mask[start * g:stop * g])


def tokenize(tokenizer, texts: list[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Truncate to max_len and pad to exactly max_len: texts shorter than max_len carry padding, longer ones none."""
    enc = tokenizer(texts, truncation=True, max_length=max_len, padding="max_length", return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def make_batch(examples: list[dict], group_size: int, tokenizer, max_len: int, use_teacher: bool,
               pos_index: int = 0) -> Batch:
    queries, passages, teacher = [], [], []
    for ex in examples:
        ps, ts = make_group(ex, group_size, use_teacher, pos_index)
        queries.append(ex["query"])
        passages += ps
        if use_teacher:
            teacher += ts
    q_ids, q_mask = tokenize(tokenizer, queries, max_len)
    p_ids, p_mask = tokenize(tokenizer, passages, max_len)
    return Batch(queries, passages, teacher if use_teacher else None, group_size, q_ids, q_mask, p_ids, p_mask)


# ---------------------------------------------------------------------------------------------------------------
# FlagEmbedding model


class PatchedM3Model(EncoderOnlyEmbedderM3Model):
    """EncoderOnlyEmbedderM3Model with exactly its two no_in_batch_neg index bugs fixed (FlagEmbedding 1.4.2).

    Only `_compute_no_in_batch_neg_loss` is overridden; it runs only for no_in_batch_neg batches. Its body is
    upstream's except for the two marked lines:
    1. Ensemble: `forward` hands it the heads' own-group scores [B, G] and slices p_dense_vecs to B rows, so
       upstream's `compute_local_score` takes group size 1 and reads the diagonal of the [B, G] matrix (scores
       [B, 1], ensemble CE identically 0; IndexError when B > G). The summed [B, G] scores are already local.
    2. m3_kd_loss: `distill_loss` targets row*G + i, columns of a [B, B*G] matrix; on the [B, G] own-group
       scores the targets are i (IndexError for B > 1). Calling upstream's distill_loss one row at a time gives
       exactly that (row 0's targets are 0..G-1) and the same mean over rows.
    """

    def _compute_no_in_batch_neg_loss(self, q_reps, p_reps, teacher_targets=None, compute_score_func=None, **kwargs):
        if compute_score_func == self.ensemble_score:  # fix 1
            local_scores = self.ensemble_score(q_reps, p_reps, **kwargs)
        else:
            local_scores = self.compute_local_score(q_reps, p_reps, compute_score_func, **kwargs)
        group_size = local_scores.size(1)
        local_targets = torch.zeros(local_scores.size(0), device=local_scores.device, dtype=torch.long)
        if teacher_targets is None:
            return local_scores, self.compute_loss(local_scores, local_targets)
        if self.kd_loss_type == "m3_kd_loss":  # fix 2
            loss = torch.stack([self.distill_loss(self.kd_loss_type, teacher_targets[b:b + 1],
                                                  local_scores[b:b + 1], group_size=group_size)
                                for b in range(local_scores.size(0))]).mean()
        else:
            loss = self.distill_loss(self.kd_loss_type, teacher_targets, local_scores, group_size=group_size)
        if self.kd_loss_type == "kl_div":
            loss = loss + self.compute_loss(local_scores, local_targets)
        return local_scores, loss


def fe_needs_patch(batch_size: int, group_size: int, kd: str | None, no_in_batch_neg: bool, unified: bool) -> bool:
    """Whether FlagEmbedding 1.4.2 computes a wrong ensemble (unified, B <= G) or raises (unified with B > G;
    m3_kd_loss with B > 1) on this no_in_batch_neg setting."""
    return no_in_batch_neg and (unified or (kd == "m3_kd_loss" and batch_size > 1))


_BASES: dict = {}


def load_fe_base(path, colbert_dim: int = -1) -> dict:
    """EncoderOnlyEmbedderM3Runner.get_model(path): {model, colbert_linear, sparse_linear}, fp32; one per path.

    The modules are shared by every model `make_fe` builds on them; `run_fe` clears their gradients first.
    """
    key = (os.fspath(path), colbert_dim)
    if key not in _BASES:
        base = EncoderOnlyEmbedderM3Runner.get_model(os.fspath(path), colbert_dim=colbert_dim)
        for module in base.values():
            module.float()
        _BASES[key] = base
    return _BASES[key]


def make_fe(base: dict, tokenizer, *, kd_loss_type: str = "kl_div", unified: bool = True,
            use_self_distill: bool = False, self_distill_start_step: int = -1, pooling: str = "cls",
            negatives_cross_device: bool = False, patched: bool = False) -> EncoderOnlyEmbedderM3Model:
    """The recipe's model (temperature 0.02, normalized embeddings) in training mode with dropout off:
    FlagEmbedding computes the loss only when `self.training`; `.model.eval()` turns off the encoder's dropout."""
    cls = PatchedM3Model if patched else EncoderOnlyEmbedderM3Model
    fe = cls(base, tokenizer=tokenizer, negatives_cross_device=negatives_cross_device, temperature=TEMPERATURE,
             kd_loss_type=kd_loss_type, sentence_pooling_method=pooling, normalize_embeddings=True,
             unified_finetuning=unified, use_self_distill=use_self_distill,
             self_distill_start_step=self_distill_start_step)
    fe.train()
    fe.model.eval()
    return fe


def named_parameters(base: dict):
    """(name, parameter) of the encoder (HF names, pooler included) and both heads ('colbert_linear.weight', ...)."""
    yield from base["model"].named_parameters()
    for head in ("colbert_linear", "sparse_linear"):
        for name, p in base[head].named_parameters():
            yield f"{head}.{name}", p


def zero_grads(base: dict) -> None:
    for _, p in named_parameters(base):
        p.grad = None


def grads_of(base: dict) -> dict[str, np.ndarray]:
    """Every parameter's .grad as float32 numpy; parameters the loss does not reach get zeros."""
    return {name: (np.zeros(tuple(p.shape), np.float32) if p.grad is None else p.grad.detach().numpy().copy())
            for name, p in named_parameters(base)}


def _features(ids: np.ndarray, mask: np.ndarray) -> dict:
    return {"input_ids": torch.from_numpy(np.ascontiguousarray(ids)),
            "attention_mask": torch.from_numpy(np.ascontiguousarray(mask))}


def fe_forward(fe, batch: Batch, *, step: int, no_in_batch_neg: bool, use_teacher: bool = True):
    """One training forward at optimizer step `step` (FlagEmbedding's self.step; forward increments it)."""
    fe.step = step
    return fe(queries=_features(batch.q_ids, batch.q_mask), passages=_features(batch.p_ids, batch.p_mask),
              teacher_scores=batch.teacher if use_teacher else None, no_in_batch_neg_flag=no_in_batch_neg)


def run_fe(fe, base: dict, batch: Batch, *, step: int, no_in_batch_neg: bool, use_teacher: bool = True):
    """(loss, {name: grad}) of one forward + loss.backward() from cleared gradients."""
    zero_grads(base)
    out = fe_forward(fe, batch, step=step, no_in_batch_neg=no_in_batch_neg, use_teacher=use_teacher)
    out.loss.backward()
    return float(out.loss.item()), grads_of(base)


# ---------------------------------------------------------------------------------------------------------------
# torch.distributed reference: python tests/fe_reference.py ddp SPEC.json OUT.npz
#
# SPEC.json: {"checkpoint": path, "world_size": 2, "group_size": G, "batch": "batch.npz" (q_ids, q_mask, p_ids,
#   p_mask, optional teacher [W*B*G]), "configs": [{"name", "kd_loss_type", "use_teacher", "unified",
#   "no_in_batch_neg", "use_self_distill", "self_distill_start_step", "step", "pooling", "patched"}]}
# OUT.npz: "<name>/losses" [W] (each rank's loss) and "<name>/grad/<param>" (all_reduce sum / W, what DDP applies).


def _ddp_rank(rank: int, spec: dict, out_path: str, init_file: str) -> None:
    import torch.distributed as dist
    from transformers import AutoTokenizer

    torch.set_num_threads(1)
    w = spec["world_size"]
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=w)
    try:
        data = np.load(spec["batch"])
        g = spec["group_size"]
        teacher = data["teacher"].tolist() if "teacher" in data else None
        full = Batch([""] * len(data["q_ids"]), [""] * len(data["p_ids"]), teacher, g,
                     data["q_ids"], data["q_mask"], data["p_ids"], data["p_mask"])
        b = full.batch_size // w
        local = full.rows(rank * b, (rank + 1) * b)
        tokenizer = AutoTokenizer.from_pretrained(spec["checkpoint"])
        base = load_fe_base(spec["checkpoint"])
        results = {}
        for c in spec["configs"]:
            fe = make_fe(base, tokenizer, kd_loss_type=c["kd_loss_type"], unified=c["unified"],
                         use_self_distill=c["use_self_distill"], self_distill_start_step=c["self_distill_start_step"],
                         pooling=c["pooling"], negatives_cross_device=True, patched=c["patched"])
            loss, grads = run_fe(fe, base, local, step=c["step"], no_in_batch_neg=c["no_in_batch_neg"],
                                 use_teacher=c["use_teacher"])
            losses = [torch.zeros(1) for _ in range(w)]
            dist.all_gather(losses, torch.tensor([loss]))
            results[f"{c['name']}/losses"] = np.array([t.item() for t in losses], np.float64)
            for name, grad in grads.items():
                t = torch.from_numpy(grad)
                dist.all_reduce(t)  # sum
                results[f"{c['name']}/grad/{name}"] = (t / w).numpy()
        if rank == 0:
            np.savez(out_path, **results)
    finally:
        dist.destroy_process_group()


def ddp_main(spec_path: str, out_path: str) -> None:
    """Fork the ranks from this process (FlagEmbedding is imported once, here, and no torch op has run yet)."""
    import tempfile

    import torch.multiprocessing as mp

    with open(spec_path) as f:
        spec = json.load(f)
    with tempfile.TemporaryDirectory(prefix="m3jax-gloo-") as tmp:
        mp.start_processes(_ddp_rank, args=(spec, out_path, os.path.join(tmp, "init")), nprocs=spec["world_size"],
                           join=True, start_method="fork")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if len(sys.argv) != 4 or sys.argv[1] != "ddp":
        sys.exit("usage: python tests/fe_reference.py ddp SPEC.json OUT.npz")
    ddp_main(sys.argv[2], sys.argv[3])
