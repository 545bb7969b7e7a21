"""Does cuDNN's fused attention apply dropout as the XLA path does, and are its gradients right? (GPU only)

    python -m benchmarks.cudnn_dropout [--rate 0.1] [--layers 3]

The kept probabilities are read back from the kernel itself: with values v[b, j, n] = e_j (one-hot over the key
position, head dim = sequence length = 64) the output is out[b, i, n, j] = P[b, n, i, j] * keep / (1 - rate), the
dropped-and-scaled attention probabilities. From them: the keep rate (against its binomial bound), whether the
kept values equal XLA's softmax / (1 - rate), and the keep mask, with which an XLA reference recomputes the
gradients of q, k and v of the same loss for comparison. One JSON line per case:
  single        one call under jax.value_and_grad (fresh executable): forward and backward of one kernel;
  steps         the same jitted function called twice: do the masks change from call to call?
  scan          `layers` calls inside lax.scan, gradients through the scan (the encoder's layer loop);
  scan_remat    the same with jax.checkpoint on the scanned body (the encoder's remat);
  unrolled      `layers` calls in a Python loop with seeds seed + layer (m3jax's cuDNN dropout layout);
  unrolled_same_seed  the same with one seed for every layer: are the masks of the layers the same?
  gradient_cache  pass 1 over chunks by lax.map, pass 2 by a scan with forward and backward per iteration (the
                order m3jax's gradient cache runs them in), chunks = `layers`.
Compiled as m3jax compiles its step on GPUs (m3jax.train.step.GPU_COMPILER_OPTIONS: no command buffers, into which XLA
cannot record cuDNN's dropout). A case's grads are right when max_rel_err (|g - g_ref| / max|g_ref| over q, k, v)
is at bf16 level (< 3e-2).
"""
from __future__ import annotations

import argparse
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from m3jax.train.step import GPU_COMPILER_OPTIONS  # command buffers off: cuDNN's dropout cannot be recorded in them

L, D, N, B = 64, 64, 4, 4
LENGTHS = (64, 50, 33, 64)


def cudnn(q, k, v, lengths, rate, seed):
    from jax._src.cudnn.fused_attention_stablehlo import MaskType, dot_product_attention

    return dot_product_attention(q, k, v, q_seqlen=lengths, kv_seqlen=lengths, scale=1.0 / math.sqrt(D),
                                 mask_type=MaskType.PADDING, seed=seed, dropout_rate=rate)


def probs(q, k, lengths):
    logits = jnp.einsum("bqnd,bknd->bnqk", q.astype(jnp.float32), k.astype(jnp.float32)) / math.sqrt(D)
    key_ok = jnp.arange(L)[None, :] < lengths[:, None]
    return jax.nn.softmax(jnp.where(key_ok[:, None, None, :], logits, -1e30), axis=-1)


def reference(q, k, v, lengths, keep, rate):
    """XLA attention with the given keep mask [B, N, Lq, Lk] (float32)."""
    p = probs(q, k, lengths) * keep / (1 - rate)
    return jnp.einsum("bnqk,bknd->bqnd", p, v.astype(jnp.float32))


def real_pairs(lengths):
    i = jnp.arange(L)
    ok = (i[None, :] < lengths[:, None])
    return ok[:, None, :, None] & ok[:, None, None, :]  # [B, 1, Lq, Lk]


def keep_of(out, lengths):
    """The keep mask [B, N, Lq, Lk] read from the one-hot output."""
    return (jnp.swapaxes(out.astype(jnp.float32), 1, 2) > 0) & real_pairs(lengths)


def inputs(seed, layers=1):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((layers, B, L, N, D)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((layers, B, L, N, D)), jnp.bfloat16)
    v = jnp.broadcast_to(jnp.eye(L, D, dtype=jnp.bfloat16)[None, :, None, :], (B, L, N, D))
    w = jnp.asarray(rng.standard_normal((layers, B, L, N, D)), jnp.float32)
    return q, k, v, w, jnp.asarray(LENGTHS, jnp.int32)


def rel_err(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def check(name, attend, rate, layers, seed=0):
    """attend(q [layers,...], k, v, lengths) -> out [layers, B, L, N, D]; compares forward values and grads."""
    q, k, v, w, lengths = inputs(seed, layers)
    row_ok = (jnp.arange(L)[None, :] < lengths[:, None])[None, :, :, None, None]

    def loss(q, k, v):
        out = attend(q, k, v, lengths)
        return jnp.sum(jnp.where(row_ok, out.astype(jnp.float32) * w, 0.0)), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                              compiler_options=GPU_COMPILER_OPTIONS)(q, k, v)
    keeps = [keep_of(out[j], lengths) for j in range(layers)]

    def ref_loss(q, k, v):
        outs = jnp.stack([reference(q[j], k[j], v, lengths, keeps[j], rate) for j in range(layers)])
        return jnp.sum(jnp.where(row_ok, outs * w, 0.0))

    ref_grads = jax.grad(ref_loss, argnums=(0, 1, 2))(q.astype(jnp.float32), k.astype(jnp.float32),
                                                       v.astype(jnp.float32))
    pairs = real_pairs(lengths)
    n_pairs = int(jnp.sum(jnp.broadcast_to(pairs, keeps[0].shape)))
    kept = [int(jnp.sum(x)) for x in keeps]
    sd = math.sqrt(n_pairs * rate * (1 - rate))
    # forward: the kept values are XLA's probabilities / (1 - rate)
    fwd_err = max(rel_err(jnp.where(keeps[j], jnp.swapaxes(out[j].astype(jnp.float32), 1, 2), 0.0),
                          jnp.where(keeps[j], probs(q[j], k[j], lengths) / (1 - rate), 0.0)) for j in range(layers))
    same = [float(jnp.sum((keeps[a] == keeps[b]) & pairs) / n_pairs)
            for a in range(layers) for b in range(a + 1, layers)]
    return dict(case=name, rate=rate, layers=layers, pairs_per_layer=n_pairs,
                keep_rate=[round(x / n_pairs, 5) for x in kept],
                keep_rate_within_5sd=all(abs(x - n_pairs * (1 - rate)) <= 5 * sd for x in kept),
                forward_rel_err=round(fwd_err, 5),
                max_rel_err={n: round(rel_err(g, r), 5) for n, g, r in zip("qkv", grads, ref_grads)},
                mask_agreement_between_layers=[round(x, 4) for x in same],
                independent_agreement=round((1 - rate) ** 2 + rate ** 2, 4)), keeps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    args = p.parse_args(argv)
    rate, layers, s0 = args.rate, args.layers, args.seed
    one = lambda q, k, v, lengths, seed=s0: cudnn(q, k, v, lengths, rate, seed)

    rec, _ = check("single", lambda q, k, v, n: one(q[0], k[0], v, n)[None], rate, 1)
    print(json.dumps(rec), flush=True)

    # two calls of one jitted function: the mask of call 2 against call 1
    q, k, v, _, lengths = inputs(0)
    f = jax.jit(lambda q, k: one(q, k, v, lengths), compiler_options=GPU_COMPILER_OPTIONS)
    a, b = keep_of(f(q[0], k[0]), lengths), keep_of(f(q[0], k[0]), lengths)
    pairs = jnp.broadcast_to(real_pairs(lengths), a.shape)
    agree = float(jnp.sum((a == b) & pairs) / jnp.sum(pairs))
    print(json.dumps(dict(case="steps", agreement_call1_call2=round(agree, 4),
                          independent_agreement=round((1 - rate) ** 2 + rate ** 2, 4))), flush=True)

    def scanned(remat):
        def attend(q, k, v, lengths):
            body = lambda c, x: (c, one(x[0], x[1], v, lengths))
            if remat:
                body = jax.checkpoint(body)
            return jax.lax.scan(body, 0, (q, k))[1]
        return attend

    def gradient_cache(q, k, v, lengths):
        """m3jax's gradient cache (m3jax.train.step.gradient_cache_loss_and_grads): pass 1 maps the chunks (here the
        `layers` axis) through one call site; pass 2 re-encodes chunk by chunk in the same order, forward and
        backward in one scan iteration, through other call sites."""
        @jax.custom_vjp
        def cached(q, k, v):
            return jax.lax.map(lambda x: one(x[0], x[1], v, lengths), (q, k))

        def fwd(q, k, v):
            return cached(q, k, v), (q, k, v)

        def bwd(res, g):
            q, k, v = res

            def body(dv, x):
                _, pull = jax.vjp(lambda a, b, c: one(a, b, c, lengths), *x[:2], v)
                dq, dk, dv_i = pull(x[2])
                return dv + dv_i, (dq, dk)

            dv, (dq, dk) = jax.lax.scan(body, jnp.zeros_like(v), (q, k, g.astype(q.dtype)))
            return dq, dk, dv

        cached.defvjp(fwd, bwd)
        return cached(q, k, v)

    for name, attend in (("scan", scanned(False)), ("scan_remat", scanned(True)), ("gradient_cache", gradient_cache),
                         ("unrolled", lambda q, k, v, n: jnp.stack([one(q[j], k[j], v, n, s0 + j)
                                                                    for j in range(layers)])),
                         ("unrolled_remat", lambda q, k, v, n: jnp.stack([
                             jax.checkpoint(lambda a, b, j=j: one(a, b, v, n, s0 + j))(q[j], k[j])
                             for j in range(layers)])),
                         ("unrolled_same_seed", lambda q, k, v, n: jnp.stack([one(q[j], k[j], v, n)
                                                                              for j in range(layers)]))):
        try:
            rec, _ = check(name, attend, rate, layers)
        except Exception as e:  # noqa: BLE001
            rec = dict(case=name, error=f"{type(e).__name__}: {str(e)[:300]}")
        print(json.dumps(rec), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
