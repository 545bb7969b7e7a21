"""GPU without a GPU: the tiny model's full train step compiled for an H100 by `m3jax plan --topology h100` on this
CPU host (XLA's deviceless GPU compile through jax's CUDA plugin: compile-only devices from a GPU target config),
in a subprocess, with XLA's dump of the compiled module; the optimised HLO's structure (kernels, the layer loops'
trip counts, copies, host transfers) and the command buffers of its thunk sequence are what the GPU would run.
Skipped without the plugin (pip install 'm3jax[cuda-aot]'); plain tests of the target names and of the HLO and
thunk readers run everywhere.
"""
import json
import os
import subprocess
import sys

import pytest

from m3jax import plan
from m3jax.core.xla_stats import hlo_structure, thunk_structure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAS_CUDA_PLUGIN = plan.cuda_plugin() is not None


def test_gpu_target_names_and_config():
    assert plan.parse_gpu_topology("h100") == ("h100", 1)
    assert plan.parse_gpu_topology("8xH200") == ("h200", 8) == plan.parse_gpu_topology("h200x8")
    for bad in ("a100", "0xh100", "2xh100x2", "v4-8"):
        assert plan.parse_gpu_topology(bad) is None
    assert plan.is_known_topology("v4-8") and plan.is_known_topology("h200") and not plan.is_known_topology("x")
    text = plan.GPU_TARGETS["h200"].target_config()
    assert "cuda_compute_capability { major: 9 minor: 0 feature_extension: ACCELERATED_FEATURES }" in text
    assert "core_count: 132" in text
    assert "device_memory_size: 150109880320" in text and 'device_description_str: "NVIDIA H200"' in text


def test_gpu_target_without_the_plugin_says_what_to_install(monkeypatch):
    monkeypatch.setattr(plan, "cuda_plugin", lambda: None)
    with pytest.raises(plan.PlanError, match=r"pip install 'm3jax\[cuda-aot\]'"):
        plan.gpu_target("h100")
    with pytest.raises(plan.PlanError, match="unknown; known: v4-8"):
        plan.gpu_target("a100")


HLO = """\
HloModule m, is_scheduled=true

%fused_add (p0: f32[8]) -> f32[8] {
  %p0 = f32[8]{0} parameter(0)
  ROOT %add.0 = f32[8]{0} add(%p0, %p0)
}

%gemm (p0: f32[8,8], p1: f32[8,8]) -> f32[8,8] {
  %p0 = f32[8,8]{1,0} parameter(0)
  %p1 = f32[8,8]{1,0} parameter(1)
  ROOT %dot.0 = f32[8,8]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%sum (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%body (t: (s32[], f32[8,8])) -> (s32[], f32[8,8]) {
  %t = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = f32[8,8]{1,0} get-tuple-element(%t), index=1
  %g = f32[8,8]{1,0} fusion(%x, %x), kind=kCustom, calls=%gemm, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
  %c = f32[8,8]{1,0} copy(%g)
  ROOT %r = (s32[], f32[8,8]{1,0}) tuple(%i, %c)
}

%cond (t: (s32[], f32[8,8])) -> pred[] {
  %t = (s32[], f32[8,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %n = s32[] constant(24)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (x: f32[8,8], v: f32[8]) -> (f32[8,8], f32[8], f32[]) {
  %x = f32[8,8]{1,0} parameter(0)
  %v = f32[8]{0} parameter(1)
  %zero = s32[] constant(0)
  %init = (s32[], f32[8,8]{1,0}) tuple(%zero, %x)
  %w = (s32[], f32[8,8]{1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"24"}}
  %y = f32[8,8]{1,0} get-tuple-element(%w), index=1
  %f = f32[8]{0} fusion(%v), kind=kLoop, calls=%fused_add
  %init0 = f32[] constant(0)
  %total = f32[] reduce(%v, %init0), dimensions={0}, to_apply=%sum
  %cb = f32[8]{0} custom-call(%f), custom_call_target="xla_python_gpu_callback"
  ROOT %out = (f32[8,8]{1,0}, f32[8]{0}, f32[]) tuple(%y, %cb, %total)
}
"""


def test_hlo_structure_counts_kernels_loops_copies_and_host_traffic():
    st = hlo_structure(HLO)
    # A loop fusion, a reduce and a callback at the top, a gemm fusion and a copy per iteration (24), the loop's
    # compare 25 times; not the reducer (to_apply) nor the fusion bodies.
    assert st["static"] == dict(copies=1, custom_calls=1, fusions=2, host_transfers=1, kernels=6, other_ops=2)
    assert st["per_step"]["kernels"] == 3 + 24 * 2 + 25 and st["per_step"]["copies"] == 24
    assert st["fusion_kinds"] == {"__triton_gemm": 1, "kLoop": 1}
    assert st["custom_calls"] == {"xla_python_gpu_callback": 1}
    assert st["while_loops"] == [dict(name="w", trip_count=24, runs_per_step=1, kernels_per_iteration=2)]
    assert st["copy_gib_per_step"] == round(24 * 8 * 8 * 4 / 2 ** 30, 3)


THUNKS = """\
000: kCommandBuffer [source | next=002 (1)]
    001: kCustomKernel [source | sink] loop_add_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
    002: kCopy [source | sink] kCopy
002: kWhile         [prev=000 (1) | next=000 (1)]
condition:
    003: kCustomKernel [source | sink] loop_compare_fusion grid: [1, 1, 1] threads: [1, 1, 1]  shared_memory: 0 bytes
  body:
    000: kCommandBuffer      [source       | next=000 (2)]
        004: kCustomKernel [source | sink] gemm_fusion_dot grid: [4, 1, 1] threads: [64, 1, 1]  shared_memory: 0 bytes
    005: kDynamicSliceFusion [source       | next=000 (1)] params=1, results=1
        006: kCopy [source | sink] kCopy
007: kCustomKernel [prev=002 (1) | sink] input_reduce_fusion grid: [1, 1, 1] threads: [32, 1, 1]  shared_memory: 0 bytes
"""


def test_thunk_structure_reads_command_buffers_by_indentation():
    th = thunk_structure(THUNKS)
    assert th["command_buffers"] == 2 and th["thunks_in_command_buffers"] == 3
    assert th["outside"] == dict(kWhile=1, kCustomKernel=2, kDynamicSliceFusion=1, kCopy=1)
    assert th["inside"] == dict(kCustomKernel=2, kCopy=1)


@pytest.mark.skipif(not HAS_CUDA_PLUGIN,
                    reason="jax's CUDA plugin is not installed (pip install 'm3jax[cuda-aot]': the plugin of this jax "
                           "version, ptxas and libdevice; no GPU needed)")
def test_tiny_train_step_compiles_for_h100_without_a_gpu(tmp_path):
    """The tiny model's full train step (unified loss, self-distillation, AdamW; cuDNN attention where cuDNN is
    installed, else XLA's, said so) compiled for one H100 by `m3jax plan`: it fits far below the budget (80 GB x
    jax's default 0.75), with its memory analysis and matmul FLOPs; the optimised HLO runs both layers in while
    loops of trip count 2 (forward and backward of the queries' and the passages' encoders), has no host transfer,
    and XLA's thunk sequence puts most kernels into command buffers (CUDA graphs)."""
    from m3jax.core.xla_stats import Shape, forward_flops
    from m3jax.model import encoder as m3model

    out, dump = tmp_path / "plan.json", tmp_path / "xla_dump"
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"--xla_dump_to={dump} --xla_dump_hlo_module_re=jit_step_fn")
    cmd = [sys.executable, "-m", "m3jax", "plan", "--topology", "h100", "--config",
           os.path.join(REPO, "configs", "toy.py"), "--model-config", "tiny", "--no-search",
           "--shapes", "8x4:32:128", "--output", str(out),
           "--config.model.attention_implementation=auto", "--config.model.dtype=bfloat16"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1200, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "1 x NVIDIA H100 80GB HBM3 (gpu)" in proc.stdout, proc.stdout
    cudnn = "attention cudnn," in proc.stdout
    assert cudnn or "attention cudnn -> xla: cuDNN is not installed" in proc.stdout, proc.stdout
    result = json.loads(out.read_text())
    assert result["target"] == dict(name="h100", devices=1, device_kind="NVIDIA H100 80GB HBM3", platform="gpu",
                                    hbm_gib=79.11)
    (small,) = result["shapes"]
    assert small["fits"] and small["error"] is None, small
    assert 0 < small["memory"]["argument_bytes"] < small["peak_bytes"] < 2 ** 30
    assert small["memory"]["temp_bytes"] > 0
    model = m3model.ModelConfig.from_hf_config(plan.TINY)
    in_kernel = 8 * 4 * 128 * model.num_hidden_layers * 4 * 128 * model.hidden_size if cudnn else 0
    assert small["matmul_flops"] >= 3 * (forward_flops(model, Shape(8, 4, 32, 128)) - in_kernel)
    st = small["structure"]
    loops = st["while_loops"]
    assert len(loops) >= 4 and all(lp["trip_count"] == model.num_hidden_layers for lp in loops), loops
    assert st["static"]["fusions"] > 50 and st["per_step"]["kernels"] > st["static"]["kernels"]
    assert st["per_step"].get("host_transfers", 0) == 0 and st["per_step"].get("collectives", 0) == 0
    assert any(k.startswith("__triton") for k in st["fusion_kinds"]), st["fusion_kinds"]
    if cudnn:
        assert any("cudnn" in t for t in st["custom_calls"]), st["custom_calls"]
    th = st["thunks"]
    assert th["command_buffers"] >= 1 and th["thunks_in_command_buffers"] > th["thunks_outside"], th
    assert th["outside"].get("kWhile", 0) == len(loops)
    assert "command buffers" in proc.stdout and "while loops (trips x kernels) 2x" in proc.stdout
