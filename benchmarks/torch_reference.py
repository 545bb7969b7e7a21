"""Our PyTorch reference: one BGE-M3 unified fine-tuning step computed the way FlagEmbedding computes it, timed.

    python benchmarks/torch_reference.py --configs 32x8:64:256,8x8:512:2048,8x2:512:8192 --ckpt 1 --sub_batch auto
    python benchmarks/torch_reference.py --configs 2x2:8:16 --layers 1 --hidden 32 --heads 2 --ffn 64 --vocab 100 \\
        --device cpu                                                  # a tiny model on CPU (a smoke test)
    python benchmarks/torch_reference.py --find-max-batch 8x8:512:8192 --granularity 2 --steps 1 --warmup 1

The step (FlagEmbedding 1.4's EncoderOnlyEmbedderM3Model with unified fine-tuning and self-distillation, one
process, in-batch negatives, no teacher scores), written here from its definition:
  * encoder: transformers' XLMRobertaModel (sdpa attention), random weights of the bge-m3 shape by default
    (24 layers, hidden 1024, 16 heads, FFN 4096, vocab 250002, 8194 positions), optionally with gradient
    checkpointing (--ckpt 1); heads colbert_linear = Linear(hidden, hidden) and sparse_linear = Linear(hidden, 1);
  * dense = normalize(h[:, 0]); sparse: relu(sparse_linear(h)) scattered into a (batch, seq, vocab) tensor, max over
    seq, the cls / eos / pad / unk ids (0, 2, 1, 3) zeroed; colbert = normalize(colbert_linear(h[:, 1:]) *
    mask[:, 1:]), scored sum_i max_j <q_i, p_j> / (query tokens after cls);
  * scores of each query against all B*G passages / 0.02, target of query i: passage i*G;
    loss = (CE(dense) + CE(ens) + 0.1 CE(sparse) + CE(colbert)) / 4 with ens = dense + 0.3 sparse + colbert;
    self-distillation: t = softmax(stop_grad(ens)), sd(s) = -mean(sum(log_softmax(s) * t)),
    loss = (loss + (sd(dense) + 0.1 sd(sparse) + sd(colbert)) / 3) / 2;
  * passages encoded in sub-batches (--sub_batch N, or auto: FlagEmbedding research's table by passage length);
  * bf16 autocast on CUDA (float32 elsewhere), fused AdamW (lr 1e-5, weight decay 0.01).
Inputs: ids uniform in [5, vocab) with cls 0 first and eos 2 last, full attention masks.

One JSON line per config (BATCHxGROUP:QLEN:PLEN): impl, ckpt, batch, group, qlen, plen, sub_batch, step_s,
queries_per_s, tokens_per_s, model_tflops (3 x the encoder's forward matmul FLOPs per second, attention included),
loss, peak_gib (torch.cuda.max_memory_allocated; null on CPU); out of memory: the same fields and "error": "OOM".
benchmarks/train_step.py prints the same fields for m3jax's step.
"""
from __future__ import annotations

import argparse
import gc
import json
import re
import sys
import time

FIELDS = ("impl", "ckpt", "batch", "group", "qlen", "plen", "sub_batch", "step_s", "queries_per_s", "tokens_per_s",
          "model_tflops", "loss", "peak_gib")
CLS, PAD, EOS, UNK = 0, 1, 2, 3
TEMPERATURE = 0.02
LEARNING_RATE, WEIGHT_DECAY = 1e-5, 0.01
# FlagEmbedding research/BGE_M3 compute_sub_batch_size: (minimum passage length, sub batch).
AUTO_SUB_BATCH = ((6000, 1), (5000, 2), (4000, 3), (3000, 3), (2000, 5), (1000, 9), (512, 16), (0, 32))


def auto_sub_batch(length: int) -> int:
    return next(size for low, size in AUTO_SUB_BATCH if length >= low)


def parse_config(text: str) -> tuple[int, int, int, int]:
    m = re.fullmatch(r"\s*(\d+)x(\d+):(\d+):(\d+)\s*", text)
    if not m:
        raise ValueError(f"config {text!r}: expected BATCHxGROUP:QLEN:PLEN, e.g. 32x8:64:256")
    return tuple(int(x) for x in m.groups())


def flops_per_token(layers: int, hidden: int, ffn: int, length: int) -> int:
    """Forward matmul FLOPs of the encoder per token: projections, FFN and the two attention matmuls."""
    return layers * (2 * (4 * hidden * hidden + 2 * hidden * ffn) + 4 * length * hidden)


def build_model(*, layers: int, hidden: int, heads: int, ffn: int, vocab: int, max_positions: int,
                dropout: float):
    """The encoder and both heads as one torch module (random weights, transformers' init for the encoder)."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    class M3Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            config = XLMRobertaConfig(
                vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=ffn, max_position_embeddings=max_positions, type_vocab_size=1, pad_token_id=PAD,
                bos_token_id=CLS, eos_token_id=EOS, layer_norm_eps=1e-5, hidden_act="gelu",
                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout, attn_implementation="sdpa")
            self.vocab = vocab
            self.encoder = XLMRobertaModel(config, add_pooling_layer=False)
            self.colbert_linear = torch.nn.Linear(hidden, hidden)
            self.sparse_linear = torch.nn.Linear(hidden, 1)

        def encode(self, ids, mask):
            """(dense [B, H], sparse [B, V], colbert [B, L-1, H]) of a batch of token ids."""
            f = torch.nn.functional
            h = self.encoder(input_ids=ids, attention_mask=mask, return_dict=True).last_hidden_state
            dense = f.normalize(h[:, 0], dim=-1)
            weights = torch.relu(self.sparse_linear(h))  # [B, L, 1]
            lexical = torch.zeros(ids.shape[0], ids.shape[1], self.vocab, dtype=weights.dtype, device=ids.device)
            lexical = torch.scatter(lexical, dim=-1, index=ids.unsqueeze(-1), src=weights)
            sparse = torch.max(lexical, dim=1).values
            sparse[:, [CLS, EOS, PAD, UNK]] *= 0.0
            colbert = self.colbert_linear(h[:, 1:]) * mask[:, 1:][:, :, None].float()
            return dense, sparse, f.normalize(colbert, dim=-1)

        def encode_in_chunks(self, ids, mask, sub_batch: int):
            if sub_batch <= 0 or sub_batch >= ids.shape[0]:
                return self.encode(ids, mask)
            chunks = [self.encode(ids[i:i + sub_batch], mask[i:i + sub_batch])
                      for i in range(0, ids.shape[0], sub_batch)]
            return tuple(torch.cat(parts, dim=0) for parts in zip(*chunks))

    return M3Model()


def unified_loss(model, q_ids, q_mask, p_ids, p_mask, *, group: int, sub_batch: int):
    """The step's loss: the four in-batch cross entropies, then self-distillation from the ensemble."""
    import torch

    f = torch.nn.functional
    q_dense, q_sparse, q_colbert = model.encode(q_ids, q_mask)
    p_dense, p_sparse, p_colbert = model.encode_in_chunks(p_ids, p_mask, sub_batch)
    dense = q_dense @ p_dense.T / TEMPERATURE
    sparse = q_sparse @ p_sparse.T / TEMPERATURE
    token = torch.einsum("qin,pjn->qipj", q_colbert, p_colbert)
    colbert = token.max(dim=-1).values.sum(dim=1) / q_mask[:, 1:].sum(dim=-1, keepdim=True) / TEMPERATURE
    target = torch.arange(q_ids.shape[0], device=q_ids.device) * group
    ensemble = dense + 0.3 * sparse + colbert
    loss = (f.cross_entropy(dense, target) + f.cross_entropy(ensemble, target)
            + 0.1 * f.cross_entropy(sparse, target) + f.cross_entropy(colbert, target)) / 4
    teacher = torch.softmax(ensemble.detach(), dim=-1)
    distill = lambda s: -torch.mean(torch.sum(torch.log_softmax(s, dim=-1) * teacher, dim=-1))
    return (loss + (distill(dense) + 0.1 * distill(sparse) + distill(colbert)) / 3) / 2


def random_inputs(batch: int, group: int, qlen: int, plen: int, vocab: int, *, seed: int = 0, device="cpu"):
    """(query ids, query mask, passage ids, passage mask): ids uniform in [5, vocab), cls first, eos last."""
    import torch

    gen = torch.Generator().manual_seed(seed)

    def ids(rows, length):
        x = torch.randint(5, vocab, (rows, length), generator=gen, dtype=torch.long)
        x[:, 0], x[:, -1] = CLS, EOS
        return x.to(device)

    q, p = ids(batch, qlen), ids(batch * group, plen)
    return q, torch.ones_like(q), p, torch.ones_like(p)


def is_oom(e: BaseException) -> bool:
    return isinstance(e, MemoryError) or "out of memory" in str(e).lower()


def run_config(model, optimizer, args, config: str) -> dict:
    import torch

    batch, group, qlen, plen = parse_config(config)
    sub = auto_sub_batch(plen) if args.sub_batch == "auto" else int(args.sub_batch)
    rec = dict.fromkeys(FIELDS)
    rec.update(impl="torch", ckpt=int(args.ckpt), batch=batch, group=group, qlen=qlen, plen=plen, sub_batch=sub)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    inputs = None
    try:
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        inputs = random_inputs(batch, group, qlen, plen, args.vocab, seed=args.seed, device=device)
        loss = None

        def step():
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=cuda):
                value = unified_loss(model, *inputs, group=group, sub_batch=sub)
            value.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return value.detach()

        for _ in range(args.warmup):
            loss = step()
        sync()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        sync()
        dt = (time.perf_counter() - t0) / args.steps
        fwd = (batch * qlen * flops_per_token(args.layers, args.hidden, args.ffn, qlen)
               + batch * group * plen * flops_per_token(args.layers, args.hidden, args.ffn, plen))
        tflops = 3 * fwd / dt / 1e12
        rec.update(step_s=round(dt, 4), queries_per_s=round(batch / dt, 2),
                   tokens_per_s=round(batch * (qlen + group * plen) / dt),
                   model_tflops=round(tflops, 1 if tflops >= 1 else 6), loss=round(float(loss), 4),
                   peak_gib=round(torch.cuda.max_memory_allocated() / 2 ** 30, 2) if cuda else None)
    except (RuntimeError, MemoryError) as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if not is_oom(e):
            raise
        optimizer.zero_grad(set_to_none=True)
        rec.update(error="OOM")
        if cuda:
            rec["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2 ** 30, 2)
    finally:
        inputs = None  # free the batch before the next shape
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return rec


def find_max_batch(model, optimizer, args, config: str) -> dict:
    """The largest batch at GROUP:QLEN:PLEN of `config` whose step runs (one warmup and one timed step each):
    doubling from BATCH until a step runs out of memory, then bisection to within --granularity."""
    batch, group, qlen, plen = parse_config(config)
    tries: list[dict] = []

    def fits(b: int) -> bool:
        t0 = time.perf_counter()
        rec = run_config(model, optimizer, args, f"{b}x{group}:{qlen}:{plen}")
        tries.append(dict(batch=b, fits="error" not in rec, peak_gib=rec["peak_gib"], step_s=rec["step_s"],
                          seconds=round(time.perf_counter() - t0, 1)))
        print(json.dumps(dict(rec, mode="find_max_batch_try")), file=sys.stderr, flush=True)
        return "error" not in rec

    good, bad = 0, None
    b = max(1, batch)
    while bad is None and b <= args.limit:
        if fits(b):
            good, b = b, b * 2
        else:
            bad = b
    if bad is None:  # everything up to the limit ran
        return dict(mode="find_max_batch", impl="torch", group=group, qlen=qlen, plen=plen, max_batch=good,
                    first_failing_batch=None, tries=tries)
    while bad - good > max(1, args.granularity):
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return dict(mode="find_max_batch", impl="torch", ckpt=int(args.ckpt), group=group, qlen=qlen, plen=plen,
                sub_batch=auto_sub_batch(plen) if args.sub_batch == "auto" else int(args.sub_batch), max_batch=good,
                first_failing_batch=bad, tries=tries)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python benchmarks/torch_reference.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="32x8:64:256,8x8:512:2048,8x2:512:8192",
                   help="comma-separated BATCHxGROUP:QLEN:PLEN; default %(default)s")
    p.add_argument("--steps", type=int, default=6, help="timed steps per config")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    p.add_argument("--ckpt", type=int, default=1, choices=(0, 1), help="gradient checkpointing of the encoder")
    p.add_argument("--sub_batch", default="auto", help="passages encoded per chunk: an int (-1: all) or auto")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=250002)
    p.add_argument("--max_positions", type=int, default=8194)
    p.add_argument("--dropout", type=float, default=0.1, help="hidden and attention dropout (bge-m3's: 0.1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--find-max-batch", metavar="SHAPE", default=None,
                   help="largest batch at GROUP:QLEN:PLEN of SHAPE whose step runs, searched from its BATCH by "
                        "doubling, then bisection (each try: --warmup and --steps steps); one JSON line")
    p.add_argument("--granularity", type=int, default=1, help="with --find-max-batch: stop when the gap is this")
    p.add_argument("--limit", type=int, default=1024, help="with --find-max-batch: the largest batch tried")
    args = p.parse_args(argv)
    try:
        configs = [c for c in args.configs.split(",") if c.strip()]
        if args.find_max_batch:
            parse_config(args.find_max_batch)
        for c in configs:
            parse_config(c)
        if args.sub_batch != "auto":
            int(args.sub_batch)
    except ValueError as e:
        print(f"torch_reference: error: {e}", file=sys.stderr)
        return 2
    if args.steps < 1 or args.warmup < 0:
        print("torch_reference: error: --steps must be >= 1 and --warmup >= 0", file=sys.stderr)
        return 2

    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(args.device).type == "cuda"
    torch.manual_seed(args.seed)
    with torch.device(args.device):
        model = build_model(layers=args.layers, hidden=args.hidden, heads=args.heads, ffn=args.ffn,
                            vocab=args.vocab, max_positions=args.max_positions, dropout=args.dropout)
    if args.ckpt:
        model.encoder.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY, fused=cuda)
    if args.find_max_batch:
        print(json.dumps(find_max_batch(model, optimizer, args, args.find_max_batch)), flush=True)
        return 0
    for c in configs:
        print(json.dumps(run_config(model, optimizer, args, c)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
