"""What XLA says about a compiled train step: memory, trip-weighted matmul FLOPs, OOM, the largest batch that fits.

    compiled = jax.jit(step, ...).lower(abstract_state, abstract_batch).compile()
    memory_record(compiled)       per-device bytes: arguments, outputs, aliased, temp, code, total
    cost_flops(compiled)          XLA's own cost analysis (counts a while body once)
    hlo_stats(compiled.as_text()) matmul FLOPs of the optimised HLO, each weighted by how often it runs
    hlo_structure(compiled.as_text())  kernels, loops and trip counts, copies, host traffic per step
    thunk_structure(dumped text)  a GPU step's command buffers (CUDA graphs), from XLA's thunk-sequence dump
    target_device(mesh)           the platform and kind of the devices a step is compiled for

A step can be compiled for devices this host does not have (jax.experimental.topologies: compile-only TPU devices
on a CPU host, or NVIDIA GPUs through the CUDA plugin's deviceless compile: m3jax.plan.gpu_target); everything
here reads the compiled step and the mesh, never the host's backend.

Shapes are written BATCHxGROUP:QLEN:PLEN (BATCH queries per device, GROUP passages per query, QLEN / PLEN tokens);
`forward_flops` is the model-FLOP formula used for throughput figures: the encoder's forward matmul FLOPs,
attention included, embeddings, heads and loss not.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np

from m3jax.core.errors import M3JaxError

GIB = 2 ** 30


class BenchError(M3JaxError, ValueError):
    """A shape or setting the step cannot be compiled or run with."""


# ---------------------------------------------------------------------------------------------------------------
# Shapes and the model-FLOP formula


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int  # queries per device (per batch shard)
    group: int  # passages per query
    qlen: int
    plen: int

    @classmethod
    def parse(cls, text: str) -> Shape:
        m = re.fullmatch(r"\s*(\d+)x(\d+):(\d+):(\d+)\s*", text)
        if not m:
            raise BenchError(f"shape {text!r}: expected BATCHxGROUP:QLEN:PLEN, e.g. 32x8:64:256")
        shape = cls(*(int(x) for x in m.groups()))
        if shape.batch < 1 or shape.group < 1 or shape.qlen < 2 or shape.plen < 2:
            raise BenchError(f"shape {text!r}: batch and group must be >= 1, lengths >= 2")
        return shape

    def with_batch(self, batch: int) -> Shape:
        return dataclasses.replace(self, batch=batch)

    def __str__(self) -> str:
        return f"{self.batch}x{self.group}:{self.qlen}:{self.plen}"


def flops_per_token(model_cfg, length: int) -> int:
    """Forward matmul FLOPs of the encoder per token at sequence length `length`: per layer the four attention
    projections and the two FFN matmuls (2 x (4h^2 + 2hf)) and the two attention matmuls (4 x length x h)."""
    h, f = model_cfg.hidden_size, model_cfg.intermediate_size
    return model_cfg.num_hidden_layers * (2 * (4 * h * h + 2 * h * f) + 4 * length * h)


def forward_flops(model_cfg, shape: Shape) -> int:
    """Encoder forward matmul FLOPs of one device's share of a step."""
    b, g = shape.batch, shape.group
    return b * shape.qlen * flops_per_token(model_cfg, shape.qlen) + b * g * shape.plen * flops_per_token(
        model_cfg, shape.plen)


def tokens(shape: Shape) -> int:
    return shape.batch * shape.qlen + shape.batch * shape.group * shape.plen


# ---------------------------------------------------------------------------------------------------------------
# The compiled step


def target_device(mesh) -> dict:
    """backend (platform) and device_kind of the devices a mesh spans: the target of a compile, which need not be
    this host's backend."""
    devices = list(mesh.devices.flat)
    return dict(backend=devices[0].platform, device_kind=devices[0].device_kind)


def memory_record(compiled) -> dict:
    """Per-device bytes of a compiled step from XLA's memory analysis; total = what it needs at once (donated
    arguments are aliased to outputs and counted once)."""
    ma = compiled.memory_analysis()
    if ma is None:
        return {}
    get = lambda name: int(getattr(ma, name, 0) or 0)
    rec = dict(argument_bytes=get("argument_size_in_bytes"), output_bytes=get("output_size_in_bytes"),
               alias_bytes=get("alias_size_in_bytes"), temp_bytes=get("temp_size_in_bytes"),
               generated_code_bytes=get("generated_code_size_in_bytes"))
    rec["total_bytes"] = (rec["argument_bytes"] + rec["output_bytes"] - rec["alias_bytes"] + rec["temp_bytes"]
                          + rec["generated_code_bytes"])
    if hasattr(ma, "peak_memory_in_bytes"):
        rec["xla_peak_bytes"] = get("peak_memory_in_bytes")
    for k in ("argument", "temp", "total"):
        rec[f"{k}_gib"] = round(rec[f"{k}_bytes"] / GIB, 3)
    return rec


def cost_flops(compiled) -> float | None:
    """XLA's cost-analysis FLOPs. Caveat: XLA counts a while loop's body once, not once per iteration, so a
    scanned encoder's layers count as one layer (see `hlo_stats` for the trip-count-weighted matmul count)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- some backends do not implement it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    return None if not ca or "flops" not in ca else float(ca["flops"])


def analysis_record(compiled, model_cfg, shape: Shape, *, hlo: bool = True) -> dict:
    """memory_record + XLA's cost FLOPs + (with hlo) hlo_stats, with the FLOP counts as ratios of the forward
    formula (`matmul_ratio`: all matmuls; `encoder_matmul_ratio`: the encoder's; 4.0 with full remat)."""
    fwd = forward_flops(model_cfg, shape)
    rec = memory_record(compiled)
    xla = cost_flops(compiled)
    rec.update(model_forward_flops=float(fwd), xla_cost_flops=xla,
               xla_cost_ratio=None if xla is None else round(xla / fwd, 3))
    if hlo:
        text = compiled.as_text()
        stats = hlo_stats(text, vocab_size=model_cfg.vocab_size)
        rec.update(stats)
        rec["structure"] = hlo_structure(text)
        if stats:
            rec["matmul_ratio"] = round(stats["matmul_flops"] / fwd, 3)
            rec["encoder_matmul_ratio"] = round(stats["matmul_flops_by_part"].get("encoder", 0.0) / fwd, 3)
    return rec


# ---------------------------------------------------------------------------------------------------------------
# The optimised HLO text

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%([\w.\-]+)\s*=\s*(.*)$")
_COMMENT = re.compile(r"/\*.*?\*/")
_ARRAY = re.compile(r"\b(pred|s4|s8|s16|s32|s64|u4|u8|u16|u32|u64|f8e4m3fn|f8e5m2|bf16|f16|f32|f64|c64|c128)"
                    r"\[([\d,]*)\]")
_BYTES = dict(pred=1, s4=1, s8=1, s16=2, s32=4, s64=8, u4=1, u8=1, u16=2, u32=4, u64=8, f8e4m3fn=1, f8e5m2=1,
              bf16=2, f16=2, f32=4, f64=8, c64=8, c128=16)
_GEMM_TARGETS = ("gemm", "matmul")  # GPU: __cublas$gemm, __cublas$lt$matmul, ...
_ATTENTION_TARGETS = ("fmha", "flash", "attention")  # GPU: __cudnn$fmha... (fused attention kernels)
_PASS_THROUGH = ("copy", "convert", "bitcast", "reshape")  # ops that keep a scalar's value


@dataclasses.dataclass
class _Instr:
    name: str
    type: str
    op: str
    args: str  # the text between the op's parentheses
    attrs: str  # what follows them
    root: bool

    @property
    def operands(self) -> list[str]:
        return re.findall(r"%([\w.\-]+)", self.args)


def _split_type(text: str) -> tuple[str, str]:
    """'(s32[], f32[2]{0}) while(...)...' or 'f32[2,3]{1,0} dot(...)...' -> (type, rest)."""
    if text.startswith("("):
        depth = 0
        for i, ch in enumerate(text):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0:
                return text[:i + 1], text[i + 1:].lstrip()
    type_, _, rest = text.partition(" ")
    return type_, rest


def _split_call(rest: str) -> tuple[str, str, str]:
    """'dot(%a, %b), lhs_contracting_dims={1}' -> ('dot', '%a, %b', ', lhs_contracting_dims={1}')."""
    op, paren, tail = rest.partition("(")
    if not paren:
        return op.strip(), "", ""
    depth = 1
    for i, ch in enumerate(tail):
        depth += ch == "("
        depth -= ch == ")"
        if depth == 0:
            return op.strip(), tail[:i], tail[i + 1:]
    return op.strip(), tail, ""


def _dims(type_: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(type_)]


def _int_list(attrs: str, name: str) -> list[int]:
    m = re.search(name + r"=\{([\d,]*)\}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


def parse_hlo(hlo_text: str) -> tuple[dict[str, list[_Instr]], list[str], str | None]:
    """(computation name -> instructions, computation names in text order, entry name) of an HLO module's text."""
    computations: dict[str, list[_Instr]] = {}
    order: list[str] = []
    entry = None
    current = None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(1)
            computations[current] = []
            order.append(current)
            if line.startswith("ENTRY"):
                entry = current
            continue
        if current is None:
            continue
        m = _INSTRUCTION.match(_COMMENT.sub("", line))
        if m:
            type_, rest = _split_type(m.group(3))
            op, args, attrs = _split_call(rest)
            computations[current].append(_Instr(m.group(2), type_, op, args, attrs, bool(m.group(1))))
    return computations, order, entry


def _scalar_constant(name: str, instrs: dict[str, _Instr]) -> int | None:
    """The integer value of `name` if it is a constant (through copies and converts), else None."""
    seen = 0
    while name in instrs and seen < 16:
        ins = instrs[name]
        if ins.op == "constant":
            try:
                return int(ins.args.strip())
            except ValueError:
                return None
        if ins.op not in _PASS_THROUGH or len(ins.operands) != 1:
            return None
        name, seen = ins.operands[0], seen + 1
    return None


def _tuple_index(name: str, instrs: dict[str, _Instr]) -> int | None:
    """i if `name` is (a copy of) get-tuple-element(parameter, index=i), else None."""
    seen = 0
    while name in instrs and seen < 16:
        ins = instrs[name]
        if ins.op == "get-tuple-element":
            src = instrs.get(ins.operands[0]) if ins.operands else None
            m = re.search(r"index=(\d+)", ins.attrs)
            return int(m.group(1)) if m and src is not None and src.op == "parameter" else None
        if ins.op not in _PASS_THROUGH or len(ins.operands) != 1:
            return None
        name, seen = ins.operands[0], seen + 1
    return None


_SWAPPED = dict(LT="GT", GT="LT", LE="GE", GE="LE", NE="NE", EQ="EQ")


def _trip_count(loop: _Instr, caller: dict[str, _Instr], computations: dict[str, list[_Instr]]) -> int | None:
    """A while loop's trip count: XLA's known_trip_count annotation (GPU, CPU) or, where there is none (TPU), read
    from the loop: the condition compares the induction variable (tuple element i) with a constant, the loop's
    initial tuple holds a constant at i, and the body adds a constant to it (1 if that cannot be read)."""
    known = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', loop.attrs)
    if known:
        return int(known.group(1))
    cond_name = re.search(r"condition=%([\w.\-]+)", loop.attrs)
    body_name = re.search(r"body=%([\w.\-]+)", loop.attrs)
    cond = {i.name: i for i in computations.get(cond_name.group(1), [])} if cond_name else {}
    root = next((i for i in cond.values() if i.root), None)
    direction = re.search(r"direction=(\w+)", root.attrs) if root is not None and root.op == "compare" else None
    if direction is None or len(root.operands) != 2:
        return None
    a, b = root.operands
    direction = direction.group(1)
    index, limit = _tuple_index(a, cond), _scalar_constant(b, cond)
    if index is None or limit is None:  # constant on the left: N > i is i < N
        index, limit, direction = _tuple_index(b, cond), _scalar_constant(a, cond), _SWAPPED[direction]
    if index is None or limit is None:
        return None
    init_tuple = caller.get(loop.operands[0]) if loop.operands else None
    if init_tuple is None or init_tuple.op != "tuple" or index >= len(init_tuple.operands):
        return None
    start = _scalar_constant(init_tuple.operands[index], caller)
    if start is None:
        return None
    step = 1
    body = {i.name: i for i in computations.get(body_name.group(1), [])} if body_name else {}
    body_root = next((i for i in body.values() if i.root), None)
    if body_root is not None and body_root.op == "tuple" and index < len(body_root.operands):
        name = body_root.operands[index]
        while name in body and body[name].op in _PASS_THROUGH and len(body[name].operands) == 1:
            name = body[name].operands[0]
        add = body.get(name)
        if add is not None and add.op == "add" and len(add.operands) == 2:
            x, y = add.operands
            if _tuple_index(x, body) == index and _scalar_constant(y, body) is not None:
                step = _scalar_constant(y, body)
            elif _tuple_index(y, body) == index and _scalar_constant(x, body) is not None:
                step = _scalar_constant(x, body)
    if step <= 0:
        return None
    span = {"LT": limit - start, "LE": limit - start + 1}.get(direction)
    if direction == "NE" and (limit - start) % step == 0:
        span = limit - start
    return None if span is None else max(0, -(-span // step))


def _valid_taps(size_in: int, size_out: int, window: int, stride: int, pad_lo: int, lhs_dilate: int,
                rhs_dilate: int) -> int:
    """Number of (output position, window tap) pairs of one spatial dimension of a convolution that read a real
    input element (not padding, not a hole of the lhs dilation). TPU writes batched matmuls as convolutions whose
    batch dims are spatial dims with padded or dilated windows where only one tap per output is real."""
    last = (size_in - 1) * lhs_dilate  # position of the last real element in the dilated input
    total = 0
    for k in range(window):
        offset = k * rhs_dilate - pad_lo  # input position of output 0 for this tap
        if lhs_dilate == 1:  # 0 <= o * stride + offset <= last
            lo = max(0, -(offset // stride))  # ceil(-offset / stride)
            hi = min(size_out - 1, (last - offset) // stride)
            total += max(0, hi - lo + 1)
        else:
            pos = np.arange(size_out) * stride + offset
            total += int(np.count_nonzero((pos >= 0) & (pos <= last) & (pos % lhs_dilate == 0)))
    return total


def convolution_flops(out_type: str, lhs_type: str, rhs_type: str, attrs: str) -> int | None:
    """2 x (output batch x output features) x contracted size: the kernel's input features times, per spatial
    dimension, the window taps that read a real input element (a dot written as a convolution has no window, or
    windows whose padding / dilation leave one real tap per output). None if the operands are not arrays."""
    out, lhs, rhs = _dims(out_type), _dims(lhs_type), _dims(rhs_type)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", attrs)
    if not (out and lhs and rhs and labels):
        return None
    out, lhs, rhs = out[0][1], lhs[0][1], rhs[0][1]
    lhs_l, rhs_l, out_l = labels.groups()
    spatial = sorted(c for c in out_l if c.isdigit())
    window = re.search(r"window=\{([^}]*)\}", attrs)
    fields = dict(f.split("=", 1) for f in window.group(1).split()) if window else {}

    def per_dim(name: str, default: int) -> list[int]:
        return [int(x) for x in fields[name].split("x")] if name in fields else [default] * len(spatial)

    sizes, strides = per_dim("size", 1), per_dim("stride", 1)
    lhs_dil, rhs_dil = per_dim("lhs_dilate", 1), per_dim("rhs_dilate", 1)
    pads = [int(p.split("_")[0]) for p in fields["pad"].split("x")] if "pad" in fields else [0] * len(spatial)
    taps = 1
    for d, c in enumerate(spatial):
        taps *= _valid_taps(lhs[lhs_l.index(c)], out[out_l.index(c)], sizes[d], strides[d], pads[d], lhs_dil[d],
                            rhs_dil[d])
    out_spatial = math.prod(out[out_l.index(c)] for c in spatial)
    return 2 * (math.prod(out) // max(1, out_spatial)) * rhs[rhs_l.index("i")] * taps


def hlo_stats(hlo_text: str, *, vocab_size: int | None = None, top: int = 8) -> dict:
    """Matmul FLOPs and materialised buffers of an optimised HLO module (`compiled.as_text()`), GPU, CPU or TPU.

    matmul_flops: 2 x output elements x contracted size of every dot, GPU gemm custom call and TPU convolution
    (TPU HLO writes matmuls as convolutions), each weighted by how often its computation runs: while bodies by
    their trip count (scan over layers; see `_trip_count`), fusions and calls by their callers. Loops whose trip
    count cannot be read count once and in unknown_trip_counts. Fused attention kernels (cuDNN custom calls) are
    not dots: counted in fused_attention_calls only. Split by the op's source (metadata op_name): encoder layers,
    the M3 heads, and the loss / the rest; `recomputed` is the part under remat (rematted_computation).
    largest_buffers: the biggest arrays outside fusions (values XLA may materialise), largest first.
    """
    computations, order, entry = parse_hlo(hlo_text)
    if entry is None:
        return {}

    # Call graph multiplicities: how often each computation runs (while bodies by their trip counts).
    mult, fusion_bodies, loops = _call_multiplicities(computations, order, entry)
    unknown_trip_counts = sum(loop["trip_count"] is None for loop in loops)
    trip_counts = [1 if loop["trip_count"] is None else loop["trip_count"] for loop in loops]

    flops = collections.Counter()
    dots = 0
    attention_calls = 0
    buffers: dict[tuple[str, tuple[int, ...]], int] = {}
    largest_vocab = 0
    for name in order:
        m_here = mult.get(name, 0.0)
        types = {ins.name: ins.type for ins in computations[name]}
        for ins in computations[name]:
            if name not in fusion_bodies and ins.op not in ("parameter", "get-tuple-element", "tuple", "bitcast"):
                for dt, dims in _dims(ins.type):
                    nbytes = math.prod(dims) * _BYTES[dt]
                    buffers[(dt, dims)] = max(buffers.get((dt, dims), 0), nbytes)
            for _, dims in _dims(ins.type):
                if vocab_size and vocab_size in dims:
                    largest_vocab = max(largest_vocab, math.prod(dims))
            target = re.search(r'custom_call_target="([^"]*)"', ins.attrs) if ins.op == "custom-call" else None
            if target and any(t in target.group(1).lower() for t in _ATTENTION_TARGETS):
                attention_calls += m_here
                continue
            operands = ins.operands
            if ins.op == "convolution":
                if len(operands) < 2:
                    continue
                count = convolution_flops(ins.type, types.get(operands[0], ""), types.get(operands[1], ""),
                                          ins.attrs)
            elif ins.op == "dot" or (target and any(t in target.group(1).lower() for t in _GEMM_TARGETS)):
                if ins.op == "dot":
                    contracting = _int_list(ins.attrs, "lhs_contracting_dims")
                else:
                    cd = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', ins.attrs)
                    contracting = [int(x.strip('" ')) for x in cd.group(1).split(",") if x.strip('" ')] if cd else []
                lhs = _dims(types.get(operands[0], "")) if operands else []
                out = _dims(ins.type)
                count = (2 * math.prod(out[0][1]) * math.prod(lhs[0][1][d] for d in contracting)
                         if lhs and out else None)
            else:
                continue
            if count is None:
                continue
            meta = re.search(r'op_name="([^"]*)"', ins.attrs)
            source = meta.group(1) if meta else ""
            part = "encoder" if "/encoder/" in source else "heads" if "BGEM3.heads" in source else "loss_and_rest"
            if "rematted_computation" in source:
                flops["recomputed"] += count * m_here
            flops[part] += count * m_here
            dots += 1
    biggest = sorted(buffers.items(), key=lambda kv: -kv[1])[:top]
    return dict(
        matmul_flops=float(flops["encoder"] + flops["heads"] + flops["loss_and_rest"]),
        matmul_flops_by_part={k: float(v) for k, v in flops.items()},
        dot_instructions=dots, fused_attention_calls=int(attention_calls),
        while_trip_counts=sorted(set(trip_counts), reverse=True), unknown_trip_counts=unknown_trip_counts,
        largest_buffers=[dict(shape=f"{dt}[{','.join(map(str, dims))}]", gib=round(n / GIB, 3))
                         for (dt, dims), n in biggest],
        largest_vocab_array_elements=largest_vocab)


# ---------------------------------------------------------------------------------------------------------------
# The optimised HLO's structure: kernels, loops, copies, host traffic

# Ops that launch no kernel of their own (bookkeeping, aliases, control flow whose bodies are counted instead).
_NO_KERNEL = {"parameter", "get-tuple-element", "tuple", "bitcast", "constant", "while", "conditional", "call",
              "after-all", "partition-id", "replica-id", "opt-barrier", "add-dependency", "domain",
              "copy-done", "send-done", "recv-done", "async-done", "all-reduce-done", "all-gather-done",
              "collective-permute-done"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute",
                "collective-broadcast", "ragged-all-to-all")
_HOST_OPS = ("send", "recv", "infeed", "outfeed")
_HOST_TARGETS = ("callback", "host", "movetohost", "movetodevice")


def _call_multiplicities(computations, order, entry) -> tuple[dict[str, float], set[str], list[dict]]:
    """(computation -> how often it runs per call of the entry, fusion bodies, the while loops: name, trip count
    (None if unread), how often the loop itself runs, its body)."""
    mult: dict[str, float] = collections.defaultdict(float)
    mult[entry] = 1.0
    fusion_bodies: set[str] = set()
    loops = []
    for name in reversed(order):
        m_here = mult.get(name, 0.0)
        by_name = {i.name: i for i in computations[name]}
        for ins in computations[name]:
            if ins.op == "while":
                n = _trip_count(ins, by_name, computations)
                body = re.search(r"body=%([\w.\-]+)", ins.attrs)
                loops.append(dict(name=ins.name, trip_count=n, runs=m_here, body=body.group(1) if body else None))
                for key, factor in (("body", 1 if n is None else n), ("condition", (1 if n is None else n) + 1)):
                    callee = re.search(key + r"=%([\w.\-]+)", ins.attrs)
                    if callee:
                        mult[callee.group(1)] += m_here * factor
                continue
            for callee in re.findall(r"(?:calls|to_apply|true_computation|false_computation)=%([\w.\-]+)",
                                     ins.attrs):
                mult[callee] += m_here
                if ins.op == "fusion":
                    fusion_bodies.add(callee)
            branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
            if branches:
                for callee in re.findall(r"%([\w.\-]+)", branches.group(1)):
                    mult[callee] += m_here
    return mult, fusion_bodies, loops


def _fusion_kind(ins: _Instr) -> str:
    """kLoop / kInput / kOutput, or a custom fusion's backend kind (__triton_gemm, __cudnn$fusion, ...)."""
    kind = re.search(r"kind=(k\w+)", ins.attrs)
    kind = kind.group(1) if kind else "?"
    if kind == "kCustom":
        named = re.search(r'"custom_fusion_config":\{"name":"([^"]+)"', ins.attrs)  # e.g. dynamic_slice_fusion
        custom = named or re.search(r'"fusion_backend_config":\{"kind":"([^"]+)"', ins.attrs)
        return custom.group(1) if custom else kind
    return kind


def hlo_structure(hlo_text: str) -> dict:
    """What an optimised HLO module (`compiled.as_text()`) runs, per step: kernels (fusions by kind, custom calls
    by target, unfused copies and transposes) as written (`static`) and as launched (`per_step`: weighted by how
    often their computation runs, while bodies by trip count), the while loops with their trip counts and the
    kernels of one iteration, the bytes unfused copies move, collectives, and host traffic (send / recv / infeed /
    outfeed, host-memory-space copies, host callbacks). A GPU's command buffers (CUDA graphs) are formed after the
    HLO, on XLA's thunk sequence: `thunk_structure` reads those."""
    computations, order, entry = parse_hlo(hlo_text)
    if entry is None:
        return {}
    mult, _, loops = _call_multiplicities(computations, order, entry)
    # The computations whose instructions are launched: the entry and, through control flow, loop bodies and
    # conditions, called and branch computations, async wrappers; not fusion bodies nor reducers (to_apply).
    launched, todo = set(), [entry]
    while todo:
        name = todo.pop()
        if name in launched or name not in computations:
            continue
        launched.add(name)
        for ins in computations[name]:
            keys = {"while": ("body", "condition"), "call": ("to_apply",),
                    "conditional": ("true_computation", "false_computation")}.get(ins.op, ())
            if ins.op.endswith("-start") and ins.op.split("-start")[0] not in _COLLECTIVES:
                keys = ("calls",)
            for key in keys:
                todo += re.findall(key + r"=%([\w.\-]+)", ins.attrs)
            branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs) if ins.op == "conditional" else None
            if branches:
                todo += re.findall(r"%([\w.\-]+)", branches.group(1))
    static, per_step = collections.Counter(), collections.Counter()
    fusion_kinds, custom_calls = collections.Counter(), collections.Counter()
    copy_bytes = 0.0
    kernels_in: dict[str, float] = collections.defaultdict(float)  # computation -> kernels per call of it
    for name in order:
        if name not in launched:
            continue
        m_here = mult.get(name, 0.0)
        for ins in computations[name]:
            op = ins.op
            if op in _NO_KERNEL:
                continue
            kinds = []
            if op == "fusion":
                kind = _fusion_kind(ins)
                fusion_kinds[kind] += 1
                kinds.append("fusions")
            elif op == "custom-call":
                target = re.search(r'custom_call_target="([^"]*)"', ins.attrs)
                target = target.group(1) if target else "?"
                custom_calls[target] += 1
                kinds.append("custom_calls")
                if any(t in target.lower() for t in _HOST_TARGETS):
                    kinds.append("host_transfers")
            elif op in ("copy", "copy-start"):
                kinds.append("copies")
                copy_bytes += m_here * sum(math.prod(d) * _BYTES[dt] for dt, d in _dims(ins.type)[:1])
                if op == "copy-start" and "S(5)" in ins.type:  # to or from host memory (memory space 5)
                    kinds.append("host_transfers")
            elif op == "transpose":
                kinds.append("transposes")
            elif op.split("-start")[0] in _COLLECTIVES:
                kinds.append("collectives")
            elif op in _HOST_OPS:
                kinds.append("host_transfers")
            else:
                kinds.append("other_ops")
            for k in kinds:
                static[k] += 1
                per_step[k] += m_here
            if op not in _HOST_OPS:  # send / recv / infeed / outfeed: host traffic, no kernel
                per_step["kernels"] += m_here
                static["kernels"] += 1
                kernels_in[name] += 1
    # Kernels of one iteration of a loop: its body and what the body calls (nested loops by their trip counts).
    def per_call(name: str, depth: int = 0) -> float:
        if depth > 32:
            return 0.0
        total = kernels_in.get(name, 0.0)
        for ins in computations.get(name, []):
            if ins.op == "while":
                n = next((lp["trip_count"] for lp in loops if lp["name"] == ins.name), None) or 1
                body = re.search(r"body=%([\w.\-]+)", ins.attrs)
                total += n * per_call(body.group(1), depth + 1) if body else 0
            elif ins.op in ("call", "conditional"):
                for callee in re.findall(r"(?:to_apply|calls|true_computation|false_computation)=%([\w.\-]+)",
                                         ins.attrs):
                    total += per_call(callee, depth + 1)
        return total

    return dict(
        static={k: int(v) for k, v in sorted(static.items())},
        per_step={k: round(v) for k, v in sorted(per_step.items())},
        fusion_kinds=dict(fusion_kinds.most_common()),
        custom_calls=dict(custom_calls.most_common()),
        copy_gib_per_step=round(copy_bytes / GIB, 3),
        while_loops=[dict(name=lp["name"], trip_count=lp["trip_count"], runs_per_step=round(lp["runs"]),
                          kernels_per_iteration=round(per_call(lp["body"])) if lp["body"] else None)
                     for lp in reversed(loops)])


_THUNK = re.compile(r"^(\s*)\d+:\s+(k\w+)")


def thunk_structure(thunk_text: str) -> dict:
    """XLA GPU's thunk sequence after its thunk passes (the dump's *thunk_sequence_after_thunk_passes.txt, written
    with XLA_FLAGS=--xla_dump_to=DIR), as written (loop bodies once): the command buffers (CUDA graphs, each
    launched by the host as one), the thunks inside them, and the thunks outside any (each issued by the host on
    its own: kernels, copies, while loops -- whose bodies the host drives iteration by iteration), by kind.
    Nesting is read from the indentation."""
    outside, inside = collections.Counter(), collections.Counter()
    regions = 0
    region_indent = None
    for line in thunk_text.splitlines():
        m = _THUNK.match(line)
        if not m:
            continue
        indent, kind = len(m.group(1)), m.group(2)
        if region_indent is not None and indent <= region_indent:
            region_indent = None
        if region_indent is None:
            outside[kind] += 1
            if kind == "kCommandBuffer":
                regions += 1
                region_indent = indent
        else:
            inside[kind] += 1
    outside.pop("kCommandBuffer", None)
    return dict(command_buffers=regions, thunks_in_command_buffers=sum(inside.values()),
                thunks_outside=sum(outside.values()), outside=dict(outside.most_common()),
                inside=dict(inside.most_common()))


# ---------------------------------------------------------------------------------------------------------------
# Out of memory, and the largest batch that fits


def is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError):
        return True
    text = f"{type(e).__name__}: {e}"
    return any(s in text for s in ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OutOfMemory"))


def short(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def predict_boundary(needs: dict[int, float], budget: float) -> float | None:
    """The batch at which the memory a step needs reaches `budget`, on the straight line through two measured
    points: `needs` maps batch -> bytes (XLA's peak of a compiled step, or what the TPU compiler said it required
    when it refused one). The points nearest the boundary on either side when both exist; else the two nearest it
    on the one side there is; a single point over budget gives the line through the origin. None when the points
    cannot tell (none, or memory not growing with the batch)."""
    under = sorted(b for b, n in needs.items() if n <= budget)
    over = sorted(b for b, n in needs.items() if n > budget)
    if under and over:
        pair = (under[-1], over[0])
    elif len(over) >= 2:
        pair = (over[0], over[1])
    elif len(under) >= 2:
        pair = (under[-2], under[-1])
    elif over:
        return over[0] * budget / needs[over[0]]
    else:
        return None
    (b1, n1), (b2, n2) = ((b, needs[b]) for b in pair)
    slope = (n2 - n1) / (b2 - b1)
    return None if slope <= 0 else b1 + (budget - n1) / slope


def search_max_batch(fits: Callable[[int], bool], start: int, *, limit: int = 1 << 16, granularity: int = 1,
                     needs: dict[int, float] | None = None, budget: Callable[[], float | None] | None = None
                     ) -> tuple[int, int | None]:
    """(largest batch that fits, smallest that does not): doubling from `start`, then narrowing the bracket until
    the gap is at most `granularity`. `fits` is assumed monotone. Returns (0, start) if not even batch 1 fits.

    Narrowing is bisection, unless `fits` records in `needs` the bytes each batch it tried needs and `budget()`
    gives the bytes that fit: then each try is the batch where the line through the measured points reaches the
    budget (`predict_boundary`; memory is close to affine in the batch), and two tries in a row that do not halve
    the bracket are followed by a bisection step -- the answer is the same, in fewer tries when the line is right.
    A TPU compile that does not fit is refused in seconds while one that fits takes minutes, so two refused sizes
    that predict the boundary and one fitting compile that confirms it are the cheap way there."""
    lo, hi = 0, None
    b = max(1, start)
    while hi is None:
        if fits(b):
            lo = b
            if b >= limit:
                return lo, None
            b = min(2 * b, limit)
        else:
            hi = b
    gap = 1 if lo == 0 else granularity  # start did not fit: find the exact largest batch below it
    misses = 0  # guesses in a row that did not halve the bracket
    while hi - lo > gap:
        b = (lo + hi) // 2
        limit_bytes = budget() if (needs is not None and budget is not None and misses < 2) else None
        guess = predict_boundary(needs, limit_bytes) if limit_bytes else None
        if guess is not None:
            b = min(max(int(guess), lo + 1), hi - 1)
        width = hi - lo
        if fits(b):
            lo = b
        else:
            hi = b
        misses = 0 if guess is None or 2 * (hi - lo) <= width else misses + 1
    return lo, hi
