"""Tokenizers: bytes, Hugging Face tokenizer.json (trained here), SentencePiece, get_tokenizer."""

import pickle
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from gigajax.data.tokenizer import (
    SPECIALS,
    ByteTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    get_tokenizer,
    train_tokenizer,
)
from gigajax.errors import ConfigError, DataError

STDLIB = Path(sysconfig.get_paths()["stdlib"])
TEXTS = ["def f(x):  # naïve café — 数据 🚀\n\treturn x", "replaced \ufffd bytes", "", " ",
         "a quoted <|eos|> is text"]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    """A 512-id byte-level BPE trained on a few stdlib modules."""
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    return train_tokenizer([str(STDLIB / "json" / "*.py"), str(STDLIB / "email" / "*.py")],
                           512, out, show_progress=False)


def test_byte_tokenizer_has_fim_sentinels_and_a_constant_fingerprint():
    tok = ByteTokenizer()
    assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id) == (259, 260, 261)
    assert tok.vocab_size == 262 and tok.spec == "byte"
    assert tok.fingerprint() == ByteTokenizer().fingerprint() and len(tok.fingerprint()) == 64
    batch = tok.encode_batch(TEXTS)
    assert [tok.decode(ids) for ids in batch] == TEXTS
    assert tok.decode([259, *tok.encode("ab"), 260, 261]) == "ab"


def test_get_tokenizer_byte_is_cached_and_unknown_specs_name_the_field_and_allowed_values(
        tmp_path):
    assert get_tokenizer("byte") is get_tokenizer("byte")
    for spec in ("gpt2", str(tmp_path / "missing.json"), str(tmp_path / "missing.model")):
        with pytest.raises(ConfigError, match=r"data\.tokenizer.*'byte'.*tokenizer\.json.*"
                                              r"\.model"):
            get_tokenizer(spec)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ConfigError, match="not a known tokenizer"):
        get_tokenizer(str(tmp_path / "notes.txt"))
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match=r"broken\.json.*library can load"):
        get_tokenizer(str(tmp_path / "broken.json"))


def test_trained_bpe_has_specials_at_ids_0_to_5_and_fim(bpe):
    assert bpe.vocab_size == 512
    assert [bpe.bos_id, bpe.eos_id, bpe.pad_id] == [0, 1, 2]
    assert [bpe.fim_prefix_id, bpe.fim_middle_id, bpe.fim_suffix_id] == [3, 4, 5]
    assert [bpe._tok.id_to_token(i) for i in range(6)] == list(SPECIALS)


def test_trained_bpe_round_trips_unicode_emoji_and_replacement_chars(bpe):
    for text, ids in zip(TEXTS, bpe.encode_batch(TEXTS), strict=True):
        np.testing.assert_array_equal(ids, bpe.encode(text))
        assert bpe.decode(ids) == text
        assert ids.dtype == np.int32 and (ids.size == 0 or ids.max() < bpe.vocab_size)
    assert len(bpe.encode("import json\n")) < len(b"import json\n")  # merges were learned


def test_special_token_text_in_a_document_is_not_encoded_as_the_special(bpe):
    ids = bpe.encode("a quoted <|eos|> and <|fim_prefix|>")
    assert not set(ids.tolist()) & set(range(len(SPECIALS)))


def test_get_tokenizer_loads_a_tokenizer_json_by_path_or_directory_and_pickles_by_path(bpe):
    tok = get_tokenizer(bpe.spec)
    assert isinstance(tok, HFTokenizer) and tok.spec == bpe.spec
    assert get_tokenizer(str(Path(bpe.spec).parent)) is tok
    assert tok.fingerprint() == bpe.fingerprint()
    np.testing.assert_array_equal(tok.encode(TEXTS[0]), bpe.encode(TEXTS[0]))
    assert pickle.loads(pickle.dumps(tok)) is tok  # reloaded from the (cached) path


def test_train_tokenizer_refuses_a_vocab_smaller_than_bytes_plus_specials(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    with pytest.raises(ConfigError, match=r"--vocab-size=100.*262"):
        train_tokenizer([str(tmp_path / "a.txt")], 100, tmp_path / "t.json", show_progress=False)


def test_train_tokenizer_reads_jsonl_fields_and_reports_bad_lines(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "hello world"}\n{"title": "x"}\n')
    with pytest.raises(DataError, match=r"a\.jsonl:2: has no field 'body'.*'title'"):
        train_tokenizer([str(tmp_path / "a.jsonl")], 300, tmp_path / "t.json",
                        show_progress=False, field="body")
    tok = train_tokenizer([str(tmp_path / "a.jsonl")], 300, tmp_path / "t.json",
                          show_progress=False, field="body", bad_lines="skip")
    assert tok.decode(tok.encode("hello world")) == "hello world"
    assert not list(tmp_path.glob("*.tmp"))


def _write_hf(path: Path, vocab: list[str]) -> str:
    """A word-level tokenizer.json with the given vocabulary (ids in order)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token=vocab[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return str(path)


def test_hf_tokenizer_without_eos_names_the_file_and_the_names_looked_for(tmp_path):
    spec = _write_hf(tmp_path / "noeos.json", ["[UNK]", "a", "b"])
    with pytest.raises(ConfigError, match=r"data\.tokenizer='.*noeos\.json': .*noeos\.json has "
                                          r"no end-of-document token; looked for <\|eos\|>.*</s>"):
        get_tokenizer(spec)


def test_hf_tokenizer_with_only_endoftext_uses_it_for_bos_and_pad(tmp_path):
    tok = get_tokenizer(_write_hf(tmp_path / "gpt.json", ["[UNK]", "a", "<|endoftext|>", "b"]))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 2, 2, 4)
    assert tok.fim_prefix_id is None and tok.fim_middle_id is None and tok.fim_suffix_id is None
    assert tok.encode("a b a").tolist() == [1, 3, 1]


def test_hf_tokenizer_json_is_reloaded_when_the_file_changes(tmp_path):
    path = tmp_path / "t.json"
    first = get_tokenizer(_write_hf(path, ["[UNK]", "</s>"]))
    second = get_tokenizer(_write_hf(path, ["[UNK]", "a", "</s>"]))
    assert (first.eos_id, second.eos_id) == (1, 2)


def test_sentencepiece_model_ids_fim_pieces_and_round_trip(tmp_path):
    import sentencepiece as spm

    corpus = tmp_path / "corpus.txt"
    corpus.write_text((STDLIB / "json" / "decoder.py").read_text() * 2)
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, pad_id=3, minloglevel=2,
        user_defined_symbols=["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>"])
    tok = get_tokenizer(str(tmp_path / "sp.model"))
    assert isinstance(tok, SentencePieceTokenizer) and tok.vocab_size == 400
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 3)
    assert (tok.fim_prefix_id, tok.fim_middle_id, tok.fim_suffix_id) == (4, 5, 6)
    text = "def decode(self, s): return café 🚀"
    ids = tok.encode(text)
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text
    np.testing.assert_array_equal(tok.encode_batch([text, "x"])[0], ids)
    assert pickle.loads(pickle.dumps(tok)) is tok
