"""Where a step's time goes: a jax.profiler trace of a few steps, reduced to a table.

    python -m benchmarks.profile_trace TRACE_DIR [--steps N]     # print the table of a captured trace
    from benchmarks.profile_trace import capture, reduce_trace    # benchmarks/train_step.py --profile DIR

`capture(fn, steps, out_dir)` traces `steps` calls of fn (already compiled and warmed up) with jax.profiler and
returns the .xplane.pb path; `reduce_trace(path, steps)` reads it with `jax.profiler.ProfileData` (no TensorBoard)
and returns a JSON-able dict:
  device       the accelerator plane's kernels (GPU: the stream lines; TPU: "XLA Ops"): busy time (the union of
               kernel intervals), the window from the first kernel's start to the last one's end, idle = window -
               busy (host gaps and loop overhead: the device waits for work), kernels per step;
  by_kind      kernel time by kind: matmul, attention, copy/transpose, collective, reduction, other fusion
               (the kernel's name classified by KINDS, first match wins), ms per step and share of busy time;
  top_kernels  the 20 kernels with the most time: name, kind, calls per step, ms per step;
  host         the host threads' longest event kinds (ms per step), e.g. the dispatch and any wait on the device.
On CPU (tests) there is no device plane: `device` is None and the host table still tells where time went.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import re
from collections import defaultdict

# A kernel's kind by its name, first match wins (cuBLAS / cuBLASLt / CUTLASS / nvjet GEMMs, cuDNN's fused attention,
# NCCL, XLA's emitted fusions by their HLO names).
KINDS = (
    ("attention", re.compile(r"fmha|flash|sdpa|cudnn|attention|splash", re.I)),
    ("matmul", re.compile(r"gemm|cublas|cutlass|nvjet|xmma|wgmma|matmul|gemv|convolution|\bdot\b|dot_|_dot", re.I)),
    ("collective", re.compile(r"nccl|all-reduce|all_reduce|all-gather|all_gather|reduce-scatter|collective", re.I)),
    ("copy/transpose", re.compile(r"memcpy|memset|copy|transpose|dynamic[-_.]update[-_.]slice|concatenate|"
                                  r"\bslice|pad", re.I)),
    ("reduction", re.compile(r"reduce|argmax|scatter|sort", re.I)),
)


def kind_of(name: str) -> str:
    for kind, pattern in KINDS:
        if pattern.search(name):
            return kind
    return "other fusion"


def capture(fn, steps: int, out_dir: str) -> str:
    """Trace `steps` calls of `fn()` (each returning something to block on) into out_dir; the .xplane.pb path."""
    import jax

    os.makedirs(out_dir, exist_ok=True)
    with jax.profiler.trace(out_dir):
        out = None
        for i in range(steps):
            with jax.profiler.StepTraceAnnotation("train", step_num=i):
                out = fn()
        jax.block_until_ready(out)
    paths = sorted(glob.glob(os.path.join(out_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"{out_dir}: jax.profiler wrote no .xplane.pb")
    return paths[-1]


def _union(intervals) -> int:
    total, end = 0, None
    for s, e in sorted(intervals):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def _device_lines(plane):
    lines = list(plane.lines)
    if plane.name.startswith("/device:GPU"):
        return [line for line in lines if line.name.startswith("Stream")]
    return [line for line in lines if line.name == "XLA Ops"]


def reduce_trace(path: str, steps: int, top: int = 20) -> dict:
    from jax.profiler import ProfileData

    data = ProfileData.from_file(path)
    planes = list(data.planes)
    device = None
    for plane in planes:
        if not (plane.name.startswith("/device:GPU") or plane.name.startswith("/device:TPU")):
            continue
        events = [(e.start_ns, e.start_ns + e.duration_ns, e.name) for line in _device_lines(plane)
                  for e in line.events]
        if not events:
            continue
        busy = _union((s, e) for s, e, _ in events)
        window = max(e for _, e, _ in events) - min(s for s, _, _ in events)
        kinds, kernels = defaultdict(int), defaultdict(lambda: [0, 0])
        for s, e, name in events:
            kinds[kind_of(name)] += e - s
            kernels[name][0] += 1
            kernels[name][1] += e - s
        ms = lambda ns: round(ns / 1e6 / steps, 3)
        device = dict(
            plane=plane.name, steps=steps, window_ms=ms(window), busy_ms=ms(busy), idle_ms=ms(window - busy),
            idle_share=round((window - busy) / max(window, 1), 4), kernels_per_step=round(len(events) / steps, 1),
            by_kind={k: dict(ms=ms(v), share_of_busy=round(v / max(busy, 1), 4))
                     for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
            top_kernels=[dict(name=n[:160], kind=kind_of(n), calls_per_step=round(c / steps, 1), ms=ms(t))
                         for n, (c, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1])[:top]])
        break
    host = defaultdict(lambda: [0, 0])
    for plane in planes:
        if not plane.name.startswith("/host"):
            continue
        for line in plane.lines:
            for e in line.events:
                host[e.name][0] += 1
                host[e.name][1] += e.duration_ns
    host_top = [dict(name=n[:160], calls_per_step=round(c / steps, 1), ms=round(t / 1e6 / steps, 3))
                for n, (c, t) in sorted(host.items(), key=lambda kv: -kv[1][1])[:top]]
    return dict(trace=path, device=device, host=host_top)


def markdown(table: dict) -> str:
    """The reduced trace as Markdown (BENCHMARKS.md)."""
    out = []
    dev = table["device"]
    if dev:
        out.append(f"device {dev['plane']}: window {dev['window_ms']} ms/step, busy {dev['busy_ms']}, idle "
                   f"{dev['idle_ms']} ({100 * dev['idle_share']:.1f}%), {dev['kernels_per_step']} kernels/step")
        out.append("")
        out.append("| kind | ms/step | share of busy |")
        out.append("|---|---|---|")
        out += [f"| {k} | {v['ms']} | {100 * v['share_of_busy']:.1f}% |" for k, v in dev["by_kind"].items()]
        out.append("")
        out.append("| kernel | kind | calls/step | ms/step |")
        out.append("|---|---|---|---|")
        out += [f"| `{k['name'][:90]}` | {k['kind']} | {k['calls_per_step']} | {k['ms']} |" for k in dev["top_kernels"]]
    out.append("")
    out.append("| host event | calls/step | ms/step |")
    out.append("|---|---|---|")
    out += [f"| `{h['name'][:90]}` | {h['calls_per_step']} | {h['ms']} |" for h in table["host"]]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", help="a .xplane.pb file or a directory holding one (jax.profiler.trace's output)")
    p.add_argument("--steps", type=int, default=1, help="steps in the trace (per-step figures divide by it)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
    args = p.parse_args(argv)
    path = args.trace
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
        if not found:
            print(f"{path}: no .xplane.pb under it")
            return 2
        path = found[-1]
    table = reduce_trace(path, args.steps)
    print(json.dumps(table) if args.json else markdown(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
