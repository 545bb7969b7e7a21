"""`m3jax plan`: compile a run's train step for a TPU slice, GPUs or this host's device and report memory,
fit, FLOPs and the largest batch that fits (m3jax.plan)."""
from __future__ import annotations

import json

from m3jax import config as config_lib
from m3jax import plan
from m3jax.cli.common import UsageError
from m3jax.core.storage import atomic_file


def add(subparsers) -> None:
    p = subparsers.add_parser(
        "plan", help="compile a run's train step for a TPU slice (or this host's device) and report memory, fit, "
                     "FLOPs and the largest batch that fits",
        description="Ahead-of-time compile of the run's real train step (no weights loaded) for a TPU topology "
                    "from any machine (needs libtpu: pip install 'm3jax[tpu]'), for NVIDIA GPUs by name (h100, "
                    "h200, 8xh100; XLA's deviceless GPU compile: pip install 'm3jax[cuda-aot]'), or for this host's "
                    "accelerator without --topology. Per step shape: per-chip peak memory against the chip's "
                    "HBM, fits or not, trip-weighted matmul FLOPs per step, the kernels, loops, copies and host "
                    "transfers of the optimised HLO, and the largest per-chip batch that fits (searched by "
                    "compiling); then the mesh it recommends. Any --config.<field>=<value> override applies.")
    p.add_argument("--config", required=True, help="a configs/*.py file")
    p.add_argument("--config.FIELD", metavar="VALUE", dest="_override", help="override any config field, e.g. "
                   "--config.sub_batch_size=4 --config.mesh.fsdp=-1 --config.mesh.data=1 (repeatable; default: the "
                   "config file's values)")
    p.add_argument("--topology", default=None,
                   help="a TPU slice by its accelerator type: v4-8, v4-32, v5p-8, v5p-64, v5litepod-8, v6e-8, ...; or "
                        "NVIDIA GPUs: h100, h200, 8xh100 (compile-only, needs pip install 'm3jax[cuda-aot]') "
                        "(default: this host's devices)")
    p.add_argument("--shapes", default=None,
                   help="BATCHxGROUP:QLEN:PLEN[,...] per chip, e.g. 8x8:512:2048 (default: the shapes of the run's "
                        "data, or of its batch-size table)")
    p.add_argument("--model-config", default=None,
                   help="model dims: bge-m3 or tiny (presets), a model directory or a config.json file (default: "
                        "config.model_name_or_path's config.json; bge-m3 when that is empty)")
    p.add_argument("--memory-gib", type=float, default=None,
                   help="judge fit against this many GiB per chip (required for a CPU target; on TPU the compiler "
                        "also enforces its own limit) (default: the device's own memory)")
    p.add_argument("--no-search", dest="search", action="store_false",
                   help="only compile the given shapes (one compile each); skip the largest-batch search")
    p.add_argument("--granularity", type=int, default=1,
                   help="stop the largest-batch search when the gap is at most this (default 1)")
    p.add_argument("--bisect", dest="predict", action="store_false",
                   help="narrow the largest-batch search by plain bisection, not by the batch where the memory line "
                        "through the compiles so far reaches the limit (the default: refused TPU compiles are fast "
                        "and say the bytes they needed, so the prediction saves fitting compiles)")
    p.add_argument("--search-limit", type=int, default=1024,
                   help="largest per-chip batch the search tries (default 1024; shown as LIMIT+ when it fits)")
    p.add_argument("--output", default=None, help="also write the results to this JSON file (default: none)")
    p.set_defaults(func=run)


def run(args) -> int:
    for name in ("granularity", "search_limit"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')}={getattr(args, name)}: a positive int")
    if args.memory_gib is not None and args.memory_gib <= 0:
        raise UsageError(f"--memory-gib={args.memory_gib}: a positive number")
    shapes = plan.parse_shapes(args.shapes) if args.shapes is not None else None
    if args.topology is not None:
        if not plan.is_known_topology(args.topology):  # before jax starts
            raise UsageError(f"--topology {args.topology!r}: unknown; known: {plan.known_topologies()}")
        if args.topology in plan.TOPOLOGIES:
            plan.prepare_tpu_environment()
        else:
            plan.prepare_gpu_environment()
    config = config_lib.config_from_argv(args.config_argv, "m3jax plan")
    target = (plan.compile_only_target(args.topology, memory_gib=args.memory_gib) if args.topology
              else plan.local_target(memory_gib=args.memory_gib))
    result = plan.plan(config, target, shapes=shapes, model_config=args.model_config, search=args.search,
                       granularity=args.granularity, limit=args.search_limit,
                       predict=args.predict)
    if args.output:
        with atomic_file(args.output) as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0
