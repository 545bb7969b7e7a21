"""m3jax.io.hf_layout, hf_read, hf_write and m3jax.io.tiny_checkpoint: the bge-m3 directory layout read and written as numpy arrays.

The saved directories must load in transformers, FlagEmbedding and sentence-transformers; every malformed
checkpoint must fail with a CheckpointFormatError that names the file and the tensor.
"""
import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest
import safetensors.numpy

from m3jax.io import hf_layout, hf_write
from m3jax.io.hf_layout import CheckpointFormatError, HFCheckpoint
from m3jax.io.hf_read import load_hf_checkpoint
from m3jax.io.hf_write import save_hf_checkpoint
from m3jax.io.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.stack_sensitive  # .ci/run runs this module on the latest stack too
HIDDEN = 32  # make_tiny_checkpoint's default
TEXTS = ["why is the sky blue during the day",
         "Sunlight is scattered by air molecules; blue light is scattered far more than red light.",
         "什么是光合作用？", "Кто написал роман «Война и мир»?"]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _assert_same(a: HFCheckpoint, b: HFCheckpoint):
    assert a.config == b.config
    for x, y in ((a.encoder, b.encoder), (a.colbert or {}, b.colbert or {}), (a.sparse or {}, b.sparse or {})):
        assert sorted(x) == sorted(y)
        for k in x:
            assert x[k].dtype == y[k].dtype == np.float32, k
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _copy(src, tmp_path, name="ckpt"):
    return shutil.copytree(src, tmp_path / name)


def _edit_safetensors(folder, edit):
    path = os.path.join(folder, "model.safetensors")
    tensors = dict(safetensors.numpy.load_file(path))
    edit(tensors)
    safetensors.numpy.save_file(tensors, path, metadata={"format": "pt"})


# ---------------------------------------------------------------------------------------------------------------
# tiny checkpoint


def test_tiny_checkpoint_is_deterministic(tiny_ckpt, make_ckpt, tmp_path):
    again = make_tiny_checkpoint(tmp_path / "again", seed=0, pytorch_bin=True, heads_dtype="float16")
    for name in ("model.safetensors", "tokenizer.json", "sentencepiece.bpe.model", "config.json"):
        assert _read(os.path.join(tiny_ckpt, name)) == _read(os.path.join(again, name)), name
    other_seed = make_ckpt(seed=1)
    assert _read(os.path.join(tiny_ckpt, "model.safetensors")) != _read(os.path.join(other_seed, "model.safetensors"))
    assert _read(os.path.join(tiny_ckpt, "tokenizer.json")) == _read(os.path.join(other_seed, "tokenizer.json"))


def test_tiny_tokenizer_is_xlmr_like(tiny_ckpt):
    from transformers import AutoTokenizer, XLMRobertaTokenizerFast

    tok = AutoTokenizer.from_pretrained(tiny_ckpt)
    assert isinstance(tok, XLMRobertaTokenizerFast)
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert tok.mask_token_id == len(tok) - 1
    with open(os.path.join(tiny_ckpt, "config.json")) as f:
        assert json.load(f)["vocab_size"] == len(tok)
    assert 1000 <= len(tok) <= 2000 and tok.model_max_length == 512
    ids = tok(TEXTS)["input_ids"]
    assert all(x[0] == 0 and x[-1] == 2 for x in ids)
    assert sum(x.count(3) for x in ids) == 0  # the toy data's scripts are all covered


def test_tiny_checkpoint_options(make_ckpt):
    ckpt = load_hf_checkpoint(make_ckpt(colbert_dim=8, pooler=False, heads_dtype="float32"))
    assert ckpt.colbert["weight"].shape == (8, HIDDEN) and ckpt.colbert["bias"].shape == (8,)
    assert ckpt.sparse["weight"].shape == (1, HIDDEN) and ckpt.sparse["bias"].shape == (1,)
    assert not any(k.startswith("pooler.") for k in ckpt.encoder)
    ln = ckpt.encoder["encoder.layer.0.output.LayerNorm.weight"]
    assert not np.allclose(ln, 1.0) and abs(ln.mean() - 1) < 0.1  # gamma 1 + noise, so gamma/beta mix-ups show


def test_cli_refuses_existing_dir(tiny_ckpt, capsys):
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "scripts"))
    try:
        import make_tiny_checkpoint as cli
    finally:
        sys.path.pop(0)
    with pytest.raises(SystemExit):
        cli.main([tiny_ckpt])
    assert "--overwrite" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# loading variants


def test_round_trip_is_bitwise(tiny_ckpt, tmp_path):
    first = load_hf_checkpoint(tiny_ckpt)
    assert first.colbert["weight"].shape == (HIDDEN, HIDDEN)
    assert "pooler.dense.weight" in first.encoder
    save_hf_checkpoint(tmp_path / "out", first, tokenizer_dir=tiny_ckpt, heads_dtype="float16")
    _assert_same(first, load_hf_checkpoint(tmp_path / "out"))
    assert _read(tmp_path / "out" / "model.safetensors") == _read(os.path.join(tiny_ckpt, "model.safetensors"))
    for name in hf_layout.TOKENIZER_FILES:
        assert _read(tmp_path / "out" / name) == _read(os.path.join(tiny_ckpt, name))


def test_safetensors_and_pytorch_bin_agree(tiny_ckpt, tmp_path):
    folder = _copy(tiny_ckpt, tmp_path)
    os.remove(folder / "model.safetensors")  # now pytorch_model.bin is read
    _assert_same(load_hf_checkpoint(tiny_ckpt), load_hf_checkpoint(folder))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_index_loads(tiny_ckpt, tmp_path, kind):
    import torch

    reference = load_hf_checkpoint(tiny_ckpt)
    folder = _copy(tiny_ckpt, tmp_path)
    os.remove(folder / "model.safetensors")
    os.remove(folder / "pytorch_model.bin")
    names = sorted(reference.encoder)
    weight_map = {}
    for n, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        shard = f"model-{n + 1:05d}-of-00002.{kind}"
        tensors = {k: reference.encoder[k] for k in part}
        if kind == "safetensors":
            safetensors.numpy.save_file(tensors, folder / shard, metadata={"format": "pt"})
        else:
            torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, folder / shard)
        weight_map.update(dict.fromkeys(part, shard))
    index = hf_layout.SAFETENSORS_INDEX_NAME if kind == "safetensors" else hf_layout.PYTORCH_INDEX_NAME
    with open(folder / index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    _assert_same(reference, load_hf_checkpoint(folder))

    os.remove(folder / f"model-00002-of-00002.{kind}")
    with pytest.raises(CheckpointFormatError, match=r"model-00002-of-00002.* does not exist"):
        load_hf_checkpoint(folder)


def test_roberta_prefix_and_extra_tensors(tiny_ckpt, tmp_path, caplog):
    folder = _copy(tiny_ckpt, tmp_path)

    def prefix(tensors):  # what XLMRobertaForMaskedLM.save_pretrained writes
        renamed = {"roberta." + k: tensors.pop(k) for k in list(tensors)}
        tensors.update(renamed, **{"lm_head.dense.weight": np.zeros((HIDDEN, HIDDEN), np.float32),
                                   "roberta.embeddings.position_ids": np.arange(514, dtype=np.int64)[None]})

    _edit_safetensors(folder, prefix)
    with caplog.at_level(logging.WARNING, logger="m3jax.io.hf_read"):
        loaded = load_hf_checkpoint(folder)
    _assert_same(load_hf_checkpoint(tiny_ckpt), loaded)
    assert "lm_head.dense.weight" in caplog.text


def test_bf16_safetensors_become_float32(tiny_ckpt, tmp_path):
    import safetensors.torch
    import torch

    folder = _copy(tiny_ckpt, tmp_path)
    state = safetensors.torch.load_file(folder / "model.safetensors")
    state = {k: v.to(torch.bfloat16) for k, v in state.items()}
    safetensors.torch.save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    loaded = load_hf_checkpoint(folder)
    for k, v in state.items():
        assert loaded.encoder[k].dtype == np.float32
        np.testing.assert_array_equal(loaded.encoder[k], v.float().numpy(), err_msg=k)


def test_fp16_and_fp32_heads(tiny_ckpt, make_ckpt):
    import torch

    fp16 = load_hf_checkpoint(tiny_ckpt)  # same seed, heads stored in float16
    fp32 = load_hf_checkpoint(make_ckpt(heads_dtype="float32"))
    assert torch.load(os.path.join(tiny_ckpt, "colbert_linear.pt"))["weight"].dtype == torch.float16
    for a, b in ((fp16.colbert, fp32.colbert), (fp16.sparse, fp32.sparse)):
        for k in ("weight", "bias"):
            assert a[k].dtype == b[k].dtype == np.float32
            np.testing.assert_array_equal(a[k], b[k].astype(np.float16).astype(np.float32))
    _assert_same(HFCheckpoint(fp16.config, fp16.encoder, None, None), HFCheckpoint(fp32.config, fp32.encoder, None, None))


def test_missing_heads_warn_and_return_none(make_ckpt, tiny_ckpt, tmp_path):
    with pytest.warns(UserWarning, match="neither colbert_linear.pt nor sparse_linear.pt.*freshly initialised.*"
                                         "fit for training, not for inference"):
        ckpt = load_hf_checkpoint(make_ckpt(with_heads=False))
    assert ckpt.colbert is None and ckpt.sparse is None
    folder = _copy(tiny_ckpt, tmp_path)
    os.remove(folder / "sparse_linear.pt")
    with pytest.warns(UserWarning, match=r"sparse_linear.pt is missing \(only colbert_linear.pt found\)"):
        ckpt = load_hf_checkpoint(folder)
    assert ckpt.colbert is None and ckpt.sparse is None


# ---------------------------------------------------------------------------------------------------------------
# error cases


def _no_config(d):
    os.remove(d / "config.json")


def _bert_config(d):
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="bert")))


def _no_weights(d):
    os.remove(d / "model.safetensors")
    os.remove(d / "pytorch_model.bin")


def _missing_tensor(d):
    _edit_safetensors(d, lambda t: t.pop("encoder.layer.1.output.dense.bias"))


def _wrong_shape(d):
    _edit_safetensors(d, lambda t: t.update({"embeddings.word_embeddings.weight": np.zeros((7, HIDDEN), np.float32)}))


def _extra_layer(d):
    _edit_safetensors(d, lambda t: t.update({"encoder.layer.5.output.dense.bias": np.zeros(HIDDEN, np.float32)}))


def _wrong_head_shape(d):
    import torch

    torch.save({"weight": torch.zeros(2, HIDDEN), "bias": torch.zeros(2)}, d / "sparse_linear.pt")


def _head_missing_bias(d):
    import torch

    torch.save({"weight": torch.zeros(HIDDEN, HIDDEN)}, d / "colbert_linear.pt")


def _corrupt_safetensors(d):
    (d / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")


@pytest.mark.parametrize("corrupt, pattern", [
    (_no_config, r"config.json: not found"),
    (_bert_config, r"config.json: model_type must be 'xlm-roberta'.*found 'bert'"),
    (_no_weights, r"no weights file; looked for model.safetensors"),
    (_missing_tensor, r"model.safetensors: missing tensor 'encoder.layer.1.output.dense.bias' \(expected shape \[32\]"),
    (_wrong_shape, r"model.safetensors: tensor 'embeddings.word_embeddings.weight' has shape \[7, 32\], "
                   r"expected \[1502, 32\]"),
    (_extra_layer, r"model.safetensors: tensor 'encoder.layer.5.output.dense.bias' is not part of"),
    (_wrong_head_shape, r"sparse_linear.pt: tensors 'weight' \[2, 32\] and 'bias' \[2\] must have shapes \[1, 32\]"),
    (_head_missing_bias, r"colbert_linear.pt: missing tensor 'bias'"),
    (_corrupt_safetensors, r"model.safetensors: cannot read safetensors file"),
])
def test_malformed_checkpoint_errors(tiny_ckpt, tmp_path, corrupt, pattern):
    folder = _copy(tiny_ckpt, tmp_path)
    corrupt(folder)
    with pytest.raises(CheckpointFormatError, match=pattern):
        load_hf_checkpoint(folder)


def test_path_errors(tiny_ckpt, tmp_path):
    with pytest.raises(CheckpointFormatError, match="does not exist"):
        load_hf_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointFormatError, match="config.json.*is a file; pass the checkpoint directory"):
        load_hf_checkpoint(os.path.join(tiny_ckpt, "config.json"))


def test_missing_torch_is_explained(tiny_ckpt, tmp_path, monkeypatch):
    folder = _copy(tiny_ckpt, tmp_path)
    os.remove(folder / "model.safetensors")
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(CheckpointFormatError, match=r"pytorch_model.bin: .*pip install 'm3jax\[torch\]'"):
        load_hf_checkpoint(folder)


# ---------------------------------------------------------------------------------------------------------------
# saving


def test_save_validates_before_writing(tiny_ckpt, tmp_path):
    ckpt = load_hf_checkpoint(tiny_ckpt)
    bad = HFCheckpoint(ckpt.config, dict(ckpt.encoder), ckpt.colbert, ckpt.sparse)
    bad.encoder["encoder.layer.0.intermediate.dense.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(CheckpointFormatError, match=r"encoder.layer.0.intermediate.dense.weight' has shape \[3, 3\]"):
        save_hf_checkpoint(tmp_path / "out", bad, tokenizer_dir=tiny_ckpt)
    with pytest.raises(CheckpointFormatError, match="both be given or both be None"):
        save_hf_checkpoint(tmp_path / "out", HFCheckpoint(ckpt.config, ckpt.encoder, ckpt.colbert, None),
                           tokenizer_dir=tiny_ckpt)
    assert not os.listdir(tmp_path)


def test_refuses_non_empty_out_dir(tiny_ckpt, tmp_path):
    ckpt = load_hf_checkpoint(tiny_ckpt)
    out = tmp_path / "out"
    out.mkdir()
    save_hf_checkpoint(out, ckpt, tokenizer_dir=tiny_ckpt)  # an empty directory is fine
    (out / "stale.txt").write_text("left over")
    with pytest.raises(CheckpointFormatError, match="exists and is not empty.*overwrite=True"):
        save_hf_checkpoint(out, ckpt, tokenizer_dir=tiny_ckpt)
    save_hf_checkpoint(out, ckpt, tokenizer_dir=tiny_ckpt, overwrite=True)
    assert not (out / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary siblings left


def test_failed_save_leaves_nothing_half_written(tiny_ckpt, tmp_path, monkeypatch):
    ckpt = load_hf_checkpoint(tiny_ckpt)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(hf_write, "_write_sentence_transformers", boom)  # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(tmp_path / "out", ckpt, tokenizer_dir=tiny_ckpt)
    assert os.listdir(tmp_path) == []

    old = _copy(tiny_ckpt, tmp_path, "old")  # with overwrite=True the previous contents survive a failure
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(old, ckpt, tokenizer_dir=tiny_ckpt, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["old"]
    assert sorted(os.listdir(old)) == sorted(os.listdir(tiny_ckpt))


def test_sentence_transformers_files(tiny_ckpt):
    def read(*p):
        with open(os.path.join(tiny_ckpt, *p)) as f:
            return json.load(f)

    assert [m["type"].rsplit(".", 1)[1] for m in read("modules.json")] == ["Transformer", "Pooling", "Normalize"]
    pooling = read("1_Pooling", "config.json")
    assert pooling["word_embedding_dimension"] == HIDDEN and pooling["pooling_mode_cls_token"] is True
    assert not any(v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_cls_token")
    assert read("sentence_bert_config.json") == {"max_seq_length": 512, "do_lower_case": False}
    config = read("config.json")
    assert config["architectures"] == ["XLMRobertaModel"] and config["torch_dtype"] == "float32"


# ---------------------------------------------------------------------------------------------------------------
# the saved directory in the libraries users load it with


def test_loads_in_transformers(tiny_ckpt, make_ckpt):
    from transformers import AutoModel

    ckpt = load_hf_checkpoint(tiny_ckpt)
    model, info = AutoModel.from_pretrained(tiny_ckpt, output_loading_info=True)
    assert type(model).__name__ == "XLMRobertaModel"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = model.state_dict()
    for k, v in ckpt.encoder.items():
        np.testing.assert_array_equal(state[k].numpy(), v, err_msg=k)
    # Without a pooler only the pooler is reported missing (transformers initialises it; unused by bge-m3).
    _, info = AutoModel.from_pretrained(make_ckpt(pooler=False), output_loading_info=True)
    assert sorted(info["missing_keys"]) == ["pooler.dense.bias", "pooler.dense.weight"]
    assert not info["unexpected_keys"]


@pytest.fixture(scope="module")
def flag_model(tiny_ckpt):
    from FlagEmbedding import BGEM3FlagModel

    return BGEM3FlagModel(tiny_ckpt, use_fp16=False, devices="cpu")


@pytest.mark.needs_flagembedding
def test_loads_in_flagembedding(tiny_ckpt, flag_model):
    ckpt = load_hf_checkpoint(tiny_ckpt)
    # The heads were read from our files, not freshly initialised.
    np.testing.assert_array_equal(flag_model.model.colbert_linear.weight.detach().numpy(), ckpt.colbert["weight"])
    np.testing.assert_array_equal(flag_model.model.sparse_linear.bias.detach().numpy(), ckpt.sparse["bias"])
    out = flag_model.encode(TEXTS, return_dense=True, return_sparse=True, return_colbert_vecs=True)
    assert out["dense_vecs"].shape == (len(TEXTS), HIDDEN)
    assert len(out["lexical_weights"]) == len(TEXTS) and isinstance(out["lexical_weights"][0], dict)
    assert [v.shape[1] for v in out["colbert_vecs"]] == [HIDDEN] * len(TEXTS)


@pytest.mark.needs_flagembedding
def test_flagembedding_with_colbert_dim(make_ckpt):
    from FlagEmbedding import BGEM3FlagModel

    model = BGEM3FlagModel(make_ckpt(colbert_dim=8, pooler=False, heads_dtype="float32"), use_fp16=False,
                           devices="cpu", colbert_dim=8)
    out = model.encode(TEXTS[:2], return_dense=True, return_colbert_vecs=True)
    assert [v.shape[1] for v in out["colbert_vecs"]] == [8, 8]


@pytest.mark.needs_flagembedding
def test_sentence_transformers_matches_flagembedding_dense(tiny_ckpt, flag_model):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(tiny_ckpt, device="cpu")
    emb = st.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, flag_model.encode(TEXTS)["dense_vecs"], atol=1e-5)
