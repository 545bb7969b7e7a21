"""Tokenisation on every stack: the tiny checkpoint's tokenizer files and m3jax's tokenizer loading.

tests/data/tokenizer_ids.json holds texts (several scripts, punctuation, digits, emoji, odd whitespace, special-token
strings) with the ids transformers 4.57.6 gave them for the tiny checkpoint's tokenizer; the same ids must come out
whatever transformers / tokenizers are installed (transformers 5 once wrote a 5-token vocabulary, and rebuilds an
XLM-R tokenizer's pipeline so that U+0085 tokenises differently). To regenerate the file after a change of
toy_train_data (the tokenizer is trained on it), run `AutoTokenizer.from_pretrained(<a tiny checkpoint>)(text)` for
each text on the pinned stack and check the diff.

Also here: m3jax.data.build.unknown_token_share, the <unk> check the trainer logs at start.
"""
import json
import logging
import os

import numpy as np
import pytest
import tokenizers

from m3jax.config import data_settings, default_config
from m3jax.data import build as data_build
from m3jax.data.files import make_backend_tokenizer
from m3jax.io import hf_layout, hf_read
from m3jax.io.tiny_checkpoint import SPM_VOCAB_SIZE

pytestmark = pytest.mark.stack_sensitive  # .ci/run runs this module on the latest stack too
HERE = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(HERE, "data", "tokenizer_ids.json"), encoding="utf-8") as _f:
    CASES = json.load(_f)["cases"]
UNK = 3


def test_the_pinned_ids_cover_what_they_should():
    texts = [c["text"] for c in CASES]
    assert len(texts) >= 20 and "" in texts and any("\u0085" in t for t in texts)
    # Mostly known pieces, but not only: the emoji and a few rare characters are <unk>.
    all_ids = [i for c in CASES for i in c["ids"]]
    assert 0 < all_ids.count(UNK) < 0.05 * len(all_ids)


def test_tokenizer_json_has_the_full_unigram_vocabulary(tiny_ckpt):
    with open(os.path.join(tiny_ckpt, "tokenizer.json"), encoding="utf-8") as f:
        spec = json.load(f)
    assert spec["model"]["type"] == "Unigram" and spec["model"]["unk_id"] == UNK
    vocab = [piece for piece, _ in spec["model"]["vocab"]]
    assert len(vocab) == SPM_VOCAB_SIZE + 2  # + <pad> and <mask>
    assert vocab[:4] == ["<s>", "<pad>", "</s>", "<unk>"] and vocab[-1] == "<mask>"
    with open(os.path.join(tiny_ckpt, "tokenizer_config.json"), encoding="utf-8") as f:
        assert json.load(f)["tokenizer_class"] == "XLMRobertaTokenizer"


def test_tiny_tokenizer_gives_the_pinned_ids(tiny_ckpt):
    tok = hf_read.load_tokenizer(tiny_ckpt)
    assert len(tok) == SPM_VOCAB_SIZE + 2
    assert (tok.cls_token_id, tok.pad_token_id, tok.eos_token_id, tok.unk_token_id, tok.mask_token_id) == \
        (0, 1, 2, UNK, SPM_VOCAB_SIZE + 1)
    texts, expected = [c["text"] for c in CASES], [c["ids"] for c in CASES]
    assert [tok(t)["input_ids"] for t in texts] == expected
    assert tok(texts)["input_ids"] == expected
    # What the data pipeline encodes with (the backend serialised to the workers) and the file itself.
    backend = make_backend_tokenizer(tok.backend_tokenizer.to_str(), None)
    assert [e.ids for e in backend.encode_batch(texts)] == expected
    from_file = tokenizers.Tokenizer.from_file(os.path.join(tiny_ckpt, "tokenizer.json"))
    assert [e.ids for e in from_file.encode_batch(texts)] == expected


def test_load_tokenizer_runs_the_pipeline_of_tokenizer_json(tiny_ckpt):
    tok = hf_read.load_tokenizer(tiny_ckpt)
    loaded = json.loads(tok.backend_tokenizer.to_str())
    with open(os.path.join(tiny_ckpt, "tokenizer.json"), encoding="utf-8") as f:
        written = json.load(f)
    for part in ("normalizer", "pre_tokenizer", "post_processor", "decoder", "added_tokens"):
        assert loaded[part] == written[part], part


def test_load_tokenizer_of_a_missing_directory(tmp_path):
    with pytest.raises(hf_layout.CheckpointFormatError, match="nowhere: checkpoint directory does not exist"):
        hf_read.load_tokenizer(tmp_path / "nowhere")


# ---- the <unk> check ---------------------------------------------------------------------------------------------

def _batch(query_rows, passage_rows, pad=1):
    """A data-pipeline batch from rows of ids (right-padded with pad, attention mask 1 on the ids)."""
    def pad_rows(rows):
        width = max(len(r) for r in rows)
        ids = np.full((len(rows), width), pad, np.int32)
        mask = np.zeros((len(rows), width), np.int32)
        for i, r in enumerate(rows):
            ids[i, :len(r)], mask[i, :len(r)] = r, 1
        return ids, mask
    q, qm = pad_rows(query_rows)
    p, pm = pad_rows(passage_rows)
    return {"query_input_ids": q, "query_attention_mask": qm, "passage_input_ids": p, "passage_attention_mask": pm}


def test_unknown_token_share_counts_text_tokens_only(tiny_ckpt):
    tok = hf_read.load_tokenizer(tiny_ckpt)
    # <s> and </s> (and padding) are not text tokens; 2 <unk> among 8 text tokens, then 3 among 10 over two batches.
    a = _batch([[0, 5, UNK, 2]], [[0, 7, 8, 2], [0, 10, UNK, 11, 12, 2]])
    assert data_build.unknown_token_share(tok, [a]) == 2 / 8
    b = _batch([[0, UNK, 6, 2]], [[0, 2]])
    assert data_build.unknown_token_share(tok, [a, b]) == 3 / 10
    assert data_build.unknown_token_share(tok, [_batch([[0, 2]], [[0, 2]])]) == 0.0


def _toy_train_data(tok, tmp_path, lines):
    path = tmp_path / "data" / "a.jsonl"
    path.parent.mkdir(parents=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    c = default_config()
    c.model_name_or_path, c.train_data, c.output_dir = "unused", str(path.parent), str(tmp_path / "out")
    c.train_group_size, c.per_device_train_batch_size, c.num_data_workers = 2, 2, 0
    return data_build.build_train_data(data_settings(c), tok, num_batch_shards=1)


def test_unknown_token_share_is_logged_and_warns_above_the_threshold(tiny_ckpt, tmp_path, caplog):
    tok = hf_read.load_tokenizer(tiny_ckpt)
    words = [{"query": f"what is the capital of France {i}", "pos": ["Paris is the capital of France."],
              "neg": ["The quick brown fox."]} for i in range(4)]
    with caplog.at_level(logging.INFO, logger="m3jax.data.build"):
        share = data_build.log_unknown_token_share(tok, _toy_train_data(tok, tmp_path / "ok", words))
    assert share == 0.0
    assert [(r.levelname, r.getMessage()) for r in caplog.records if "text tokens" in r.getMessage()] == \
        [("INFO", "0.0% of the text tokens of the first 2 batches are <unk>")]

    caplog.clear()
    emoji = [{"query": "🦕 🦖 🐙", "pos": ["🦑 🐳 x"], "neg": ["🦀 🦞"]} for _ in range(4)]
    with caplog.at_level(logging.INFO, logger="m3jax.data.build"):
        share = data_build.log_unknown_token_share(tok, _toy_train_data(tok, tmp_path / "bad", emoji))
    assert share > 0.3  # each emoji run is '▁' + one <unk>
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "(more than 5%): the tokenizer does not fit the training texts" in warnings[0]
