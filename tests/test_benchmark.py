"""m3jax bench (m3jax/benchmark.py) and scripts/device_bench.sh, on CPU.

* the tiny model runs the real train step and prints the PyTorch reference's JSON fields with sane values;
* --find-max-batch against a memory budget returns a batch whose analysed memory fits and whose double does not;
* --analyze at a real bge-m3 shape (24 layers, hidden 1024, vocab 250002) guards memory and FLOPs: the figures and
  how the bounds were derived are in BENCHMARKS.md ("CPU analysis");
* the accelerator script's dry run prints the commands, and its real run (with a fake python) runs them in order
  under a deadline.
"""
import ast
import json
import math
import os
import stat
import subprocess

import pytest

from m3jax import benchmark

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ANCHOR = os.path.join(REPO, "..", "shared", "bench", "torch_m3_anchor.py")
# The fields of one line of the PyTorch reference (torch_m3_anchor.py), success and OOM alike.
ANCHOR_FIELDS = {"impl", "ckpt", "batch", "group", "qlen", "plen", "sub_batch", "step_s", "queries_per_s",
                 "tokens_per_s", "model_tflops", "loss", "peak_gib"}

# --analyze of the bge-m3 step at 32x8:64:256 on CPU (jax 0.10.2, bf16, remat full, XLA attention): temp was
# 23,748,476,480 bytes (22.12 GiB). The guard is that x 1.25; see BENCHMARKS.md for what the temp holds.
BGE_M3_SHAPE = "32x8:64:256"
BGE_M3_TEMP_BOUND = int(1.25 * 23_748_476_480)


def _args(argv):
    parser = benchmark.argparse.ArgumentParser()
    benchmark.add_arguments(parser)
    return parser.parse_args(argv)


def _run(argv):
    records = []
    benchmark.run(_args(argv), emit=records.append)
    return records


# ---------------------------------------------------------------------------------------------------------------
# Pure parts


def test_shape_parsing_and_the_reference_flop_formula():
    s = benchmark.Shape.parse("32x8:64:256")
    assert (s.batch, s.group, s.qlen, s.plen) == (32, 8, 64, 256) and str(s) == "32x8:64:256"
    for bad in ("32x8:64", "x8:64:256", "0x8:64:256", "32x8:1:256", "a"):
        with pytest.raises(benchmark.BenchError):
            benchmark.Shape.parse(bad)
    h, f, layers = 1024, 4096, 24  # the reference's flops_per_token at bge-m3's shape

    class Cfg:
        hidden_size, intermediate_size, num_hidden_layers = h, f, layers

    for length in (64, 256, 2048, 8192):
        assert benchmark.flops_per_token(Cfg, length) == layers * (2 * (4 * h * h + 2 * h * f) + 4 * length * h)
    assert benchmark.forward_flops(Cfg, s) == 32 * 64 * benchmark.flops_per_token(Cfg, 64) + \
        256 * 256 * benchmark.flops_per_token(Cfg, 256)
    assert benchmark.auto_sub_batch(8192) == 1 and benchmark.auto_sub_batch(2048) == 5
    assert benchmark.auto_sub_batch(256) == 32


def test_search_max_batch_doubles_then_bisects():
    tried = []

    def fits_up_to(n):
        def fits(b):
            tried.append(b)
            return b <= n
        return fits

    assert benchmark.search_max_batch(fits_up_to(13), 4) == (13, 14)
    assert tried == [4, 8, 16, 12, 14, 13]
    tried.clear()
    assert benchmark.search_max_batch(fits_up_to(2), 8) == (2, 3)  # the start itself does not fit
    assert benchmark.search_max_batch(fits_up_to(0), 4) == (0, 1)
    tried.clear()
    assert benchmark.search_max_batch(fits_up_to(13), 4, granularity=4) == (12, 16)
    assert tried == [4, 8, 16, 12]
    assert benchmark.search_max_batch(fits_up_to(100), 4, granularity=1000) == (64, 128)


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
    stats = benchmark.hlo_stats(hlo, vocab_size=250002)
    assert stats["matmul_flops_by_part"]["encoder"] == 24 * 2 * 4 * 8 * 8
    assert stats["matmul_flops_by_part"]["loss_and_rest"] == 2 * 4 * 8 * 4
    assert stats["while_trip_counts"] == [24] and stats["unknown_trip_counts"] == 0
    assert stats["largest_vocab_array_elements"] == 3 * 250002


# ---------------------------------------------------------------------------------------------------------------
# The tiny model, run for real


@pytest.fixture(scope="module")
def tiny_run():
    # Default mesh: the batch shards over all 8 simulated CPU devices (conftest), as on a multi-GPU host.
    return _run(["--tiny", "--shapes", "2x2:8:16", "--steps", "2", "--warmup", "1", "--fast-compile", "on"])


def test_tiny_mode_runs_the_step_and_prints_every_field(tiny_run):
    (rec,) = tiny_run
    assert ANCHOR_FIELDS <= rec.keys(), ANCHOR_FIELDS - rec.keys()
    assert "error" not in rec
    assert rec["impl"] == "m3jax" and rec["model"] == "tiny" and rec["ckpt"] == 1 and rec["remat"] == "full"
    assert (rec["batch"], rec["group"], rec["qlen"], rec["plen"]) == (2, 2, 8, 16)
    import jax

    w = rec["devices"]
    assert w == len(jax.devices()) and rec["mesh"]["data"] == w
    assert math.isfinite(rec["loss"]) and rec["loss"] > 0
    assert rec["step_s"] > 0 and rec["compile_s"] > 0 and rec["tokens_per_s"] > 0
    assert abs(rec["tokens_per_s"] - w * (2 * 8 + 2 * 2 * 16) / rec["step_s"]) / rec["tokens_per_s"] < 0.01
    assert rec["queries_per_s"] > 0 and rec["model_tflops"] >= 0
    assert rec["peak_gib"] is not None and rec["peak_gib"] >= 0 and rec["analysed_gib"] > 0
    assert rec["backend"] == "cpu" and rec["dtype"] == "float32"  # --dtype auto: float32 for CPU runs
    json.dumps(rec)  # one JSON line


def _anchor_fields_from_source(path):
    """Keyword names of the reference's `rec = dict(...)` and `rec.update(...)` calls."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            is_dict = isinstance(func, ast.Name) and func.id == "dict"
            is_update = isinstance(func, ast.Attribute) and func.attr == "update" and \
                isinstance(func.value, ast.Name) and func.value.id == "rec"
            if is_dict or is_update:
                names.update(k.arg for k in node.keywords if k.arg)
    return names - {"error"}


def test_json_schema_matches_the_reference(tiny_run):
    if os.path.isfile(ANCHOR):
        assert _anchor_fields_from_source(ANCHOR) == ANCHOR_FIELDS
    rec = tiny_run[0]
    assert ANCHOR_FIELDS <= rec.keys()
    assert isinstance(rec["impl"], str) and isinstance(rec["ckpt"], int)
    for k in ("batch", "group", "qlen", "plen", "sub_batch", "tokens_per_s"):
        assert isinstance(rec[k], int), k
    for k in ("step_s", "queries_per_s", "model_tflops", "loss", "peak_gib", "compile_s"):
        assert isinstance(rec[k], (int, float)), k


def test_main_prints_json_lines_and_cli_reports_bad_shapes(capsys):
    from m3jax import cli

    assert cli.main(["bench", "--shapes", "1x1:64"]) == 2
    assert "m3jax bench: error: shape '1x1:64'" in capsys.readouterr().err
    assert benchmark.main(["--remat", "everything", "--tiny"]) == 2
    assert benchmark.main(["--env"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    env = json.loads(line)
    assert env["mode"] == "env" and env["m3jax_trainer"] == "ok" and env["jax"]


def test_oom_becomes_an_error_line():
    assert benchmark.is_oom(RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB"))
    assert benchmark.is_oom(MemoryError())
    assert not benchmark.is_oom(ValueError("shapes do not match"))


# ---------------------------------------------------------------------------------------------------------------
# Max batch by memory analysis


def test_find_max_batch_against_a_memory_budget():
    budget_gib = 0.028  # tiny model, 2 x 16 / 64 tokens: about 0.022 GiB at batch 8, 0.034 at 16
    (rec,) = _run(["--tiny", "--mesh", "data=1", "--find-max-batch", "8x2:16:64", "--memory-budget-gib",
                   str(budget_gib), "--granularity", "1000"])  # pure doubling: the first failure is 2 x the best
    assert rec["mode"] == "find_max_batch" and rec["method"] == "memory_analysis"
    best, tries = rec["max_batch"], {t["batch"]: t for t in rec["tries"]}
    assert best >= 1 and rec["first_failing_batch"] == 2 * best
    budget = rec["budget_bytes"]
    assert budget == int(budget_gib * 2 ** 30)
    assert tries[best]["fits"] and tries[best]["bytes"] <= budget
    assert not tries[2 * best]["fits"] and tries[2 * best]["bytes"] > budget
    sizes = [t["bytes"] for t in sorted(rec["tries"], key=lambda t: t["batch"])]
    assert sizes == sorted(sizes)  # memory grows with the batch
    assert rec["gib_at_max"] == tries[best]["gib"] and rec["group"] == 2 and rec["plen"] == 64


# ---------------------------------------------------------------------------------------------------------------
# Analysis of the real bge-m3 step on CPU


def test_analyze_bge_m3_step_memory_and_flops():
    (rec,) = _run(["--analyze", "--mesh", "data=1", "--shapes", BGE_M3_SHAPE])
    assert "error" not in rec and rec["model"] == "bge-m3" and rec["dtype"] == "bfloat16"
    b, g, lq, lp, vocab, hidden = 32, 8, 64, 256, 250002, 1024

    # Arguments are exactly the float32 params and the two AdamW moments (the donated state); no batch-sized copy.
    bench = benchmark.Bench(_args(["--mesh", "data=1"]), remat="full", for_run=False)
    params = bench.jax.tree.leaves(bench.stepper.abstract_params)
    param_bytes = sum(math.prod(x.shape) * x.dtype.itemsize for x in params)
    batch_bytes = 4 * (2 * b * lq + 2 * b * g * lp + b * g)
    assert 3 * param_bytes <= rec["argument_bytes"] <= 3 * param_bytes + batch_bytes + 2 ** 20
    assert rec["alias_bytes"] >= 3 * param_bytes  # the state is donated: updated in place

    # Temp memory: a regression guard (BENCHMARKS.md), and at least the float32 gradients.
    assert param_bytes <= rec["temp_bytes"] <= BGE_M3_TEMP_BOUND, rec["temp_gib"]

    # The sparse head is a (batch, vocab) scatter-max: no array is larger than the embedding table, far from
    # FlagEmbedding's (batch * group, passage_len, vocab) tensor.
    assert rec["largest_vocab_array_elements"] <= max(vocab * hidden, b * g * vocab)
    assert rec["largest_vocab_array_elements"] < b * g * lp * vocab // 16

    # FLOPs: the layers run under a 24-trip while loop; weighted by it, the encoder's matmuls are 4x the forward
    # formula with full remat (forward, recomputed forward, 2x backward), the heads and loss add under 3%.
    assert 24 in rec["while_trip_counts"]
    fwd = benchmark.forward_flops(bench.model_cfg, benchmark.Shape.parse(BGE_M3_SHAPE))
    assert rec["model_forward_flops"] == fwd
    assert 3.98 <= rec["encoder_matmul_ratio"] <= 4.02
    assert 0.98 * fwd <= rec["matmul_flops_by_part"]["recomputed"] <= 1.02 * fwd
    assert 4.0 <= rec["matmul_ratio"] <= 4.12
    # XLA's own cost analysis counts a while body once (24 layers as 1): far below the trip-weighted count.
    assert rec["xla_cost_flops"] > 0 and rec["xla_cost_flops"] < rec["matmul_flops_by_part"]["encoder"]


# ---------------------------------------------------------------------------------------------------------------
# scripts/device_bench.sh


def _device_bench(args, env=None):
    full_env = {k: v for k, v in os.environ.items() if k != "OUT"}
    full_env.update(env or {})
    return subprocess.run(["bash", os.path.join(REPO, "scripts", "device_bench.sh"), *args], capture_output=True,
                          text=True, env=full_env, cwd=REPO, timeout=60)


def test_device_bench_dry_run_prints_the_commands(tmp_path):
    out = tmp_path / "out"
    result = _device_bench(["--dry-run", "--out", str(out), "--anchor", "runs/anchor/torch_m3_anchor.py"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "export XLA_PYTHON_CLIENT_MEM_FRACTION=.92"
    commands = [line for line in lines if line.startswith("timeout ")]
    shapes = "32x8:64:256,8x8:512:2048,8x2:512:8192"
    expected = [
        f"python3 -m m3jax.benchmark --env >> {out}/env.txt",
        f"python3 runs/anchor/torch_m3_anchor.py --configs {shapes} --ckpt 1 --sub_batch auto >> {out}/anchor.jsonl",
        *[f"python3 -m m3jax.benchmark --shapes {s} --attention cudnn --remat full >> {out}/m3jax.jsonl"
          for s in shapes.split(",")],
        "python3 -m m3jax.benchmark --find-max-batch 8x8:512:8192 --memory-budget-gib auto --granularity 4 "
        f"--verify --steps 2 --warmup 1 --attention cudnn --remat full >> {out}/maxbatch.jsonl",
        "python3 -m m3jax.benchmark --find-max-batch 8x8:512:8192 --memory-budget-gib auto --granularity 4 "
        f"--attention cudnn --remat none --sub-batch-size 1 >> {out}/maxbatch.jsonl",
        "python3 -m m3jax.benchmark --shapes 32x8:64:256,8x8:512:2048 --attention cudnn --remat dots_no_batch "
        f">> {out}/m3jax.jsonl",
    ]
    assert [c.split(" ", 4)[4] for c in commands] == expected
    limits = [int(c.split()[3]) for c in commands]
    assert all(0 < t <= 300 for t in limits)  # each bounded; the script's deadline (570 s) bounds the whole
    assert not out.exists()  # a dry run writes nothing


def _fake_python(folder):
    log = folder / "calls.log"
    path = folder / "fake_python"
    path.write_text("#!/usr/bin/env bash\n"
                    f'printf "%s\\n" "$*" >> "{log}"\n'
                    'echo "{\\"fake\\": true}"\n')
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path), log


def test_device_bench_runs_each_step_and_records_status(tmp_path):
    python, log = _fake_python(tmp_path)
    out = tmp_path / "out"
    result = _device_bench(["--out", str(out), "--python", python, "--anchor", "anchor.py"])
    assert result.returncode == 0, result.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == "-m m3jax.benchmark --env"
    assert calls[1].startswith("anchor.py --configs 32x8:64:256,8x8:512:2048,8x2:512:8192 --ckpt 1")
    assert len(calls) == 8 and "--find-max-batch 8x8:512:8192" in calls[5] and "--sub-batch-size 1" in calls[6]
    status = [json.loads(line) for line in (out / "status.jsonl").read_text().splitlines()]
    assert [s["rc"] for s in status] == [0] * 8
    assert (out / "anchor.jsonl").read_text() == '{"fake": true}\n'
    assert len((out / "m3jax.jsonl").read_text().splitlines()) == 4
    assert {p.name for p in out.iterdir()} <= {"env.txt", "anchor.jsonl", "m3jax.jsonl", "maxbatch.jsonl",
                                               "status.jsonl", "bench.log"}  # at most 8 files come back


def test_device_bench_deadline_skips_the_rest(tmp_path):
    python, log = _fake_python(tmp_path)
    out = tmp_path / "out"
    result = _device_bench(["--out", str(out), "--python", python, "--anchor", "anchor.py", "--budget-s", "5"])
    assert result.returncode == 0, result.stderr
    status = [json.loads(line) for line in (out / "status.jsonl").read_text().splitlines()]
    assert len(status) == 8 and all(s.get("skipped") == "deadline" for s in status)
    assert not log.exists()
