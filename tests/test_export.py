"""m3jax.tools.export and `m3jax export`: an Orbax training checkpoint -> the bge-m3 directory layout.

The checkpoints are written here the way the trainer writes them (m3jax.io.checkpoint.Checkpointer.save of a
TrainState with params sharded over several simulated devices + an adamw state, base_model/ copied). The exported
directory must load in transformers, FlagEmbedding and sentence-transformers with outputs equal (1e-5, fp32) to
m3jax's encode of the checkpoint, and load back into m3jax with bitwise-equal params.
"""
import json
import logging
import os
import runpy
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from m3jax import config as config_lib
from m3jax.cli import main as cli
from m3jax.core import sharding as shard_lib
from m3jax.io import checkpoint as ckpt_lib
from m3jax.io import hf_layout, hf_read, hf_write
from m3jax.io.checkpoint import CheckpointError, locate_checkpoint
from m3jax.model import encoder as m3model
from m3jax.model import loading
from m3jax.tools.export import ExportError, export_checkpoint, export_params
from m3jax.trainer import TrainState

pytestmark = pytest.mark.stack_sensitive  # .ci/run runs this module on the latest stack too
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HIDDEN = 32
TEXTS = ["why is the sky blue during the day",
         "Sunlight is scattered by air molecules; blue light is scattered far more than red light, which is why "
         "the sky looks blue for most of the day while sunsets look red and orange.",
         "什么是光合作用？", "Кто написал роман «Война и мир»?", "git reset --soft HEAD~1", "a"]
EXPORTED_FILES = sorted(["1_Pooling", "2_Normalize", "README.md", "colbert_linear.pt", "config.json",
                         "config_sentence_transformers.json", "m3jax_export.json", "model.safetensors",
                         "modules.json", "sentence_bert_config.json", "sentencepiece.bpe.model", "sparse_linear.pt",
                         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])


def _perturbed(params, seed):
    """Params that differ from the pretrained ones everywhere (a "trained" model)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32), params)


def _save_step(work, step, params, model_cfg, *, devices, mesh_axes, config_changes=None):
    """What the trainer does: shard params over a mesh, adamw state, Checkpointer.save(step, TrainState, ...)."""
    config = config_lib.default_config()
    with config.unlocked():
        for axis, size in mesh_axes.items():
            config.mesh[axis] = size
        for k, v in (config_changes or {}).items():
            config[k] = v
    mesh = shard_lib.make_mesh(config_lib.mesh_settings(config), devices)
    shardings = shard_lib.logical_shardings(m3model.abstract_params(model_cfg)["params"], mesh,
                                            config.sharding_rules)
    sharded = shard_lib.put_tree(params, shardings)
    state = TrainState(step=jnp.int32(step), params=sharded, opt_state=optax.adamw(1e-3).init(sharded))
    checkpointer = ckpt_lib.Checkpointer(work)
    checkpointer.save(step, state, None, config_lib.config_to_json(config))
    checkpointer.wait()
    checkpointer.close()
    return sharded


@pytest.fixture(scope="module")
def run(tiny_ckpt, tmp_path_factory):
    """A work dir with steps 3 (params over 2 devices) and 7 (over 8 devices, the latest)."""
    work = str(tmp_path_factory.mktemp("run") / "work")
    model_cfg, base, _ = loading.load_model(tiny_ckpt)
    ckpt_lib.copy_base_model_files(tiny_ckpt, work)
    params3, params7 = _perturbed(base, 3), _perturbed(base, 7)
    sharded3 = _save_step(work, 3, params3, model_cfg, devices=jax.devices()[:2], mesh_axes=dict(data=1, fsdp=2))
    sharded7 = _save_step(work, 7, params7, model_cfg, devices=jax.devices(), mesh_axes=dict(data=2, fsdp=4))
    emb3 = sharded3["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    emb7 = sharded7["encoder"]["embeddings"]["word_embeddings"]["embedding"]
    assert len(emb3.sharding.device_set) == 2 and len(emb7.sharding.device_set) == 8
    assert emb7.addressable_shards[0].data.shape == (1502, HIDDEN // 4)  # really split over fsdp
    return {"work": work, "params": {3: params3, 7: params7}, "sharded7": sharded7, "model_cfg": model_cfg,
            "tiny": tiny_ckpt}


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("export") / "bge-m3-step7")
    assert export_checkpoint(run["work"], out) == out
    return out


def _copy_run(run, tmp_path):
    return shutil.copytree(run["work"], tmp_path / "work")


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        assert isinstance(x, np.ndarray) and x.dtype == np.float32, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------------------------
# reading the checkpoint


def test_locate_checkpoint_accepts_work_checkpoints_and_step_dirs(run):
    work = run["work"]
    ckpts = os.path.join(work, "checkpoints")
    assert locate_checkpoint(work) == ckpt_lib.CheckpointLocation(work, ckpts, 7, os.path.join(ckpts, "7"))
    assert locate_checkpoint(ckpts).step == 7
    assert locate_checkpoint(os.path.join(ckpts, "3")).step == 3
    assert locate_checkpoint(work, step=3).step_dir == os.path.join(ckpts, "3")
    assert locate_checkpoint(os.path.join(ckpts, "3"), step=3).step == 3
    with pytest.raises(CheckpointError, match="is the directory of step 3 but step 7 was requested"):
        locate_checkpoint(os.path.join(ckpts, "3"), step=7)


def test_restores_sharded_params_onto_one_cpu_bitwise(run):
    latest = loading.load_model(run["work"])
    assert latest.source.location.step == 7
    _assert_trees_equal(latest.params, run["params"][7])  # written from 8 devices, read as host numpy
    _assert_trees_equal(loading.load_model(run["work"], step=3).params, run["params"][3])  # from 2 devices
    cfg = latest.cfg
    assert (cfg.colbert_out_dim, cfg.has_pooler, cfg.num_hidden_layers, cfg.vocab_size) == (HIDDEN, True, 2, 1502)
    assert (cfg.sentence_pooling_method, cfg.normalize_embeddings) == ("cls", True)
    assert latest.source.run_config["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert latest.source.tokenizer_dir == os.path.join(run["work"], "base_model")
    assert loading.load_tokenizer(latest.source)("a b")["input_ids"][0] == 0


# ---------------------------------------------------------------------------------------------------------------
# the export round trip


def test_exported_files(exported, run):
    assert sorted(os.listdir(exported)) == EXPORTED_FILES
    with open(os.path.join(exported, "m3jax_export.json")) as f:
        info = json.load(f)
    assert info["step"] == 7 and info["source_checkpoint"] == os.path.join(run["work"], "checkpoints", "7")
    assert (info["heads_dtype"], info["colbert_dim"], info["sentence_pooling_method"]) == ("float32", HIDDEN, "cls")
    for name in hf_layout.TOKENIZER_FILES:  # byte copies of the base model's tokenizer
        with open(os.path.join(exported, name), "rb") as a, open(os.path.join(run["tiny"], name), "rb") as b:
            assert a.read() == b.read(), name
    parent = os.path.dirname(exported)
    assert os.listdir(parent) == [os.path.basename(exported)]  # no staging directory left behind


def test_export_loads_back_bitwise(exported, run):
    cfg, params, _ = loading.load_model(exported)
    _assert_trees_equal(params, run["params"][7])
    assert cfg == loading.load_model(run["work"]).cfg


KW = dict(return_dense=True, return_sparse=True, return_colbert_vecs=True, batch_size=4, max_length=64)


@pytest.fixture(scope="module")
def m3jax_outputs(run):
    """m3jax's encoding of TEXTS with the trained params (m3jax loading the export has bitwise-equal params)."""
    from m3jax.model.inference import BGEM3FlagModel

    ckpt = loading.load_model(run["work"])
    ours = BGEM3FlagModel.from_params(ckpt.cfg, ckpt.params, loading.load_tokenizer(ckpt.source), use_fp16=False,
                                      devices="cpu")
    return ours.encode(TEXTS, **KW)


def test_export_matches_m3jax_in_transformers_and_sentence_transformers(exported, m3jax_outputs):
    import torch
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    ref = m3jax_outputs
    # transformers AutoModel: normalised CLS of the last hidden state.
    tok = AutoTokenizer.from_pretrained(exported)
    hf_model = AutoModel.from_pretrained(exported).eval()
    with torch.no_grad():
        batch = tok(TEXTS, padding=True, truncation=True, max_length=64, return_tensors="pt")
        cls = torch.nn.functional.normalize(hf_model(**batch).last_hidden_state[:, 0], dim=-1).numpy()
    np.testing.assert_allclose(cls, ref["dense_vecs"], atol=1e-5, rtol=0)

    # sentence-transformers: CLS pooling + Normalize.
    st = SentenceTransformer(exported, device="cpu")
    np.testing.assert_allclose(st.encode(TEXTS, convert_to_numpy=True), ref["dense_vecs"], atol=1e-5, rtol=0)


@pytest.mark.needs_flagembedding
def test_export_matches_m3jax_in_flagembedding(exported, run, m3jax_outputs):
    from FlagEmbedding import BGEM3FlagModel as FlagBGEM3

    ckpt, ref = loading.load_model(run["work"]), m3jax_outputs
    # FlagEmbedding: all three outputs, heads read from the exported files (not re-initialised).
    flag = FlagBGEM3(exported, use_fp16=False, devices="cpu")
    np.testing.assert_array_equal(flag.model.colbert_linear.weight.detach().numpy(),
                                  ckpt.params["colbert_linear"]["kernel"].T)
    theirs = flag.encode(TEXTS, **KW)
    np.testing.assert_allclose(theirs["dense_vecs"], ref["dense_vecs"], atol=1e-5, rtol=0)
    assert sum(len(x) for x in ref["lexical_weights"]) > 10
    for mine, other in zip(ref["lexical_weights"], theirs["lexical_weights"]):
        assert sorted(mine) == sorted(other)
        np.testing.assert_allclose([float(other[k]) for k in sorted(mine)], [float(mine[k]) for k in sorted(mine)],
                                   atol=1e-5, rtol=0)
    for mine, other in zip(ref["colbert_vecs"], theirs["colbert_vecs"]):
        assert mine.shape == other.shape and mine.shape[1] == HIDDEN
        np.testing.assert_allclose(other, mine, atol=1e-5, rtol=0)


def test_export_params_from_sharded_train_state(run, tmp_path):
    """The trainer's hook: export_params straight from the (sharded) TrainState params."""
    with open(os.path.join(run["tiny"], "config.json")) as f:
        hf_config = json.load(f)
    out = export_params(run["sharded7"], hf_config, tmp_path / "final", tokenizer_dir=run["tiny"],
                        export_info={"step": 7})
    _, params, _ = loading.load_model(out)
    _assert_trees_equal(params, run["params"][7])


def test_export_options_pytorch_bin_and_fp16_heads(run, tmp_path):
    import torch

    out = export_checkpoint(run["work"], tmp_path / "out", step=3, pytorch_bin=True, heads_dtype="float16")
    assert "pytorch_model.bin" in os.listdir(out)
    state = torch.load(os.path.join(out, "pytorch_model.bin"), map_location="cpu", weights_only=True)
    safetensors = hf_read._read_safetensors(os.path.join(out, "model.safetensors"))
    assert sorted(state) == sorted(safetensors)
    for k, v in state.items():
        np.testing.assert_array_equal(v.numpy(), safetensors[k], err_msg=k)
    colbert = torch.load(os.path.join(out, "colbert_linear.pt"), map_location="cpu", weights_only=True)
    assert colbert["weight"].dtype == torch.float16
    _, params, _ = loading.load_model(out)
    expected = run["params"][3]
    np.testing.assert_array_equal(params["colbert_linear"]["kernel"],
                                  expected["colbert_linear"]["kernel"].astype(np.float16).astype(np.float32))
    _assert_trees_equal(params["encoder"], expected["encoder"])  # the encoder stays exact
    with open(os.path.join(out, "m3jax_export.json")) as f:
        assert json.load(f)["step"] == 3


def test_mean_pooling_run_exports_matching_sentence_transformers(run, tmp_path):
    from sentence_transformers import SentenceTransformer

    from m3jax.model.inference import BGEM3FlagModel

    work = str(tmp_path / "mean_run")
    ckpt_lib.copy_base_model_files(run["tiny"], work)
    _save_step(work, 1, run["params"][3], run["model_cfg"], devices=jax.devices()[:1], mesh_axes=dict(data=1),
               config_changes=dict(sentence_pooling_method="mean", normalize_embeddings=False))
    ckpt = loading.load_model(work)
    assert (ckpt.cfg.sentence_pooling_method, ckpt.cfg.normalize_embeddings) == ("mean", False)
    out = export_checkpoint(work, tmp_path / "out")
    with open(os.path.join(out, "1_Pooling", "config.json")) as f:
        pooling = json.load(f)
    assert pooling["pooling_mode_mean_tokens"] and not pooling["pooling_mode_cls_token"]
    with open(os.path.join(out, "modules.json")) as f:
        assert [m["path"] for m in json.load(f)] == ["", "1_Pooling"]
    assert not os.path.exists(os.path.join(out, "2_Normalize"))
    ours = BGEM3FlagModel.from_params(ckpt.cfg, ckpt.params, loading.load_tokenizer(ckpt.source), use_fp16=False,
                                      devices="cpu").encode(TEXTS, max_length=64)["dense_vecs"]
    assert abs(np.linalg.norm(ours[0]) - 1) > 0.01  # really unnormalised
    st = SentenceTransformer(out, device="cpu").encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(st, ours, atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# refusals


def _rename_step(work, step, new_name):
    ckpts = os.path.join(work, "checkpoints")
    os.rename(os.path.join(ckpts, str(step)), os.path.join(ckpts, new_name))


def test_missing_or_wrong_paths(run, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        loading.load_model(tmp_path / "nope")
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        loading.load_model(tmp_path / "file")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="not an m3jax run directory"):
        loading.load_model(tmp_path / "empty")
    (tmp_path / "fresh" / "base_model").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="has saved no checkpoint yet"):
        loading.load_model(tmp_path / "fresh")
    (tmp_path / "run2" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no checkpoint steps; nothing to export"):
        loading.load_model(tmp_path / "run2")
    with pytest.raises(CheckpointError, match=r"no step 5; completed steps: \[3, 7\]"):
        loading.load_model(run["work"], step=5)


def test_incomplete_steps_are_refused(run, tmp_path):
    work = _copy_run(run, tmp_path)
    ckpts = os.path.join(work, "checkpoints")
    _rename_step(work, 7, "7.orbax-checkpoint-tmp-1234")  # the save of step 7 never finished
    with pytest.raises(CheckpointError, match="unfinished Orbax checkpoint .*step 7"):
        loading.load_model(os.path.join(ckpts, "7.orbax-checkpoint-tmp-1234"))
    with pytest.raises(CheckpointError, match=r"step 7 is incomplete .*completed steps: \[3\]"):
        loading.load_model(work, step=7)
    shutil.rmtree(os.path.join(ckpts, "3", "state"))
    with pytest.raises(CheckpointError, match="step 3 is incomplete: missing state"):
        loading.load_model(os.path.join(ckpts, "3"))
    with pytest.raises(CheckpointError, match="only incomplete or damaged steps: 3, 7.orbax-checkpoint-tmp-1234"):
        loading.load_model(work)


def test_latest_skips_an_unfinished_newer_step(run, tmp_path, caplog):
    work = _copy_run(run, tmp_path)
    shutil.copytree(os.path.join(work, "checkpoints", "7"), os.path.join(work, "checkpoints", "9.orbax-checkpoint-tmp"))
    with caplog.at_level(logging.WARNING, logger="m3jax.io.checkpoint"):
        assert loading.load_model(work).source.location.step == 7
    assert "9.orbax-checkpoint-tmp: the save of step 9 never finished; skipped; using step 7" in caplog.text


def test_corrupt_state_is_refused(run, tmp_path):
    work = _copy_run(run, tmp_path)
    state = os.path.join(work, "checkpoints", "7", "state")
    for root, _, files in os.walk(state):  # drop the array data, keep the metadata
        for name in files:
            if "ocdbt" in root or name.startswith("manifest"):
                os.remove(os.path.join(root, name))
    # a damaged latest step is skipped for the step before it (issue 27); asked for by number, it is refused
    assert loading.load_model(work).source.location.step == 3
    with pytest.raises(CheckpointError, match=r"step 7 is incomplete: missing state/manifest.ocdbt \(and \d+ more"):
        loading.load_model(work, step=7)
    # read directly, without the manifest check, the damaged state still fails with a CheckpointError
    with pytest.raises(CheckpointError, match=r"state: cannot .*\); the checkpoint is incomplete or corrupt$"):
        ckpt_lib.restore_params(state)
    os.remove(os.path.join(state, "_METADATA"))
    with pytest.raises(CheckpointError, match="cannot read the Orbax checkpoint metadata"):
        ckpt_lib.params_metadata(state)


def test_base_model_problems(run, tmp_path):
    work = _copy_run(run, tmp_path)
    base = os.path.join(work, "base_model")
    with open(os.path.join(base, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(base, "config.json"), "w") as f:
        json.dump({**config, "num_hidden_layers": 3}, f)
    with pytest.raises(CheckpointError, match="has shape .* implies .*is --base-model the model that was trained"):
        loading.load_model(work)
    assert loading.load_model(work, base_model=run["tiny"]).source.location.step == 7  # --base-model fixes it
    for name in ("tokenizer.json", "sentencepiece.bpe.model"):
        os.remove(os.path.join(base, name))
    with pytest.raises(CheckpointError, match="no tokenizer files"):
        loading.load_model(work)
    shutil.rmtree(base)
    with pytest.raises(CheckpointError, match="base_model: does not exist.*--base-model"):
        loading.load_model(work)


def test_output_dir_rules_and_atomicity(run, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(ExportError, match="exists and is not empty; pass --overwrite"):
        export_checkpoint(run["work"], out)
    with pytest.raises(ExportError, match="heads_dtype='bfloat16'"):
        export_checkpoint(run["work"], tmp_path / "other", heads_dtype="bfloat16")

    # A failure half way (after the weights are written) leaves the old directory untouched and no staging dir.
    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_write, "_write_sentence_transformers", boom)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(run["work"], out, overwrite=True)
    assert os.listdir(out) == ["keep.txt"]
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(run["work"], tmp_path / "fresh")
    assert sorted(os.listdir(tmp_path)) == ["out"]
    monkeypatch.undo()

    export_checkpoint(run["work"], out, overwrite=True)
    assert sorted(os.listdir(out)) == EXPORTED_FILES
    assert sorted(os.listdir(tmp_path)) == ["out"]


# ---------------------------------------------------------------------------------------------------------------
# command line


def test_cli_export_and_errors(run, tmp_path, capsys):
    out = str(tmp_path / "cli_out")
    assert cli.main(["export", "--checkpoint", run["work"], "--output", out, "--step", "3"]) == 0
    printed = capsys.readouterr()
    assert printed.out.strip() == out
    step_dir = os.path.join(run["work"], "checkpoints", "3")
    assert printed.err.strip() == f"m3jax export: wrote step 3 of {step_dir} to {out}"  # issue 27: which step
    _, params, _ = loading.load_model(out)
    _assert_trees_equal(params, run["params"][3])

    assert cli.main(["export", "--checkpoint", run["work"], "--output", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"m3jax export: error: {out}: directory exists and is not empty; pass --overwrite " \
                  f"(overwrite=True) to replace it"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.strip() == f"m3jax export: error: {tmp_path / 'missing'}: does not exist"
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--checkpoint", run["work"], "--output", out, "--heads-dtype", "int8"])
    assert e.value.code == 2


def test_module_and_script_entry_points(run, tmp_path, capsys, monkeypatch):
    """`python -m m3jax export ...` and `python scripts/export_to_hf.py ...`, run in-process as __main__."""
    monkeypatch.setattr(sys, "argv", ["m3jax", "export", "--checkpoint", str(tmp_path / "none"), "--output",
                                      str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("m3jax", run_name="__main__")
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == f"m3jax export: error: {tmp_path / 'none'}: does not exist"

    script = os.path.join(REPO, "scripts", "export_to_hf.py")
    monkeypatch.setattr(sys, "argv", [script, "--checkpoint", os.path.join(run["work"], "checkpoints", "7"),
                                      "--output", str(tmp_path / "o")])
    with pytest.raises(SystemExit) as e:
        runpy.run_path(script, run_name="__main__")
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "o")
    assert sorted(os.listdir(tmp_path / "o")) == EXPORTED_FILES
