"""End-to-end training: configs/toy.py steps, exact resume after SIGKILL / SIGTERM, multi-device equivalence,
config errors. In-process runs use the first simulated CPU device (explicit mesh sizes); killed / multi-process runs
are subprocesses of train.py, as a user runs it."""
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from m3jax import config as config_lib
from m3jax import trainer
from m3jax.core import storage
from m3jax.io import checkpoint as ckpt_lib
from m3jax.model import encoder as m3model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def toy_config(tiny_ckpt, output_dir, **overrides):
    spec = importlib.util.spec_from_file_location("toy", os.path.join(REPO, "configs", "toy.py"))
    toy = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(toy)
    c = toy.get_config()
    c.model_name_or_path = str(tiny_ckpt)
    c.output_dir = str(output_dir)
    c.mesh.data = 1  # one of the eight simulated devices
    c.logging_steps = 1
    return set_fields(c, overrides)


def set_fields(c, fields: dict):
    """Set dotted config fields ({"model.dtype": "bfloat16"}) on a ConfigDict; returns it."""
    for key, value in fields.items():
        target = c
        *parents, leaf = key.split(".")
        for p in parents:
            target = target[p]
        target[leaf] = value
    return c


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["split"] == "train"}


def final_params(output_dir):
    """Params of the latest checkpoint, as host numpy (restored without target shardings)."""
    import orbax.checkpoint as ocp
    step = ckpt_lib.Checkpointer(output_dir, read_only=True).latest_step()
    path = storage.join(ckpt_lib.checkpoint_dir(output_dir), str(step), "state")  # a local path or a URL
    restored = ocp.StandardCheckpointer().restore(path)
    return step, jax.tree.map(np.asarray, restored["params"])


def run_train_py(args, env_extra=None, **popen):
    env = dict(os.environ, M3JAX_CACHE_DIR=os.environ.get("M3JAX_CACHE_DIR", "/tmp/m3jax_test_cache"))
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, os.path.join(REPO, "train.py"), "--config",
                             os.path.join(REPO, "configs", "toy.py"), *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


def cli_args(tiny_ckpt, output_dir, **overrides):
    base = {"model_name_or_path": tiny_ckpt, "output_dir": output_dir, "mesh.data": 1, "logging_steps": 1,
            "seq_len_buckets": "(128,)"}
    base.update(overrides)
    return [f"--config.{k}={v}" for k, v in base.items()]


# ---------------------------------------------------------------------------------------------------------------

def test_one_step_of_the_toy_config(tiny_ckpt, tmp_path):
    summary = trainer.train(toy_config(tiny_ckpt, tmp_path, max_steps=1, warmup_ratio=0.0, eval_steps=1))
    assert summary["step"] == 1 and np.isfinite(summary["metrics"]["loss"])
    assert set(summary["metrics"]) >= {"loss", "loss_dense", "loss_sparse", "loss_colbert", "loss_ensemble",
                                       "loss_self_distill", "learning_rate", "grad_norm", "tokens_per_s"}
    assert ckpt_lib.Checkpointer(str(tmp_path), read_only=True).all_steps() == [1]
    assert os.path.exists(tmp_path / "base_model" / "config.json")
    with open(tmp_path / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert len(evals) == 1 and evals[0]["step"] == 1 and 0 <= evals[0]["all/ndcg@10"] <= 1
    assert {"dense/mrr@10", "sparse/recall@100", "colbert/ndcg@10", "dense+sparse/ndcg@10"} <= set(evals[0])
    events = os.listdir(tmp_path / "tensorboard")
    assert any(e.startswith("events.out.tfevents") for e in events)
    _, params = final_params(str(tmp_path))
    from m3jax.model.loading import load_model
    _, initial, _ = load_model(tiny_ckpt)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), params, initial)
    assert moved["encoder"]["layers"]["query"]["kernel"] > 0 and moved["colbert_linear"]["kernel"] > 0
    assert moved["pooler"]["kernel"] == 0  # never used by M3, frozen like in FlagEmbedding


def test_loss_decreases_on_the_toy_data(tiny_ckpt, tmp_path):
    summary = trainer.train(toy_config(tiny_ckpt, tmp_path, max_steps=42, save_steps=1000, logging_steps=14))
    losses = summary["losses"]
    first, last = np.mean([losses[s] for s in range(14)]), np.mean([losses[s] for s in range(28, 42)])
    assert last < 0.8 * first, (first, last)


def kill_when(proc, predicate, timeout=600):
    """SIGKILL `proc` as soon as `predicate()` holds (fails if it ends first or the timeout passes)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended before it could be killed:\n{proc.stdout.read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out waiting to kill the run")


# LoRA on every target with adapter dropout (issue 15): resume and multi-device equivalence hold with it too.
LORA = {"lora.rank": 4, "lora.dropout": 0.1,
        "lora.targets": "query,key,value,attention_output,intermediate,output"}


@pytest.mark.parametrize("extra", [{}, LORA], ids=["full", "lora"])
def test_exact_resume_after_sigkill(tiny_ckpt, tmp_path, extra):
    straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
    n = 10
    common = dict(max_steps=n, save_steps=3, **extra)
    p = run_train_py(cli_args(tiny_ckpt, straight, **common))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]

    p = run_train_py(cli_args(tiny_ckpt, resumed, **common))
    # SIGKILL once step 6 is committed and a later step has been logged (the run is mid-way between saves).
    committed = os.path.join(ckpt_lib.checkpoint_dir(resumed), "6", "commit_success.txt")
    metrics = os.path.join(resumed, "metrics.jsonl")
    kill_when(p, lambda: os.path.exists(committed) and os.path.exists(metrics)
               and max(json.loads(l)["step"] for l in open(metrics) if l.strip()) >= 7)
    assert ckpt_lib.Checkpointer(resumed, read_only=True).latest_step() == 6
    p = run_train_py(cli_args(tiny_ckpt, resumed, **common))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    assert "resumed from" in out

    a, b = read_metrics(straight), read_metrics(resumed)
    for step in range(7, n + 1):  # every step after the resume point
        assert a[step]["loss"] == b[step]["loss"], step
    step_a, params_a = final_params(straight)
    step_b, params_b = final_params(resumed)
    assert step_a == step_b == n
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)  # bitwise on CPU


def test_sigterm_saves_the_current_step_and_resume_continues(tiny_ckpt, tmp_path):
    out_dir = str(tmp_path)
    p = run_train_py(cli_args(tiny_ckpt, out_dir, max_steps=40, save_steps=1000))
    metrics = os.path.join(out_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3):
        assert p.poll() is None and time.time() < deadline
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    saved = ckpt_lib.Checkpointer(out_dir, read_only=True).latest_step()
    last_logged = max(read_metrics(out_dir))
    assert saved is not None and saved >= 3 and saved >= last_logged
    p = run_train_py(cli_args(tiny_ckpt, out_dir, max_steps=saved + 2, save_steps=1000))
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out[-3000:]
    assert f"step {saved}" in out and ckpt_lib.Checkpointer(out_dir, read_only=True).latest_step() == saved + 2


@pytest.mark.multiprocess
@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(tiny_ckpt, tmp_path):
    """Preemption of one host: jax's preemption service agrees on a step, both save it together and exit 0."""
    out_dir = str(tmp_path)
    procs = _two_processes(cli_args(tiny_ckpt, out_dir, max_steps=200, save_steps=1000,
                                    per_device_train_batch_size=1, **{"mesh.data": -1}))
    metrics = os.path.join(out_dir, "metrics.jsonl")
    deadline = time.time() + 300
    while not (os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 3):
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-2000:] + outs[1][-2000:]
    saved = ckpt_lib.Checkpointer(out_dir, read_only=True).latest_step()
    assert saved is not None and 3 <= saved < 200
    assert all(f"saving a checkpoint at step {saved}" in out for out in outs)


def _equivalence_config(tiny_ckpt, out, mesh, per_device, **extra):
    return toy_config(tiny_ckpt, out, max_steps=4, save_steps=1000, per_device_train_batch_size=per_device,
                      negatives_cross_device=True, cross_device_all_heads=True, seq_len_buckets=(128,),
                      **{"mesh.data": mesh[0], "mesh.fsdp": mesh[1], "mesh.tensor": mesh[2] if len(mesh) > 2 else 1},
                      **extra)


@pytest.mark.parametrize("extra", [{}, dict(LORA, **{"lora.targets": m3model.LORA_TARGETS})], ids=["full", "lora"])
def test_same_global_batch_gives_the_same_losses_on_1_and_8_devices(tiny_ckpt, tmp_path, extra):
    """cross_device_all_heads makes the loss a function of the global batch alone: any mesh, same numbers. 1 device;
    8 devices as data, data x fsdp, and data x fsdp x tensor (params split over heads / mlp / vocab; LoRA adapters
    by the same logical axes)."""
    runs = {}
    for name, mesh, per_device in (("1", (1, 1), 8), ("data8", (8, 1), 1), ("data2_fsdp4", (2, 4), 1),
                                   ("data2_fsdp2_tensor2", (2, 2, 2), 2)):
        runs[name] = trainer.train(_equivalence_config(tiny_ckpt, tmp_path / name, mesh, per_device,
                                                       **extra))["losses"]
    for name in ("data8", "data2_fsdp4", "data2_fsdp2_tensor2"):
        for step in range(4):
            assert abs(runs[name][step] - runs["1"][step]) <= 1e-5, (name, step, runs[name][step], runs["1"][step])


def _two_processes(args):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [run_train_py(args, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                                "M3JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "M3JAX_NUM_PROCESSES": "2",
                                "M3JAX_PROCESS_ID": str(i)}) for i in range(2)]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_of_four_devices_match_one_device(tiny_ckpt, tmp_path):
    single = trainer.train(_equivalence_config(tiny_ckpt, tmp_path / "single", (1, 1), 8))["losses"]
    out_dir = str(tmp_path / "multi")
    args = cli_args(tiny_ckpt, out_dir, max_steps=4, save_steps=1000, per_device_train_batch_size=1,
                    negatives_cross_device=True, cross_device_all_heads=True, **{"mesh.data": -1})
    procs = _two_processes(args)
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
    multi = read_metrics(out_dir)
    for step in range(4):
        assert abs(multi[step + 1]["loss"] - single[step]) <= 1e-5, (step, multi[step + 1]["loss"], single[step])


@pytest.mark.parametrize("override, message", [
    ("--config.temprature=0.05", "--config.temprature: no such config field; did you mean temperature"),
    ("--config.temperature=-1", "error: config.temperature=-1.0: expected a positive float"),
    ("--config.train_data=/nonexistent/dir", "/nonexistent/dir"),
])
def test_config_errors_are_clear(tiny_ckpt, tmp_path, override, message):
    p = run_train_py([f"--config.model_name_or_path={tiny_ckpt}", f"--config.output_dir={tmp_path}", override])
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 2
    assert message in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tiny_ckpt, tmp_path):
    config = toy_config(tiny_ckpt, tmp_path, max_steps=30, save_steps=1, learning_rate=1e6, max_grad_norm=0.0,
                        warmup_ratio=0.0)
    with pytest.raises(trainer.NonFiniteLossError, match="not finite") as err:
        trainer.train(config)
    good = ckpt_lib.Checkpointer(str(tmp_path), read_only=True).latest_step()
    assert good is not None and f"good checkpoint, step {good}" in str(err.value)
    # named good only once verified against its manifest (issue 27)
    assert str(err.value).endswith("is verified intact.") and ckpt_lib.verify_step(
        os.path.join(ckpt_lib.checkpoint_dir(str(tmp_path)), str(good))).verified
    _, params = final_params(str(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("field, value, message", [
    ("kd_loss_type", "kl", "config.kd_loss_type='kl': expected 'kl_div' or 'm3_kd_loss'"),
    ("train_data", "", "config.train_data='': expected one or more data directories"),
    ("model.remat_policy", "everything", "config.model.remat_policy='everything': expected 'auto', 'none', 'full'"),
    ("mesh.data", 0, "config.mesh.data=0: expected -1 or a positive int"),
    ("eval_steps", 10, "config.eval.corpus='': expected a file path"),
    ("seq_len_buckets", (64, 32), "config.seq_len_buckets=(64, 32): expected strictly increasing"),
])
def test_validate_rejects_bad_values(field, value, message):
    c = config_lib.default_config()
    c.model_name_or_path, c.output_dir, c.train_data = "m", "o", "d"
    config_lib.validate(c)
    set_fields(c, {field: value})
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c)
    assert message in str(err.value)


def test_train_data_accepts_comma_separated_directories():
    assert config_lib.train_data_dirs(config_lib.default_config().copy_and_resolve_references()) == []
    c = config_lib.default_config()
    c.train_data = "a, b ,c"
    assert config_lib.train_data_dirs(c) == ["a", "b", "c"]


def test_sub_batch_encoding_gives_the_same_step(tiny_ckpt, tmp_path):
    """sub_batch_size chunks each device's passages (recomputed in backward): same loss and update, less memory."""
    from transformers import AutoTokenizer

    from m3jax import config as config_lib
    from m3jax.core import sharding as shard_lib
    from m3jax.data import build as data_build
    from m3jax.model import loading

    results = {}
    for sub in (-1, 2):
        config = toy_config(tiny_ckpt, tmp_path, sub_batch_size=sub, per_device_train_batch_size=2,
                            **{"mesh.data": 2, "model.hidden_dropout_prob": 0.0,
                               "model.attention_probs_dropout_prob": 0.0})
        mesh = shard_lib.make_mesh(config_lib.mesh_settings(config))
        model_cfg, params, _ = loading.load_model(tiny_ckpt, config_lib.model_settings(config))
        config_lib.validate_against_model(config, model_cfg)
        stepper = trainer.Stepper.build(config_lib.step_settings(config), model_cfg, mesh, total_steps=10)
        state = stepper.init_state(shard_lib.put_tree(params, stepper.param_shardings))
        batch = data_build.build_train_data(config_lib.data_settings(config), AutoTokenizer.from_pretrained(tiny_ckpt),
                                            num_batch_shards=2).batch(0)
        arrays = {k: batch[k] for k in ("query_input_ids", "query_attention_mask", "passage_input_ids",
                                        "passage_attention_mask", "teacher_scores")}
        assert arrays["passage_input_ids"].shape[0] == 2 * 2 * 4  # 2 devices x 2 queries x 4 passages
        state, metrics = stepper.step(4, False, False)(state, stepper.global_batch(arrays))
        results[sub] = (float(metrics["loss"]), jax.tree.map(np.asarray, state.params))
    assert abs(results[-1][0] - results[2][0]) <= 1e-6
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), results[-1][1], results[2][1])


def test_distillation_and_no_in_batch_neg_batches_train(tiny_ckpt, tmp_path, caplog):
    """Batch kinds switch step by step (teacher scores / no in-batch negatives / group size): one jit each."""
    import shutil

    kd_dir, nibn_dir = tmp_path / "kd", tmp_path / "classification_no_in_batch_neg"
    kd_dir.mkdir()
    nibn_dir.mkdir()
    shutil.copy(os.path.join(REPO, "toy_train_data", "retrieval_kd.jsonl"), kd_dir)
    shutil.copy(os.path.join(REPO, "toy_train_data", "retrieval_en.jsonl"), nibn_dir)
    config = toy_config(tiny_ckpt, tmp_path / "run", max_steps=8, save_steps=1000, knowledge_distillation=True,
                        kd_loss_type="m3_kd_loss", train_data=f"{kd_dir},{nibn_dir}", seq_len_buckets=(128,),
                        eval_steps=0)
    summary = trainer.train(config)
    assert "retrieval_en.jsonl has no teacher scores" in caplog.text  # kd on, but that file has none
    rows = read_metrics(str(tmp_path / "run"))
    kinds = {(r["loss_kd"] > 0) for r in rows.values()}
    assert kinds == {True, False}, rows  # steps from both datasets ran
    assert all(np.isfinite(r["loss"]) for r in rows.values()) and summary["step"] == 8
