"""scripts/launch_tpu_pod.sh, scripts/launch_slurm.sbatch (+ slurm_task.sh), scripts/launch_multinode.sh.

The dry runs must print exactly the commands the scripts would run (each line valid shell, overrides quoted so the
remote / task shell gets them verbatim); the real runs are exercised with fake gcloud / tar / srun / scontrol /
python executables on PATH that record how they were called.
"""
import os
import shlex
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPO, "scripts")
TRICKY = "--config.query_instruction_for_retrieval=Represent this: it's \"q\" $HOME"  # spaces, quotes, $


def _run(script, args, env=None, path_dir=None):
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("SLURM_", "M3JAX_", "NNODES", "NODE_RANK", "MASTER_", "NPROC_", "DRY_RUN"))}
    full_env.update(env or {})
    if path_dir:
        full_env["PATH"] = f"{path_dir}{os.pathsep}{full_env['PATH']}"
    return subprocess.run(["bash", os.path.join(SCRIPTS, script), *args], capture_output=True, text=True,
                          env=full_env, cwd=REPO, timeout=60)


def _fake(folder, name, body):
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return str(path)


RECORD = 'printf "%s\\0" "$(basename "$0")" "$@" >> "$FAKE_LOG"; printf "\\n" >> "$FAKE_LOG"\n'


def _recorded(log):
    """The argv of every call of a recording fake, in call order."""
    return [line.strip("\0").split("\0") for line in log.read_text().splitlines() if line]


# ---------------------------------------------------------------------------------------------------------------
# TPU pod

TPU_ARGS = ["--name", "m3-pod", "--zone", "us-central2-b", "--project", "my-proj", "--create", "--accelerator-type",
            "v4-32", "--version", "tpu-ubuntu2204-base", "--spot", "--config", "configs/toy.py", "--",
            "--config.output_dir=gs://bucket/runs/m3", TRICKY]


def _tpu_expected(tmpdir):
    install = ("set -e; rm -rf m3jax; mkdir -p m3jax; tar -xzf m3jax-src.tar.gz -C m3jax; "
               "python3 -m pip install -U 'jax[tpu]'; python3 -m pip install -e 'm3jax[gcs]'")
    train = "cd m3jax && python3 train.py --config configs/toy.py --config.output_dir=gs://bucket/runs/m3 " \
            + shlex.quote(TRICKY)
    flags = ["--zone=us-central2-b", "--project=my-proj"]
    return [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "m3-pod", *flags, "--accelerator-type=v4-32",
         "--version=tpu-ubuntu2204-base", "--spot"],
        ["tar", "-czf", f"{tmpdir}/m3jax-src-m3-pod.tar.gz", "--exclude=.git", "--exclude=.venv", "--exclude=runs",
         "--exclude=work_dirs", "--exclude=__pycache__", "--exclude=*.egg-info", "-C", REPO, "."],
        ["gcloud", "compute", "tpus", "tpu-vm", "scp", f"{tmpdir}/m3jax-src-m3-pod.tar.gz", "m3-pod:m3jax-src.tar.gz",
         *flags, "--worker=all"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "m3-pod", *flags, "--worker=all", f"--command={install}"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "m3-pod", *flags, "--worker=all", f"--command={train}"],
    ]


def test_tpu_dry_run_prints_every_command(tmp_path):
    result = _run("launch_tpu_pod.sh", TPU_ARGS + [], env={"DRY_RUN": "1", "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = _tpu_expected(tmp_path)
    assert lines == [shlex.join(argv) for argv in expected]
    # The exact text of the last line, and what the workers' shell makes of its --command.
    assert lines[-1] == (
        "gcloud compute tpus tpu-vm ssh m3-pod --zone=us-central2-b --project=my-proj --worker=all "
        "'--command=cd m3jax && python3 train.py --config configs/toy.py --config.output_dir=gs://bucket/runs/m3 '\"'\"'"
        "--config.query_instruction_for_retrieval=Represent this: it'\"'\"'\"'\"'\"'\"'\"'\"'s \"q\" $HOME'\"'\"''")
    remote = shlex.split(shlex.split(lines[-1])[-1][len("--command="):])
    assert remote == ["cd", "m3jax", "&&", "python3", "train.py", "--config", "configs/toy.py",
                      "--config.output_dir=gs://bucket/runs/m3", TRICKY]
    # stderr says what the workers do with each gs:// path (issue 18)
    assert result.stderr.splitlines() == ["output_dir gs://bucket/runs/m3: read and written in place by every worker"]


def test_tpu_dry_run_names_what_happens_to_each_cloud_path(tmp_path):
    args = TPU_ARGS[:-2] + ["--config.output_dir=gs://b/run", "--config.model_name_or_path=gs://b/bge-m3",
                            "--config.train_data=gs://b/data/a,gs://b/data/b", "--config.eval.corpus=gs://b/ev/c.jsonl",
                            "--config.learning_rate=1e-5"]
    result = _run("launch_tpu_pod.sh", args, env={"DRY_RUN": "1", "TMPDIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        "output_dir gs://b/run: read and written in place by every worker",
        "model_name_or_path: gs://b/bge-m3 is staged (copied once to each worker's $M3JAX_CACHE_DIR)",
        "train_data: gs://b/data/a,gs://b/data/b is staged (copied once to each worker's $M3JAX_CACHE_DIR)",
        "eval.corpus: gs://b/ev/c.jsonl is read in place"]
    assert "pip install -e " in result.stdout and "m3jax[gcs]" in result.stdout


def test_tpu_real_run_calls_gcloud_as_printed(tmp_path):
    fakes = tmp_path / "bin"
    fakes.mkdir()
    _fake(fakes, "gcloud", RECORD)
    _fake(fakes, "tar", RECORD)
    log = tmp_path / "calls"
    result = _run("launch_tpu_pod.sh", TPU_ARGS, env={"FAKE_LOG": str(log), "TMPDIR": str(tmp_path)},
                  path_dir=fakes)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert _recorded(log) == _tpu_expected(tmp_path)


def test_tpu_minimal_and_detached(tmp_path):
    result = _run("launch_tpu_pod.sh", ["--dry-run", "--name", "p", "--zone", "z", "--skip-install", "--detach",
                                        "--config", os.path.join(REPO, "configs", "toy.py")])
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "gcloud compute tpus tpu-vm ssh p --zone=z --worker=all '--command=cd m3jax && nohup python3 train.py "
        "--config configs/toy.py > train.log 2>&1 < /dev/null &'"]


@pytest.mark.parametrize("args, message", [
    (["--zone", "z", "--config", "configs/toy.py"], "--name is required"),
    (["--name", "p", "--config", "configs/toy.py"], "--zone is required"),
    (["--name", "p", "--zone", "z"], "--config is required"),
    (["--name", "p", "--zone", "z", "--config", "configs/toy.py", "--create"],
     "--create needs --accelerator-type and --version"),
    (["--name", "p", "--zone", "z", "--config", "configs/toy.py", "--config.x=1"],
     "unknown argument '--config.x=1' (train.py overrides go after --; see --help)"),
    (["--name", "p", "--zone", "z", "--config", "configs/nope.py"], "config configs/nope.py not found in"),
])
def test_tpu_argument_errors(args, message):
    result = _run("launch_tpu_pod.sh", args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"launch_tpu_pod.sh: error: {message}")


def test_tpu_help():
    result = _run("launch_tpu_pod.sh", ["--help"])
    assert result.returncode == 0 and "--worker=all" in result.stdout and "--dry-run" in result.stdout


# ---------------------------------------------------------------------------------------------------------------
# SLURM


def _slurm_env(tmp_path, **extra):
    fakes = tmp_path / "bin"
    fakes.mkdir(exist_ok=True)
    _fake(fakes, "scontrol", '[[ $1 == show && $2 == hostnames ]] || exit 1\n'
                             'for n in gpu-a01 gpu-a02 gpu-a03; do echo $n; done\n')
    env = {"SLURM_JOB_NODELIST": "gpu-a[01-03]", "SLURM_NTASKS": "3", "SLURM_SUBMIT_DIR": REPO, **extra}
    return env, fakes


def test_slurm_dry_run_one_process_per_node(tmp_path):
    env, fakes = _slurm_env(tmp_path)
    result = _run("launch_slurm.sbatch", ["--dry-run", "configs/toy.py", TRICKY], env=env, path_dir=fakes)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "export M3JAX_COORDINATOR_ADDRESS=gpu-a01:12355",
        "export M3JAX_NUM_PROCESSES=3",
        f"export M3JAX_REPO={REPO} M3JAX_PYTHON=python",
        f"srun --kill-on-bad-exit=1 --ntasks=3 --ntasks-per-node=1 {REPO}/scripts/slurm_task.sh configs/toy.py "
        + shlex.quote(TRICKY)]
    assert shlex.split(result.stdout.splitlines()[-1])[-1] == TRICKY


def test_slurm_dry_run_one_process_per_gpu(tmp_path):
    env, fakes = _slurm_env(tmp_path, SLURM_NTASKS="16", SLURM_NTASKS_PER_NODE="8", M3JAX_PORT="23456",
                            M3JAX_PYTHON="/opt/venv/bin/python", DRY_RUN="1")
    result = _run("launch_slurm.sbatch", ["configs/toy.py"], env=env, path_dir=fakes)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "export M3JAX_COORDINATOR_ADDRESS=gpu-a01:23456",
        "export M3JAX_NUM_PROCESSES=16",
        f"export M3JAX_REPO={REPO} M3JAX_PYTHON=/opt/venv/bin/python",
        "export M3JAX_GPU_PER_TASK=1",
        f"srun --kill-on-bad-exit=1 --ntasks=16 --ntasks-per-node=8 {REPO}/scripts/slurm_task.sh configs/toy.py"]


def test_slurm_task_dry_run():
    env = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "M3JAX_GPU_PER_TASK": "1", "M3JAX_REPO": REPO,
           "M3JAX_COORDINATOR_ADDRESS": "gpu-a01:12355", "M3JAX_NUM_PROCESSES": "8", "DRY_RUN": "1"}
    result = _run("slurm_task.sh", ["configs/toy.py", TRICKY], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"cd {REPO} && env M3JAX_COORDINATOR_ADDRESS=gpu-a01:12355 M3JAX_NUM_PROCESSES=8 M3JAX_PROCESS_ID=5 "
        f"CUDA_VISIBLE_DEVICES=1 python train.py --config configs/toy.py {shlex.quote(TRICKY)}"]


def test_slurm_real_run_through_fake_srun(tmp_path):
    """sbatch script -> srun (fake: runs each task with SLURM_PROCID / SLURM_LOCALID) -> slurm_task.sh -> python."""
    env, fakes = _slurm_env(tmp_path, SLURM_NTASKS="4", SLURM_NTASKS_PER_NODE="2")
    _fake(fakes, "srun", 'n=1; per=1; args=()\n'
                         'while [[ $1 == --* ]]; do case $1 in --ntasks=*) n=${1#*=};; --ntasks-per-node=*) '
                         'per=${1#*=};; esac; shift; done\n'
                         'for ((i = 0; i < n; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$((i % per)) "$@" || exit 1; '
                         'done\n')
    python = _fake(fakes, "fakepython", 'echo "pid=$M3JAX_PROCESS_ID n=$M3JAX_NUM_PROCESSES '
                                        'addr=$M3JAX_COORDINATOR_ADDRESS gpu=${CUDA_VISIBLE_DEVICES-all} '
                                        'cwd=$PWD args=$*"\n')
    result = _run("launch_slurm.sbatch", ["configs/toy.py", "--config.x=1"], env={**env, "M3JAX_PYTHON": python},
                  path_dir=fakes)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        f"pid={i} n=4 addr=gpu-a01:12355 gpu={i % 2} cwd={REPO} args=train.py --config configs/toy.py --config.x=1"
        for i in range(4)]
    assert "4 processes (2 per node), coordinator gpu-a01:12355" in result.stderr


def test_slurm_outside_an_allocation():
    result = _run("launch_slurm.sbatch", ["--dry-run", "configs/toy.py"])
    assert result.returncode == 2
    assert result.stderr.startswith("launch_slurm.sbatch: error: not inside a SLURM allocation")


# ---------------------------------------------------------------------------------------------------------------
# plain multi-node (environment variables)


@pytest.mark.parametrize("env, lines", [
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"},
     ["env M3JAX_COORDINATOR_ADDRESS=10.0.0.1:29500 M3JAX_NUM_PROCESSES=2 M3JAX_PROCESS_ID=1 python train.py "
      "--config configs/toy.py " + shlex.quote(TRICKY)]),
    ({"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "NPROC_PER_NODE": "2", "PYTHON": "python3"},
     [f"env M3JAX_COORDINATOR_ADDRESS=10.0.0.1:12355 M3JAX_NUM_PROCESSES=4 M3JAX_PROCESS_ID={2 + i} "
      f"CUDA_VISIBLE_DEVICES={i} python3 train.py --config configs/toy.py " + shlex.quote(TRICKY) for i in range(2)]),
    ({}, ["python train.py --config configs/toy.py " + shlex.quote(TRICKY)]),  # one process: no distributed setup
])
def test_multinode_dry_run(env, lines):
    result = _run("launch_multinode.sh", ["--dry-run", "configs/toy.py", TRICKY], env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [f"cd {REPO}"] + lines
    assert shlex.split(result.stdout.splitlines()[-1])[-1] == TRICKY


@pytest.mark.parametrize("env, message", [
    ({"NNODES": "2"}, "MASTER_ADDR (the address of node 0) is required when NNODES > 1"),
    ({"NNODES": "2", "NODE_RANK": "2", "MASTER_ADDR": "h"}, "NODE_RANK=2 must be smaller than NNODES=2"),
    ({"NNODES": "two"}, "NNODES=two: expected a non-negative integer"),
    ({"NPROC_PER_NODE": "0"}, "NNODES and NPROC_PER_NODE must be at least 1"),
])
def test_multinode_errors(env, message):
    result = _run("launch_multinode.sh", ["--dry-run", "configs/toy.py"], env=env)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip() == f"launch_multinode.sh: error: {message}"


def test_multinode_real_run_starts_every_local_process(tmp_path):
    python = _fake(tmp_path, "fakepython",
                   'echo "pid=$M3JAX_PROCESS_ID n=$M3JAX_NUM_PROCESSES addr=$M3JAX_COORDINATOR_ADDRESS '
                   'gpu=$CUDA_VISIBLE_DEVICES args=$*" > "$OUT_DIR/$M3JAX_PROCESS_ID"\n'
                   '[[ ${FAIL_ID:-} != "$M3JAX_PROCESS_ID" ]]\n')
    env = {"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "10.0.0.1", "NPROC_PER_NODE": "3", "PYTHON": python,
           "OUT_DIR": str(tmp_path)}
    result = _run("launch_multinode.sh", ["configs/toy.py", TRICKY], env=env)
    assert result.returncode == 0, result.stderr
    for i in range(3):
        assert (tmp_path / str(i)).read_text() == (f"pid={i} n=6 addr=10.0.0.1:12355 gpu={i} args=train.py "
                                                   f"--config configs/toy.py {TRICKY}\n")
    failed = _run("launch_multinode.sh", ["configs/toy.py"], env={**env, "FAIL_ID": "1"})
    assert failed.returncode == 1
