"""Issue 16: several eval sets during training, the best checkpoint kept and exported, merging with the base model,
the model card; and the eval shared out over processes.

One short toy run (module fixture) with two eval sets, eval at step 0, save_total_limit=1 serves the training
tests; the merge tests use the tiny checkpoint and a perturbed copy of it."""
import json
import logging
import os
import re
import shutil
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml
from test_train import toy_config

from m3jax import config as config_lib
from m3jax import trainer
from m3jax.cli import main as cli
from m3jax.evaluation import selection
from m3jax.evaluation.evaluate import EvalSetSpec
from m3jax.io import checkpoint as ckpt_lib
from m3jax.model import loading
from m3jax.tools import merge as merge_lib
from m3jax.tools.export import ExportError, export_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOY = os.path.join(REPO, "toy_eval_data")


def _general_set(tmp_path):
    """A second eval set: the toy corpus with the first 12 queries."""
    d = tmp_path / "general"
    d.mkdir()
    shutil.copy(os.path.join(TOY, "corpus.jsonl"), d / "corpus.jsonl")
    with open(os.path.join(TOY, "queries.jsonl")) as f:
        queries = f.readlines()[:12]
    (d / "queries.jsonl").write_text("".join(queries))
    shutil.copy(os.path.join(TOY, "qrels.tsv"), d / "qrels.tsv")
    return str(d)


METRIC = "0.1*domain/all/ndcg@10 + 0.9*general/dense/ndcg@10"


@pytest.fixture(scope="module")
def run(tiny_ckpt, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("selection")
    general = _general_set(tmp)
    out = tmp / "run"
    # greater_is_better=False: the toy run's metric rises at every eval (0.127, 0.132, 0.133 at steps 2, 4, 6), so
    # with lower-is-better the best is a step before the last and save_total_limit=1 must keep it beside the latest
    config = toy_config(tiny_ckpt, out, max_steps=6, save_steps=1000, save_total_limit=1, eval_steps=2,
                        eval_on_start=True, metric_for_best_model=METRIC, greater_is_better=False,
                        seq_len_buckets=(128,), **{"eval.corpus": "", "eval.queries": "", "eval.qrels": ""})
    config.eval_sets = {
        "domain": dict(corpus=os.path.join(TOY, "corpus.jsonl"), queries=os.path.join(TOY, "queries.jsonl"),
                       qrels=os.path.join(TOY, "qrels.tsv"), batch_size=32),
        "general": dict(corpus=f"{general}/corpus.jsonl", queries=f"{general}/queries.jsonl",
                        qrels=f"{general}/qrels.tsv", modes=("dense", "sparse"), metrics=("ndcg@10", "recall@5"),
                        passage_max_len=64)}
    summary = trainer.train(config)
    return {"out": str(out), "summary": summary, "tmp": tmp}


def _eval_rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["split"].startswith("eval")]


def test_two_eval_sets_are_logged_at_every_eval(run):
    rows = _eval_rows(run["out"])
    by_split = {}
    for r in rows:
        by_split.setdefault(r["split"], []).append(r["step"])
    assert by_split == {"eval/domain": [0, 2, 4, 6], "eval/general": [0, 2, 4, 6]}
    domain = next(r for r in rows if r["split"] == "eval/domain")
    general = next(r for r in rows if r["split"] == "eval/general")
    assert {"dense/ndcg@10", "sparse/recall@100", "all/mrr@10", "dense+sparse/ndcg@10"} <= set(domain)
    assert set(general) - {"step", "split"} == {"dense/ndcg@10", "dense/recall@5", "sparse/ndcg@10",
                                                "sparse/recall@5"}
    scalars = _tensorboard_scalars(os.path.join(run["out"], "tensorboard"))  # tensorboardX writes "@" as "_"
    assert {"eval/domain/all/ndcg_10", "eval/general/dense/recall_5", "train/loss"} <= set(scalars)
    assert [step for step, _ in scalars["eval/general/sparse/ndcg_10"]] == [0, 2, 4, 6]
    at_2 = next(r for r in rows if r["split"] == "eval/domain" and r["step"] == 2)
    assert scalars["eval/domain/all/ndcg_10"][1] == (2, pytest.approx(at_2["all/ndcg@10"], abs=1e-6))


def _tensorboard_scalars(log_dir):
    """{tag: [(step, value)]} read from the event files (TFRecord framing, tensorboardX's Event proto)."""
    import struct

    from tensorboardX.proto import event_pb2

    out = {}
    for name in sorted(os.listdir(log_dir)):
        with open(os.path.join(log_dir, name), "rb") as f:
            data = f.read()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_best_checkpoint_survives_save_total_limit(run):
    with open(os.path.join(run["out"], "best.json")) as f:
        best = json.load(f)
    values = {e["step"]: e["value"] for e in best["history"]}
    assert sorted(values) == [2, 4, 6] and best["base"]["step"] == 0
    rows = {(r["split"], r["step"]): r for r in _eval_rows(run["out"])}
    for step, value in values.items():  # the weighted metric, from the logged numbers
        expected = 0.1 * rows["eval/domain", step]["all/ndcg@10"] + 0.9 * rows["eval/general", step]["dense/ndcg@10"]
        assert value == pytest.approx(expected, abs=1e-12)
    assert best["step"] == min(values, key=values.get)  # lower is better in this run
    assert best["metric_for_best_model"] == METRIC and best["metrics"]["general/sparse/recall@5"] >= 0
    steps = ckpt_lib.Checkpointer(run["out"], read_only=True).all_steps()
    assert best["step"] != 6, "the toy run's choice: a step before the last, so save_total_limit=1 is tested"
    assert steps == sorted({best["step"], 6})  # the latest (for resume) and the best
    assert run["summary"]["best"]["step"] == best["step"]


def test_export_of_best_equals_that_steps_params_and_has_a_card(run, tiny_ckpt, tmp_path):
    with open(os.path.join(run["out"], "best.json")) as f:
        best = json.load(f)
    out = str(tmp_path / "best_export")
    assert cli.main(["export", "--checkpoint", run["out"], "--step", "best", "--output", out]) == 0
    step_dir = os.path.join(ckpt_lib.checkpoint_dir(run["out"]), str(best["step"]))
    expected = ckpt_lib.restore_params(os.path.join(step_dir, "state"))
    _, params, _ = loading.load_model(out)
    jax.tree.map(np.testing.assert_array_equal, params, expected)
    with open(os.path.join(out, "m3jax_export.json")) as f:
        assert json.load(f)["step"] == best["step"]

    text = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    match = re.match(r"^---\n(.*?)\n---\n", text, re.S)
    meta = yaml.safe_load(match.group(1))
    assert meta["library_name"] == "sentence-transformers" and meta["pipeline_tag"] == "sentence-similarity"
    assert meta["base_model"] == os.path.basename(os.path.normpath(tiny_ckpt))
    assert "m3jax" in meta["tags"]
    rows = {(r["split"], r["step"]): r for r in _eval_rows(run["out"])}
    for split, step, key in (("eval/domain", 0, "all/ndcg@10"), ("eval/domain", best["step"], "all/ndcg@10"),
                             ("eval/general", best["step"], "sparse/recall@5")):
        assert f"{rows[split, step][key]:.4f}" in text, (split, step, key)
    assert "| domain | all | ndcg@10 |" in text and f"fine-tuned (step {best['step']})" in text
    assert "base (step 0)" in text and "`metric_for_best_model`" in text and "`save_total_limit` | `1`" in text
    assert "toy_train_data" in text and "from FlagEmbedding import BGEM3FlagModel" in text
    assert "SentenceTransformer(" in text and "from m3jax import BGEM3FlagModel" in text


def test_resume_keeps_the_best(run, tiny_ckpt, tmp_path):
    """A resumed run reads best.json: the best step stays protected while new steps are saved and removed."""
    with open(os.path.join(run["out"], "best.json")) as f:
        best_step = json.load(f)["step"]
    tracker = selection.BestTracker(run["out"], selection.parse_metric(METRIC), greater_is_better=False)
    tracker.resume(6)
    assert tracker.protected() == {best_step}
    tracker = selection.BestTracker(run["out"], selection.parse_metric(METRIC), greater_is_better=False)
    tracker.resume(best_step - 1)  # resuming before the best eval forgets it
    assert best_step not in tracker.protected()


def test_metric_for_best_model_syntax_and_errors():
    specs = [EvalSetSpec("domain", "c", "q", "r", 8, 8, 8, ("dense", "dense+sparse", "all"), (1, 1, 1),
                         ("ndcg@10", "mrr@10")),
             EvalSetSpec("general", "c", "q", "r", 8, 8, 8, ("dense",), (1, 1, 1), ("ndcg@10",))]
    e = selection.parse_metric("0.7*domain/dense+sparse/ndcg@10+0.3*general/dense/ndcg@10", specs)
    assert e.terms == ((0.7, "domain/dense+sparse/ndcg@10"), (0.3, "general/dense/ndcg@10"))
    assert e.value({"domain/dense+sparse/ndcg@10": 0.5, "general/dense/ndcg@10": 1.0}) == pytest.approx(0.65)
    # issue 27: empty is the first set's mode for the trained heads (default all three: all) and its nDCG@10
    assert selection.parse_metric("", specs).terms == ((1.0, "domain/all/ndcg@10"),)
    for heads, expected in ((("dense", "sparse"), "domain/dense+sparse/ndcg@10"), (("dense",), "domain/dense/ndcg@10"),
                            (("dense", "colbert"), "domain/dense/ndcg@10"),
                            (("sparse",), "domain/dense/ndcg@10")):  # no sparse mode in the set: its first mode
        assert selection.parse_metric("", specs, heads=heads).terms == ((1.0, expected),), heads
    assert "has no sparse/ndcg@10" in selection.parse_metric("", specs, heads=("sparse",)).why
    assert selection.parse_metric("", specs[1:]).terms == ((1.0, "general/dense/ndcg@10"),)
    assert selection.parse_metric("domain/all/mrr@10", specs).terms == ((1.0, "domain/all/mrr@10"),)
    for bad, message in (("domain/all/ndcg@5", "no metric 'ndcg@5'"), ("other/dense/ndcg@10", "no eval set 'other'"),
                         ("general/all/ndcg@10", "no mode 'all'"), ("domain/all/ndcg@10 +", "missing after"),
                         ("0*domain/all/ndcg@10", "non-zero"), ("domain/ndcg@10", "cannot read")):
        with pytest.raises(ValueError, match=re.escape(message)):
            selection.parse_metric(bad, specs)


def test_the_choosing_metric_and_its_values_are_logged(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="m3jax")
    specs = [EvalSetSpec("eval", "c", "q", "r", 8, 8, 8, ("dense", "all"), (1, 1, 1), ("ndcg@10",))]
    tracker = selection.BestTracker(str(tmp_path), selection.parse_metric("", specs))
    assert tracker.update(0, {"eval/all/ndcg@10": 0.25, "eval/dense/ndcg@10": 0.5}) is False
    assert tracker.update(2, {"eval/all/ndcg@10": 0.5, "eval/dense/ndcg@10": 0.1}) is True
    assert tracker.update(4, {"eval/all/ndcg@10": 0.375, "eval/dense/ndcg@10": 0.9}) is False
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "the best checkpoint is chosen by eval/all/ndcg@10 (the default for the trained heads dense, sparse, colbert; "
        "greater is better)",
        "eval at step 0 (the base model): eval/all/ndcg@10 = 0.25",
        "eval at step 2: eval/all/ndcg@10 = 0.5 (the best so far)",
        "eval at step 4: eval/all/ndcg@10 = 0.375 (the best is step 2: 0.5)"]
    assert tracker.summary().startswith("best checkpoint: step 2, eval/all/ndcg@10 = 0.5 ")


def test_a_run_training_all_heads_picks_by_all_ndcg_by_default(tiny_ckpt, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="m3jax")
    out = tmp_path / "run"
    config = toy_config(tiny_ckpt, out, max_steps=2, save_steps=1000, eval_steps=2, seq_len_buckets=(128,))
    assert config.metric_for_best_model == "" and config_lib.trained_heads(config) == ("dense", "sparse", "colbert")
    summary = trainer.train(config)
    assert summary["best"]["metric_for_best_model"] == "eval/all/ndcg@10"
    with open(out / "best.json") as f:
        best = json.load(f)
    assert best["metric_for_best_model"] == "eval/all/ndcg@10"
    assert best["value"] == best["metrics"]["eval/all/ndcg@10"]
    text = caplog.text
    assert "the best checkpoint is chosen by eval/all/ndcg@10 (the default for the trained heads" in text
    assert f"eval at step 2: eval/all/ndcg@10 = {best['value']:.5g} (the best so far)" in text
    assert f"best checkpoint: step 2, eval/all/ndcg@10 = {best['value']:.5g}" in text


@pytest.mark.parametrize("change, message", [
    (dict(eval_sets={"a/b": dict(corpus="c", queries="q", qrels="r")}), "config.eval_sets='a/b'"),
    (dict(eval_sets={"a": dict(corpus="c", queries="q")}), "config.eval_sets.a.qrels='': expected a file path"),
    (dict(eval_sets={"a": dict(corpus="c", queries="q", qrels="r", modez=("dense",))}),
     "config.eval_sets.a.modez: no such eval set field"),
    (dict(eval_sets={"a": dict(corpus="c", queries="q", qrels="r", metrics=("ndcg",))}),
     "config.eval_sets.a.metrics=('ndcg',)"),
    (dict(eval_sets={"a": dict(corpus="c", queries="q", qrels="r")}, metric_for_best_model="b/all/ndcg@10"),
     "config.metric_for_best_model='b/all/ndcg@10': no eval set 'b'"),
    (dict(eval_sets={"eval": dict(corpus="c", queries="q", qrels="r")}, **{"eval.corpus": "x"}),
     "config.eval_sets.eval='eval'"),
])
def test_eval_set_config_errors_name_the_field(change, message):
    c = config_lib.default_config()
    c.model_name_or_path, c.output_dir, c.train_data = "m", "o", "d"
    for key, value in change.items():
        if key == "eval.corpus":
            c.eval.update(corpus=value, queries="q", qrels="r")
        else:
            c[key] = value
    with pytest.raises(config_lib.ConfigError) as err:
        config_lib.validate(c)
    assert message in str(err.value)


def test_legacy_eval_is_a_set_named_eval():
    c = config_lib.default_config()
    c.eval.update(corpus="c", queries="q", qrels="r")
    c.eval_sets = {"general": dict(corpus="c2", queries="q2", qrels="r2", query_max_len=16)}
    specs = config_lib.eval_settings(c).eval_set_specs
    assert [(s.name, s.log_prefix) for s in specs] == [("eval", "eval"), ("general", "eval/general")]
    assert specs[1].query_max_len == 16 and specs[1].passage_max_len == c.passage_max_len
    assert specs[1].modes == specs[0].modes and specs[1].metrics == ("ndcg@10", "recall@100", "mrr@10")



def test_a_matryoshka_metric_for_best_model_is_resolved_as_validate_accepts_it():
    """metric_for_best_model may name a Matryoshka mode (dense@K of mrl_dims, which every set reports): validate()
    accepts it, and the run's selection resolves it (it once raised from the trainer, outside validate)."""
    c = config_lib.default_config()
    c.eval.update(corpus="c", queries="q", qrels="r")
    c.update(eval_steps=5, mrl_dims=(16, 32), metric_for_best_model="eval/dense@16/ndcg@10")
    config_lib.validate(c, for_training=False)
    chosen = config_lib.selection_settings(c).metric_for_best_model
    assert chosen.terms == ((1.0, "eval/dense@16/ndcg@10"),)
    assert chosen.value({"eval/dense@16/ndcg@10": 0.25}) == 0.25
    c.metric_for_best_model = "eval/dense@8/ndcg@10"  # not one of mrl_dims
    with pytest.raises(config_lib.ConfigError, match="dense@8"):
        config_lib.validate(c, for_training=False)

# ---------------------------------------------------------------------------------------------------------------
# the eval shared out over two processes


def _eval_cmd(tiny_ckpt, output, extra_env, devices):
    env = dict(os.environ, M3JAX_CACHE_DIR=os.environ.get("M3JAX_CACHE_DIR", "/tmp/m3jax_test_cache"),
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra_env)
    return subprocess.Popen([sys.executable, "-m", "m3jax", "eval", "--model", str(tiny_ckpt), "--corpus",
                             os.path.join(TOY, "corpus.jsonl"), "--queries", os.path.join(TOY, "queries.jsonl"),
                             "--qrels", os.path.join(TOY, "qrels.tsv"), "--batch-size", "8", "--query-max-len", "32",
                             "--passage-max-len", "64", "--metrics", "ndcg@10,recall@100,mrr@10,recall@3",
                             "--output", str(output)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.multiprocess
@pytest.mark.slow
def test_two_process_eval_equals_one_process_to_the_last_digit(tiny_ckpt, tmp_path):
    """79 passages in chunks of 64 (8 blocks of 8): process 0 searches chunk 0, process 1 chunk 1; merged top-k."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_eval_cmd(tiny_ckpt, tmp_path / "multi.json", {"M3JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                                            "M3JAX_NUM_PROCESSES": "2", "M3JAX_PROCESS_ID": str(i)}, 2)
             for i in range(2)]
    procs.append(_eval_cmd(tiny_ckpt, tmp_path / "single.json", {}, 2))
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(o[-2000:] for o in outs)
    multi = json.loads((tmp_path / "multi.json").read_text())["metrics"]
    single = json.loads((tmp_path / "single.json").read_text())["metrics"]
    assert multi == single  # the same floats, bit for bit
    assert 0 < single["all"]["ndcg@10"] < 1 and single["dense"]["recall@100"] == 1.0


# ---------------------------------------------------------------------------------------------------------------
# merging


@pytest.fixture(scope="module")
def tuned(tiny_ckpt, tmp_path_factory):
    """A "fine-tuned" bge-m3 directory: the tiny checkpoint with every tensor perturbed (float32 heads)."""
    from m3jax.tools.export import export_params

    cfg, params, _ = loading.load_model(tiny_ckpt)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda a: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32), params)
    with open(os.path.join(tiny_ckpt, "config.json")) as f:
        hf_config = json.load(f)
    out = export_params(params, hf_config, tmp_path_factory.mktemp("tuned") / "tuned", tokenizer_dir=tiny_ckpt)
    return out, params


def _base_params(path):
    """The params of a bge-m3 directory as an export writes them (heads read as stored, fp16 ones widened)."""
    return loading.load_model(path).params


def test_merge_weights_one_zero_and_half(tuned, tiny_ckpt, tmp_path):
    tuned_dir, tuned_params = tuned
    base = _base_params(tiny_ckpt)
    out1 = merge_lib.merge_models([tuned_dir, tiny_ckpt], [1.0, 0.0], tmp_path / "w1")
    jax.tree.map(np.testing.assert_array_equal, loading.load_model(out1).params, tuned_params)
    out0 = merge_lib.merge_models([tuned_dir, tiny_ckpt], [0.0, 1.0], tmp_path / "w0")
    jax.tree.map(np.testing.assert_array_equal, loading.load_model(out0).params, base)
    out_half = merge_lib.merge_models([tuned_dir, tiny_ckpt], None, tmp_path / "half")  # default: equal weights
    mean = jax.tree.map(lambda a, b: ((a.astype(np.float64) + b.astype(np.float64)) / 2).astype(np.float32),
                        tuned_params, base)
    merged = loading.load_model(out_half).params
    jax.tree.map(np.testing.assert_array_equal, merged, mean)
    assert not np.array_equal(merged["colbert_linear"]["kernel"], base["colbert_linear"]["kernel"])  # heads too
    with open(os.path.join(out_half, "m3jax_export.json")) as f:
        assert json.load(f)["merge"]["weights"] == [0.5, 0.5]
    text = open(os.path.join(out_half, "README.md"), encoding="utf-8").read()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert "merge" in meta["tags"] and "| 0.5 |" in text


def test_merge_errors(tuned, tiny_ckpt, tmp_path, make_ckpt, capsys):
    tuned_dir, _ = tuned
    with pytest.raises(merge_lib.MergeError, match="sum to 1"):
        merge_lib.merge_models([tuned_dir, tiny_ckpt], [0.5, 0.6], tmp_path / "x")
    with pytest.raises(merge_lib.MergeError, match="2 weights for 3 models"):
        merge_lib.merge_models([tuned_dir, tiny_ckpt, tiny_ckpt], [0.5, 0.5], tmp_path / "x")
    with pytest.raises(merge_lib.MergeError, match="not the same architecture"):
        merge_lib.merge_models([tuned_dir, make_ckpt(layers=3)], [0.5, 0.5], tmp_path / "x")
    no_heads = tmp_path / "no_heads"
    shutil.copytree(tiny_ckpt, no_heads)
    os.remove(no_heads / "sparse_linear.pt")
    assert cli.main(["merge", "--models", tuned_dir, str(no_heads), "--output", str(tmp_path / "y")]) == 2
    assert "no sparse_linear.pt; merging needs every tensor" in capsys.readouterr().err
    assert cli.main(["merge", "--models", tuned_dir, tiny_ckpt, "--grid", "0,1", "--output", str(tmp_path / "y")]) == 2
    assert "--grid needs at least one --eval-set" in capsys.readouterr().err


def test_export_merge_with_base(run, tiny_ckpt, tmp_path):
    step = 6
    finetuned = ckpt_lib.restore_params(os.path.join(ckpt_lib.checkpoint_dir(run["out"]), str(step), "state"))
    base = _base_params(tiny_ckpt)
    out = export_checkpoint(run["out"], tmp_path / "m1", step=step, merge_with=tiny_ckpt, merge_weight=1.0)
    jax.tree.map(np.testing.assert_array_equal, loading.load_model(out).params, finetuned)
    out = export_checkpoint(run["out"], tmp_path / "m0", step=step, merge_with=tiny_ckpt, merge_weight=0.0)
    jax.tree.map(np.testing.assert_array_equal, loading.load_model(out).params, base)
    assert cli.main(["export", "--checkpoint", run["out"], "--step", str(step), "--output", str(tmp_path / "mh"),
                     "--merge-with", tiny_ckpt, "--merge-weight", "0.5"]) == 0
    mean = jax.tree.map(lambda a, b: ((a.astype(np.float64) + b.astype(np.float64)) / 2).astype(np.float32),
                        finetuned, base)
    jax.tree.map(np.testing.assert_array_equal, loading.load_model(tmp_path / "mh").params, mean)
    with pytest.raises(ExportError, match="go together"):
        export_checkpoint(run["out"], tmp_path / "e", merge_with=tiny_ckpt)
    with pytest.raises(merge_lib.MergeError, match=r"in \[0, 1\]"):
        export_checkpoint(run["out"], tmp_path / "e", merge_with=tiny_ckpt, merge_weight=1.5)


TEXTS = ["why is the sky blue during the day", "git reset --soft HEAD~1", "什么是光合作用？", "a"]


@pytest.mark.stack_sensitive
def test_merged_export_loads_in_transformers_and_sentence_transformers(tuned, tiny_ckpt, tmp_path):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from m3jax.model.inference import BGEM3FlagModel

    out = merge_lib.merge_models([tuned[0], tiny_ckpt], [0.3, 0.7], tmp_path / "merged")
    ref = BGEM3FlagModel(out, use_fp16=False, devices="cpu").encode(TEXTS, max_length=64, return_sparse=True,
                                                                   return_colbert_vecs=True)
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        batch = tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = AutoModel.from_pretrained(out).eval()(**batch).last_hidden_state[:, 0]
    np.testing.assert_allclose(torch.nn.functional.normalize(hidden, dim=-1).numpy(), ref["dense_vecs"], atol=1e-5)
    st = SentenceTransformer(out, device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(st, ref["dense_vecs"], atol=1e-5)


@pytest.mark.needs_flagembedding
def test_merged_export_loads_in_flagembedding(tuned, tiny_ckpt, tmp_path):
    from FlagEmbedding import BGEM3FlagModel as FlagBGEM3

    from m3jax.model.inference import BGEM3FlagModel

    out = merge_lib.merge_models([tuned[0], tiny_ckpt], [0.3, 0.7], tmp_path / "merged")
    kw = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True, batch_size=4, max_length=64)
    ours = BGEM3FlagModel(out, use_fp16=False, devices="cpu").encode(TEXTS, **kw)
    theirs = FlagBGEM3(out, use_fp16=False, devices="cpu").encode(TEXTS, **kw)
    np.testing.assert_allclose(theirs["dense_vecs"], ours["dense_vecs"], atol=1e-5)
    for mine, other in zip(ours["lexical_weights"], theirs["lexical_weights"]):
        assert sorted(mine) == sorted(other)
        np.testing.assert_allclose([float(other[k]) for k in sorted(mine)], [float(mine[k]) for k in sorted(mine)],
                                   atol=1e-5)
    for mine, other in zip(ours["colbert_vecs"], theirs["colbert_vecs"]):
        np.testing.assert_allclose(other, mine, atol=1e-5)


def test_merge_grid_chooses_the_weight_on_eval_sets(tuned, tiny_ckpt, tmp_path, capsys):
    general = _general_set(tmp_path)
    out = str(tmp_path / "grid")
    assert cli.main(["merge", "--models", tuned[0], tiny_ckpt, "--grid", "0,0.5,1", "--eval-set", f"domain={TOY}",
                     "--eval-set", f"general={general}/corpus.jsonl,{general}/queries.jsonl,{general}/qrels.tsv",
                     "--modes", "dense,sparse", "--metrics", "ndcg@10", "--metric",
                     "domain/sparse/ndcg@10 + general/dense/ndcg@10", "--batch-size", "32", "--query-max-len", "32",
                     "--passage-max-len", "64", "--devices", "cpu", "--fp32", "--output", out]) == 0
    printed = capsys.readouterr().out
    with open(os.path.join(out, merge_lib.GRID_NAME)) as f:
        grid = json.load(f)
    points = grid["points"]
    assert [p["weight"] for p in points] == [0.0, 0.5, 1.0]
    values = [p["metrics"]["domain/sparse/ndcg@10"] + p["metrics"]["general/dense/ndcg@10"] for p in points]
    assert [p["value"] for p in points] == pytest.approx(values, abs=1e-12)
    chosen = points[int(np.argmax(values))]["weight"]
    assert grid["chosen_weight"] == chosen and printed.count("W=") == 4
    chosen_value = points[int(np.argmax(values))]["value"]
    assert printed.splitlines()[-2] == (f"chosen: W={chosen:g} by domain/sparse/ndcg@10 + general/dense/ndcg@10 = "
                                        f"{chosen_value:.4f} (greater is better)")  # issue 27: the choice is shown
    w = chosen
    expected = merge_lib.merge_params([loading.load_model(tuned[0]).params, _base_params(tiny_ckpt)], [w, 1 - w])
    jax.tree.map(np.testing.assert_array_equal, loading.load_model(out).params, expected)
    # W=0 is the base model itself: its grid numbers equal `m3jax eval` of the base
    from m3jax.evaluation import evaluate as ev
    from m3jax.model.inference import BGEM3FlagModel

    base_eval = ev.evaluate(BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices="cpu"), f"{TOY}/corpus.jsonl",
                            f"{TOY}/queries.jsonl", f"{TOY}/qrels.tsv", batch_size=32, query_max_len=32,
                            passage_max_len=64, modes=["dense", "sparse"], metrics=["ndcg@10"])
    assert points[0]["metrics"]["domain/sparse/ndcg@10"] == base_eval["sparse"]["ndcg@10"]
    text = open(os.path.join(out, "README.md"), encoding="utf-8").read()
    assert f"{points[0]['metrics']['domain/dense/ndcg@10']:.4f}" in text and "second model (W=0)" in text
