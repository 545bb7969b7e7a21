"""m3jax.core.xla_stats: shapes and the model-FLOP formula, the max-batch search, OOM detection, and the HLO statistics on
GPU/CPU-style HLO (dots, known trip counts) and on real TPU HLO (convolutions, trip counts read from the loop).

tests/data/tpu_v4_scan.hlo is the optimised HLO of this program, compiled for one TPU v4 chip with compile-only
devices on a CPU host (jax 0.10.2, libtpu 0.0.42.1; only the module's source-location tables are left out):

    B, L, H, N, D, LAYERS = 2, 8, 32, 4, 8, 24
    def f(x, ws):                                   # x f32[B, L, H], ws f32[LAYERS, H, N, D]
        with jax.named_scope("encoder"):
            def layer(x, w):
                q = jnp.einsum("blh,hnd->blnd", x, w)
                s = jnp.einsum("blnd,bmnd->bnlm", q, q)
                o = jnp.einsum("bnlm,bmnd->blnd", s, q).reshape(B, L, H)
                return o, None
            x = jax.lax.scan(layer, x, ws)[0]
        return jax.lax.while_loop(lambda x: jnp.sum(x) < 100.0, lambda x: x * 2.0, x)

Its three einsums are TPU convolutions (the batch dims as padded or dilated windows), its scan a while loop without a
known_trip_count annotation, and the second loop's trip count depends on the data.
"""
import importlib.util
import os
import types

import numpy as np
import pytest

from m3jax.core import xla_stats

TPU_HLO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tpu_v4_scan.hlo")


def test_shape_parsing_and_the_reference_flop_formula():
    s = xla_stats.Shape.parse("32x8:64:256")
    assert (s.batch, s.group, s.qlen, s.plen) == (32, 8, 64, 256) and str(s) == "32x8:64:256"
    for bad in ("32x8:64", "x8:64:256", "0x8:64:256", "32x8:1:256", "a"):
        with pytest.raises(xla_stats.BenchError):
            xla_stats.Shape.parse(bad)
    h, f, layers = 1024, 4096, 24  # the reference's flops_per_token at bge-m3's shape

    class Cfg:
        hidden_size, intermediate_size, num_hidden_layers = h, f, layers

    for length in (64, 256, 2048, 8192):
        assert xla_stats.flops_per_token(Cfg, length) == layers * (2 * (4 * h * h + 2 * h * f) + 4 * length * h)
    assert xla_stats.forward_flops(Cfg, s) == 32 * 64 * xla_stats.flops_per_token(Cfg, 64) + \
        256 * 256 * xla_stats.flops_per_token(Cfg, 256)
    assert xla_stats.tokens(s) == 32 * 64 + 32 * 8 * 256


def test_search_max_batch_doubles_then_bisects():
    tried = []

    def fits_up_to(n):
        def fits(b):
            tried.append(b)
            return b <= n
        return fits

    assert xla_stats.search_max_batch(fits_up_to(13), 4) == (13, 14)
    assert tried == [4, 8, 16, 12, 14, 13]
    tried.clear()
    assert xla_stats.search_max_batch(fits_up_to(2), 8) == (2, 3)  # the start itself does not fit
    assert xla_stats.search_max_batch(fits_up_to(0), 4) == (0, 1)
    tried.clear()
    assert xla_stats.search_max_batch(fits_up_to(13), 4, granularity=4) == (12, 16)
    assert tried == [4, 8, 16, 12]
    assert xla_stats.search_max_batch(fits_up_to(100), 4, granularity=1000) == (64, 128)


def test_search_max_batch_narrows_by_the_memory_line():
    """With the bytes of each try (a refused TPU compile says what it needed), the search tries the batch where
    the line through the measured points reaches the budget: same answer as bisection, fewer (fitting) tries."""
    def run(need, budget, start, **kw):
        tried, needs = [], {}

        def fits(b):
            tried.append(b)
            needs[b] = need(b)
            return needs[b] <= budget
        return xla_stats.search_max_batch(fits, start, needs=needs, budget=lambda: budget, **kw), tried

    affine = lambda b: 100 + 7 * b  # noqa: E731 -- budget 1000: 128 fits, 129 does not
    assert abs(xla_stats.predict_boundary({8: affine(8), 256: affine(256)}, 1000) - (128 + 4 / 7)) < 1e-9
    assert abs(xla_stats.predict_boundary({512: affine(512)}, 1000) - 512000 / affine(512)) < 1e-9  # via 0
    assert xla_stats.predict_boundary({}, 1000) is None and xla_stats.predict_boundary({1: 5, 2: 5}, 9) is None
    # Doubling as before, then one try to close the bracket instead of bisection's seven (192, 160, ..., 129).
    assert run(affine, 1000, 8) == ((128, 129), [8, 16, 32, 64, 128, 256, 129])
    # The start refused: proportional guess (refused too), then the line through the two refused sizes.
    assert run(affine, 1000, 512) == ((128, 129), [512, 138, 128, 129])
    assert run(affine, 1000, 512, granularity=8) == ((128, 129), [512, 138, 128, 129])
    # Memory far from a line: still the exact answer (a guess that does not halve the bracket is followed by a
    # bisection step).
    for need in (lambda b: 10 + b * b, lambda b: 2000 if b > 37 else 0, lambda b: 50 * b ** 0.5):
        (best, fail), tried = run(need, 1000, 4)
        expect = xla_stats.search_max_batch(lambda b, need=need: need(b) <= 1000, 4)
        assert (best, fail) == expect and need(best) <= 1000 < need(fail) and len(tried) <= 14


def test_oom_becomes_an_error_line():
    assert xla_stats.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB"))
    assert xla_stats.is_oom(MemoryError())
    assert not xla_stats.is_oom(ValueError("shapes do not match"))


def test_target_device_is_the_meshs_not_the_hosts():
    import jax

    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("data",))
    assert xla_stats.target_device(mesh) == dict(backend="cpu", device_kind=jax.devices()[0].device_kind)
    tpu = types.SimpleNamespace(platform="tpu", device_kind="TPU v4")  # what compile-only TPU devices report
    fake_mesh = types.SimpleNamespace(devices=np.asarray([tpu, tpu]))
    assert xla_stats.target_device(fake_mesh) == dict(backend="tpu", device_kind="TPU v4")


# ---------------------------------------------------------------------------------------------------------------
# HLO statistics


def test_hlo_stats_weights_dots_by_while_trip_counts():
    hlo = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %x = f32[4,8]{1,0} get-tuple-element(%p), index=1
  %w = f32[8,8]{1,0} constant({...})
  %d = f32[4,8]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(f)/encoder/while/body/dot_general"}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %d)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[4,8], v: f32[3,250002]) -> f32[4,8] {
  %a = f32[4,8]{1,0} parameter(0)
  %v = f32[3,250002]{1,0} parameter(1)
  %z = s32[] constant(0)
  %t = (s32[], f32[4,8]{1,0}) tuple(%z, %a)
  %w = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"24"}}
  %y = f32[4,8]{1,0} get-tuple-element(%w), index=1
  ROOT %e = f32[4,8]{1,0} dot(%y, %a), lhs_contracting_dims={0}, rhs_contracting_dims={0}
}
"""
    stats = xla_stats.hlo_stats(hlo, vocab_size=250002)
    assert stats["matmul_flops_by_part"]["encoder"] == 24 * 2 * 4 * 8 * 8
    assert stats["matmul_flops_by_part"]["loss_and_rest"] == 2 * 4 * 8 * 4
    assert stats["while_trip_counts"] == [24] and stats["unknown_trip_counts"] == 0
    assert stats["largest_vocab_array_elements"] == 3 * 250002


def test_hlo_stats_on_real_tpu_hlo():
    """The scan's 24 layers, each 2*B*L*H*N*D (projection) + 2 x 2*B*N*L*L*D (the two attention-like einsums)
    FLOPs, all TPU convolutions; the scan's trip count read from its condition; the data-dependent loop unknown."""
    with open(TPU_HLO, encoding="utf-8") as f:
        text = f.read()
    assert " convolution(" in text and "known_trip_count" not in text and " dot(" not in text
    b, l, h, n, d, layers = 2, 8, 32, 4, 8, 24
    per_layer = 2 * b * l * h * n * d + 2 * (2 * b * n * l * l * d)
    stats = xla_stats.hlo_stats(text)
    assert stats["matmul_flops"] == layers * per_layer == 1_179_648
    assert stats["matmul_flops_by_part"] == {"encoder": layers * per_layer}
    assert stats["dot_instructions"] == 3
    assert stats["while_trip_counts"] == [24, 1] and stats["unknown_trip_counts"] == 1


def test_convolution_flops_of_tpu_matmuls():
    """Convolutions of m3jax's train step compiled for TPU v4 (tiny model; per device 64 tokens of hidden 64, 4
    heads of 16): no window, a plain window over the contracted tokens, and a padded window over the heads."""
    # colbert_linear weight gradient: sum over 4 x 15 tokens of a 64 x 64 outer product
    assert xla_stats.convolution_flops("f32[64,64,1]", "bf16[4,15,64]", "f32[4,15,64]",
                                       "window={size=4}, dim_labels=0fb_0io->bf0") == 2 * 60 * 64 * 64
    # the query projection: 64 tokens x hidden 64 -> 4 heads x 16, the heads a padded window (one real tap each)
    assert xla_stats.convolution_flops("bf16[4,16,4,16]", "bf16[4,16,64,1]", "bf16[64,4,16,1]",
                                       "window={size=1x4 pad=0_0x3_3 rhs_reversal=0x1}, "
                                       "dim_labels=0bf1_i1o0->0b1f") == 2 * 64 * 64 * 64
    # the key projection's weight gradient: heads a padded window, the 4 x 16 tokens contracted
    assert xla_stats.convolution_flops("bf16[64,4,16,1]", "bf16[4,16,64,1]", "bf16[4,16,4,16]",
                                       "window={size=4x4 pad=3_3x0_0 rhs_reversal=1x0}, "
                                       "dim_labels=1fb0_1i0o->b0f1") == 2 * 64 * 64 * 64
    # attention scores q.k per head (4 sequences, 4 heads, 16 x 16 positions, head dim 16): batch dims dilated
    assert xla_stats.convolution_flops("f32[4,4,16,16]", "bf16[4,16,4,16]", "bf16[4,16,4,16]",
                                       "window={size=4x4 stride=3x3 lhs_dilate=4x4}, "
                                       "dim_labels=0b1f_0o1i->01bf") == 2 * 4 * 4 * 16 * 16 * 16
    # a plain matmul [2, 1000] x [4, 1000]^T
    assert xla_stats.convolution_flops("f32[2,4]", "f32[2,1000]", "f32[4,1000]", "dim_labels=bf_oi->bf") == \
        2 * 2 * 4 * 1000


_LOOP = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {{
  %p = (s32[], f32[4,8]{{1,0}}) parameter(0)
  %x = f32[4,8]{{1,0}} get-tuple-element(%p), index=1
  %w = f32[8,8]{{1,0}} constant({{...}})
  %d = f32[4,8]{{1,0}} dot(%x, %w), lhs_contracting_dims={{1}}, rhs_contracting_dims={{0}}
  %i = s32[] get-tuple-element(%p), index=0
  %one = s32[] constant({step})
  %next = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[4,8]{{1,0}}) tuple(%next, %d)
}}

%cond (p: (s32[], f32[4,8])) -> pred[] {{
  %p = (s32[], f32[4,8]{{1,0}}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %copy = s32[] copy(%i)
  %n = s32[] constant({limit})
  ROOT %c = pred[] compare({lhs}, {rhs}), direction={direction}
}}

ENTRY %main (a: f32[4,8]) -> f32[4,8] {{
  %a = f32[4,8]{{1,0}} parameter(0)
  %z = s32[] constant({start})
  %zc = s32[] copy(%z)
  %t = (s32[], f32[4,8]{{1,0}}) tuple(%zc, %a)
  %w = (s32[], f32[4,8]{{1,0}}) while(%t), condition=%cond, body=%body
  ROOT %y = f32[4,8]{{1,0}} get-tuple-element(%w), index=1
}}
"""


@pytest.mark.parametrize("lhs, rhs, direction, start, limit, step, trips", [
    ("%copy", "%n", "LT", 0, 24, 1, 24),  # i < 24, the scan's form
    ("%n", "%copy", "GT", 0, 24, 1, 24),  # 24 > i
    ("%copy", "%n", "LE", 0, 23, 1, 24),  # i <= 23
    ("%copy", "%n", "LT", 4, 24, 2, 10),  # from 4 in steps of 2
    ("%copy", "%n", "NE", 0, 6, 1, 6),
    ("%copy", "%n", "LT", 5, 3, 1, 0),  # never runs
    ("%copy", "%n", "GT", 0, 24, 1, None),  # i > 24 from 0: not a counting loop
    ("%copy", "%copy", "LT", 0, 24, 1, None),  # no constant
])
def test_trip_count_read_from_the_loop(lhs, rhs, direction, start, limit, step, trips):
    text = _LOOP.format(lhs=lhs, rhs=rhs, direction=direction, start=start, limit=limit, step=step)
    stats = xla_stats.hlo_stats(text)
    assert stats["unknown_trip_counts"] == (trips is None)
    assert stats["matmul_flops"] == (1 if trips is None else trips) * 2 * 4 * 8 * 8


# ---------------------------------------------------------------------------------------------------------------
# The tiny model's train step compiled for TPU (only where libtpu is installed)


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (compile-only TPU devices)")
def test_tiny_train_step_compiled_for_tpu(monkeypatch):
    """benchmarks.train_step.Bench over a compile-only v4 2x2x1 slice: the record names the TPU, the trip count of
    the layer loop is read from the HLO, and the encoder's matmuls are 4x the forward formula (full remat)."""
    monkeypatch.setenv("TPU_SKIP_MDS_QUERY", "1")
    monkeypatch.setenv("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    from benchmarks import train_step

    devices = topologies.get_topology_desc(platform="tpu", topology_name="v4:2x2x1", chip_config_name="megacore",
                                           chips_per_host_bounds=(2, 2, 1), num_slices=1).devices
    parser = train_step.argparse.ArgumentParser()
    train_step.add_arguments(parser)
    args = parser.parse_args(["--tiny", "--analyze", "--mesh", "data=2,fsdp=2"])
    rec = train_step.Bench(args, remat="full", for_run=False, devices=devices).analyze(
        xla_stats.Shape.parse("4x3:16:40"))
    assert rec["backend"] == "tpu" and rec["device_kind"].startswith("TPU v4") and rec["devices"] == 4
    assert rec["while_trip_counts"] == [2] and rec["unknown_trip_counts"] == 0  # the tiny model's 2 layers
    assert rec["encoder_matmul_ratio"] == 4.0
    assert rec["matmul_flops_by_part"]["encoder"] == 4 * rec["model_forward_flops"]
    assert rec["total_bytes"] > 0
