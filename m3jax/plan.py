"""Plan a run before booking the hardware: compile its real train step for a TPU slice (or the local device) and
read what the compiler says -- per-chip memory, fits or not, matmul FLOPs, the largest per-chip batch that fits.

    m3jax plan --topology v5p-64 --config configs/bge_m3_unified.py [--config.<field>=...] [--shapes 8x8:512:2048]

How: with `libtpu` installed (`pip install 'm3jax[tpu]'`), `jax.experimental.topologies` builds compile-only TPU
devices on any host; the step the trainer would run (`Stepper.build` on the run config's step settings, the same
mesh and sharding rules, attention resolved for TPU) is lowered on abstract state and batches (`jax.eval_shape`: no
weights are loaded or allocated) and compiled by the real TPU compiler. A step that does not fit fails to compile
with RESOURCE_EXHAUSTED; one that fits reports its memory (`compiled.memory_analysis()`). MaxText's
train_compile.py works the same way. Without --topology the target is this host's devices (a GPU: fits = peak <= the
device's memory limit; a CPU: against --memory-gib).

Step shapes come from --shapes (BATCHxGROUP:QLEN:PLEN, per batch shard), else from the run's data when
config.train_data is set (every (batch, group) the data produces, at its longest padded lengths: the most memory),
else from the config's batch-size table (each `LO-HI` bucket's batch at passage length min(HI, passage_max_len),
padded like the data pipeline pads it, query length query_max_len; plus per_device_train_batch_size at the max
lengths).

The same search sizes the batches of a run with `batch_size_by_length="auto"` (`auto_batch_sizes`): each length
bucket's per-device batch is the largest that compiles within the device's memory (or config.auto_batch_memory_gib),
cached on disk (storage.cache_dir("auto_batch")) by the step's settings, model dims, shape, mesh, device kind and
jax version.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
import time
from typing import Any

from m3jax import config as config_lib
from m3jax.config import RESEARCH_BATCH_SIZE_BY_LENGTH, train_data_dirs
from m3jax.core import sharding as shard_lib
from m3jax.core import storage
from m3jax.core.errors import M3JaxError
from m3jax.core.padding import length_buckets, pad_length
from m3jax.core.xla_stats import (
    GIB,
    BenchError,
    Shape,
    hlo_stats,
    hlo_structure,
    is_oom,
    memory_record,
    search_max_batch,
    short,
    thunk_structure,
)
from m3jax.data import build as data_build
from m3jax.data.files import list_dataset_files
from m3jax.io import hf_layout, hf_read
from m3jax.model import loading
from m3jax.train.step import GRADIENT_CACHE_CHUNK_ROWS, Chunking, Stepper, StepSettings

logger = logging.getLogger(__name__)


class PlanError(M3JaxError, ValueError):
    """A topology, shape or setting `m3jax plan` (or batch_size_by_length="auto") cannot work with."""


# MaxText's names (accelerator type -> topology, chip config, chips per host). Megacore chips (v4, v5p) are one
# device of two TensorCores; v4-8 is 4 chips, v5p-64 is 32.
TOPOLOGIES = {
    "v4-8": ("v4:2x2x1", "megacore", (2, 2, 1)),
    "v4-16": ("v4:2x2x2", "megacore", (2, 2, 1)),
    "v4-32": ("v4:2x2x4", "megacore", (2, 2, 1)),
    "v4-64": ("v4:2x4x4", "megacore", (2, 2, 1)),
    "v4-128": ("v4:4x4x4", "megacore", (2, 2, 1)),
    "v5p-8": ("v5:2x2x1", "megacore", (2, 2, 1)),
    "v5p-16": ("v5:2x2x2", "megacore", (2, 2, 1)),
    "v5p-32": ("v5:2x2x4", "megacore", (2, 2, 1)),
    "v5p-64": ("v5:2x4x4", "megacore", (2, 2, 1)),
    "v5p-128": ("v5:4x4x4", "megacore", (2, 2, 1)),
    "v5litepod-4": ("v5e:2x2", "default", (2, 2, 1)),
    "v5litepod-8": ("v5e:2x4", "default", (2, 4, 1)),
    "v5litepod-16": ("v5e:4x4", "default", (2, 4, 1)),
    "v5litepod-32": ("v5e:4x8", "default", (2, 4, 1)),
    "v5litepod-64": ("v5e:8x8", "default", (2, 4, 1)),
    "v6e-8": ("v6e:2x4", "default", (2, 4, 1)),
    "v6e-16": ("v6e:4x4", "default", (2, 4, 1)),
    "v6e-32": ("v6e:4x8", "default", (2, 4, 1)),
    "v6e-64": ("v6e:8x8", "default", (2, 4, 1)),
}
# HBM per chip by jax's device_kind (the compiler's usable limit is a little lower: its RESOURCE_EXHAUSTED
# messages say e.g. 30.75 GiB on v4, 15.75 GiB on v5e).
HBM_GIB = {"TPU v4": 32, "TPU v5 lite": 16, "TPU v5": 95, "TPU v5p": 95, "TPU v6 lite": 32, "TPU v6e": 32}

# config.json of BAAI/bge-m3 (XLMRobertaModel), the fields m3jax reads: plan bge-m3 without its 2 GB of weights.
BGE_M3 = dict(vocab_size=250002, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
              intermediate_size=4096, max_position_embeddings=8194, type_vocab_size=1, pad_token_id=1,
              layer_norm_eps=1e-5, hidden_act="gelu", position_embedding_type="absolute",
              hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
TINY = dict(BGE_M3, vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128)
MODEL_PRESETS = {"bge-m3": BGE_M3, "tiny": TINY}


# ---------------------------------------------------------------------------------------------------------------
# Targets: a TPU topology of compile-only devices, or this host's devices


@dataclasses.dataclass
class Target:
    name: str  # v5p-64, or "local gpu" ...
    devices: list
    platform: str
    device_kind: str
    hbm_bytes: int | None  # per chip (None: unknown, e.g. a CPU)
    budget_bytes: int | None  # fits = peak <= this; None: the compiler decides (TPU: RESOURCE_EXHAUSTED)


def prepare_tpu_environment() -> None:
    """Environment for compile-only TPU devices on a host without TPUs; call before jax initialises a backend."""
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server: do not wait for it
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # another process (a run, a plan) may hold libtpu
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the host's own backend; TPU devices come from the topology
    import jax

    # jax read JAX_PLATFORMS when it was imported (with this module); its config takes the value until a backend
    # starts.
    jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def tpu_target(name: str, *, memory_gib: float | None = None) -> Target:
    """Compile-only devices of a TPU slice by MaxText's name (v4-8, v5p-64, v5litepod-8, ...)."""
    if name not in TOPOLOGIES:
        raise PlanError(f"--topology {name!r}: unknown; known: {', '.join(TOPOLOGIES)}")
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise PlanError(f"--topology {name}: compiling for TPU needs libtpu on this host: pip install 'm3jax[tpu]'"
                        ) from None
    from jax.experimental import topologies

    topology, chip_config, host_bounds = TOPOLOGIES[name]
    try:
        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name=chip_config,
                                               chips_per_host_bounds=host_bounds, num_slices=1).devices
    except Exception as e:  # noqa: BLE001 -- libtpu's errors are plain RuntimeErrors
        raise PlanError(f"--topology {name} ({topology}, {chip_config}): libtpu cannot describe it: {short(e)}"
                        ) from e
    kind = devices[0].device_kind
    hbm = HBM_GIB.get(kind)
    return Target(name, list(devices), "tpu", kind, None if hbm is None else hbm * GIB,
                  None if memory_gib is None else int(memory_gib * GIB))


# ---------------------------------------------------------------------------------------------------------------
# GPU targets without a GPU: XLA's deviceless (ahead-of-time) GPU compilation through jax's CUDA PJRT plugin.
# The plugin describes a topology of compile-only GPUs from a GpuTargetConfigProto (text format) instead of a
# device query; the compile runs XLA's whole GPU pipeline (fusion, layouts, scheduling, buffer assignment, LLVM ->
# PTX, ptxas) as it would for an attached GPU, except autotuning (no device to time kernels on: GEMM fusions get
# XLA's default tilings). It needs ptxas and libdevice (the `cuda-aot` extra installs both from PyPI, or the
# system CUDA toolkit's).


# Hopper's execution units per SM as the driver reports them (XLA's cost model reads them): XLA primitive type ->
# (clock GHz, units per SM, ops per clock); scalar units, then tensor cores. Read from an H200 (jax 0.11.2).
_HOPPER_SCALAR = {4: (1.98, 64, 1), 8: (1.98, 64, 1), 10: (1.98, 128, 2), 11: (1.98, 128, 1), 12: (1.98, 64, 1),
                  16: (1.98, 128, 2)}
_HOPPER_MATRIX = {2: 1024, 6: 1024, 10: 512, 11: 256, 12: 32, 16: 512, 19: 1024, 20: 1024, 23: 1024, 24: 1024,
                  25: 1024, 28: 1024, 29: 1024, 33: 1024, 35: 1024, 36: 1024}  # ops per clock, 4 per SM


@dataclasses.dataclass(frozen=True)
class GpuSpec:
    """The fields of XLA's GpuTargetConfigProto that its GPU compiler reads, as the driver reports them on that
    GPU (what `xla_client.get_topology_for_devices(jax.devices()).target_config` prints there); name as jax's
    device_kind."""
    name: str
    memory_bytes: int  # device memory the driver reports (a little under nvidia-smi's total)
    memory_bandwidth: int  # bytes / s
    l2_bytes: int
    compute_capability: tuple[int, int] = (9, 0)  # sm_90a: Hopper's accelerated features (wgmma, TMA)
    sm_count: int = 132
    clock_ghz: float = 1.98  # boost clock
    dnn_version: tuple[int, int, int] = (9, 19, 0)  # cuDNN (what jax 0.11.2's wheels load on the H200)
    cuda_version: str = "13.0.0"  # driver and runtime (CUDA graph features, e.g. conditional nodes, depend on it)

    def target_config(self) -> str:
        major, minor = self.compute_capability
        dnn = self.dnn_version
        rates = lambda table: [
            f"    rate_infos {{ key: {key} value {{ clock_rate_ghz: {clock} units_per_core: {n} ops_per_clock: {ops} "
            f"}} }}" for key, (clock, n, ops) in table.items()]
        matrix = {k: (1.98 if k == 12 else 1.82952011, 4, ops) for k, ops in _HOPPER_MATRIX.items()}
        return "\n".join([
            "gpu_device_info {",
            "  threads_per_block_limit: 1024",
            "  threads_per_warp: 32",
            "  shared_memory_per_block: 49152",
            "  shared_memory_per_core: 233472",
            "  threads_per_core_limit: 2048",
            f"  core_count: {self.sm_count}",
            "  fpus_per_core: 128",
            "  block_dim_limit_x: 2147483647",
            "  block_dim_limit_y: 65535",
            "  block_dim_limit_z: 65535",
            f"  memory_bandwidth: {self.memory_bandwidth}",
            f"  l2_cache_size: {self.l2_bytes}",
            f"  clock_rate_ghz: {self.clock_ghz}",
            f"  device_memory_size: {self.memory_bytes}",
            "  shared_memory_per_block_optin: 232448",
            f"  cuda_compute_capability {{ major: {major} minor: {minor} feature_extension: ACCELERATED_FEATURES }}",
            "  registers_per_core_limit: 65536",
            "  registers_per_block_limit: 65536",
            "  scalar_unit_description {", *rates(_HOPPER_SCALAR), "  }",
            "  matrix_unit_description {", *rates(matrix), "  }",
            "  thread_dim_limit_x: 1024",
            "  thread_dim_limit_y: 1024",
            "  thread_dim_limit_z: 64",
            f'  driver_version: "{self.cuda_version}"',
            f'  runtime_version: "{self.cuda_version}"',
            f'  compile_time_toolkit_version: "{self.cuda_version}"',
            f'  dnn_version: "{dnn[0]}.{dnn[1]}.{dnn[2]}"',
            '  device_vendor: "NVIDIA Corporation"',
            f'  platform_version: "Compute Capability {major}.{minor}a"',
            f'  name: "{self.name}"',
            "  device_address_bits: 64",
            "  ecc_enabled: true",
            "}",
            'platform_name: "CUDA"',
            f"dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2]} }}",
            f'device_description_str: "{self.name}"',
            ""])


GPU_TARGETS = {
    # H100 SXM5 80 GB HBM3 (nvidia-smi: 81559 MiB), 3.35 TB/s, 50 MiB L2.
    "h100": GpuSpec("NVIDIA H100 80GB HBM3", memory_bytes=84942979072, memory_bandwidth=3352320000000,
                    l2_bytes=50 * 2 ** 20),
    # H200: the H100's chip (compute capability 9.0, 132 SMs) with 141 GB of HBM3e (nvidia-smi: 143771 MiB),
    # 4.8 TB/s, 60 MiB L2: the driver's figures on the project's H200 (2026-12-04).
    "h200": GpuSpec("NVIDIA H200", memory_bytes=150109880320, memory_bandwidth=4814304000000,
                    l2_bytes=60 * 2 ** 20),
}
# The PJRT plugins that can compile for a GPU target, newest CUDA first (jax-cuda13-pjrt / jax-cuda12-pjrt).
CUDA_PLUGINS = ("jax_plugins.xla_cuda13", "jax_plugins.xla_cuda12")
CUDA_AOT_INSTALL = "pip install 'm3jax[cuda-aot]'"
# A device's allocator takes this share of its memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise (jax's
# default): the budget a step must fit in on the real GPU.
DEFAULT_MEM_FRACTION = 0.75


def parse_gpu_topology(name: str) -> tuple[str, int] | None:
    """("h100", 8) for "8xh100" (or "h100x8"), ("h200", 1) for "h200"; None when `name` is no GPU target."""
    m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+?)(?:x(\d+))?", name.strip().lower())
    if not m or m.group(2) not in GPU_TARGETS or (m.group(1) and m.group(3)):
        return None
    n = int(m.group(1) or m.group(3) or 1)
    return (m.group(2), n) if n >= 1 else None


def is_known_topology(name: str) -> bool:
    return name in TOPOLOGIES or parse_gpu_topology(name) is not None


def known_topologies() -> str:
    return ", ".join([*TOPOLOGIES, *GPU_TARGETS, *(f"8x{g}" for g in GPU_TARGETS)])


def cuda_plugin() -> str | None:
    """The module of an installed CUDA PJRT plugin, or None."""
    import importlib.util

    for module in CUDA_PLUGINS:
        try:
            if importlib.util.find_spec(module) is not None:
                return module
        except (ImportError, ValueError):
            continue
    return None


def prepare_gpu_environment() -> None:
    """Environment for compile-only GPU devices on a host without GPUs; call before jax initialises a backend.
    JAX_PLATFORMS=cpu keeps the plugin from probing for a GPU (and its CUDA libraries) at start: its topology
    factory is registered all the same."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import sys

    if "jax" in sys.modules:  # jax read the variable when it was imported; its backends may still be unset
        sys.modules["jax"].config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def gpu_target(name: str, *, memory_gib: float | None = None) -> Target:
    """Compile-only NVIDIA GPUs by name: h100, h200, or NxNAME (e.g. 8xh100, one host of N GPUs), through the
    CUDA PJRT plugin's deviceless compilation. fits = peak <= memory_gib, else the GPU's memory x
    XLA_PYTHON_CLIENT_MEM_FRACTION (jax's default 0.75: the allocator's limit a run has by default). A probe
    compile checks ptxas and libdevice first, so a host without them fails here and says what is missing."""
    parsed = parse_gpu_topology(name)
    if parsed is None:
        raise PlanError(f"--topology {name!r}: unknown; known: {known_topologies()}")
    gpu, count = parsed
    if cuda_plugin() is None:
        raise PlanError(f"--topology {name}: compiling for a GPU without one needs jax's CUDA plugin (the version of "
                        f"jax) with ptxas and libdevice: {CUDA_AOT_INSTALL}")
    import jax
    import jax.numpy as jnp
    from jax.experimental import topologies

    spec = GPU_TARGETS[gpu]
    try:
        devices = topologies.get_topology_desc(platform="cuda", topology=f"1x1x{count}",
                                               target_config=spec.target_config()).devices
    except Exception as e:  # noqa: BLE001 -- the plugin's errors are plain runtime errors
        raise PlanError(f"--topology {name}: the CUDA plugin cannot describe {count} x {spec.name}: {short(e)}"
                        ) from e
    try:  # tanh: a kernel that links libdevice, and any kernel goes through ptxas
        sharding = jax.sharding.SingleDeviceSharding(devices[0])
        jax.jit(jnp.tanh, in_shardings=sharding).lower(
            jax.ShapeDtypeStruct((8,), jnp.float32, sharding=sharding)).compile()
    except Exception as e:  # noqa: BLE001
        raise PlanError(f"--topology {name}: a GPU compile needs ptxas and libdevice ({CUDA_AOT_INSTALL}, or a CUDA "
                        f"toolkit in /usr/local/cuda): {short(e)}") from e
    fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION") or DEFAULT_MEM_FRACTION)
    budget = int(memory_gib * GIB) if memory_gib else int(spec.memory_bytes * fraction)
    return Target(name, list(devices), "gpu", devices[0].device_kind, spec.memory_bytes, budget)


def compile_only_target(name: str, *, memory_gib: float | None = None) -> Target:
    """A TPU slice (tpu_target) or GPUs (gpu_target) by name."""
    return tpu_target(name, memory_gib=memory_gib) if name in TOPOLOGIES else gpu_target(name, memory_gib=memory_gib)


def cudnn_loadable() -> bool:
    """Whether jax can load cuDNN on this host: its fused attention is traced against cuDNN's version (a host
    without cuDNN cannot even lower it; with it, XLA compiles the fused attention without a GPU)."""
    try:
        from jax._src.cudnn.fused_attention_stablehlo import check_cudnn_version

        check_cudnn_version()
    except Exception:  # noqa: BLE001 -- RuntimeError("cuDNN not found."), or a jax without that module
        return False
    return True


def xla_dump_dir() -> str | None:
    """XLA's dump directory from XLA_FLAGS (--xla_dump_to=DIR), if any."""
    m = re.search(r"--xla_dump_to=(\S+)", os.environ.get("XLA_FLAGS", ""))
    return m.group(1) if m and m.group(1) not in ("sponge", "-") else None


def dumped_thunks(dump_dir: str, module: str = "jit_step_fn") -> dict | None:
    """thunk_structure of the latest `module` XLA GPU dumped into dump_dir (None: no thunk sequence there)."""
    try:
        names = os.listdir(dump_dir)
    except OSError:
        return None
    pattern = re.compile(r"module_(\d+)\." + re.escape(module) + r"\.thunk_sequence_after_thunk_passes\.txt$")
    found = sorted((int(m.group(1)), n) for n in names if (m := pattern.match(n)))
    if not found:
        return None
    with open(os.path.join(dump_dir, found[-1][1]), encoding="utf-8") as f:
        return thunk_structure(f.read())


def local_target(*, memory_gib: float | None = None, devices=None) -> Target:
    """This host's devices: fits = peak <= the device's memory limit (GPU: memory_stats' bytes_limit), or
    memory_gib when given; a device that reports no limit (CPU) needs memory_gib."""
    import jax

    devices = list(jax.devices() if devices is None else devices)
    d = devices[0]
    limit = None
    try:
        stats = d.memory_stats() or {}
        limit = int(stats.get("bytes_limit") or 0) or None
    except Exception:  # noqa: BLE001 -- CPU devices have no memory stats
        pass
    budget = int(memory_gib * GIB) if memory_gib else limit
    if budget is None and d.platform != "tpu":
        raise PlanError(f"{d.platform} devices report no memory limit: give a memory budget (m3jax plan "
                        f"--memory-gib N, or config.auto_batch_memory_gib for batch_size_by_length='auto')")
    return Target(f"local {d.platform}", devices, d.platform, d.device_kind, limit, budget)


# ---------------------------------------------------------------------------------------------------------------
# The run's model config without weights


def hf_config_for(config, model_config: str | None = None) -> tuple[dict, str, bool]:
    """(config.json dict, where it came from, has_pooler) for the run: --model-config (a preset name, a model
    directory or a config.json file), else config.model_name_or_path's config.json, else the bge-m3 preset when
    model_name_or_path is empty."""
    choice = model_config or config.model_name_or_path
    if not choice:
        return dict(BGE_M3), "preset bge-m3 (config.model_name_or_path is empty)", True
    if choice in MODEL_PRESETS:
        return dict(MODEL_PRESETS[choice]), f"preset {choice}", choice == "bge-m3"
    if storage.is_url(choice):  # staged once per host, as the run itself stages it (storage.stage)
        choice = storage.stage(choice, what="model directory" if storage.isdir(choice) else "model config")
    path = choice if os.path.isdir(choice) else os.path.dirname(os.path.abspath(choice))
    file = os.path.join(path, hf_layout.CONFIG_NAME) if os.path.isdir(choice) else choice
    if not os.path.isfile(file):
        field = "--model-config" if model_config else "config.model_name_or_path"
        raise PlanError(f"{field}={choice!r}: no config.json there; give --model-config bge-m3 (or tiny) to plan "
                        f"with a preset's dims, or a directory / config.json file")
    try:
        with open(file, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"{file}: cannot read config.json: {e}") from e
    pooler = os.path.isdir(path) and hf_read.has_pooler(path) if os.path.isdir(choice) else True
    return hf, file, bool(pooler)


def model_config_for(settings: loading.ModelSettings, hf_config: dict, platform: str, *, has_pooler: bool = True):
    """The trainer's ModelConfig for these dims (loading.model_config), attention resolved for `platform`."""
    source = loading.ModelSource(path="(plan: no weights)", hf_config=hf_config, tokenizer_dir=None,
                                 colbert_dim=None, has_pooler=has_pooler)
    return loading.model_config(source, settings, platform=platform)


# ---------------------------------------------------------------------------------------------------------------
# Compiling the run's step


@dataclasses.dataclass
class ShapeResult:
    shape: Shape
    fits: bool
    peak_bytes: int | None  # per chip: XLA's peak on TPU, else arguments + outputs - aliased + temp + code
    memory: dict  # xla_stats.memory_record
    matmul_flops: float | None  # trip-weighted, per chip; not the attention inside the Pallas attention kernels
    error: str | None  # the RESOURCE_EXHAUSTED message
    compile_s: float
    # From a TPU RESOURCE_EXHAUSTED message: what the step's temporaries need, and the HBM the compiler allows.
    needed_bytes: int | None = None
    limit_bytes: int | None = None
    # xla_stats.hlo_structure of the compiled step (kernels, loops, copies, host traffic), plus "thunks" (GPU
    # command buffers, xla_stats.thunk_structure) when XLA dumped its thunk sequence (Planner.dump_dir).
    structure: dict | None = None

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["shape"] = str(self.shape)
        d["peak_gib"] = None if self.peak_bytes is None else round(self.peak_bytes / GIB, 4)
        return d


_UNITS = dict(B=1, K=2 ** 10, M=2 ** 20, G=2 ** 30, T=2 ** 40)


def oom_figures(message: str) -> tuple[int | None, int | None]:
    """(bytes needed, bytes available) from the TPU compiler's "... required for HLO temporaries (5.00T) exceeds
    available HBM (30.75G)"; (None, None) if the message does not say."""
    m = re.search(r"\(([\d.]+)([BKMGT])\) exceeds available HBM \(([\d.]+)([BKMGT])\)", message)
    if not m:
        return None, None
    return int(float(m.group(1)) * _UNITS[m.group(2)]), int(float(m.group(3)) * _UNITS[m.group(4)])


class Planner:
    """The run's Stepper on a mesh of a target's devices; compiles its step for abstract batches of a shape.
    has_teacher: whether the batches carry teacher scores (config.knowledge_distillation)."""

    def __init__(self, step: StepSettings, model_cfg, target: Target, *, mesh, has_teacher: bool):
        self.model_cfg = model_cfg
        self.target = target
        self.mesh = mesh
        self.stepper = Stepper.build(step, model_cfg, self.mesh, total_steps=1000)
        self.num_shards = shard_lib.num_batch_shards(self.mesh, step.sharding_rules)
        self.has_teacher = has_teacher
        self.compiles = 0
        self.dump_dir = xla_dump_dir()  # where XLA dumps what it compiles (XLA_FLAGS=--xla_dump_to=DIR), if set

    def compile(self, shape: Shape, *, no_in_batch_neg: bool = False, chunk: int | None = None):
        fn = self.stepper.step(shape.group, no_in_batch_neg, self.has_teacher, chunk=chunk)
        lowered = fn.lower(self.stepper.abstract_state(),
                           self.stepper.abstract_batch(shape.batch, shape.group, shape.qlen, shape.plen))
        self.compiles += 1
        if self.target.platform == "cpu":  # LLVM -O0: the HLO passes and so the memory analysis are unchanged
            return lowered.compile(compiler_options={"xla_backend_optimization_level": 0})
        return lowered.compile()

    def check(self, shape: Shape, *, flops: bool = True, no_in_batch_neg: bool = False,
              chunk: int | None = None) -> ShapeResult:
        """Compile `shape`: fits (compiled, and peak within the budget), its memory and matmul FLOPs. `chunk`: the
        gradient cache's rows per device (default: the step settings')."""
        t0 = time.perf_counter()
        try:
            compiled = self.compile(shape, no_in_batch_neg=no_in_batch_neg, chunk=chunk)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            needed, limit = oom_figures(str(e))
            return ShapeResult(shape, False, None, {}, None, short(e), round(time.perf_counter() - t0, 1), needed,
                               limit)
        mem = memory_record(compiled)
        # TPU: XLA's peak, which the TPU compiler holds against the chip's HBM; elsewhere (where XLA's peak leaves
        # the arguments out) what the step needs at once: arguments + outputs - aliased + temp + code.
        peak = (mem.get("xla_peak_bytes") if self.target.platform == "tpu" else None) or mem.get("total_bytes")
        fits = self.target.budget_bytes is None or (peak is not None and peak <= self.target.budget_bytes)
        structure = None
        if flops:
            text = compiled.as_text()
            stats = hlo_stats(text, vocab_size=self.model_cfg.vocab_size)
            structure = hlo_structure(text)
            thunks = dumped_thunks(self.dump_dir) if self.dump_dir else None
            if thunks is not None:
                structure["thunks"] = thunks
        else:
            stats = {}
        error = None if fits else (f"peak {peak / GIB:.2f} GiB > budget {self.target.budget_bytes / GIB:.2f} GiB")
        return ShapeResult(shape, fits, peak, mem, stats.get("matmul_flops"), error,
                           round(time.perf_counter() - t0, 1), structure=structure)

    def max_batch(self, shape: Shape, *, granularity: int = 1, limit: int = 1024,
                  known: dict[int, bool] | None = None, predict: bool = True, flops: bool = False
                  ) -> tuple[int, int | None, list[dict]]:
        """(largest per-shard batch that fits at shape's GROUP:QLEN:PLEN, smallest that does not, the tries):
        doubling from shape.batch up to `limit`, then narrowing (xla_stats.search_max_batch). With `predict`, each
        narrowing try is the batch where the memory line through the tries so far reaches the limit: the TPU
        compiler refuses a step that does not fit in seconds and says how many bytes it needed, so two refused
        batches predict the boundary and one fitting compile confirms it (bisection when the line misses).
        `known`: batch -> fits already compiled (or batch -> ShapeResult, which also gives its bytes). `flops`:
        also count each fitting try's matmul FLOPs (the tries' `matmul_flops`)."""
        known = dict(known or {})
        needs: dict[int, float] = {}
        limits: list[int] = []
        for b, r in list(known.items()):
            if isinstance(r, ShapeResult):
                known[b] = self._note(r, needs, limits)
        tries: list[dict] = []

        def fits(b: int) -> bool:
            if b not in known:
                r = self.check(shape.with_batch(b), flops=flops)
                known[b] = self._note(r, needs, limits)
                tries.append(dict(batch=b, fits=r.fits, peak_gib=r.as_dict()["peak_gib"], seconds=r.compile_s,
                                  needed_gib=None if r.needed_bytes is None else round(r.needed_bytes / GIB, 4),
                                  matmul_flops=r.matmul_flops))
                logger.info("%s batch %d: %s (%s, %.0f s)", shape, b, "fits" if r.fits else "does not fit",
                            r.error or f"{r.as_dict()['peak_gib']} GiB", r.compile_s)
            return known[b]

        def budget() -> float | None:
            return self.target.budget_bytes or (min(limits) if limits else None)

        best, first_fail = search_max_batch(fits, min(shape.batch, limit), granularity=granularity, limit=limit,
                                            needs=needs if predict else None, budget=budget)
        return best, first_fail, tries

    @staticmethod
    def _note(r: ShapeResult, needs: dict, limits: list) -> bool:
        """Record a result's bytes (peak, or what a refused TPU compile needed) and the compiler's limit."""
        n = r.peak_bytes if r.peak_bytes is not None else r.needed_bytes
        if n is not None:
            needs[r.shape.batch] = n
        if r.limit_bytes is not None:
            limits.append(r.limit_bytes)
        return r.fits

    def state_gib(self) -> float:
        return round(self.stepper.state_bytes_per_device() / GIB, 3)


def recommend_mesh(planner: Planner, results: list[ShapeResult]) -> dict:
    """fsdp (params and optimizer state sharded over every chip) when they take a large share of a chip's memory
    (>= 1/4), or when a shape does not fit and sharding them would free what it lacks; else the config's mesh."""
    n = planner.mesh.size
    state = planner.stepper.state_bytes_per_device()
    sharded = state / n
    hbm = planner.target.budget_bytes or planner.target.hbm_bytes
    current = {k: int(v) for k, v in planner.mesh.shape.items()}
    out = dict(current=current, state_gib_per_chip=round(state / GIB, 2),
               state_gib_per_chip_fsdp=round(sharded / GIB, 2))
    if n == 1 or current.get("fsdp", 1) == n or hbm is None:
        return dict(out, recommended=current, reason="the config's mesh")
    large = state >= hbm / 4
    helps = any(not r.fits and r.peak_bytes is not None and r.peak_bytes - state + sharded <= hbm for r in results)
    if large or helps:
        why = (f"params + optimizer state take {state / GIB:.2f} GiB of each chip's {hbm / GIB:.2f} GiB"
               if large else "a shape that does not fit would with the state sharded")
        return dict(out, recommended=dict(data=1, fsdp=n, tensor=1),
                    reason=f"{why}; --config.mesh.data=1 --config.mesh.fsdp={n} holds {sharded / GIB:.2f} GiB")
    return dict(out, recommended=current, reason=f"params + optimizer state {state / GIB:.2f} GiB per chip is a "
                                                 f"small share of {hbm / GIB:.2f} GiB")


# ---------------------------------------------------------------------------------------------------------------
# The step shapes of a run


def bucket_lengths(config, key: str) -> tuple[int, int]:
    """(query length, passage length) a `LO-HI` length bucket pads to at most: passage min(HI, passage_max_len)
    rounded up to the data pipeline's ladder (m3jax/core/padding.py), query query_max_len."""
    lo, _, hi = str(key).partition("-")
    if not lo.isdigit() or not (hi.isdigit() or hi == "inf"):
        raise PlanError(f"config.batch_size_by_length key {key!r}: expected 'LO-HI' with HI an int or 'inf'")
    pmax = int(config.passage_max_len)
    plen = pmax if hi == "inf" else min(int(hi), pmax)
    return int(config.query_max_len), pad_length(plen, length_buckets(pmax, tuple(config.seq_len_buckets)))


def table_shapes(config) -> dict[str, Shape]:
    """Label -> shape of each bucket of the config's batch-size table (the research table when None), plus
    `untagged`: per_device_train_batch_size at the max lengths."""
    table = config.batch_size_by_length
    if table is None or table == "auto":
        table = RESEARCH_BATCH_SIZE_BY_LENGTH.get(config.train_group_size, {})
    g = int(config.train_group_size)
    out = {}
    for key, batch in dict(table).items():
        q, p = bucket_lengths(config, key)
        out[str(key)] = Shape(int(batch), g, q, p)
    out["untagged"] = Shape(int(config.per_device_train_batch_size), g, int(config.query_max_len),
                            int(config.passage_max_len))
    return out


def data_shapes(config, num_shards: int) -> dict[str, Shape]:
    """Label -> the longest shape of each (batch, group) the run's data produces (data_build.build_train_data)."""
    source = loading.find_model(config.model_name_or_path)
    tokenizer = loading.load_tokenizer(source)
    if config.batch_size_by_length == "auto":  # plan the research table's batches (a run sizes them itself)
        config = config.copy_and_resolve_references()
        config.batch_size_by_length = None
    shapes = data_build.build_train_data(config_lib.data_settings(config), tokenizer,
                                         num_batch_shards=num_shards).shapes()
    worst: dict[tuple, Shape] = {}
    for s in shapes:
        key = (s.global_batch // num_shards, s.group_size)
        prev = worst.get(key)
        q, p = max(s.query_len, prev.qlen if prev else 0), max(s.passage_len, prev.plen if prev else 0)
        worst[key] = Shape(key[0], key[1], q, p)
    return {f"data {s.batch}x{s.group}": s for s in sorted(worst.values(), key=lambda s: (s.plen, s.batch))}


def parse_shapes(text: str) -> dict[str, Shape]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            shape = Shape.parse(part)
        except BenchError as e:
            raise PlanError(f"--shapes: {e}") from None
        out[str(shape)] = shape
    if not out:
        raise PlanError(f"--shapes {text!r}: expected BATCHxGROUP:QLEN:PLEN[,...], e.g. 8x8:512:2048")
    return out


# ---------------------------------------------------------------------------------------------------------------
# m3jax plan


def _cache_words(step: StepSettings, *, chunk_auto: bool = False) -> str:
    if not step.gradient_cache:
        return ""
    if step.gradient_cache_chunk_tokens:
        return f", gradient cache: chunks of {step.gradient_cache_chunk_tokens} tokens"
    if chunk_auto:
        return f", gradient cache: chunks 'auto' (the table below: {step.gradient_cache_chunk_size} rows)"
    return f", gradient cache: chunks of {step.gradient_cache_chunk_size} rows"


def plan(config, target: Target, *, shapes: dict[str, Shape] | None = None, model_config: str | None = None,
         search: bool = True, granularity: int = 1, limit: int = 1024, predict: bool = True, emit=None) -> dict:
    """Compile the run's step for every shape on `target`; returns (and `emit`s, as a table) the results."""
    emit = emit or (lambda line: print(line, flush=True))
    config_lib.validate(config, for_training=False)
    hf, where, pooler = hf_config_for(config, model_config)
    model_cfg = model_config_for(config_lib.model_settings(config), hf, target.platform, has_pooler=pooler)
    attention_note = None
    if target.platform == "gpu" and model_cfg.attention_implementation == "cudnn" and not cudnn_loadable():
        # A GPU target without a GPU (gpu_target) on a host without cuDNN: XLA's attention instead, said so.
        model_cfg = dataclasses.replace(model_cfg, attention_implementation="xla")
        attention_note = ("attention cudnn -> xla: cuDNN is not installed on this host, and jax needs it to lower "
                          "the fused attention (pip install nvidia-cudnn-cu13 to compile that too); the memory "
                          "and FLOPs below are those of XLA's attention")
    step = config_lib.step_settings(config)
    mesh = shard_lib.make_mesh(config_lib.mesh_settings(config), target.devices)
    config_lib.validate_against_model(config, model_cfg)
    planner = Planner(step, model_cfg, target, mesh=mesh, has_teacher=bool(config.knowledge_distillation))
    if shapes is None:
        shapes = data_shapes(config, planner.num_shards) if config_lib.train_data_dirs(config) else \
            table_shapes(config)
    hbm = target.hbm_bytes
    emit(f"target {target.name}: {len(target.devices)} x {target.device_kind} ({target.platform})"
         + (f", {hbm / GIB:.0f} GiB HBM per chip" if hbm else "")
         + (f", budget {target.budget_bytes / GIB:.2f} GiB" if target.budget_bytes else ""))
    emit(f"model {where}: {model_cfg.num_hidden_layers} layers, hidden {model_cfg.hidden_size}, vocab "
         f"{model_cfg.vocab_size}; dtype {model_cfg.dtype}, attention {model_cfg.attention_implementation}, remat "
         f"{model_cfg.remat_policy}, sub_batch_size {step.sub_batch_size}"
         + _cache_words(step, chunk_auto=config_lib.gradient_cache_chunk_auto(config)))
    if attention_note:
        emit(attention_note)
    emit(f"mesh {dict(planner.mesh.shape)}; batch split over {planner.num_shards} chips; params + optimizer state "
         f"{planner.state_gib()} GiB per chip")
    # the trainer's choices per shape (remat_policy / gradient_cache_chunk_size "auto"); the table below compiles
    # the settings' step: remat "full" under "auto", chunks of GRADIENT_CACHE_CHUNK_ROWS under "auto"
    for choice in choose_auto(config, step, model_cfg, planner.mesh,
                              [(shape, planner.has_teacher, False) for shape in shapes.values()], target=target):
        emit(choice["line"])
    header = f"{'bucket':<16} {'per-chip shape':<18} {'peak GiB':>9} {'fits':>5} {'matmul TFLOP':>13} {'max batch':>10}"
    emit(header)
    results, rows = [], []
    t0 = time.perf_counter()
    for label, shape in shapes.items():
        r = planner.check(shape)
        results.append(r)
        row = dict(label=label, **r.as_dict())
        if search:
            best, first_fail, tries = planner.max_batch(shape, granularity=granularity, limit=limit,
                                                        known={shape.batch: r}, predict=predict, flops=True)
            at_best = r.as_dict() if best == shape.batch else next((t for t in tries if t["batch"] == best), {})
            row.update(max_batch=best, first_failing_batch=first_fail, tries=tries,
                       max_batch_peak_gib=at_best.get("peak_gib"), max_batch_matmul_flops=at_best.get("matmul_flops"))
        rows.append(row)
        flops = "-" if r.matmul_flops is None else f"{r.matmul_flops / 1e12:.2f}"
        peak = "-" if r.peak_bytes is None else f"{r.peak_bytes / GIB:.2f}"
        if r.peak_bytes is None and r.needed_bytes is not None:  # temporaries alone, as the compiler says
            peak = f">{r.needed_bytes / GIB:.1f}"
        max_b = "-" if not search else (f"{row['max_batch']}" + ("" if row["first_failing_batch"] else "+"))
        bucket = "-" if label == str(shape) else label
        emit(f"{bucket:<16} {str(shape):<18} {peak:>9} {'yes' if r.fits else 'NO':>5} {flops:>13} {max_b:>10}")
        if r.error:
            emit(f"    {r.error}")
        if r.structure:
            emit("    " + structure_line(r.structure))
        if search and row["max_batch"]:
            first = dict(batch=shape.batch, peak_gib=row["peak_gib"],
                         needed_gib=None if r.needed_bytes is None else round(r.needed_bytes / GIB, 4))
            over = next((t for t in [first, *tries] if t["batch"] == row["first_failing_batch"]), None)
            tflop = row["max_batch_matmul_flops"]
            emit(f"    largest batch {row['max_batch']}: peak {row['max_batch_peak_gib']} GiB, "
                 + ("-" if tflop is None else f"{tflop / 1e12:.2f}") + " matmul TFLOP"
                 + ("" if over is None else f"; {over['batch']} does not fit"
                    + (f" (temporaries {over['needed_gib']} GiB)" if over["needed_gib"] is not None else
                       f" (peak {over['peak_gib']} GiB)" if over["peak_gib"] is not None else "")))
    mesh = recommend_mesh(planner, results)
    emit(f"recommended mesh: {mesh['recommended']} ({mesh['reason']})")
    emit(f"{planner.compiles} compiles in {time.perf_counter() - t0:.0f} s")
    return dict(target=dict(name=target.name, devices=len(target.devices), device_kind=target.device_kind,
                            platform=target.platform, hbm_gib=None if hbm is None else round(hbm / GIB, 2)),
                model=where, mesh=mesh, shapes=rows, compiles=planner.compiles)


def structure_line(st: dict) -> str:
    """One line of xla_stats.hlo_structure (+ thunks): kernels per step, loops, copies, host traffic."""
    per = st.get("per_step", {})
    loops = ", ".join(f"{lp['trip_count'] or '?'}x{lp['kernels_per_iteration']}" for lp in st.get("while_loops", []))
    kinds = ", ".join(f"{k} {v}" for k, v in list(st.get("fusion_kinds", {}).items())[:4])
    line = (f"kernels per step {per.get('kernels', 0)} ({st.get('static', {}).get('fusions', 0)} fusions: {kinds}); "
            f"while loops (trips x kernels) {loops or 'none'}; copies {per.get('copies', 0)} "
            f"({st.get('copy_gib_per_step', 0)} GiB); custom calls {sum(st.get('custom_calls', {}).values())}; "
            f"collectives {per.get('collectives', 0)}; host transfers {per.get('host_transfers', 0)}")
    th = st.get("thunks")
    if th:
        line += (f"; command buffers {th['command_buffers']} holding {th['thunks_in_command_buffers']} thunks, "
                 f"{th['thunks_outside']} thunks outside them")
    return line


# ---------------------------------------------------------------------------------------------------------------
# model.remat_policy="auto"

REMAT_BY_RECOMPUTE = ("none", "dots", "dots_no_batch", "full")  # least recomputation first


def memory_target(auto_batch_memory_gib: float, mesh) -> Target | None:
    """The target the "auto" choices judge memory by: the mesh's devices with config.auto_batch_memory_gib (> 0),
    else the device's own limit; None where neither exists (CPU without a budget)."""
    budget_gib = float(auto_batch_memory_gib)
    try:
        return local_target(memory_gib=budget_gib if budget_gib > 0 else None, devices=list(mesh.devices.flat))
    except PlanError:
        return None


def choose_remat(step: StepSettings, model_cfg, mesh, shapes, *, target: Target | None) -> list[dict]:
    """For model.remat_policy="auto": per (Shape per batch shard, has_teacher, no_in_batch_neg) of `shapes`, the
    policy with the least recomputation (REMAT_BY_RECOMPUTE) whose compiled step fits the memory budget of
    `target` (the trainer's: `memory_target`), judged by XLA's memory analysis as `m3jax plan` judges a shape.
    Returns one dict per shape: shape, policy, candidates (policy, peak_gib, fits; in the order compiled). Compiles
    stop at the first fitting policy; where none fits, "full" (the step then fails as it would have). Without a
    budget (target None: CPU and no auto_batch_memory_gib) nothing can be judged: "none", with no candidates."""
    planners: dict[tuple[str, bool], Planner] = {}
    out = []
    for shape, has_teacher, no_in_batch_neg in shapes:
        if target is None:
            out.append(dict(shape=str(shape), policy="none", candidates=[], reason="no memory budget to judge by"))
            continue
        candidates, chosen = [], None
        for policy in REMAT_BY_RECOMPUTE:
            key = (policy, bool(has_teacher))
            if key not in planners:
                planners[key] = Planner(step, dataclasses.replace(model_cfg, remat_policy=policy), target, mesh=mesh,
                                        has_teacher=bool(has_teacher))
            r = planners[key].check(shape, flops=False, no_in_batch_neg=bool(no_in_batch_neg))
            candidates.append(dict(policy=policy, peak_gib=r.as_dict()["peak_gib"], fits=r.fits,
                                   compile_s=r.compile_s))
            if r.fits:
                chosen = policy
                break
        out.append(dict(shape=str(shape), policy=chosen or "full", candidates=candidates,
                        budget_gib=None if target.budget_bytes is None else round(target.budget_bytes / GIB, 3)))
    return out


def choose_auto(config, step: StepSettings, model_cfg, mesh, shapes, *, target: Target | None) -> list[dict]:
    """The per-shape choices a run config leaves to memory, as the trainer makes them: with the gradient cache and
    gradient_cache_chunk_size="auto", the chunk (choose_chunk; with remat_policy="auto" the pair, least
    recomputation first), else with remat_policy="auto" the policy (choose_remat); [] when nothing is "auto".
    `shapes` as choose_remat's. One dict per shape: policy, chunk (None where not chosen), line (the log line)."""
    remat_auto = config.model.remat_policy == "auto"
    if config_lib.gradient_cache_chunk_auto(config):
        policies = REMAT_BY_RECOMPUTE if remat_auto else (model_cfg.remat_policy,)
        return [dict(c, line=describe_chunk_choice(c))
                for c in choose_chunk(step, model_cfg, mesh, shapes, target=target, policies=policies)]
    if remat_auto:
        return [dict(c, chunk=None, line=describe_remat_choice(c))
                for c in choose_remat(step, model_cfg, mesh, shapes, target=target)]
    return []


def describe_remat_choice(choice: dict) -> str:
    """One log line: the shape, the chosen policy and every candidate's memory."""
    tried = ", ".join(f"{c['policy']} {c['peak_gib']} GiB{'' if c['fits'] else ' (does not fit)'}"
                      for c in choice["candidates"])
    return f"remat_policy='auto' for {choice['shape']}: {choice['policy']}" + (f" ({tried})" if tried else
                                                                               f" ({choice.get('reason')})")


# ---------------------------------------------------------------------------------------------------------------
# gradient_cache_chunk_size="auto"


def chunk_ladder(rows: int) -> list[int]:
    """The chunk candidates for `rows` passages per device, largest first: all of them, then halved and rounded
    down to a divisor of `rows` (the chunk shape Chunking takes exactly), down to 1."""
    out = [int(rows)]
    while out[-1] > 1:
        out.append(Chunking.of(rows, 1, out[-1] // 2).chunk)
    return out


def largest_fitting(ladder: list[int], fits) -> int | None:
    """Index of the first (largest) chunk of `ladder` for which `fits(index)` holds, the memory taken as monotone
    in the chunk: the largest compiles first (a batch that fits whole costs one compile), then bisection over the
    rest (at most 1 + ceil(log2(len(ladder))) calls). None when not even the smallest fits."""
    if fits(0):
        return 0
    lo, hi = 0, len(ladder)  # ladder[lo] does not fit; ladder[hi] is the largest known to fit (len: none yet)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi if hi < len(ladder) else None


def choose_chunk(step: StepSettings, model_cfg, mesh, shapes, *, target: Target | None,
                 policies: tuple[str, ...]) -> list[dict]:
    """For gradient_cache_chunk_size="auto": per (Shape per batch shard, has_teacher, no_in_batch_neg) of
    `shapes`, the gradient cache's chunk (rows per device) and the encoder's remat policy. `policies`: the remat
    policies to try in order -- REMAT_BY_RECOMPUTE with remat_policy="auto", else the run's one. For each, the
    largest chunk of chunk_ladder(batch x group) whose compiled step fits the memory budget of `target` (the
    trainer's: `memory_target`), judged as `choose_remat` judges a policy (largest_fitting: one compile when the
    whole batch fits, a bisection otherwise); the first policy with a chunk that fits wins, so the pair is the
    least recomputation, then the largest chunk. Where nothing fits: the last policy's smallest chunk (the step
    then fails as it would have). Without a budget (target None): policies[0] and GRADIENT_CACHE_CHUNK_ROWS rows,
    no compile. Returns one dict per shape: shape, policy, chunk, candidates (policy, chunk, peak_gib, fits,
    compile_s; in the order compiled)."""
    planners: dict[tuple[str, bool], Planner] = {}
    out = []
    for shape, has_teacher, no_in_batch_neg in shapes:
        if target is None:
            out.append(dict(shape=str(shape), policy=policies[0], chunk=GRADIENT_CACHE_CHUNK_ROWS, candidates=[],
                            reason="no memory budget to judge by"))
            continue
        ladder = chunk_ladder(shape.batch * shape.group)
        candidates, chosen = [], None
        for policy in policies:
            key = (policy, bool(has_teacher))
            if key not in planners:
                planners[key] = Planner(step, dataclasses.replace(model_cfg, remat_policy=policy), target, mesh=mesh,
                                        has_teacher=bool(has_teacher))
            best = _largest_chunk(planners[key], shape, bool(no_in_batch_neg), ladder, candidates)
            if best is not None:
                chosen = (policy, best)
                break
        policy, chunk = chosen or (policies[-1], ladder[-1])
        out.append(dict(shape=str(shape), policy=policy, chunk=chunk, candidates=candidates, fits=chosen is not None,
                        budget_gib=None if target.budget_bytes is None else round(target.budget_bytes / GIB, 3)))
    return out


def _largest_chunk(planner: Planner, shape: Shape, no_in_batch_neg: bool, ladder: list[int],
                   candidates: list[dict]) -> int | None:
    """The largest chunk of `ladder` whose step compiles within the planner's budget (largest_fitting); each
    compile is appended to `candidates`."""

    def fits(i: int) -> bool:
        r = planner.check(shape, flops=False, no_in_batch_neg=no_in_batch_neg, chunk=ladder[i])
        candidates.append(dict(policy=planner.model_cfg.remat_policy, chunk=ladder[i],
                               peak_gib=r.as_dict()["peak_gib"], fits=r.fits, compile_s=r.compile_s,
                               needed_gib=None if r.needed_bytes is None else round(r.needed_bytes / GIB, 2)))
        logger.info("gradient cache chunk %d for %s (remat %s): %s (%s, %.0f s)", ladder[i], shape,
                    planner.model_cfg.remat_policy, "fits" if r.fits else "does not fit",
                    r.error or f"{r.as_dict()['peak_gib']} GiB", r.compile_s)
        return r.fits

    best = largest_fitting(ladder, fits)
    return None if best is None else ladder[best]


def describe_chunk_choice(choice: dict) -> str:
    """One log line: the shape, the chosen chunk and remat policy, and every candidate's memory (largest chunk
    first, per policy)."""
    def memory(c: dict) -> str:  # a refused TPU compile has no peak, only the temporaries it needed
        if c["peak_gib"] is None and c.get("needed_gib") is not None:
            return f"temporaries {c['needed_gib']} GiB"
        return f"{c['peak_gib']} GiB"

    parts = []
    for policy in dict.fromkeys(c["policy"] for c in choice["candidates"]):
        tried = sorted((c for c in choice["candidates"] if c["policy"] == policy), key=lambda c: -c["chunk"])
        parts.append(f"remat {policy}: " + ", ".join(
            f"{c['chunk']} {memory(c)}{'' if c['fits'] else ' (does not fit)'}" for c in tried))
    return (f"gradient_cache_chunk_size='auto' for {choice['shape']}: {choice['chunk']} rows per device, remat "
            f"{choice['policy']}" + (f" ({'; '.join(parts)})" if parts else f" ({choice.get('reason')})"))


# ---------------------------------------------------------------------------------------------------------------
# batch_size_by_length="auto"

AUTO_BATCH_FILE = "auto_batch_sizes.json"  # in the run's output_dir
_NOT_STEP_SETTINGS = ("model_name_or_path", "output_dir", "overwrite_output_dir", "train_data", "logging_steps",
                      "save_steps", "save_total_limit", "eval_steps", "eval", "num_data_workers", "data_prefetch",
                      "num_train_epochs", "max_steps", "skip_bad_examples", "distributed", "batch_size_by_length",
                      "per_device_train_batch_size", "max_example_num_per_dataset", "small_threshold",
                      "drop_threshold", "shuffle_ratio")


def _step_settings_json(config) -> dict:
    """The run config's fields that shape the compiled step (all but _NOT_STEP_SETTINGS), as saved JSON: part of
    the auto batch cache key."""
    return {k: v for k, v in config_lib.config_to_json(config).items() if k not in _NOT_STEP_SETTINGS}


def _cache_key(step_settings: dict, model_cfg, shape: Shape, planner: Planner, budget: int | None,
               granularity: int) -> str:
    import jax

    key = dict(model=dataclasses.asdict(model_cfg), shape=str(shape), mesh=dict(planner.mesh.shape),
               device_kind=planner.target.device_kind, platform=planner.target.platform, jax=jax.__version__,
               budget=budget, granularity=granularity, step=step_settings)
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]


def data_length_tags(config) -> list[str]:
    """The `LO-HI` tags of the run's data files (len-LO-HI.jsonl names), sorted by LO."""
    tag = re.compile(r"len-(\d+)-(\d+|inf)\.jsonl?$")
    tags = set()
    for d in train_data_dirs(config):
        if storage.is_url(d):  # a directory, or a .json/.jsonl file (one dataset, as FlagEmbedding takes it)
            names = ([n for n in storage.listdir(d) if n.endswith((".json", ".jsonl"))] if storage.isdir(d)
                     else [storage.basename(d)])
        else:
            names = [os.path.basename(p) for p in list_dataset_files(os.path.normpath(d))]
        for name in names:
            m = tag.search(name)
            if m:
                tags.add(f"{m.group(1)}-{m.group(2)}")
    return sorted(tags, key=lambda t: int(t.split("-")[0]))


def auto_batch_sizes(config, model_cfg, mesh, *, tags: list[str] | None = None) -> dict[str, Any]:
    """{"table": {tag: per-device batch}, "buckets": [...]} for batch_size_by_length="auto": per length tag of
    the data (or `tags`), the largest per-device batch whose step compiles within the device's memory -- the
    compiler's limit on TPU, the allocator's on GPU, config.auto_batch_memory_gib where set (required on CPU).
    The search starts from the research table's batch (else per_device_train_batch_size), to within 1/8 of it;
    each bucket's answer is cached (storage.cache_dir("auto_batch"))."""
    devices = list(mesh.devices.flat)
    budget_gib = float(config.auto_batch_memory_gib)
    target = local_target(memory_gib=budget_gib if budget_gib > 0 else None, devices=devices)
    config_lib.validate_against_model(config, model_cfg)
    planner = Planner(config_lib.step_settings(config), model_cfg, target, mesh=mesh,
                      has_teacher=bool(config.knowledge_distillation))
    step_settings = _step_settings_json(config)
    research = RESEARCH_BATCH_SIZE_BY_LENGTH.get(int(config.train_group_size), {})
    tags = data_length_tags(config) if tags is None else list(tags)
    table, buckets = {}, []
    for tag in tags:
        q, p = bucket_lengths(config, tag)
        start = int(research.get(tag, config.per_device_train_batch_size))
        shape = Shape(start, int(config.train_group_size), q, p)
        granularity = max(1, start // 8)
        path = storage.cache_dir("auto_batch", _cache_key(step_settings, model_cfg, shape, planner,
                                                          target.budget_bytes, granularity) + ".json")
        cached = None
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    cached = json.load(f)
            except (OSError, json.JSONDecodeError):
                cached = None
        if cached is not None:
            entry = dict(cached, cached=True)
        else:
            best, first_fail, tries = planner.max_batch(shape, granularity=granularity)
            entry = dict(tag=tag, batch=best, first_failing_batch=first_fail, query_len=q, passage_len=p,
                         group=shape.group, tries=tries)
            with storage.atomic_file(path) as f:
                json.dump(entry, f, indent=2, sort_keys=True)
            entry = dict(entry, cached=False)
        if entry["batch"] < 1:
            within = ("the device's memory" if target.budget_bytes is None
                      else f"config.auto_batch_memory_gib={target.budget_bytes / GIB:g}")
            raise PlanError(f"config.batch_size_by_length='auto': not even 1 query per device fits for length "
                            f"bucket {tag} ({shape.with_batch(1)}) within {within}; set sub_batch_size, a mesh with "
                            f"fsdp, or a smaller passage_max_len")
        table[tag] = int(entry["batch"])
        buckets.append(entry)
        logger.info("auto batch size for %s (%s:%d:%d): %d per device%s", tag, f"?x{shape.group}", q, p,
                    entry["batch"], " (cached)" if entry["cached"] else f" ({len(entry['tries'])} compiles)")
    return dict(table=table, buckets=buckets, device_kind=target.device_kind, platform=target.platform,
                budget_gib=None if target.budget_bytes is None else round(target.budget_bytes / GIB, 3),
                mesh={k: int(v) for k, v in mesh.shape.items()})
