"""Verified checkpoints (issue 27): every step's manifest (sizes and CRC-32 of its files), the newest intact step taken
by resume, export and eval alike with each damaged or partial step named in one line, saves that fail loudly, and
metrics.jsonl / a finished run across resumes.

One toy run (6 steps, saves at 2, 4 and 6) is trained once per module; each test damages a copy of it.
"""
import glob
import json
import logging
import os
import resource
import shutil
import signal

import pytest
from test_train import cli_args, read_metrics, run_train_py, toy_config

from m3jax import trainer
from m3jax.cli import main as cli
from m3jax.io import checkpoint as ckpt_lib
from m3jax.io.checkpoint import CheckpointError, CheckpointSaveError
from m3jax.model import loading

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = dict(max_steps=6, save_steps=2, eval_steps=0, seq_len_buckets=(128,))


@pytest.fixture(scope="module")
def run(tiny_ckpt, tmp_path_factory):
    work = str(tmp_path_factory.mktemp("integrity") / "run")
    summary = trainer.train(toy_config(tiny_ckpt, work, **RUN))
    assert summary["step"] == 6
    return {"work": work, "losses": summary["losses"], "tiny": tiny_ckpt}


def _copy(run, tmp_path) -> str:
    return str(shutil.copytree(run["work"], tmp_path / "run"))


def _step(work, step) -> str:
    return os.path.join(work, "checkpoints", str(step))


def _largest_array_file(step_dir) -> str:
    return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")), key=os.path.getsize)


def _flip(path, offset=100, n=64):
    with open(path, "r+b") as f:
        f.seek(offset)
        data = f.read(n)
        f.seek(offset)
        f.write(bytes(b ^ 0xFF for b in data))


def _truncate(path, keep=0.5):
    with open(path, "r+b") as f:
        f.truncate(int(os.path.getsize(path) * keep))


def _damage(step_dir, how) -> str:
    """Damage one step as `how` says; returns the name the one-line report must carry."""
    if how == "flipped_array_bytes":
        path = _largest_array_file(step_dir)
        _flip(path)
        return os.path.relpath(path, step_dir) + " has CRC-32"
    if how == "truncated_array_file":
        path = _largest_array_file(step_dir)
        _truncate(path)
        return os.path.relpath(path, step_dir) + " is"
    if how == "truncated_iterator_state":
        path = os.path.join(step_dir, "data", "process_0-of-1.json")
        _truncate(path)
        return "data/process_0-of-1.json is"
    if how == "arrays_gone":
        for path in glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")):
            os.remove(path)
        return "missing state/ocdbt.process_0/d/"
    if how == "state_folder_missing":
        shutil.rmtree(os.path.join(step_dir, "state"))
        return "missing state/"
    if how == "manifest_missing":
        os.remove(os.path.join(step_dir, ckpt_lib.MANIFEST_NAME))
        return f"missing {ckpt_lib.MANIFEST_NAME}"
    raise AssertionError(how)


DAMAGES = ["flipped_array_bytes", "truncated_array_file", "truncated_iterator_state", "arrays_gone",
           "state_folder_missing", "manifest_missing"]


def _lines(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# ---------------------------------------------------------------------------------------------------------------


def test_every_step_has_a_manifest_of_its_files(run):
    for step in (2, 4, 6):
        step_dir = _step(run["work"], step)
        manifest = json.load(open(os.path.join(step_dir, ckpt_lib.MANIFEST_NAME)))
        on_disk = {os.path.relpath(os.path.join(d, n), step_dir) for d, _, names in os.walk(step_dir) for n in names}
        assert set(manifest["files"]) == on_disk - {ckpt_lib.MANIFEST_NAME, "_CHECKPOINT_METADATA",
                                                   "commit_success.txt"}
        assert any(f.startswith("state/ocdbt.process_0/d/") for f in manifest["files"])
        assert "data/process_0-of-1.json" in manifest["files"] and manifest["step"] == step
        check = ckpt_lib.verify_step(step_dir)
        assert check.ok and check.verified


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_latest_step_is_named_and_every_reader_takes_the_step_before(run, tmp_path, caplog, how):
    work = _copy(run, tmp_path)
    what = _damage(_step(work, 6), how)
    check = ckpt_lib.verify_step(_step(work, 6))
    assert not check.ok and what in check.problem, check
    with caplog.at_level(logging.WARNING, logger="m3jax.io.checkpoint"):
        source = loading.find_model(work)  # export, eval, mine and score all resolve a run through find_model
    assert source.location.step == 4
    lines = _lines(caplog, "step 6 is")
    assert len(lines) == 1 and what in lines[0] and lines[0].endswith("; skipped; using step 4"), lines
    with pytest.raises(CheckpointError, match=f"step 6 is (damaged|incomplete): {what}"):
        loading.find_model(work, step=6)


def test_export_and_eval_of_a_run_with_flipped_bytes_use_the_intact_step(run, tmp_path, capsys):
    work = _copy(run, tmp_path)
    _damage(_step(work, 6), "flipped_array_bytes")
    out = str(tmp_path / "export")
    assert cli.main(["export", "--checkpoint", work, "--output", out]) == 0
    assert json.load(open(os.path.join(out, "m3jax_export.json")))["step"] == 4
    toy = os.path.join(REPO, "toy_eval_data")
    assert cli.main(["eval", "--model", work, "--corpus", f"{toy}/corpus.jsonl", "--queries", f"{toy}/queries.jsonl",
                     "--qrels", f"{toy}/qrels.tsv", "--modes", "dense", "--devices", "cpu", "--fp32"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--checkpoint", work, "--step", "6", "--output", str(tmp_path / "e6")]) == 2
    err = capsys.readouterr().err
    assert "step 6 is damaged: state/ocdbt.process_0/d/" in err and "Traceback" not in err


def test_a_step_saved_before_manifests_still_loads_with_one_line(run, tmp_path, caplog):
    work = _copy(run, tmp_path)
    step_dir = _step(work, 6)
    os.remove(os.path.join(step_dir, ckpt_lib.MANIFEST_NAME))
    meta_path = os.path.join(step_dir, "_CHECKPOINT_METADATA")
    meta = json.load(open(meta_path))
    meta["custom_metadata"] = {}  # as an m3jax before manifests wrote it
    json.dump(meta, open(meta_path, "w"))
    with caplog.at_level(logging.WARNING, logger="m3jax.io.checkpoint"):
        assert loading.find_model(work).location.step == 6
    assert len(_lines(caplog, "saved by an m3jax before checkpoint manifests")) == 1


def test_resume_discards_a_damaged_step_and_continues_bitwise_from_the_intact_one(run, tmp_path, caplog):
    work = _copy(run, tmp_path)
    before = read_metrics(work)
    _damage(_step(work, 6), "flipped_array_bytes")
    with caplog.at_level(logging.INFO, logger="m3jax"):
        summary = trainer.train(toy_config(run["tiny"], work, **RUN))
    lines = _lines(caplog, "step 6 is damaged")
    assert len(lines) == 1 and lines[0].endswith("; discarded; using step 4"), lines
    assert "resumed from" in caplog.text and summary["step"] == 6
    assert summary["losses"] == {s: run["losses"][s] for s in (4, 5)}  # bitwise the uninterrupted run
    rows = [json.loads(line) for line in open(os.path.join(work, "metrics.jsonl"))]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2, 3, 4, 5, 6]  # one row per logged step
    assert {s: r["loss"] for s, r in read_metrics(work).items()} == {s: r["loss"] for s, r in before.items()}
    assert ckpt_lib.verify_step(_step(work, 6)).verified


def test_metrics_keep_one_row_per_step_after_a_crash_between_saves(run, tmp_path, caplog):
    """The run died after logging steps 5 and 6 but before its save of step 6 (step 6 removed): the resumed run
    logs them again, and metrics.jsonl has each step once."""
    work = _copy(run, tmp_path)
    shutil.rmtree(_step(work, 6))
    with caplog.at_level(logging.INFO, logger="m3jax"):
        trainer.train(toy_config(run["tiny"], work, **RUN))
    steps = [json.loads(line)["step"] for line in open(os.path.join(work, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    assert len(_lines(caplog, "dropped 2 row(s) after step 4")) == 1


def test_an_unfinished_save_is_discarded_at_resume_with_one_line(run, tmp_path, caplog):
    """What a SIGKILL during the save of step 6 leaves: Orbax's temporary directory (made here from step 6)."""
    work = _copy(run, tmp_path)
    os.rename(_step(work, 6), _step(work, 6) + ".orbax-checkpoint-tmp")
    os.remove(os.path.join(_step(work, 6) + ".orbax-checkpoint-tmp", "commit_success.txt"))
    with caplog.at_level(logging.INFO, logger="m3jax"):
        trainer.train(toy_config(run["tiny"], work, **RUN))
    lines = _lines(caplog, "the save of step 6 never finished")
    assert len(lines) == 1 and "discarded; using step 4" in lines[0], lines
    assert not os.path.exists(_step(work, 6) + ".orbax-checkpoint-tmp")
    assert ckpt_lib.verify_step(_step(work, 6)).verified


def test_a_finished_run_run_again_says_so(run, tmp_path, caplog):
    work = _copy(run, tmp_path)
    with caplog.at_level(logging.INFO, logger="m3jax"):
        summary = trainer.train(toy_config(run["tiny"], work, **RUN))
    assert summary["already_finished"] and summary["step"] == 6
    line = _lines(caplog, "already finished")
    assert len(line) == 1 and os.path.join(work, "checkpoints") in line[0]
    assert "--config.overwrite_output_dir=true" in line[0]
    assert [json.loads(x)["step"] for x in open(os.path.join(work, "metrics.jsonl"))] == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------------------------------------------------------
# saves that fail


def _file_size_limit(limit):
    def preexec():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


def test_a_save_failing_on_a_file_size_limit_stops_the_run_with_one_line(run, tiny_ckpt, tmp_path):
    """RLIMIT_FSIZE (standing in for a full disk or a quota) in a resumed subprocess: the save of step 4 fails in
    Orbax's background thread; the run stops at the next step boundary, exit status 2, one line; step 2 intact."""
    work = _copy(run, tmp_path)
    shutil.rmtree(_step(work, 6))
    shutil.rmtree(_step(work, 4))
    # a cache of its own: the compiled step written under the limit is cut short (jax only warns)
    p = run_train_py(cli_args(tiny_ckpt, work, max_steps=6, save_steps=2, eval_steps=0),
                     {"M3JAX_CACHE_DIR": str(tmp_path / "cache")}, preexec_fn=_file_size_limit(100_000))
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if "m3jax train: error:" in line]
    assert len(errors) == 1, out[-3000:]
    # which write meets the limit first is a race between Orbax's writers: a file of m3jax's (OSError, errno 27) or
    # an array's through tensorstore (ValueError OUT_OF_RANGE ... "File too large"); either is named in the one line
    assert f"step 4: saving the checkpoint to {_step(work, 4)} failed: " in errors[0], errors[0]
    assert "File too large" in errors[0], errors[0]
    assert "Traceback" not in out, out[-3000:]
    assert ckpt_lib.Checkpointer(work, read_only=True).all_steps() == [2]  # the failed step is never a step
    assert loading.find_model(work).location.step == 2 and ckpt_lib.verify_step(_step(work, 2)).verified


def test_a_permission_error_in_the_background_save_stops_the_run(run, tmp_path, monkeypatch):
    """A directory that turns read-only during a save, simulated (tests run as root, whom chmod does not stop):
    the manifest write of step 4, in Orbax's background thread before it commits the step, raises EACCES."""
    work = _copy(run, tmp_path)
    shutil.rmtree(_step(work, 6))
    shutil.rmtree(_step(work, 4))

    def read_only(step_dir, step):
        raise PermissionError(13, "Permission denied", os.path.join(step_dir, ckpt_lib.MANIFEST_NAME))

    monkeypatch.setattr(ckpt_lib, "write_manifest", read_only)
    with pytest.raises(CheckpointSaveError, match=r"step 4: saving the checkpoint to .* failed: PermissionError: "
                                                  r"\[Errno 13\] Permission denied"):
        trainer.train(toy_config(run["tiny"], work, **RUN))
    assert ckpt_lib.Checkpointer(work, read_only=True).all_steps() == [2]
    assert loading.find_model(work).location.step == 2
