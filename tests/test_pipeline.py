"""Pipeline on prepared data: packing across shards, SFT loss masks, FIM, weighted mixtures."""

from pathlib import Path

import ml_collections
import numpy as np
import pytest

from gigajax.config import base_config
from gigajax.data import pipeline, store
from gigajax.data.tokenizer import ByteTokenizer, get_tokenizer
from gigajax.errors import ConfigError, DataError

TOK = ByteTokenizer()
EOS = TOK.eos_id
FIM = pipeline.FimSpec(1.0, prefix_id=TOK.fim_prefix_id, middle_id=TOK.fim_middle_id,
                       suffix_id=TOK.fim_suffix_id)


def write_prepared(directory: Path, docs: list[list[int]], masks: list[list[int]] | None = None,
                   shard_docs: int = 2, val_docs: list[list[int]] | None = None) -> Path:
    """A prepared directory holding `docs` (EOS appended), `shard_docs` documents per shard."""
    directory.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, split_docs in (("train", docs), ("validation", val_docs or docs)):
        shards = []
        for k, first in enumerate(range(0, len(split_docs), shard_docs)):
            chunk = split_docs[first:first + shard_docs]
            tokens = np.concatenate([np.array([*d, EOS]) for d in chunk])
            ends = np.cumsum([len(d) + 1 for d in chunk])
            mask = None
            if masks is not None and split == "train":
                mask = np.concatenate([np.array([*m, 1]) for m in masks[first:first + shard_docs]])
            elif masks is not None:
                mask = np.ones_like(tokens)
            shards.append(store.write_shard(directory, store.shard_name(split, k), tokens, ends,
                                            mask, vocab_size=TOK.vocab_size))
        splits[split] = {"shards": shards, "num_docs": len(split_docs),
                         "num_tokens": sum(s["num_tokens"] for s in shards)}
    tokenizer = {"spec": "byte", "fingerprint": TOK.fingerprint(), "vocab_size": TOK.vocab_size,
                 "bos_id": TOK.bos_id, "eos_id": EOS, "pad_id": TOK.pad_id,
                 "fim_prefix_id": TOK.fim_prefix_id, "fim_middle_id": TOK.fim_middle_id,
                 "fim_suffix_id": TOK.fim_suffix_id}
    max_id = max(max(d) for d in docs + (val_docs or []))
    store.write_manifest(directory, {"dtype": store.token_dtype(TOK.vocab_size).str,
                                     "splits": splits, "tokenizer": tokenizer,
                                     "max_token_id": max(max_id, EOS),
                                     "has_loss_mask": masks is not None})
    return directory


def data_cfg(**overrides) -> ml_collections.ConfigDict:
    """A `data` section of the default config with these fields."""
    cfg = base_config().data
    cfg.update(dict(source="prepared", tokenizer="auto", path="", mixture="", seq_len=8,
                    batch_size=2, val_fraction=0.05, max_bytes=0, fim_rate=0.0))
    cfg.update(overrides)
    return cfg


def random_docs(rng: np.random.Generator, n: int, low: int = 1, high: int = 20,
                vocab: tuple[int, int] = (0, 200)) -> list[list[int]]:
    return [rng.integers(*vocab, size=rng.integers(low, high)).tolist() for _ in range(n)]


def test_prepared_windows_tile_the_documents_across_shards(tmp_path):
    docs = random_docs(np.random.default_rng(0), 9)
    split = store.open_split(write_prepared(tmp_path / "d", docs), "train")
    stream = np.concatenate([np.array([*d, EOS]) for d in docs])
    assert len(split.tokens) == len(stream) and split.num_docs == 9
    ds = pipeline.make_dataset([pipeline.TokenSource(split.tokens)], seq_len=8, batch_size=1,
                               seed=0, shuffle=False, repeat=False)
    inputs = np.concatenate([ds[i]["inputs"][0] for i in range(len(ds))])
    np.testing.assert_array_equal(inputs, stream[:len(inputs)])
    for i in range(len(ds)):  # features equal those of the in-memory stream (checked in test_data)
        want = pipeline.batch_features(pipeline.windows(stream, 8)[i:i + 1], eos_id=EOS)
        for key, value in ds[i].items():
            np.testing.assert_array_equal(value, want[key], err_msg=key)


def test_packing_restarts_positions_and_segments_at_each_document():
    tokens = np.array([[5, 6, EOS, 7, 8, 9, EOS, 1, 2]])
    batch = pipeline.batch_features(tokens, eos_id=EOS)
    assert batch["positions"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 2, 3]
    assert batch["loss_mask"][0].tolist() == [1, 1, 0, 1, 1, 1, 0, 1]


def test_sft_loss_mask_covers_only_response_targets():
    # prompt 10 11 | response 20 21 | EOS | prompt 12 | response 22 | EOS
    tokens = np.array([[10, 11, 20, 21, EOS, 12, 22, EOS]])
    target = np.array([[0, 0, 1, 1, 1, 0, 1, 1]], np.uint8)
    batch = pipeline.batch_features(tokens, target, eos_id=EOS)
    # input 10 -> 11 (prompt): 0; 11 -> 20: 1; 20 -> 21: 1; 21 -> EOS: 1; EOS -> 12: 0;
    # 12 -> 22: 1; 22 -> EOS: 1
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 1, 0, 1, 1]
    assert batch["segment_ids"][0].tolist() == [1, 1, 1, 1, 1, 2, 2]


def test_sft_mask_flows_from_prepared_shards(tmp_path):
    docs = [[10, 11, 20, 21], [12, 22, 23]]
    masks = [[0, 0, 1, 1], [0, 1, 1]]
    split = store.open_split(write_prepared(tmp_path / "sft", docs, masks), "train")
    ds = pipeline.make_dataset([pipeline.TokenSource(split.tokens, split.mask)], seq_len=8,
                               batch_size=1, seed=0, shuffle=False, repeat=False)
    batch = ds[0]
    assert batch["inputs"][0].tolist() == [10, 11, 20, 21, EOS, 12, 22, 23]
    assert batch["loss_mask"][0].tolist() == [0, 1, 1, 1, 0, 1, 1, 1]


def check_fim_piece(original: np.ndarray, rewritten: np.ndarray) -> bool:
    """True if `rewritten` is PRE p SUF s MID m of original[:-3] = p m s; False if unchanged."""
    if np.array_equal(original, rewritten):
        return False
    assert len(rewritten) == len(original)
    assert rewritten[0] == FIM.prefix_id
    (suf,) = np.flatnonzero(rewritten == FIM.suffix_id)
    (mid,) = np.flatnonzero(rewritten == FIM.middle_id)
    assert 0 < suf < mid
    prefix, suffix, middle = rewritten[1:suf], rewritten[suf + 1:mid], rewritten[mid + 1:]
    np.testing.assert_array_equal(np.concatenate([prefix, middle, suffix]), original[:-3])
    return True


def test_fim_rewrites_each_document_piece_and_keeps_eos_in_place():
    rng = np.random.default_rng(1)
    for trial in range(50):
        docs = random_docs(rng, 4, low=1, high=12)
        window = np.concatenate([np.array([*d, EOS]) for d in docs])
        out, mask = pipeline.apply_fim(window, np.zeros(len(window), np.uint8), FIM, EOS,
                                       np.random.default_rng(trial))
        np.testing.assert_array_equal(out == EOS, window == EOS)
        starts = np.concatenate([[0], np.flatnonzero(window == EOS) + 1])
        for lo, hi in zip(starts[:-1], np.flatnonzero(window == EOS), strict=True):
            rewritten = check_fim_piece(window[lo:hi], out[lo:hi])
            assert rewritten == (hi - lo >= 5)  # rate 1: every piece long enough
            assert mask[lo:hi].all() == rewritten


def test_fim_rate_and_determinism():
    rng = np.random.default_rng(2)
    window = np.concatenate([np.array([*d, EOS]) for d in random_docs(rng, 400, 6, 10)])
    half = pipeline.FimSpec(0.3, FIM.prefix_id, FIM.middle_id, FIM.suffix_id)
    ones = np.ones(len(window), np.uint8)
    a, _ = pipeline.apply_fim(window, ones, half, EOS, np.random.default_rng([0, 7]))
    b, _ = pipeline.apply_fim(window, ones, half, EOS, np.random.default_rng([0, 7]))
    np.testing.assert_array_equal(a, b)
    rewritten = (a == FIM.prefix_id).sum()
    assert 0.22 < rewritten / 400 < 0.38, rewritten  # 0.3 +- 3.5 sigma
    none = pipeline.FimSpec(0.0, FIM.prefix_id, FIM.middle_id, FIM.suffix_id)
    c, _ = pipeline.apply_fim(window, ones, none, EOS, np.random.default_rng(0))
    np.testing.assert_array_equal(c, window)


def test_fim_in_the_dataset_is_a_function_of_seed_and_sample(tmp_path):
    docs = random_docs(np.random.default_rng(3), 40, 6, 30)
    write_prepared(tmp_path / "code", docs)
    cfg = data_cfg(path=str(tmp_path / "code"), fim_rate=0.5, seq_len=16, batch_size=4)
    _, a, _ = pipeline.build_datasets(cfg, seed=0)
    _, b, _ = pipeline.build_datasets(cfg, seed=0)
    _, plain, _ = pipeline.build_datasets(data_cfg(path=str(tmp_path / "code"), seq_len=16,
                                                   batch_size=4), seed=0)
    for step in range(5):
        np.testing.assert_array_equal(a[step]["inputs"], b[step]["inputs"])
    # another seed gives other rewrites of the same windows (FIM draws from (seed, sample))
    other = pipeline.make_dataset([pipeline.TokenSource(store.open_split(
        tmp_path / "code", "train").tokens)], seq_len=16, batch_size=4, seed=0, shuffle=False,
        fim=pipeline.FimSpec(0.5, FIM.prefix_id, FIM.middle_id, FIM.suffix_id))
    unshuffled_seed1 = pipeline.make_dataset([pipeline.TokenSource(store.open_split(
        tmp_path / "code", "train").tokens)], seq_len=16, batch_size=4, seed=1, shuffle=False,
        fim=pipeline.FimSpec(0.5, FIM.prefix_id, FIM.middle_id, FIM.suffix_id))
    assert any(not np.array_equal(other[s]["inputs"], unshuffled_seed1[s]["inputs"])
               for s in range(5))
    sentinels = sum(int((a[s]["inputs"] == FIM.prefix_id).sum()) for s in range(20))
    assert sentinels > 0
    assert all(not (plain[s]["inputs"] >= 259).any() for s in range(20))
    rows = pipeline.build_datasets(cfg, seed=0, rows=slice(2, 4))[1]  # a process's rows
    np.testing.assert_array_equal(rows[3]["inputs"], a[3]["inputs"][2:4])


def test_mixture_hits_its_weights_within_two_percent(tmp_path):
    weights = {"a": 0.5, "b": 0.3, "c": 0.2}
    rng = np.random.default_rng(4)
    for k, name in enumerate(weights):  # dataset k uses token ids 10k .. 10k+9 only
        write_prepared(tmp_path / name, random_docs(rng, 50, 5, 30, (10 * k, 10 * k + 10)))
    mixture = ",".join(f"{tmp_path / name}={w}" for name, w in weights.items())
    _, ds, val = pipeline.build_datasets(data_cfg(mixture=mixture, seq_len=8, batch_size=1),
                                         seed=0)
    counts = dict.fromkeys(weights, 0)
    for step in range(10_000):
        inputs = ds[step]["inputs"][0]
        source = int(inputs[inputs != EOS][0]) // 10
        counts[list(weights)[source]] += 1
    for name, w in weights.items():
        assert abs(counts[name] / 10_000 - w) < 0.02, counts
    assert isinstance(val, pipeline.Mixture) and val.weights == pytest.approx((0.5, 0.3, 0.2))
    assert len(pipeline.eval_batches(val, seq_len=8, batch_size=1, num_batches=10)) == 10


@pytest.mark.parametrize("mixture, match", [
    ("onlyadir", "DIR=WEIGHT"), ("a=0", "positive"), ("a=x", "positive"), ("=1", "DIR=WEIGHT")])
def test_bad_mixture_strings_are_config_errors(mixture, match):
    with pytest.raises(ConfigError, match=rf"data\.mixture.*{match}"):
        pipeline.check_data_config(data_cfg(mixture=mixture))


def test_prepared_source_needs_exactly_one_of_path_and_mixture(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path.*data\.mixture"):
        pipeline.check_data_config(data_cfg())
    with pytest.raises(ConfigError, match="exactly one"):
        pipeline.check_data_config(data_cfg(path="x", mixture="x=1"))


def test_missing_prepared_directory_says_what_to_run(tmp_path):
    with pytest.raises(DataError, match="gigajax data prepare"):
        pipeline.check_data_config(data_cfg(path=str(tmp_path / "nope")))


def test_fim_on_sft_data_is_refused(tmp_path):
    write_prepared(tmp_path / "sft", [[1, 2, 3]], [[0, 1, 1]])
    with pytest.raises(ConfigError, match=r"data\.fim_rate.*SFT"):
        pipeline.check_data_config(data_cfg(path=str(tmp_path / "sft"), fim_rate=0.5))


def test_mixture_of_different_tokenizers_is_refused(tmp_path):
    write_prepared(tmp_path / "a", [[1, 2, 3]])
    write_prepared(tmp_path / "b", [[1, 2, 3]])
    manifest = store.read_manifest(tmp_path / "b")
    manifest["tokenizer"]["fingerprint"] = "other"
    store.write_manifest(tmp_path / "b", manifest)
    with pytest.raises(ConfigError, match="one tokenizer"):
        pipeline.check_data_config(data_cfg(mixture=f"{tmp_path / 'a'}=1,{tmp_path / 'b'}=1"))


def test_truncated_shard_is_a_data_error_not_a_crash_in_a_step(tmp_path):
    write_prepared(tmp_path / "d", random_docs(np.random.default_rng(5), 6))
    shard = tmp_path / "d" / "train-00001.tokens"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="train-00001.*truncated"):
        pipeline.build_datasets(data_cfg(path=str(tmp_path / "d")), seed=0)


def test_model_vocab_smaller_than_the_data_is_a_config_error(tmp_path):
    from gigajax import load_config  # the API's: it checks the data against the model

    write_prepared(tmp_path / "d", [[1, 2, 3]])
    manifest = store.read_manifest(tmp_path / "d")  # as if prepared with a 512-id tokenizer
    manifest["tokenizer"]["vocab_size"] = 512
    store.write_manifest(tmp_path / "d", manifest)
    root = Path(__file__).resolve().parents[1]
    with pytest.raises(ConfigError, match=r"model\.vocab_size=280.*512 ids"):
        load_config(root / "configs" / "tiny.py",
                    "--config.data.source=prepared", f"--config.data.path={tmp_path / 'd'}",
                    "--config.model.vocab_size=280", "--config.data.seq_len=2",
                    "--config.data.batch_size=2")


def test_the_run_tokenizer_is_the_manifests_unless_set(tmp_path):
    """data_tokenizer (used by `gigajax eval` to read a run's prompts): the prepared data's
    manifest's tokenizer for auto, data.tokenizer when set, byte for the generated sources.
    The manifest names a tokenizer other than the default (byte), so ignoring it fails."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    word_level = Tokenizer(models.WordLevel({w: i for i, w in enumerate(
        ["[UNK]", "</s>", "hello", "world"])}, unk_token="[UNK]"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.save(str(tmp_path / "words.json"))
    words = get_tokenizer(str(tmp_path / "words.json"))
    assert words.fingerprint() != TOK.fingerprint() and words.vocab_size == 4
    directory = write_prepared(tmp_path / "d", [[2, 3], [3, 2, 3]])
    manifest = store.read_manifest(directory)  # as if prepared with words.json (tokens unread)
    manifest["tokenizer"].update(spec=words.spec, fingerprint=words.fingerprint(),
                                 vocab_size=words.vocab_size, eos_id=words.eos_id)
    store.write_manifest(directory, manifest)
    tok = pipeline.data_tokenizer(data_cfg(path=str(directory)))
    assert tok.fingerprint() == words.fingerprint()
    assert tok.encode("hello world").tolist() == [2, 3]
    set_byte = pipeline.data_tokenizer(data_cfg(path=str(directory), tokenizer="byte"))
    assert set_byte.fingerprint() == TOK.fingerprint()  # the set one wins over the manifest's
    assert pipeline.data_tokenizer(data_cfg(source="passkey")).fingerprint() == TOK.fingerprint()
    with pytest.raises(ConfigError, match="data.tokenizer=.nope."):  # the set one is used
        pipeline.data_tokenizer(data_cfg(path=str(directory), tokenizer="nope"))
