"""The README's toy run learns what the README says, on whichever stack runs the tests.

The README's main command, as a user runs it: `python scripts/make_tiny_checkpoint.py DIR` then
`python train.py --config configs/toy.py` (all 210 steps; only the checkpoint and output directories are moved to
tmp), on one CPU device. Measured (jax 0.10.2, on transformers 4.57.6 and on 5.24.0 alike): logged loss 3.29 at
step 10 and 0.36 at step 210; nDCG@10 at step 105 / 210: dense 0.225 / 0.268, sparse 0.678 / 0.579, colbert
0.219 / 0.294, all three 0.603 / 0.454. The tokenizer that transformers 5 once wrote, which maps every word to <unk>,
gave loss 2.64 -> 1.32 and nDCG@10 between 0.06 and 0.14 for every head: the thresholds below sit between the two.
"""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.stack_sensitive  # .ci/run runs this module on the latest stack too
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINAL_LOSS_BELOW = 0.6
NDCG_ABOVE = {"dense": 0.17, "sparse": 0.4, "colbert": 0.17, "all": 0.35}  # at steps 105 and 210


def _run(args, env):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, f"{args} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_toy_run_learns(tmp_path):
    env = dict(os.environ, M3JAX_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("XLA_FLAGS")  # conftest's eight simulated devices: the README's run sees the machine's one CPU device
    ckpt, out = tmp_path / "tiny_bge_m3", tmp_path / "toy"
    _run([os.path.join("scripts", "make_tiny_checkpoint.py"), str(ckpt)], env)
    log = _run(["train.py", "--config", os.path.join("configs", "toy.py"), f"--config.model_name_or_path={ckpt}",
                f"--config.output_dir={out}"], env)
    assert "0.0% of the text tokens of the first 2 batches are <unk>" in log

    with open(out / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    train = {r["step"]: r for r in rows if r["split"] == "train"}
    evals = {r["step"]: r for r in rows if r["split"] == "eval"}
    assert max(train) == 210 and sorted(evals) == [105, 210]
    assert train[10]["loss"] > 2.5 and train[210]["loss"] < FINAL_LOSS_BELOW, (train[10]["loss"], train[210]["loss"])
    ndcg = {(step, head): evals[step][f"{head}/ndcg@10"] for step in evals for head in NDCG_ABOVE}
    low = {key: value for key, value in ndcg.items() if value <= NDCG_ABOVE[key[1]]}
    assert not low, f"nDCG@10 at or below {NDCG_ABOVE}: {low} (all: {ndcg})"
