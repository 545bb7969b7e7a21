"""A tiny random BGE-M3 checkpoint in the exact bge-m3 directory layout, for tests and smoke runs.

`make_tiny_checkpoint(out_dir)` writes, in a few seconds on CPU and without any download:
- an XLM-R-style unigram sentencepiece tokenizer trained here, deterministically, on the texts of
  `toy_train_data/*.jsonl` plus a built-in multilingual sample (several scripts), saved both as
  `sentencepiece.bpe.model` and as a fast `tokenizer.json` (`<s>`=0, `<pad>`=1, `</s>`=2, `<unk>`=3, `<mask>` last,
  exactly like XLM-R's fairseq id layout). The tokenizer files are written with `sentencepiece` and `tokenizers`
  alone, byte for byte what transformers 4.57 writes, whatever transformers is installed;
- a random XLMRobertaModel with bge-m3's config but tiny dimensions, random colbert/sparse heads, and the
  sentence-transformers files, all through `m3jax.io.hf_write.save_hf_checkpoint`.

`make_tiny_reranker(out_dir)` writes a tiny cross-encoder in bge-reranker-v2-m3's layout (the same tokenizer and
random encoder weights, under XLMRobertaForSequenceClassification's one-logit head) through
`m3jax.io.hf_write.save_reranker_checkpoint`.

Same arguments give byte-identical `model.safetensors` and `tokenizer.json` (the .pt/.bin files are torch zip
archives with a per-save id, so only their tensors are identical).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
import warnings
from pathlib import Path

import numpy as np

from m3jax.io.hf_layout import HFCheckpoint, classifier_shapes, expected_encoder_shapes
from m3jax.io.hf_write import save_hf_checkpoint, save_reranker_checkpoint

TOY_DATA_DIR = Path(__file__).resolve().parents[2] / "toy_train_data"
SPM_VOCAB_SIZE = 1500  # sentencepiece pieces; the HF tokenizer adds <pad> and <mask>: 1502 ids in all

# A few lines per script so that every script the toy data uses (and some it does not) has pieces of its own.
_BUILTIN_SAMPLE = """\
The quick brown fox jumps over the lazy dog while 3 engineers debug a JSON parser at 10:45 pm.
def add(a, b): return a + b  # unit tests pass; x = [1, 2, 3]; print(f"{x!r}")
Die Bundesregierung hat am Montag neue Regeln für Energie, Verkehr und Gesundheit vorgestellt.
Le musée est ouvert tous les jours de 9 h à 18 h, sauf le mardi et les jours fériés.
El tren de alta velocidad conecta Madrid y Barcelona en menos de tres horas.
O governo anunciou novas medidas para reduzir o desmatamento na Amazônia.
Il ristorante serve pasta fresca, pizza napoletana e gelato fatto in casa.
Москва является столицей России и крупнейшим городом страны.
Учёные изучают, как изменение климата влияет на леса Сибири.
北京是中国的首都，也是全国的政治和文化中心。
人工智能正在改变医疗、交通和教育等许多行业。
東京は日本の首都で、世界有数の大都市です。
ひらがなとカタカナと漢字を組み合わせて日本語を書きます。
서울은 대한민국의 수도이며 한강이 도시를 가로질러 흐릅니다.
القاهرة هي عاصمة مصر وأكبر مدنها، ويمر بها نهر النيل.
नई दिल्ली भारत की राजधानी है और यहाँ संसद भवन स्थित है।
ירושלים היא עיר עתיקה עם היסטוריה ארוכה.
กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย
Η Αθήνα είναι η πρωτεύουσα της Ελλάδας.
Hà Nội là thủ đô của Việt Nam.
İstanbul, Asya ile Avrupa arasında bir köprüdür.
Warszawa jest stolicą Polski, a Kraków słynie z zabytków.
"""


def _training_texts() -> list[str]:
    texts = []
    files = sorted(TOY_DATA_DIR.glob("*.jsonl")) if TOY_DATA_DIR.is_dir() else []
    if not files:
        warnings.warn(f"{TOY_DATA_DIR} not found (m3jax not run from a source checkout): the tokenizer is trained on "
                      f"the built-in sample only and differs from the one a source checkout builds", stacklevel=2)
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    ex = json.loads(line)
                    texts += [ex["query"], *ex["pos"], *ex["neg"]]
    return texts + _BUILTIN_SAMPLE.splitlines()


# The special tokens of XLM-R's fairseq id layout and the tokenizer files transformers 4.57 writes for them.
_SPECIALS = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}  # and "<mask>": the last id
_SPECIAL_TOKENS_MAP = {"bos_token": "<s>", "cls_token": "<s>", "eos_token": "</s>", "sep_token": "</s>",
                       "pad_token": "<pad>", "unk_token": "<unk>"}
_MASK = {"content": "<mask>", "lstrip": True, "normalized": True, "rstrip": False, "single_word": False}


def _fast_tokenizer(spm_model: bytes):
    """The `tokenizers.Tokenizer` of an XLM-R sentencepiece model, as transformers 4's XLMRobertaConverter builds it.

    Built here with the `tokenizers` library alone, so that tokenizer.json is the same whatever the transformers
    version (transformers 5 has no converter taking a .model file in its XLM-R tokenizer's constructor).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(spm_model)
    # sentencepiece has <unk>=0 <s>=1 </s>=2; fairseq moves <unk> to 3, puts <pad> at 1 and appends <mask>.
    vocab = [(token, 0.0) for token in _SPECIALS] + [(p.piece, p.score) for p in proto.pieces[3:]] + [("<mask>", 0.0)]
    tok = Tokenizer(Unigram(vocab, unk_id=_SPECIALS["<unk>"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence([
        normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
        normalizers.Strip(left=False, right=True),
        normalizers.Replace(Regex(" {2,}"), "\u2581"),
    ])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", _SPECIALS["<s>"]), ("</s>", _SPECIALS["</s>"])])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in _SPECIALS]
                           + [AddedToken(**_MASK, special=True)])
    return tok


def train_tokenizer(out_dir: str, *, model_max_length: int = 512) -> int:
    """Train the tiny XLM-R tokenizer into out_dir (sentencepiece.bpe.model + HF files); returns its size.

    The files do not depend on the installed transformers: tokenizer.json holds the full unigram vocabulary and
    the pipeline transformers 4 builds for XLM-R, tokenizer_config.json / special_tokens_map.json what transformers
    4.57 writes (tests/test_tokenizer.py pins the ids it gives).
    """
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_texts()), model_writer=model,
        model_type="unigram", vocab_size=SPM_VOCAB_SIZE,
        character_coverage=1.0,  # keep every character of the small corpus (CJK would otherwise become <unk>)
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,  # XLM-R's sentencepiece model layout; HF adds <pad> and <mask>
        normalization_rule_name="nmt_nfkc",
        num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,  # determinism: no sampling, one thread
        minloglevel=2,
    )
    tok = _fast_tokenizer(model.getvalue())
    size = tok.get_vocab_size()
    added = {str(i): {**dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False),
                      "special": True} for t, i in _SPECIALS.items()}
    added[str(size - 1)] = {**_MASK, "special": True}
    config = {"added_tokens_decoder": added, **_SPECIAL_TOKENS_MAP, "clean_up_tokenization_spaces": False,
              "extra_special_tokens": {}, "mask_token": "<mask>", "model_max_length": model_max_length,
              "sp_model_kwargs": {}, "tokenizer_class": "XLMRobertaTokenizer"}
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "sentencepiece.bpe.model"), "wb") as f:
        f.write(model.getvalue())
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special_tokens_map = dict(sorted({**_SPECIAL_TOKENS_MAP, "mask_token": _MASK}.items()))
    for name, content in [("tokenizer_config.json", dict(sorted(config.items()))),
                          ("special_tokens_map.json", special_tokens_map)]:
        with open(os.path.join(out_dir, name), "w", encoding="utf-8") as f:
            f.write(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return size


def _random_weights(rng: np.random.Generator, shapes: dict[str, tuple[int, ...]]) -> dict[str, np.ndarray]:
    out = {}
    for name, shape in shapes.items():  # fixed (insertion) order, so a seed always gives the same arrays
        noise = rng.standard_normal(shape, dtype=np.float32)
        if "LayerNorm.weight" in name:
            out[name] = 1.0 + 0.1 * noise  # not all ones, so a gamma/beta mix-up changes the outputs
        elif "LayerNorm.bias" in name:
            out[name] = 0.1 * noise
        elif name.startswith("encoder.layer.") and name.endswith(".weight"):
            # 10x initializer_range: at 0.02 two layers barely mix tokens and every text gets the same CLS vector
            # (cosine 1.0000), which leaves the dense head untestable and untrainable; at 0.2 CLS cosines spread
            # over about 0.67..0.99, like a real encoder's.
            out[name] = 0.2 * noise
        else:
            out[name] = 0.02 * noise  # initializer_range; biases random too, so a missing bias is caught
    return out


def _linear_init(rng: np.random.Generator, out_features: int, in_features: int) -> dict[str, np.ndarray]:
    # torch.nn.Linear's default init: what FlagEmbedding gives a freshly created head.
    bound = 1.0 / np.sqrt(in_features)
    return {"weight": rng.uniform(-bound, bound, (out_features, in_features)).astype(np.float32),
            "bias": rng.uniform(-bound, bound, (out_features,)).astype(np.float32)}


def tiny_config(*, vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4, intermediate: int = 64,
                max_position: int = 514) -> dict:
    """bge-m3's config.json with tiny dimensions."""
    return {
        "architectures": ["XLMRobertaModel"],
        "attention_probs_dropout_prob": 0.1,
        "bos_token_id": 0,
        "classifier_dropout": None,
        "eos_token_id": 2,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": intermediate,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": max_position,
        "model_type": "xlm-roberta",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "output_past": True,
        "pad_token_id": 1,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "type_vocab_size": 1,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def make_tiny_checkpoint(out_dir, *, seed: int = 0, colbert_dim: int = -1, hidden: int = 32, layers: int = 2,
                         heads: int = 4, intermediate: int = 64, max_position: int = 514, pooler: bool = True,
                         with_heads: bool = True, heads_dtype: str = "float16", safetensors: bool = True,
                         pytorch_bin: bool = False, overwrite: bool = False) -> str:
    """Write a random tiny bge-m3 checkpoint to out_dir and return its path.

    colbert_dim -1 means hidden (FlagEmbedding's default); heads_dtype float16 is what bge-m3 ships;
    with_heads=False leaves out colbert_linear.pt / sparse_linear.pt (a checkpoint fit only for training).
    """
    with tempfile.TemporaryDirectory(prefix="m3jax-tok-") as tok_dir:
        vocab_size = train_tokenizer(tok_dir, model_max_length=min(512, max_position - 2))
        config = tiny_config(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads,
                             intermediate=intermediate, max_position=max_position)
        shapes = expected_encoder_shapes(config)
        if pooler:
            shapes.update({"pooler.dense.weight": (hidden, hidden), "pooler.dense.bias": (hidden,)})
        rng = np.random.default_rng(seed)
        encoder = _random_weights(rng, shapes)
        colbert = sparse = None
        if with_heads:
            colbert = _linear_init(rng, hidden if colbert_dim <= 0 else colbert_dim, hidden)
            sparse = _linear_init(rng, 1, hidden)
        ckpt = HFCheckpoint(config=config, encoder=encoder, colbert=colbert, sparse=sparse)
        save_hf_checkpoint(out_dir, ckpt, tokenizer_dir=tok_dir, safetensors=safetensors, pytorch_bin=pytorch_bin,
                           heads_dtype=heads_dtype, overwrite=overwrite)
    return os.fspath(out_dir)


def make_tiny_reranker(out_dir, *, seed: int = 0, hidden: int = 32, layers: int = 2, heads: int = 4,
                       intermediate: int = 64, max_position: int = 514, overwrite: bool = False) -> str:
    """Write a random tiny reranker (XLMRobertaForSequenceClassification, one label) to out_dir; return its path.

    The classification head's weights have std 1/sqrt(hidden), so tanh stays out of saturation and different pairs
    get different logits (they spread over a few tenths on the toy texts)."""
    with tempfile.TemporaryDirectory(prefix="m3jax-tok-") as tok_dir:
        vocab_size = train_tokenizer(tok_dir, model_max_length=min(512, max_position - 2))
        config = tiny_config(vocab_size=vocab_size, hidden=hidden, layers=layers, heads=heads,
                             intermediate=intermediate, max_position=max_position)
        rng = np.random.default_rng(seed)
        encoder = _random_weights(rng, expected_encoder_shapes(config))
        classifier = {name: (rng.standard_normal(shape, dtype=np.float32) / np.sqrt(hidden)).astype(np.float32)
                      for name, shape in classifier_shapes(config).items()}
        ckpt = HFCheckpoint(config=config, encoder=encoder, colbert=None, sparse=None, classifier=classifier)
        save_reranker_checkpoint(out_dir, ckpt, tokenizer_dir=tok_dir, overwrite=overwrite)
    return os.fspath(out_dir)
