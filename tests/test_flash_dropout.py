"""Attention dropout inside the flash kernel (issue 28): the Pallas kernel (m3jax.model.flash_dropout, interpreted on CPU)
against the XLA path with the same hash-drawn mask -- outputs and gradients of q, k, v within 1e-5 in float32 with
dropout on, on one device and sharded over a CPU mesh; the mask the kernel applies read back bit for bit; keep rates
within statistical bounds; different rows, heads, layers and steps drawing different masks; rate 0 equal to the
kernel without dropout. Shapes are small (a few 128-blocks) so that the interpreted kernels stay fast.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.config import default_config
from m3jax.core import sharding as shard_lib
from m3jax.model import attention as m3attention
from m3jax.model import encoder as m3model
from m3jax.model import flash_dropout as fd
from m3jax.model import loading

RATE = 0.1
SEED = jnp.asarray([20260, -7], jnp.int32)


def _qkv(b=3, length=300, n=2, d=16, seed=0, lengths=(300, 131, 7)):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, length, n, d)), jnp.float32) for _ in range(3))
    return q, k, v, jnp.asarray(lengths[:b], jnp.int32)


def _loss(impl, dropout):
    def loss(q, k, v, lengths):
        out = m3attention.attention(q, k, v, lengths, implementation=impl, dropout=dropout)
        real = (jnp.arange(q.shape[1])[None, :] < lengths[:, None])[:, :, None, None]
        return jnp.sum(jnp.where(real, out, 0.0) * jnp.cos(jnp.arange(out.size).reshape(out.shape) * 0.1)), out
    return loss


def _real(x, lengths):
    return [np.asarray(x[i, :n]) for i, n in enumerate(np.asarray(lengths))]


def _value_and_grads(impl, dropout, q, k, v, lengths):
    (_, out), grads = jax.value_and_grad(_loss(impl, dropout), argnums=(0, 1, 2), has_aux=True)(q, k, v, lengths)
    return out, grads


def _assert_close(ref, got, lengths, atol=1e-5):
    (out_a, grads_a), (out_b, grads_b) = ref, got
    for a, b in zip(_real(out_a, lengths), _real(out_b, lengths)):
        np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5, err_msg="output")
    for name, ga, gb in zip("qkv", grads_a, grads_b):
        for a, b in zip(_real(ga, lengths), _real(gb, lengths)):
            np.testing.assert_allclose(a, b, atol=atol, rtol=1e-5, err_msg=f"d loss / d {name}")


def test_kernel_with_dropout_matches_the_xla_path_forward_and_gradient():
    """Length 300 (padded to 384: 3 x 3 blocks of 128), rows of 300, 131 and 7 real tokens, rate 0.1: the
    interpreted kernel and XLA's attention on materialised probabilities with the same mask agree within 1e-5."""
    q, k, v, lengths = _qkv()
    dropout = m3attention.Dropout(RATE, SEED)
    ref = _value_and_grads("xla", dropout, q, k, v, lengths)
    got = _value_and_grads("flash-dropout-interpret", dropout, q, k, v, lengths)
    assert got[0].shape == q.shape
    _assert_close(ref, got, lengths)
    # ... and dropout did something: without it the outputs differ.
    plain = _value_and_grads("xla", None, q, k, v, lengths)
    assert np.abs(np.asarray(plain[0][0]) - np.asarray(got[0][0])).max() > 1e-2


def test_the_kernel_applies_the_reference_mask_bit_for_bit():
    """q = k = 0 (uniform probabilities 1/L) and v = the identity: the kernel's output is its scaled keep mask,
    which must be `reference_keep` exactly (every (query, key) of 2 heads x 256 x 256 across 2 x 2 blocks)."""
    b, n, length = 1, 2, 256
    zeros = jnp.zeros((b, n, length, length), jnp.float32)
    eye = jnp.broadcast_to(jnp.eye(length, dtype=jnp.float32), (b, n, length, length))
    seg = jnp.ones((b, length), jnp.int32)
    keys = fd.row_head_keys(SEED, b, n)
    out = fd.flash_attention(zeros, zeros, eye, seg, seg, keys, rate=0.3, block_q=128, block_k=128, interpret=True)
    kernel_keep = np.asarray(out) > 0
    np.testing.assert_allclose(np.asarray(out)[kernel_keep], 1 / 0.7 / length, rtol=1e-6)
    np.testing.assert_array_equal(kernel_keep, np.asarray(fd.reference_keep(keys, length, length, 0.3)))


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_keep_rate_is_within_statistical_bounds(rate):
    """1M draws (4 rows x 4 heads x 256 x 256): the keep rate within 5 sigma of 1 - rate overall, per (row, head),
    per query position and per key position (bounds from the binomial's sigma at each count)."""
    b, n, length = 4, 4, 256
    keep = np.asarray(fd.reference_keep(fd.row_head_keys(SEED, b, n), length, length, rate), np.float64)
    p = 1.0 - rate

    def check(means, count):
        sigma = np.sqrt(p * (1 - p) / count)
        assert np.abs(means - p).max() < 5 * sigma, (means.min(), means.max(), p, sigma)

    check(np.array([keep.mean()]), keep.size)
    check(keep.mean(axis=(2, 3)).ravel(), length * length)
    check(keep.mean(axis=(0, 1, 3)), b * n * length)
    check(keep.mean(axis=(0, 1, 2)), b * n * length)
    assert abs(fd.drop_threshold(rate) / 2 ** fd.KEEP_BITS - rate) < 2 ** -fd.KEEP_BITS


def _agreement(a, b):
    return float((np.asarray(a) == np.asarray(b)).mean())


def test_rows_heads_and_seeds_draw_different_masks():
    """Every (row, head) has its own key; masks of different rows, heads or seeds agree on about
    p^2 + (1-p)^2 of their entries, as independent draws would (0.82 at rate 0.1), not on all."""
    b, n, length = 3, 4, 128
    keys = fd.row_head_keys(SEED, b, n)
    other = fd.row_head_keys(SEED.at[0].add(1), b, n)
    assert len(set(np.asarray(keys).ravel().tolist() + np.asarray(other).ravel().tolist())) == 2 * b * n
    masks, masks_other = (np.asarray(fd.reference_keep(x, length, length, RATE)) for x in (keys, other))
    independent = RATE ** 2 + (1 - RATE) ** 2
    for a, b_ in ((masks[0, 0], masks[1, 0]), (masks[0, 0], masks[0, 1]), (masks[2, 3], masks_other[2, 3])):
        assert abs(_agreement(a, b_) - independent) < 0.01
    # Within one (row, head): query rows and key columns are not copies of each other either.
    m = masks[0, 0]
    assert abs(_agreement(m[0], m[1]) - independent) < 0.08 and abs(_agreement(m[:, 0], m[:, 1]) - independent) < 0.08


def test_layers_and_steps_draw_different_seeds(tiny_ckpt, monkeypatch):
    """The tiny model in training mode: each layer's attention gets its own seed (the layer's flax dropout rng),
    and the same layer at another step (another step key, as step.py folds it in) another one."""
    seen = []
    original = m3attention.attention

    def recording(q, k, v, lengths, *, implementation, dropout=None, **kw):
        jax.debug.callback(lambda s: seen.append(tuple(np.asarray(s).tolist())), dropout.seed)
        return original(q, k, v, lengths, implementation=implementation, dropout=dropout, **kw)

    monkeypatch.setattr(m3attention, "attention", recording)
    cfg, params, _ = loading.load_model(tiny_ckpt)
    model = m3model.BGEM3(cfg)
    ids = jnp.asarray([[0, 5, 6, 2]], jnp.int32)
    for step in (1, 2):
        key = jax.random.fold_in(jax.random.key(0), step)
        jax.block_until_ready(model.apply({"params": params}, ids, jnp.ones_like(ids), deterministic=False,
                                          rngs={"dropout": key}))
    assert len(seen) == 2 * cfg.num_hidden_layers and len(set(seen)) == len(seen), seen


def test_rate_zero_is_the_kernel_without_dropout():
    """Rate 0 (with keys given) is bit for bit the kernel without dropout, and that kernel is XLA's attention
    within 1e-5 (outputs and gradients); through `attention`, a Dropout of rate 0 is no dropout."""
    q, k, v, lengths = _qkv(b=2, length=256, lengths=(256, 200))
    heads = lambda x: jnp.swapaxes(x, 1, 2)
    seg = (jnp.arange(256)[None, :] < lengths[:, None]).astype(jnp.int32)

    def kernel(keys, rate):
        f = lambda q, k, v: fd.flash_attention(heads(q), heads(k), heads(v), seg, seg, keys, rate=rate,
                                               block_q=128, block_k=128, interpret=True)
        return jax.value_and_grad(lambda *a: jnp.sum(f(*a) * jnp.sin(jnp.arange(f(*a).size).reshape(
            f(*a).shape))), argnums=(0, 1, 2))(q, k, v)

    a, b = kernel(fd.row_head_keys(SEED, 2, 2), 0.0), kernel(None, 0.0)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)
    _assert_close(_value_and_grads("xla", None, q, k, v, lengths),
                  _value_and_grads("flash-dropout-interpret", m3attention.Dropout(0.0, SEED), q, k, v, lengths),
                  lengths)


def test_short_sequences_use_the_xla_path_with_the_same_mask():
    """Below one 128 tile flash-dropout runs XLA's attention, dropout applied by the same rule."""
    q, k, v, lengths = _qkv(b=2, length=100, lengths=(100, 50))
    dropout = m3attention.Dropout(RATE, SEED)
    a = m3attention.attention(q, k, v, lengths, implementation="xla", dropout=dropout)
    b = m3attention.attention(q, k, v, lengths, implementation="flash-dropout-interpret", dropout=dropout)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_kernel_on_packed_rows_matches_the_xla_path():
    """Packed rows (segments 1, 2, ... and padding 0, m3jax.core.packing) of 200 tokens, rate 0.1: the kernel with
    the rows' segment ids (pallas_call in the trace) and XLA's segment-masked path draw the same mask; outputs and
    gradients of the real tokens within 1e-5."""
    q, k, v, _ = _qkv(b=2, length=200)
    ends = [(0, 60, 61, 190), (0, 3, 130, 200)]  # segment boundaries per row: short, long, one-token texts
    seg = np.zeros((2, 200), np.int32)
    for r, cuts in enumerate(ends):
        for s, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            seg[r, a:b] = s + 1
    seg = jnp.asarray(seg)
    dropout = m3attention.Dropout(RATE, SEED)

    def run(impl):
        def loss(q, k, v):
            out = m3attention.attention(q, k, v, None, implementation=impl, dropout=dropout, segment_ids=seg)
            real = (seg > 0)[:, :, None, None]
            return jnp.sum(jnp.where(real, out, 0.0) * jnp.cos(jnp.arange(out.size).reshape(out.shape) * 0.1)), out
        return loss

    ref = jax.value_and_grad(run("xla"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    got = jax.value_and_grad(run("flash-dropout-interpret"), argnums=(0, 1, 2), has_aux=True)(q, k, v)
    assert "pallas_call" in str(jax.make_jaxpr(run("flash-dropout-interpret"))(q, k, v))
    assert "pallas_call" not in str(jax.make_jaxpr(run("xla"))(q, k, v))
    real = np.asarray(seg) > 0
    for a, b in zip([ref[0][1], *ref[1]], [got[0][1], *got[1]]):
        np.testing.assert_allclose(np.asarray(a)[real], np.asarray(b)[real], atol=1e-5, rtol=1e-5)
    plain = m3attention.attention(q, k, v, None, implementation="xla", segment_ids=seg)
    assert np.abs(np.asarray(plain)[real] - np.asarray(got[0][1])[real]).max() > 1e-2  # dropout did something


def test_kernel_keeps_bfloat16_inputs_in_bfloat16():
    q, k, v, lengths = _qkv(b=2, length=128, lengths=(128, 9))
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    dropout = m3attention.Dropout(RATE, SEED)
    f = lambda q, k, v: m3attention.attention(q, k, v, lengths, implementation="flash-dropout-interpret",
                                              dropout=dropout)
    grads = jax.eval_shape(jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=(0, 1, 2)), q, k, v)
    assert jax.eval_shape(f, q, k, v).dtype == jnp.bfloat16 and [g.dtype for g in grads] == [jnp.bfloat16] * 3


def test_kernel_sharded_over_a_cpu_mesh_draws_the_global_mask():
    """Batch over data x fsdp, heads over tensor on 8 CPU devices: the per-shard kernels draw the masks of their
    global rows and heads, so the result equals the XLA path on one device (within 1e-5), with no all-gather."""
    q, k, v, lengths = _qkv(b=4, length=130, n=2, lengths=(130, 129, 64, 1))
    dropout = m3attention.Dropout(RATE, SEED)
    rules = default_config().sharding_rules
    mesh = shard_lib.make_mesh(shard_lib.MeshSettings(data=2, fsdp=2, tensor=2, sharding_rules=rules),
                               jax.devices()[:8])
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None))
    len_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    def f(q, k, v, lengths):
        with shard_lib.tracing_context(mesh, rules):
            (_, out), grads = jax.value_and_grad(_loss("flash-dropout-interpret", dropout), argnums=(0, 1, 2),
                                                 has_aux=True)(q, k, v, lengths)
            return out, grads

    sharded = jax.jit(f, in_shardings=(spec, spec, spec, len_spec), out_shardings=None)
    _assert_close(_value_and_grads("xla", dropout, q, k, v, lengths), sharded(q, k, v, lengths), lengths)
    assert "all-gather" not in sharded.lower(q, k, v, lengths).compile().as_text()


def test_resolve_attention_picks_the_dropout_kernel_on_tpu():
    assert loading.resolve_attention("auto", "tpu") == "flash-dropout"
    assert loading.resolve_attention("flash-dropout", "cpu") == "flash-dropout-interpret"
    assert loading.resolve_attention("splash", "tpu") == "splash"  # the old fused path, no attention dropout
    assert loading.resolve_attention("auto", "gpu") == "cudnn" and loading.resolve_attention("auto", "cpu") == "xla"
    with pytest.raises(ValueError, match="flash-dropout"):
        loading.resolve_attention("flash")
