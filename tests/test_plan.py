"""batch_size_by_length="auto" on CPU: the largest batch whose compiled step fits a memory budget, cached on disk,
saved with the run; and the step shapes `m3jax plan` derives from a config's batch-size table.

The tiny model's step at 4 passages of 64 tokens and 32-token queries needs about 0.017 GiB at batch 1 plus
0.007 GiB per query (CPU, float32, arguments + outputs - aliased + temp): within 0.035 GiB, 3 queries fit and 4 do
not.
"""
import dataclasses
import json
import os

import jax
import pytest

from m3jax import config as config_lib
from m3jax import plan, trainer
from m3jax.core import sharding
from m3jax.core.xla_stats import GIB, Shape, predict_boundary, search_max_batch


def _config(train_data="", **changes):
    c = config_lib.default_config()
    c.train_data = train_data
    c.train_group_size, c.query_max_len, c.passage_max_len = 4, 32, 64
    c.per_device_train_batch_size = 2
    c.model.dtype, c.model.remat_policy = "float32", "none"
    c.mesh.data = 1
    c.batch_size_by_length = "auto"
    c.auto_batch_memory_gib = 0.035
    for k, v in changes.items():
        c[k] = v
    return c


def test_auto_batch_sizes_search_by_compiled_memory_and_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("M3JAX_CACHE_DIR", str(tmp_path / "cache"))
    data = tmp_path / "data"
    data.mkdir()
    for name in ("a_len-0-50.jsonl", "b_len-50-inf.jsonl", "untagged.jsonl"):
        (data / name).write_text(json.dumps({"query": "q", "pos": ["p"], "neg": ["n"]}) + "\n")
    config = _config(str(data))
    config_lib.validate(config, for_training=False)
    assert plan.data_length_tags(config) == ["0-50", "50-inf"]
    model_cfg = plan.model_config_for(config_lib.model_settings(config), plan.TINY, "cpu")
    mesh = sharding.make_mesh(config_lib.mesh_settings(config), jax.devices()[:1])

    first = plan.auto_batch_sizes(config, model_cfg, mesh, tags=["0-50"])  # passages padded to 64 tokens
    (bucket,) = first["buckets"]
    assert first["table"] == {"0-50": 3} and first["budget_gib"] == 0.035 and first["platform"] == "cpu"
    assert (bucket["query_len"], bucket["passage_len"], bucket["group"]) == (32, 64, 4)
    assert not bucket["cached"] and bucket["first_failing_batch"] == 4
    tried = {t["batch"]: t for t in bucket["tries"]}
    assert sorted(tried) == [2, 3, 4]  # from per_device_train_batch_size: 2 fits, 4 does not, then 3
    assert tried[3]["fits"] and tried[3]["peak_gib"] <= 0.035 < tried[4]["peak_gib"] and not tried[4]["fits"]

    again = plan.auto_batch_sizes(config, model_cfg, mesh, tags=["0-50"])
    assert again["table"] == {"0-50": 3} and again["buckets"][0]["cached"]  # no compile the second time
    assert len(os.listdir(tmp_path / "cache" / "auto_batch")) == 1

    # The trainer's use: the table replaces "auto" and is saved with the run; a resumed run reads it back.
    out = tmp_path / "run"
    out.mkdir()
    resolved = trainer._auto_batch_sizes(config, config_lib.data_settings(config), model_cfg, mesh, str(out),
                                         resuming=False)
    saved = json.loads((out / plan.AUTO_BATCH_FILE).read_text())
    assert saved["table"] == {"0-50": 3, "50-inf": 3} and dict(resolved.batch_size_by_length) == saved["table"]
    assert [b["cached"] for b in saved["buckets"]] == [True, True]  # both pad passages to 64: one shape
    (out / plan.AUTO_BATCH_FILE).write_text(json.dumps(dict(first, table={"0-50": 7, "50-inf": 5})))
    resumed = trainer._auto_batch_sizes(config, config_lib.data_settings(config), model_cfg, mesh, str(out),
                                        resuming=True)
    assert dict(resumed.batch_size_by_length) == {"0-50": 7, "50-inf": 5} and config.batch_size_by_length == "auto"


def test_largest_batch_from_the_memory_line_of_the_tiny_model():
    """The search narrows by the memory line through the compiles so far: the same answer as bisection, in no
    more compiles. On this CPU the tiny model's memory grows a little
    faster than linearly (0.088 GiB at 11, 0.102 at 13, 0.272 at 32), so the first guesses land just below."""
    config = _config()
    model_cfg = plan.model_config_for(config_lib.model_settings(config), plan.TINY, "cpu")
    target = plan.local_target(memory_gib=0.1, devices=jax.devices()[:1])
    planner = plan.Planner(config_lib.step_settings(config), model_cfg, target,
                           mesh=sharding.make_mesh(config_lib.mesh_settings(config), target.devices),
                           has_teacher=bool(config.knowledge_distillation))
    best, first_fail, tries = planner.max_batch(Shape(32, 4, 32, 64))
    by_batch = {t["batch"]: t for t in tries}
    assert by_batch[best]["fits"] and by_batch[best]["peak_gib"] <= 0.1 < by_batch[first_fail]["peak_gib"]
    assert first_fail == best + 1 and 8 <= best <= 16
    peaks = [t["peak_gib"] for t in sorted(tries, key=lambda t: t["batch"])]
    assert peaks == sorted(peaks)
    line = predict_boundary({t["batch"]: t["peak_gib"] for t in tries}, 0.1)
    assert best <= line < first_fail
    bisection = []  # the batches plain bisection compiles for the same answer
    assert search_max_batch(lambda b: bisection.append(b) or b <= best, 32) == (best, first_fail)
    assert len(tries) <= len(bisection)


def test_auto_batch_memory_is_required_where_the_device_has_no_limit():
    config = _config(auto_batch_memory_gib=-1.0)
    model_cfg = plan.model_config_for(config_lib.model_settings(config), plan.TINY, "cpu")
    mesh = sharding.make_mesh(config_lib.mesh_settings(config), jax.devices()[:1])
    with pytest.raises(plan.PlanError, match="auto_batch_memory_gib"):
        plan.auto_batch_sizes(config, model_cfg, mesh, tags=["0-50"])
    with pytest.raises(config_lib.ConfigError, match="auto_batch_memory_gib"):
        config_lib.validate(_config(auto_batch_memory_gib=0.0), for_training=False)
    with pytest.raises(config_lib.ConfigError, match="batch_size_by_length"):
        config_lib.validate(_config(batch_size_by_length="big"), for_training=False)


def test_a_gpu_is_planned_against_its_allocators_limit():
    """On a GPU host (no accelerator here: a device object that answers as jax's GPU devices do) the budget is the
    allocator's bytes_limit; --memory-gib overrides it; a CPU, which reports none, must be given one."""

    class FakeGpu:
        platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"

        def memory_stats(self):
            return {"bytes_limit": 79 * GIB, "bytes_in_use": 0}

    target = plan.local_target(devices=[FakeGpu()])
    assert (target.name, target.platform, target.device_kind) == ("local gpu", "gpu", "NVIDIA H100 80GB HBM3")
    assert target.hbm_bytes == target.budget_bytes == 79 * GIB
    assert plan.local_target(memory_gib=40, devices=[FakeGpu()]).budget_bytes == 40 * GIB
    with pytest.raises(plan.PlanError, match="--memory-gib"):
        plan.local_target(devices=jax.devices()[:1])


def test_plan_compiles_the_gradient_cache_step_the_config_asks_for():
    """`m3jax plan --config.gradient_cache=True` plans the cached step: at 64 queries its compiled memory is below
    the uncached step's, and the header says which step was planned."""
    lines, peaks = [], {}
    for cached in (False, True):
        config = _config(train_data="", batch_size_by_length=None, gradient_cache=cached,
                         gradient_cache_chunk_size=8)
        target = plan.local_target(memory_gib=1.0, devices=jax.devices()[:1])
        result = plan.plan(config, target, shapes={"s": Shape(64, 4, 32, 64)}, model_config="tiny", search=False,
                           emit=lines.append)
        peaks[cached] = result["shapes"][0]["peak_gib"]
    assert peaks[True] < 0.8 * peaks[False], peaks
    assert sum("gradient cache" in line for line in lines) == 1
    assert any("gradient cache: chunks of 8 rows" in line for line in lines)


def test_plan_shapes_from_the_batch_size_table():
    c = config_lib.default_config()
    c.train_group_size, c.query_max_len, c.passage_max_len = 8, 512, 8192
    shapes = plan.table_shapes(c)  # the research table for group size 8
    assert shapes["0-500"] == Shape(48, 8, 512, 512) and shapes["1000-2000"] == Shape(20, 8, 512, 2048)
    assert shapes["3000-4000"] == Shape(14, 8, 512, 4096) and shapes["7000-inf"] == Shape(8, 8, 512, 8192)
    assert shapes["untagged"] == Shape(1, 8, 512, 8192)
    c.batch_size_by_length = {"0-100": 64}
    c.passage_max_len = 64
    assert plan.table_shapes(c)["0-100"] == Shape(64, 8, 512, 64)  # capped at passage_max_len
    with pytest.raises(plan.PlanError, match="LO-HI"):
        plan.bucket_lengths(c, "short")
    assert plan.parse_shapes("8x8:512:2048, 4x2:64:256") == {"8x8:512:2048": Shape(8, 8, 512, 2048),
                                                             "4x2:64:256": Shape(4, 2, 64, 256)}
    assert GIB == 2 ** 30


def test_mesh_advice_shards_the_state_when_it_is_a_large_share_of_a_chip():
    import types

    from m3jax.plan import ShapeResult, recommend_mesh

    def planner(state_gib, chips=8, hbm_gib=16):
        stepper = types.SimpleNamespace(state_bytes_per_device=lambda: int(state_gib * GIB))
        return types.SimpleNamespace(mesh=types.SimpleNamespace(size=chips, shape=dict(data=chips, fsdp=1, tensor=1)),
                                     stepper=stepper, target=plan.Target("t", [], "tpu", "TPU v5 lite",
                                                                         int(hbm_gib * GIB), None))

    def result(fits, peak_gib):
        return ShapeResult(Shape(8, 8, 512, 2048), fits, None if peak_gib is None else int(peak_gib * GIB), {},
                           None, None, 0.0)

    big = recommend_mesh(planner(6.35), [result(True, 12)])  # bge-m3's AdamW state on 16 GiB chips
    assert big["recommended"] == dict(data=1, fsdp=8, tensor=1) and big["state_gib_per_chip_fsdp"] == 0.79
    small = recommend_mesh(planner(1.0), [result(True, 3)])
    assert small["recommended"] == small["current"] == dict(data=8, fsdp=1, tensor=1)
    rescued = recommend_mesh(planner(3.0), [result(False, 17)])  # 17 - 3 + 3/8 fits in 16
    assert rescued["recommended"]["fsdp"] == 8 and "would" in rescued["reason"]


def test_tpu_out_of_memory_message_figures():
    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries (5.00T) "
               "exceeds available HBM (30.75G).")  # the TPU v4 compiler's, tiny model at 8192x8:32:2048
    assert plan.oom_figures(message) == (5 * 2 ** 40, int(30.75 * 2 ** 30))
    assert plan.oom_figures("RESOURCE_EXHAUSTED: something else") == (None, None)


def test_plan_shapes_from_the_runs_data(tiny_ckpt):
    """With train_data: one shape per (per-device batch, group size) the data produces, at its longest padded
    lengths (the toy data: 3 datasets of batch 4 and group 4, passages padded up to 128 tokens)."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    c = _config(os.path.join(repo, "toy_train_data"), batch_size_by_length="auto", per_device_train_batch_size=4,
                model_name_or_path=str(tiny_ckpt), num_data_workers=0)
    c.passage_max_len = 128
    assert plan.data_shapes(c, num_shards=2) == {"data 4x4": Shape(4, 4, 32, 128)}


def test_plan_command_on_this_host_against_a_memory_budget(tmp_path, capsys):
    """`m3jax plan` without --topology: this host's device (CPU here, so against --memory-gib)."""
    from m3jax.cli import main as cli

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "plan.json"
    assert cli.main(["plan", "--config", os.path.join(repo, "configs", "bge_m3_unified.py"), "--model-config", "tiny",
                     "--shapes", "2x2:16:32,64x2:16:32", "--memory-gib", "0.05", "--no-search", "--output", str(out),
                     "--config.model.dtype=float32", "--config.mesh.data=1"]) == 0
    result = json.loads(out.read_text())
    small, big = result["shapes"]
    assert result["target"]["platform"] == "cpu" and result["model"] == "preset tiny"
    assert small["fits"] and 0 < small["peak_gib"] <= 0.05 < big["peak_gib"] and not big["fits"]
    assert "peak" in big["error"] and "> budget 0.05 GiB" in big["error"]
    printed = capsys.readouterr().out
    assert "local cpu" in printed and "2x2:16:32" in printed and "NO" in printed

    # With the search: the largest batch, with its own peak and FLOPs (compiled), and the batch above it refused.
    assert cli.main(["plan", "--config", os.path.join(repo, "configs", "bge_m3_unified.py"), "--model-config", "tiny",
                     "--shapes", "32x2:16:32", "--memory-gib", "0.05", "--output", str(out),
                     "--config.model.dtype=float32", "--config.mesh.data=1"]) == 0
    (row,) = json.loads(out.read_text())["shapes"]
    tries = {t["batch"]: t for t in row["tries"]}
    best, over = row["max_batch"], row["first_failing_batch"]
    assert 32 < best < 64 and over == best + 1 and not tries[over]["fits"] and tries[over]["peak_gib"] > 0.05
    assert tries[best]["fits"] and row["max_batch_peak_gib"] == tries[best]["peak_gib"] <= 0.05
    assert row["max_batch_matmul_flops"] == tries[best]["matmul_flops"] > row["matmul_flops"] > 0
    printed = capsys.readouterr().out
    assert f"largest batch {best}: peak {row['max_batch_peak_gib']} GiB" in printed
    assert f"{over} does not fit (peak {tries[over]['peak_gib']} GiB)" in printed


def test_remat_auto_takes_the_least_recompute_that_fits_the_budget(monkeypatch):
    """model.remat_policy="auto" (m3jax.plan.choose_remat): candidates compile in the order of least recomputation
    (none, dots, dots_no_batch, full) and the first whose compiled step fits the budget is taken; compiles stop
    there. One real compile (everything fits: none), then the planner's compiled peaks stood in for, so that the
    order and the stopping are checked without four compiles per case."""
    config = _config()
    config.model.remat_policy = "auto"
    config.auto_batch_memory_gib = 100.0
    model_cfg = plan.model_config_for(config_lib.model_settings(config), plan.TINY, "cpu")
    assert model_cfg.remat_policy == "full"  # the model's own default under "auto"
    mesh = sharding.make_mesh(config_lib.mesh_settings(config), jax.devices()[:1])
    shape = Shape(2, 4, 32, 64)
    step = config_lib.step_settings(config)

    def choose_remat(shapes):  # as the trainer calls it
        return plan.choose_remat(step, model_cfg, mesh, shapes,
                                 target=plan.memory_target(config.auto_batch_memory_gib, mesh))

    (choice,) = choose_remat([(shape, False, False)])
    assert choice["policy"] == "none" and [c["policy"] for c in choice["candidates"]] == ["none"]
    assert choice["candidates"][0]["fits"] and 0 < choice["candidates"][0]["peak_gib"] < 1 and choice["budget_gib"] == 100

    peaks = {"none": 3.0, "dots": 2.5, "dots_no_batch": 1.5, "full": 1.0}  # GiB
    compiled = []

    def check(self, shape, *, flops=True, no_in_batch_neg=False):
        policy = self.model_cfg.remat_policy
        compiled.append((policy, no_in_batch_neg, self.has_teacher))
        fits = peaks[policy] <= self.target.budget_bytes / GIB
        return plan.ShapeResult(shape, fits, int(peaks[policy] * GIB), {}, None, None, 0.1)

    monkeypatch.setattr(plan.Planner, "check", check)
    config.auto_batch_memory_gib = 2.0
    first, second = choose_remat([(shape, True, False), (shape.with_batch(4), False, True)])
    assert first["policy"] == second["policy"] == "dots_no_batch"
    assert [c["policy"] for c in first["candidates"]] == ["none", "dots", "dots_no_batch"]  # stops at the first fit
    assert [c["fits"] for c in first["candidates"]] == [False, False, True]
    assert compiled[:3] == [("none", False, True), ("dots", False, True), ("dots_no_batch", False, True)]
    assert compiled[3:] == [("none", True, False), ("dots", True, False), ("dots_no_batch", True, False)]
    line = plan.describe_remat_choice(first)
    assert line == ("remat_policy='auto' for 2x4:32:64: dots_no_batch (none 3.0 GiB (does not fit), dots 2.5 GiB "
                    "(does not fit), dots_no_batch 1.5 GiB)")
    config.auto_batch_memory_gib = 0.5  # nothing fits: full, which then fails as it would have
    (choice,) = choose_remat([(shape, False, False)])
    assert choice["policy"] == "full" and len(choice["candidates"]) == 4
    config.auto_batch_memory_gib = -1.0  # CPU reports no limit: nothing to judge by
    (choice,) = choose_remat([(shape, False, False)])
    assert choice["policy"] == "none" and choice["candidates"] == []


# ---------------------------------------------------------------------------------------------------------------
# gradient_cache_chunk_size="auto"


def _cache_config(**changes):
    return _config(**{"batch_size_by_length": None, "gradient_cache": True, "gradient_cache_chunk_size": "auto",
                      **changes})


def test_chunk_ladder_halves_down_to_divisors():
    assert plan.chunk_ladder(2048) == [2048, 1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1]
    assert plan.chunk_ladder(24) == [24, 12, 6, 3, 1] and plan.chunk_ladder(1) == [1]
    calls = []

    def fits(i):  # the 4th and smaller fit
        calls.append(i)
        return i >= 3

    assert plan.largest_fitting(list(range(12)), fits) == 3
    assert calls[0] == 0 and len(calls) <= 1 + 4  # the largest first, then a bisection
    assert plan.largest_fitting([8, 4], lambda i: False) is None and plan.largest_fitting([8, 4], lambda i: True) == 0


def test_chunk_auto_takes_the_largest_chunk_whose_compiled_step_fits(monkeypatch):
    """gradient_cache_chunk_size="auto" (m3jax.plan.choose_chunk) on the tiny model at 1 x 4 passages (chunks 4, 2,
    1 rows): each budget is set from XLA's memory analysis of the candidates compiled so far, and the chunk chosen
    is the largest whose peak is within it -- a larger chunk when memory allows, a smaller one when it does not.
    Real compiles, each (remat, chunk) once (the planner's check is memoised across the calls)."""
    config = _cache_config()
    assert config_lib.gradient_cache_chunk_auto(config)
    step = config_lib.step_settings(config)
    assert step.gradient_cache_chunk_size == 16  # the step's own default under "auto"
    model_cfg = plan.model_config_for(config_lib.model_settings(config), plan.TINY, "cpu")
    mesh = sharding.make_mesh(config_lib.mesh_settings(config), jax.devices()[:1])
    shape = Shape(1, 4, 32, 64)
    real_check, results = plan.Planner.check, {}

    def check(self, shape, *, flops=True, no_in_batch_neg=False, chunk=None):
        key = (self.model_cfg.remat_policy, str(shape), chunk)
        if key not in results:
            results[key] = real_check(self, shape, flops=flops, no_in_batch_neg=no_in_batch_neg, chunk=chunk)
        r = results[key]
        return dataclasses.replace(r, fits=r.peak_bytes <= self.target.budget_bytes)

    monkeypatch.setattr(plan.Planner, "check", check)

    def choose(budget_bytes):
        target = plan.memory_target(budget_bytes / GIB, mesh)
        (choice,) = plan.choose_auto(config, step, model_cfg, mesh, [(shape, False, False)], target=target)
        return choice

    everything = choose(100 * GIB)  # the whole batch in one chunk fits: one compile
    assert (everything["chunk"], everything["policy"]) == (4, "none") and everything["fits"]
    assert [c["chunk"] for c in everything["candidates"]] == [4]
    peak = {4: results[("none", str(shape), 4)].peak_bytes}

    smaller = choose(peak[4] - 1)  # 4 rows no longer fit: the bisection finds 2
    assert [c["chunk"] for c in smaller["candidates"]] == [4, 2]
    peak[2] = results[("none", str(shape), 2)].peak_bytes
    assert peak[2] < peak[4] and smaller["chunk"] == 2

    smallest = choose(peak[2] - 1)
    peak[1] = results[("none", str(shape), 1)].peak_bytes
    assert peak[1] < peak[2] and smallest["chunk"] == 1 and smallest["fits"]
    assert [c["fits"] for c in smallest["candidates"]] == [False, False, True]
    assert plan.describe_chunk_choice(smallest) == (
        f"gradient_cache_chunk_size='auto' for 1x4:32:64: 1 rows per device, remat none (remat none: 4 "
        f"{round(peak[4] / GIB, 4)} GiB (does not fit), 2 {round(peak[2] / GIB, 4)} GiB (does not fit), 1 "
        f"{round(peak[1] / GIB, 4)} GiB)")

    nothing = choose(peak[1] - 1)  # nothing fits: the smallest chunk, which then fails as it would have
    assert nothing["chunk"] == 1 and not nothing["fits"] and len(nothing["candidates"]) == 3
    assert len(results) == 3  # each chunk compiled once

    # No budget (CPU without auto_batch_memory_gib): 16 rows, as before "auto", with nothing compiled.
    (free,) = plan.choose_auto(config, step, model_cfg, mesh, [(shape, False, False)], target=None)
    assert (free["chunk"], free["policy"], free["candidates"]) == (16, "none", [])
    assert free["line"] == ("gradient_cache_chunk_size='auto' for 1x4:32:64: 16 rows per device, remat none (no "
                            "memory budget to judge by)")


def test_chunk_and_remat_auto_search_the_pair_least_recompute_first(monkeypatch):
    """With remat_policy="auto" too, the policies go in the order of least recomputation and, for each, the
    largest chunk that fits; the first policy with one wins. The planner's compiled peaks stood in for."""
    config = _cache_config()
    config.model.remat_policy = "auto"
    model_cfg = plan.model_config_for(config_lib.model_settings(config), plan.TINY, "cpu")
    mesh = sharding.make_mesh(config_lib.mesh_settings(config), jax.devices()[:1])
    step = config_lib.step_settings(config)
    per_row = {"none": 1.0, "dots": 0.5, "dots_no_batch": 0.25, "full": 0.125}  # GiB per chunk row, over 2 GiB
    compiled = []

    def check(self, shape, *, flops=True, no_in_batch_neg=False, chunk=None):
        policy = self.model_cfg.remat_policy
        compiled.append((policy, chunk))
        peak = 2.0 + per_row[policy] * chunk
        return plan.ShapeResult(shape, peak <= self.target.budget_bytes / GIB, int(peak * GIB), {}, None, None, 0.1)

    monkeypatch.setattr(plan.Planner, "check", check)
    shape = Shape(2, 8, 32, 64)  # 16 passages per device: chunks 16, 8, 4, 2, 1

    def choose(budget_gib):
        compiled.clear()
        (choice,) = plan.choose_auto(config, step, model_cfg, mesh, [(shape, False, False)],
                                     target=plan.memory_target(budget_gib, mesh))
        return choice

    c = choose(6.5)  # none: 2 + 4 = 6 GiB at 4 rows
    assert (c["policy"], c["chunk"]) == ("none", 4)
    assert compiled[0] == ("none", 16) and all(p == "none" for p, _ in compiled)
    assert c["line"].startswith("gradient_cache_chunk_size='auto' for 2x8:32:64: 4 rows per device, remat none (remat "
                                "none: 16 18.0 GiB (does not fit), 8 10.0 GiB (does not fit), 4 6.0 GiB")
    c = choose(20.0)  # the whole batch, without remat: one compile
    assert (c["policy"], c["chunk"]) == ("none", 16) and compiled == [("none", 16)]
    c = choose(2.9)  # none at 1 row needs 3 GiB: dots, whose 1 row fits (2.5 GiB) and 2 rows do not (3 GiB)
    assert (c["policy"], c["chunk"]) == ("dots", 1)
    assert [p for p, _ in compiled] == ["none"] * 4 + ["dots"] * 4 and compiled[3] == ("none", 1)
    c = choose(2.2)  # dots_no_batch at 1 row needs 2.25 GiB: full, at its largest fitting chunk (1 row, 2.125)
    assert (c["policy"], c["chunk"], c["fits"]) == ("full", 1, True)
    c = choose(1.0)  # nothing fits: full at 1 row
    assert (c["policy"], c["chunk"], c["fits"]) == ("full", 1, False)


def test_the_step_takes_the_chunk_per_shape():
    """Stepper.step(..., chunk=C) is the step built with gradient_cache_chunk_size=C (the same lowered program)."""
    mesh = sharding.make_mesh(config_lib.mesh_settings(_cache_config()), jax.devices()[:1])
    model_cfg = plan.model_config_for(config_lib.model_settings(_cache_config()), plan.TINY, "cpu")

    def lowered(config, **kw):
        from m3jax.train.step import Stepper

        stepper = Stepper.build(config_lib.step_settings(config), model_cfg, mesh, 10)
        return stepper.step(4, False, False, **kw).lower(stepper.abstract_state(),
                                                          stepper.abstract_batch(2, 4, 32, 64)).as_text()

    per_shape = lowered(_cache_config(), chunk=2)
    assert per_shape == lowered(_cache_config(gradient_cache_chunk_size=2))
    assert per_shape != lowered(_cache_config())  # 16 rows: the whole 8 passages in one chunk


def test_plan_names_the_chunk_chosen_per_shape():
    lines = []
    config = _cache_config()
    target = plan.local_target(memory_gib=1.0, devices=jax.devices()[:1])
    plan.plan(config, target, shapes={"s": Shape(1, 4, 32, 64)}, model_config="tiny", search=False, emit=lines.append)
    assert any("gradient cache: chunks 'auto' (the table below: 16 rows)" in line for line in lines), lines
    assert any(line.startswith("gradient_cache_chunk_size='auto' for 1x4:32:64: 4 rows per device, remat none "
                               "(remat none: 4 ") for line in lines), lines
