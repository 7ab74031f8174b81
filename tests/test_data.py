"""Data: byte tokenizer, stdlib corpus split, and the grain windowed batch pipeline."""

import numpy as np
import pytest

from gigajax.config import base_config
from gigajax.data import pipeline, stdlib_corpus
from gigajax.data.tokenizer import ByteTokenizer, get_tokenizer
from gigajax.errors import ConfigError, DataError

TOK = ByteTokenizer()
EOS = TOK.eos_id
MAX_BYTES = 200_000


@pytest.fixture(scope="module")
def train_tokens():
    return stdlib_corpus.load_stdlib_tokens("train", TOK, MAX_BYTES, val_fraction=0.1)


def _data_cfg(**overrides):
    """A `data` section of the default config with these fields."""
    cfg = base_config().data
    cfg.update(dict(source="stdlib", tokenizer="byte", seq_len=64, batch_size=4, val_fraction=0.1,
                    max_bytes=MAX_BYTES, path="", mixture="", fim_rate=0.0))
    cfg.update(overrides)
    return cfg


def _reference_features(window):
    """Python-loop reference for one window of T+1 tokens."""
    inputs, targets = window[:-1], window[1:]
    positions, segment_ids, loss_mask = [], [], []
    pos, seg = 0, 1
    for t, tok in enumerate(inputs):
        if t > 0 and inputs[t - 1] == EOS:
            pos, seg = 0, seg + 1
        positions.append(pos)
        segment_ids.append(seg)
        loss_mask.append(0.0 if tok == EOS else 1.0)
        pos += 1
    return {
        "inputs": inputs,
        "targets": targets,
        "positions": positions,
        "segment_ids": segment_ids,
        "loss_mask": loss_mask,
    }


def test_byte_tokenizer_roundtrips_non_ascii_text():
    text = "def f(x):  # naïve café — 数据 🚀\n\treturn x"
    ids = TOK.encode(text)
    assert ids.dtype == np.uint16
    assert len(ids) == len(text.encode("utf-8"))
    assert TOK.decode(ids) == text
    assert TOK.vocab_size == 262 and (TOK.bos_id, TOK.eos_id, TOK.pad_id) == (256, 257, 258)
    assert (TOK.fim_prefix_id, TOK.fim_middle_id, TOK.fim_suffix_id) == (259, 260, 261)


def test_byte_tokenizer_decode_skips_specials_and_replaces_bad_utf8():
    ids = [TOK.bos_id, *TOK.encode("hé"), TOK.eos_id, 0xFF, TOK.pad_id]
    assert TOK.decode(ids) == "hé\ufffd"


def test_get_tokenizer_unknown_name_raises_config_error_naming_field():
    assert isinstance(get_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ConfigError, match=r"data\.tokenizer.*'byte'"):
        get_tokenizer("sentencepiece")


def test_stdlib_split_is_disjoint_by_file_and_deterministic():
    train = stdlib_corpus.split_files("train", 0.1)
    val = stdlib_corpus.split_files("validation", 0.1)
    assert train and val
    assert not set(train) & set(val)
    assert sorted(train + val) == stdlib_corpus.stdlib_files()
    assert train == sorted(train)
    assert val == stdlib_corpus.split_files("validation", 0.1)
    assert not any(part in stdlib_corpus.EXCLUDED_DIRS for f in train for part in f.split("/"))


def test_load_stdlib_tokens_caps_bytes_and_ends_every_file_with_eos(train_tokens):
    assert train_tokens.dtype == np.uint16
    assert train_tokens[-1] == EOS
    n_files = int((train_tokens == EOS).sum())
    files = stdlib_corpus.split_files("train", 0.1)[:n_files]
    sizes = [(stdlib_corpus.stdlib_dir() / f).stat().st_size for f in files]
    assert sum(sizes[:-1]) < MAX_BYTES <= sum(sizes)  # stops right after crossing the cap
    first = stdlib_corpus.stdlib_dir() / files[0]
    assert TOK.decode(train_tokens[: sizes[0]]) == first.read_text(encoding="utf-8")


def test_load_stdlib_tokens_without_py_files_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="No .py files"):
        stdlib_corpus.load_stdlib_tokens("train", TOK, root=tmp_path)


def test_load_stdlib_tokens_empty_split_raises_data_error(tmp_path):
    (tmp_path / "a.py").write_text("x = 1\n")
    with pytest.raises(DataError, match="val_fraction"):
        stdlib_corpus.load_stdlib_tokens("validation", TOK, val_fraction=1e-9, root=tmp_path)


def test_batch_has_expected_shapes_and_dtypes(train_tokens):
    ds = pipeline.make_dataset(train_tokens, seq_len=32, batch_size=3, seed=0)
    batch = ds[0]
    ints = ("inputs", "targets", "positions", "segment_ids")
    dtypes = {**dict.fromkeys(ints, np.int32), "loss_mask": np.float32}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
        k: ((3, 32), np.dtype(d)) for k, d in dtypes.items()
    }


def test_unshuffled_windows_tile_the_stream_and_targets_are_inputs_shifted(train_tokens):
    seq_len, batch_size = 16, 4
    ds = pipeline.make_dataset(
        train_tokens, seq_len=seq_len, batch_size=batch_size, seed=0, shuffle=False, repeat=False
    )
    inputs = np.concatenate([ds[i]["inputs"] for i in range(len(ds))])
    targets = np.concatenate([ds[i]["targets"] for i in range(len(ds))])
    n = len(inputs) * seq_len
    np.testing.assert_array_equal(inputs.ravel(), train_tokens[:n])
    np.testing.assert_array_equal(targets.ravel(), train_tokens[1 : n + 1])


def test_positions_segments_and_loss_mask_reset_after_eos():
    x = 7
    tokens = np.array([x, x, EOS, x, x, x, EOS, EOS, x, x, EOS, x, x, x, x, x, x], np.uint16)
    ds = pipeline.make_dataset(tokens, seq_len=8, batch_size=2, seed=0, shuffle=False)
    batch = ds[0]
    for row, window in enumerate(pipeline.windows(tokens, 8)):
        for key, want in _reference_features(list(window)).items():
            np.testing.assert_array_equal(batch[key][row], want, err_msg=key)
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 2, 3]
    assert batch["loss_mask"][0].tolist() == [1, 1, 0, 1, 1, 1, 0, 0]


def test_features_match_reference_on_a_stdlib_window_that_spans_files(train_tokens):
    all_windows = pipeline.windows(train_tokens, 512)
    step = int(np.flatnonzero((all_windows[:, :-1] == EOS).any(axis=1))[0])
    ds = pipeline.make_dataset(train_tokens, seq_len=512, batch_size=1, seed=3, shuffle=False)
    batch = ds[step]
    for key, want in _reference_features(all_windows[step].tolist()).items():
        np.testing.assert_array_equal(batch[key][0], want, err_msg=key)
    assert batch["segment_ids"][0, -1] > 1


def test_shuffled_epoch_visits_every_window_once(train_tokens):
    seq_len = 64
    ds = pipeline.make_dataset(train_tokens, seq_len=seq_len, batch_size=1, seed=5, repeat=False)
    seen = np.concatenate([ds[i]["inputs"] for i in range(len(ds))])
    want = pipeline.windows(train_tokens, seq_len)[:, :-1]
    assert len(seen) == len(want)
    assert sorted(map(bytes, seen.astype(np.uint16))) == sorted(map(bytes, want))


def test_same_seed_and_step_give_the_same_batch(train_tokens):
    a, b = (pipeline.make_dataset(train_tokens, seq_len=32, batch_size=4, seed=7) for _ in "ab")
    for step in (0, 1, 1000, 10**9):
        for key in a[step]:
            np.testing.assert_array_equal(a[step][key], b[step][key])


def test_batch_iterator_resumes_at_start_step(train_tokens):
    ds = pipeline.make_dataset(train_tokens, seq_len=32, batch_size=4, seed=7)
    from_zero = pipeline.batch_iterator(ds, 0)
    first = [next(from_zero) for _ in range(6)]
    resumed = pipeline.batch_iterator(ds, 4)
    for k in (4, 5):
        got = next(resumed)
        for key in got:
            np.testing.assert_array_equal(got[key], first[k][key])
            np.testing.assert_array_equal(got[key], ds[k][key])


def test_different_seeds_give_different_orders(train_tokens):
    a = pipeline.make_dataset(train_tokens, seq_len=32, batch_size=4, seed=0)
    b = pipeline.make_dataset(train_tokens, seq_len=32, batch_size=4, seed=1)
    assert not np.array_equal(a[0]["inputs"], b[0]["inputs"])
    # grain shuffles epoch e with seed + e; the seeds are mixed first so seed 0's second epoch
    # is not seed 1's first.
    a1 = pipeline.make_dataset(train_tokens, seq_len=32, batch_size=1, seed=0)
    b1 = pipeline.make_dataset(train_tokens, seq_len=32, batch_size=1, seed=1)
    n = pipeline.num_windows(len(train_tokens), 32)
    assert not all(np.array_equal(a1[n + i]["inputs"], b1[i]["inputs"]) for i in range(4))


def test_build_datasets_returns_tokenizer_train_dataset_and_validation_tokens():
    tokenizer, train_ds, val_tokens = pipeline.build_datasets(_data_cfg(), seed=0)
    assert tokenizer.vocab_size == 262
    assert train_ds[0]["inputs"].shape == (4, 64)
    assert val_tokens.dtype == np.uint16 and val_tokens[-1] == EOS
    batches = pipeline.eval_batches(val_tokens, seq_len=64, batch_size=4, num_batches=2)
    assert len(batches) == 2 and batches[0]["targets"].shape == (4, 64)


def test_unknown_source_raises_config_error_naming_field():
    with pytest.raises(ConfigError, match=r"data\.source.*'stdlib'"):
        pipeline.build_datasets(_data_cfg(source="c4"), seed=0)


def test_unknown_tokenizer_in_config_raises_config_error():
    with pytest.raises(ConfigError, match=r"data\.tokenizer"):
        pipeline.build_datasets(_data_cfg(tokenizer="gpt2"), seed=0)


def test_seq_len_longer_than_the_data_raises_data_error():
    with pytest.raises(DataError, match=r"data\.seq_len.*data\.batch_size.*data\.max_bytes"):
        pipeline.build_datasets(_data_cfg(seq_len=1_000_000), seed=0)


def test_too_many_eval_batches_raises_data_error(train_tokens):
    with pytest.raises(DataError, match=r"data\.seq_len.*train\.eval_batches"):
        pipeline.eval_batches(train_tokens, seq_len=4096, batch_size=8, num_batches=100)
