"""TPU without a TPU: splash attention's numerics (the Pallas kernel interpreted on CPU) against XLA's attention,
forward and gradient, with right padding and lengths that are not multiples of 128, on one device and sharded over
a CPU mesh; and the tiny model's full train step compiled for a TPU v4 topology (compile-only devices from libtpu,
in a subprocess so libtpu stays out of this one) through `m3jax plan`.
"""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from m3jax.config import default_config
from m3jax.core import sharding as shard_lib
from m3jax.model import attention as m3attention
from m3jax.model import encoder as m3model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(impl: str) -> m3model.ModelConfig:
    return m3model.ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                               intermediate_size=64, max_position_embeddings=300, attention_implementation=impl,
                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _qkv(b=3, length=200, n=2, d=16, seed=0):
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.standard_normal((b, length, n, d)), jnp.float32) for _ in range(3))
    lengths = jnp.asarray([length, 131, 7][:b], jnp.int32)  # full, just past one 128 tile, short
    return q, k, v, lengths


def _attention_loss(impl):
    def loss(q, k, v, lengths):
        out = m3attention.attention(q, k, v, lengths, implementation=_cfg(impl).attention_implementation)
        real = (jnp.arange(q.shape[1])[None, :] < lengths[:, None])[:, :, None, None]
        return jnp.sum(jnp.where(real, out, 0.0) * jnp.cos(jnp.arange(out.size).reshape(out.shape) * 0.1)), out
    return loss


def _real(x, lengths):
    return [np.asarray(x[i, :n]) for i, n in enumerate(np.asarray(lengths))]


def test_splash_matches_xla_forward_and_gradient_with_right_padding():
    q, k, v, lengths = _qkv()  # length 200: padded to 256 inside the kernel
    grads, outs = {}, {}
    for impl in ("xla", "splash-interpret"):
        (_, outs[impl]), grads[impl] = jax.value_and_grad(_attention_loss(impl), argnums=(0, 1, 2), has_aux=True)(
            q, k, v, lengths)
    assert outs["splash-interpret"].shape == q.shape
    for a, b in zip(_real(outs["xla"], lengths), _real(outs["splash-interpret"], lengths)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    for name, ga, gb in zip("qkv", grads["xla"], grads["splash-interpret"]):
        for a, b in zip(_real(ga, lengths), _real(gb, lengths)):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5, err_msg=f"d loss / d {name}")


def test_splash_falls_back_to_xla_below_one_tile():
    q, k, v, lengths = _qkv(length=100)
    a = m3attention.attention(q, k, v, lengths, implementation="xla")
    b = m3attention.attention(q, k, v, lengths, implementation="splash-interpret")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # the same XLA computation


def test_splash_keeps_bfloat16_inputs_in_bfloat16():
    """The kernel's output, and so the gradients of q, k and v, stay in the inputs' dtype: a float32 scale would
    promote q (and the output, and dq) to float32, doubling their memory on TPU (the bge-m3 step on v5e did not
    fit for it)."""
    q, k, v, lengths = (x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x for x in _qkv())
    out = jax.eval_shape(lambda q, k, v: m3attention.attention(q, k, v, lengths, implementation="splash-interpret"),
                         q, k, v)
    grads = jax.eval_shape(jax.grad(lambda q, k, v: jnp.sum(m3attention.attention(
        q, k, v, lengths, implementation="splash-interpret").astype(jnp.float32)), argnums=(0, 1, 2)), q, k, v)
    assert out.dtype == jnp.bfloat16 and [g.dtype for g in grads] == [jnp.bfloat16] * 3


def test_splash_sharded_over_a_cpu_mesh_matches_and_gathers_nothing():
    """Batch over data x fsdp, heads over tensor (the config's rules), on 8 CPU devices: same numbers as XLA's
    attention on one device, and the kernel runs per shard (no all-gather of q, k, v)."""
    q, k, v, lengths = _qkv(b=4, length=130, n=2)
    lengths = jnp.asarray([130, 129, 64, 1], jnp.int32)
    rules = default_config().sharding_rules
    mesh = shard_lib.make_mesh(shard_lib.MeshSettings(data=2, fsdp=2, tensor=2, sharding_rules=rules),
                               jax.devices()[:8])
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor", None))
    len_spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))

    def f(q, k, v, lengths):
        with shard_lib.tracing_context(mesh, rules):
            return jax.value_and_grad(_attention_loss("splash-interpret"), argnums=(0, 1, 2), has_aux=True)(
                q, k, v, lengths)

    sharded = jax.jit(f, in_shardings=(spec, spec, spec, len_spec), out_shardings=None)
    (_, out), grads = sharded(q, k, v, lengths)
    (_, ref), ref_grads = jax.value_and_grad(_attention_loss("xla"), argnums=(0, 1, 2), has_aux=True)(
        q, k, v, lengths)
    for a, b in zip(_real(ref, lengths), _real(out, lengths)):
        np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    for ga, gb in zip(ref_grads, grads):
        for a, b in zip(_real(ga, lengths), _real(gb, lengths)):
            np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
    hlo = sharded.lower(q, k, v, lengths).compile().as_text()
    assert "all-gather" not in hlo


HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
TPU_ENV = dict(JAX_PLATFORMS="cpu", TPU_SKIP_MDS_QUERY="1", ALLOW_MULTIPLE_LIBTPU_LOAD="1")


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'm3jax[tpu]'; .ci/run installs it)")
def test_tiny_train_step_compiles_for_tpu_v4_and_plan_reports_fit_memory_flops_and_oom(tmp_path):
    """The tiny model's full train step (unified loss, self-distillation, AdamW, splash attention for the 128-token
    passages) compiled for a v4-8 slice (4 megacore chips, data-parallel mesh) by `m3jax plan`, in a subprocess:
    a small shape fits with its peak far below 32 GiB and positive matmul FLOPs, twice the batch has more memory
    and twice the FLOPs, and a huge shape is RESOURCE_EXHAUSTED at compile time."""
    from m3jax.core.xla_stats import Shape, forward_flops
    from m3jax.plan import TINY

    out = tmp_path / "plan.json"
    env = dict(os.environ, **TPU_ENV)
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "m3jax", "plan", "--topology", "v4-8", "--config",
           os.path.join(REPO, "configs", "toy.py"), "--model-config", "tiny", "--no-search",
           "--shapes", "8x4:32:128,8192x8:32:2048", "--output", str(out),
           "--config.model.attention_implementation=auto", "--config.model.dtype=bfloat16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "attention flash-dropout" in proc.stdout and "4 x TPU v4" in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    assert result["target"] == dict(name="v4-8", devices=4, device_kind="TPU v4", platform="tpu", hbm_gib=32.0)
    small, huge = result["shapes"]
    assert small["fits"] and not huge["fits"], proc.stdout
    assert 0 < small["memory"]["argument_bytes"] < small["peak_bytes"] < 2 ** 30
    # Forward + backward of the encoder (no remat) at least: 3 x its forward matmuls, both layers of the scan --
    # except the passages' attention matmuls, which run inside the splash kernel (a Pallas custom call, no HLO dots).
    model = m3model.ModelConfig.from_hf_config(TINY)
    in_kernel = 8 * 4 * 128 * model.num_hidden_layers * 4 * 128 * model.hidden_size
    assert small["matmul_flops"] >= 3 * (forward_flops(model, Shape(8, 4, 32, 128)) - in_kernel)
    assert "RESOURCE_EXHAUSTED" in huge["error"] and huge["peak_bytes"] is None
    assert result["mesh"]["current"] == dict(data=4, fsdp=1, tensor=1)
    assert result["mesh"]["recommended"] == dict(data=4, fsdp=1, tensor=1)  # 7 MB of state: no need for fsdp
    assert result["compiles"] == 2, [(s["shape"], s["compile_s"]) for s in result["shapes"]]


def test_plan_tells_what_is_wrong(monkeypatch):
    from m3jax import plan
    from m3jax.cli import main as cli

    monkeypatch.setitem(sys.modules, "libtpu", None)  # as if not installed
    with pytest.raises(plan.PlanError, match=r"pip install 'm3jax\[tpu\]'"):
        plan.tpu_target("v5p-64")

    env_missing = {"--topology": "v9-8", "--shapes": "8x8:512"}
    for flag, value in env_missing.items():
        proc = subprocess.run([sys.executable, "-m", "m3jax", "plan", "--config",
                               os.path.join(REPO, "configs", "bge_m3_unified.py"), flag, value],
                              capture_output=True, text=True, cwd=REPO, timeout=120)
        assert proc.returncode == 2, proc.stderr
        assert ("unknown; known: v4-8" in proc.stderr) if flag == "--topology" else \
            ("expected BATCHxGROUP:QLEN:PLEN" in proc.stderr), proc.stderr
    assert cli.main(["plan", "--config", os.path.join(REPO, "configs", "bge_m3_unified.py"), "--no-search",
                     "--shapes", "1x1:8:8"]) == 2  # a CPU target without --memory-gib
