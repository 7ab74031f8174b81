"""`gigajax data prepare`: round trips, determinism, re-runs, SFT masks, and every bad input."""

import json
import os
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gigajax import cli
from gigajax.data import prepare as prepare_mod
from gigajax.data import readers, store
from gigajax.data.tokenizer import ByteTokenizer, train_tokenizer
from gigajax.errors import ConfigError, DataError

TOK = ByteTokenizer()
EOS = TOK.eos_id


def run(tmp_path: Path, inputs: list, out: str = "out", **kw) -> dict:
    """prepare() quietly into tmp_path/out with one worker unless told otherwise."""
    kw.setdefault("workers", 1)
    tokenizer = kw.pop("tokenizer", "byte")
    return prepare_mod.prepare([str(i) for i in inputs], tokenizer, tmp_path / out,
                               progress=False, echo=None, **kw)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def split_of(key: str, index: int, val_fraction: float) -> str:
    """The documented rule: validation iff crc32('key:index') / 2**32 < val_fraction."""
    return "validation" if zlib.crc32(f"{key}:{index}".encode()) / 2**32 < val_fraction \
        else "train"


def documents(out: Path, split: str) -> list[str]:
    """The split's documents, checking each shard's document index ends at an EOS."""
    manifest = store.read_manifest(out)
    for shard in manifest["splits"][split]["shards"]:
        tokens = np.fromfile(out / f"{shard['name']}.tokens", np.dtype(manifest["dtype"]))
        ends = np.fromfile(out / f"{shard['name']}.docs", store.DOC_DTYPE)
        np.testing.assert_array_equal(ends, np.flatnonzero(tokens == EOS) + 1)
    opened = store.open_split(out, split)
    tokens = np.asarray(opened.tokens[0:len(opened.tokens)])
    assert opened.num_docs == int((tokens == EOS).sum()) and (len(tokens) == 0
                                                              or tokens[-1] == EOS)
    return [TOK.decode(d) for d in np.split(tokens, np.flatnonzero(tokens == EOS) + 1)[:-1]]


@pytest.fixture
def corpus(tmp_path) -> tuple[list[str], dict[str, list[str]]]:
    """jsonl + txt + parquet + an unknown extension, and the documents each split must hold."""
    lines = [{"text": f"doc {i} — café ✓ " * (i % 4 + 1), "id": i} for i in range(40)]
    lines[7] = ""  # a blank line: no document, but it keeps its line index
    write_jsonl(tmp_path / "a.jsonl", lines)
    (tmp_path / "b.txt").write_text("a plain text file\nwith two lines 🚀\n")
    rows = [f"row {i} " * (i + 1) for i in range(12)]
    pq.write_table(pa.table({"id": list(range(12)), "text": rows}), tmp_path / "c.parquet",
                   row_group_size=5)
    (tmp_path / "d.xyz").write_text("unknown extensions are text")
    want: dict[str, list[str]] = {"train": [], "validation": []}
    docs = [("a.jsonl", i, r["text"]) for i, r in enumerate(lines) if r] + [
        ("b.txt", 0, "a plain text file\nwith two lines 🚀\n")] + [
        ("c.parquet", i, r) for i, r in enumerate(rows)] + [
        ("d.xyz", 0, "unknown extensions are text")]
    for key, index, text in docs:
        want[split_of(key, index, 0.3)].append(text)
    inputs = [str(tmp_path / "*.jsonl"), str(tmp_path / "b.txt"), str(tmp_path / "c.parquet"),
              str(tmp_path / "d.xyz")]
    return inputs, want


def test_round_trip_gives_back_every_document_followed_by_eos_in_its_split(tmp_path, corpus):
    inputs, want = corpus
    manifest = run(tmp_path, inputs, val_fraction=0.3)
    assert want["train"] and want["validation"]
    for split in store.SPLITS:
        assert documents(tmp_path / "out", split) == want[split]
    counts = manifest["counts"]
    n_docs = len(want["train"]) + len(want["validation"])
    assert counts["documents_written"] == counts["documents_read"] == n_docs
    assert counts["files"] == 4 and counts["tokens"] == sum(
        s["num_tokens"] for s in manifest["splits"].values())
    assert manifest["dtype"] == "<u2" and manifest["max_token_id"] == EOS
    assert manifest["tokenizer"]["spec"] == "byte" and manifest["tokenizer"]["fim_suffix_id"] == 261
    assert not manifest["has_loss_mask"] and manifest["options"]["val_fraction"] == 0.3
    assert [i["key"] for i in manifest["inputs"]] == ["a.jsonl", "b.txt", "c.parquet", "d.xyz"]


def test_small_shards_never_split_a_document_and_hold_the_same_stream(tmp_path, corpus):
    inputs, want = corpus
    manifest = run(tmp_path, inputs, val_fraction=0.3, shard_tokens=100)
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3
    for shard in shards[:-1]:  # each closes with the first document that reaches 100 tokens
        ends = np.fromfile(tmp_path / "out" / f"{shard['name']}.docs", store.DOC_DTYPE)
        assert ends[-1] >= 100 and (len(ends) == 1 or ends[-2] < 100)
    assert documents(tmp_path / "out", "train") == want["train"]


def test_output_is_identical_for_one_or_two_workers_and_any_chunking(tmp_path, monkeypatch):
    rows = [{"text": f"line {i} " + "x" * (i % 37)} for i in range(300)]
    write_jsonl(tmp_path / "big.jsonl", rows)
    write_jsonl(tmp_path / "small.jsonl", rows[:20])
    pq.write_table(pa.table({"text": [r["text"] for r in rows]}), tmp_path / "c.parquet",
                   row_group_size=40)
    tok = train_tokenizer([str(tmp_path / "*.jsonl")], 300, tmp_path / "tok.json",
                          show_progress=False)
    inputs = [tmp_path / "*.jsonl", tmp_path / "c.parquet"]
    kw = dict(tokenizer=tok.spec, val_fraction=0.2, shard_tokens=500)
    parquet = readers.expand_inputs([str(tmp_path / "c.parquet")])[0]
    assert len(readers.plan_units(0, parquet, 1000, "text", False)) > 2
    one = run(tmp_path, inputs, "one", **kw)
    monkeypatch.setattr(prepare_mod, "CHUNK_BYTES", 1000)  # big.jsonl, c.parquet -> many units
    two = run(tmp_path, inputs, "two", workers=2, **kw)
    assert one == two and len(one["splits"]["train"]["shards"]) > 2
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_rerun_on_unchanged_input_is_a_fast_no_op(tmp_path, corpus, capsys):
    inputs, _ = corpus
    run(tmp_path, inputs)
    manifest = tmp_path / "out" / "manifest.json"
    before = manifest.stat().st_mtime_ns
    start = time.perf_counter()
    prepare_mod.prepare(inputs, "byte", tmp_path / "out", progress=False, workers=1)
    assert time.perf_counter() - start < 2
    assert "up to date" in capsys.readouterr().out
    assert manifest.stat().st_mtime_ns == before


def test_changing_an_input_rebuilds(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}])
    run(tmp_path, [path], val_fraction=0)
    write_jsonl(path, [{"text": "one"}, {"text": "two"}])
    manifest = run(tmp_path, [path], val_fraction=0)
    assert manifest["counts"]["documents_written"] == 2
    assert documents(tmp_path / "out", "train") == ["one", "two"]


def test_a_failed_rebuild_leaves_the_previous_dataset_whole(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "one"}, {"text": "two"}])
    run(tmp_path, [path], val_fraction=0)
    write_jsonl(path, [{"text": "one"}, "{not json"])  # changed input, bad line: rebuild fails
    with pytest.raises(DataError, match="a.jsonl:2"):
        run(tmp_path, [path], val_fraction=0)
    assert documents(tmp_path / "out", "train") == ["one", "two"]  # the old dataset is intact
    write_jsonl(path, [{"text": "three"}])
    run(tmp_path, [path], val_fraction=0)  # the next good run replaces it (no staging left)
    assert documents(tmp_path / "out", "train") == ["three"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "manifest.json", "train-00000.docs", "train-00000.tokens"]


def test_truncated_shard_is_detected_and_rebuilt_on_rerun(tmp_path, corpus):
    inputs, want = corpus
    run(tmp_path, inputs, val_fraction=0.3)
    shard = tmp_path / "out" / "train-00000.tokens"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataError, match="truncated"):
        store.open_split(tmp_path / "out", "train")
    run(tmp_path, inputs, val_fraction=0.3)
    assert documents(tmp_path / "out", "train") == want["train"]


def test_leftover_tmp_files_and_manifestless_shards_are_cleaned(tmp_path, corpus):
    inputs, want = corpus
    run(tmp_path, inputs, val_fraction=0.3)
    out = tmp_path / "out"
    (out / "train-00009.tokens.tmp").write_bytes(b"partial")
    run(tmp_path, inputs, val_fraction=0.3)  # up to date, but the leftover goes
    assert not list(out.glob("*.tmp"))
    (out / "manifest.json").unlink()  # an interrupted run: shards, no manifest
    (out / "train-00042.docs").write_bytes(b"stale")
    run(tmp_path, inputs, val_fraction=0.3)
    assert not (out / "train-00042.docs").exists()
    assert documents(out, "train") == want["train"]


def test_sft_mask_marks_responses_assistant_turns_and_the_closing_eos(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"prompt": "Q: 2+2?\nA: ", "response": "4"},
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!"},
                      {"role": "user", "content": "Bye"},
                      {"role": "assistant", "content": "Bye é."}]}])
    manifest = run(tmp_path, [path], sft=True, val_fraction=0)
    assert manifest["has_loss_mask"] and (tmp_path / "out" / "train-00000.mask").exists()
    pieces = [("Q: 2+2?\nA: ", 0), ("4", 1), (None, 1),
              ("system: ", 0), ("Be brief.", 0), ("\n", 0), ("user: ", 0), ("Hi", 0), ("\n", 0),
              ("assistant: ", 0), ("Hello!", 1), ("\n", 1), ("user: ", 0), ("Bye", 0),
              ("\n", 0), ("assistant: ", 0), ("Bye é.", 1), ("\n", 1), (None, 1)]
    want_tokens = np.concatenate([TOK.encode(t) if t is not None else [EOS] for t, _ in pieces])
    want_mask = np.concatenate([np.full(len(TOK.encode(t)) if t is not None else 1, m)
                                for t, m in pieces])
    split = store.open_split(tmp_path / "out", "train")
    np.testing.assert_array_equal(split.tokens[0:len(split.tokens)], want_tokens)
    np.testing.assert_array_equal(split.mask[0:len(split.mask)], want_mask)
    targets = np.asarray(split.tokens[0:len(split.tokens)])[split.mask[0:len(split.mask)] == 1]
    assert TOK.decode(targets) == "4Hello!\nBye é.\n"


def test_sft_masks_stay_aligned_across_splits_and_shards(tmp_path):
    rows = [{"prompt": f"P{i}:" + "p" * (i % 5), "response": "R" + "r" * (i % 7)}
            for i in range(60)]
    path = write_jsonl(tmp_path / "sft.jsonl", rows)
    run(tmp_path, [path], sft=True, val_fraction=0.5, shard_tokens=40)
    seen = 0
    for split in store.SPLITS:
        opened = store.open_split(tmp_path / "out", split)
        tokens = np.asarray(opened.tokens[0:len(opened.tokens)])
        mask = np.asarray(opened.mask[0:len(opened.mask)])
        cuts = np.flatnonzero(tokens == EOS) + 1
        for doc, m in zip(np.split(tokens, cuts)[:-1], np.split(mask, cuts)[:-1], strict=True):
            n_prompt = TOK.decode(doc).index("R")
            assert m.tolist() == [0] * n_prompt + [1] * (len(doc) - n_prompt)
            seen += 1
    assert seen == 60


@pytest.mark.parametrize("row, match", [
    ({"prompt": "p"}, r"sft\.jsonl:1: an SFT record needs string 'prompt' and 'response', or "
                      r"'messages'; its keys are \['prompt'\]"),
    ({"messages": []}, r"sft\.jsonl:1: 'messages' must be a non-empty list"),
    ({"messages": [{"role": "user"}]}, r"sft\.jsonl:1: each message needs string 'role' and "
                                       "'content'"),
])
def test_sft_record_without_prompt_response_or_messages_is_an_error(tmp_path, row, match):
    path = write_jsonl(tmp_path / "sft.jsonl", [row])
    with pytest.raises(DataError, match=match):
        run(tmp_path, [path], sft=True)


def test_sft_refuses_plain_text_inputs(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(DataError, match=r"a\.txt: --sft reads JSON Lines or Parquet"):
        run(tmp_path, [tmp_path / "a.txt"], sft=True)


def test_glob_matching_nothing_directory_and_compressed_inputs_are_errors(tmp_path):
    with pytest.raises(DataError, match=r"--input '.*\*\.jsonl' matches no files.*Quote globs"):
        run(tmp_path, [tmp_path / "*.jsonl"])
    (tmp_path / "sub").mkdir()
    with pytest.raises(DataError, match=r"is a directory; pass the files in it.*\*\*"):
        run(tmp_path, [tmp_path / "sub"])
    with pytest.raises(DataError, match="matches only directories"):
        run(tmp_path, [tmp_path / "su*"])
    (tmp_path / "a.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(DataError, match=r"a\.jsonl\.gz: compressed input \(\.gz\).*decompress"):
        run(tmp_path, [tmp_path / "a.jsonl.gz"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "secret.txt"
    path.write_text("x")
    path.chmod(0)
    try:
        with pytest.raises(DataError, match=r"secret\.txt: cannot read it \(Permission denied\)"):
            run(tmp_path, [path])
    finally:
        path.chmod(0o600)


def test_permission_error_is_reported_the_same_way_when_simulated(tmp_path, monkeypatch):
    path = tmp_path / "secret.txt"
    path.write_text("x")

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(readers, "open", denied, raising=False)
    with pytest.raises(DataError, match=r"secret\.txt: cannot read it \(Permission denied\); fix "
                                        "its permissions or leave it out of --input"):
        run(tmp_path, [path])


def test_empty_files_and_blank_documents_are_counted_and_all_empty_is_an_error(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match=r"no documents to write: the 2 input file\(s\) \(2 empty"):
        run(tmp_path, [tmp_path / "empty.*"])
    assert not (tmp_path / "out" / "manifest.json").exists()
    write_jsonl(tmp_path / "a.jsonl", [{"text": "kept"}, {"text": " \n\t"}, ""])
    counts = run(tmp_path, [tmp_path / "*"])["counts"]
    assert counts["empty_files"] == 2 and counts["skipped_empty"] == 2  # empty.txt, " \n\t"
    assert counts["documents_read"] == 3 and counts["documents_written"] == 1


def test_a_byte_order_mark_opening_a_file_is_dropped(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "json"}\n')
    (tmp_path / "b.txt").write_bytes(b"\xef\xbb\xbftext")
    run(tmp_path, [tmp_path / "a.jsonl", tmp_path / "b.txt"], val_fraction=0)
    assert documents(tmp_path / "out", "train") == ["json", "text"]


def test_invalid_utf8_is_replaced_and_counted_or_rejected_with_its_position(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"line one\nok \xff\xfe end")
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n{"text": "caf\xc3"}\n'
                                         b'{"text": "\\ud800 lone"}\n')
    inputs = [tmp_path / "bad.*"]
    manifest = run(tmp_path, inputs, val_fraction=0)
    assert manifest["counts"]["utf8_replaced_chars"] == 4
    assert manifest["counts"]["utf8_replaced_documents"] == 3
    docs = documents(tmp_path / "out", "train")
    assert docs == ["fine", "caf\ufffd", "\ufffd lone", "line one\nok \ufffd\ufffd end"]
    with pytest.raises(DataError, match=r"bad\.jsonl:2: invalid UTF-8 .* byte 13 of the line "
                                        r"\(30 of the file\).*--bad-utf8 replace"):
        run(tmp_path, inputs, bad_utf8="reject", bad_lines="skip")
    with pytest.raises(DataError, match=r"bad\.txt:2: invalid UTF-8 .* byte 12 of the file"):
        run(tmp_path, [tmp_path / "bad.txt"], bad_utf8="reject")


@pytest.mark.parametrize("line, match", [
    ("{oops", r"a\.jsonl:2: malformed JSON \(Expecting property name.*column 2\).*"
              r"--bad-lines skip"),
    ('{"title": "t", "body": "b"}', r"a\.jsonl:2: has no field 'text' \(its keys: \['body', "
                                    r"'title'\]\); choose the text field with --field"),
    ('{"text": 5}', r"a\.jsonl:2: field 'text' is a int, not a string"),
    ('{"text": null}', r"a\.jsonl:2: has no field 'text'"),
    ("[1, 2]", r"a\.jsonl:2: is a JSON list, not an object"),
])
def test_malformed_lines_are_errors_with_file_and_line_or_counted_skips(tmp_path, line, match):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "good"}, line, {"text": "also good"}])
    with pytest.raises(DataError, match=match):
        run(tmp_path, [path])
    manifest = run(tmp_path, [path], bad_lines="skip", val_fraction=0)
    assert manifest["counts"]["skipped_malformed"] == 1
    assert documents(tmp_path / "out", "train") == ["good", "also good"]


def test_bad_line_in_a_later_chunk_reports_its_line_in_the_file(tmp_path, monkeypatch):
    rows = [{"text": f"document number {i}"} for i in range(200)]
    rows[150] = "{broken"
    path = write_jsonl(tmp_path / "a.jsonl", rows)
    monkeypatch.setattr(prepare_mod, "CHUNK_BYTES", 500)
    with pytest.raises(DataError, match=r"a\.jsonl:151: malformed JSON"):
        run(tmp_path, [path])


def test_parquet_without_the_column_or_with_a_non_string_one_names_the_columns(tmp_path):
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet: no column 'text'; its columns are "
                                        r"\['id', 'body'\]. Choose one with --field"):
        run(tmp_path, [tmp_path / "a.parquet"])
    with pytest.raises(DataError, match=r"column 'id' has type int64, not string"):
        run(tmp_path, [tmp_path / "a.parquet"], field="id")
    assert run(tmp_path, [tmp_path / "a.parquet"], field="body")["counts"]["tokens"] == 2


def test_parquet_null_text_is_an_error_naming_the_row_or_a_counted_skip(tmp_path):
    pq.write_table(pa.table({"text": ["a", None, "b"]}), tmp_path / "a.parquet")
    with pytest.raises(DataError, match=r"a\.parquet, row 1: has no column 'text'"):
        run(tmp_path, [tmp_path / "a.parquet"])
    manifest = run(tmp_path, [tmp_path / "a.parquet"], bad_lines="skip")
    assert manifest["counts"]["skipped_malformed"] == 1


def test_documents_shorter_than_min_doc_tokens_are_counted_skips(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in ("a", "abc", "ab", "abcd")])
    manifest = run(tmp_path, [path], min_doc_tokens=3, val_fraction=0)
    assert manifest["counts"]["skipped_too_short"] == 2
    assert documents(tmp_path / "out", "train") == ["abc", "abcd"]


class _OutOfRange(ByteTokenizer):
    """A broken tokenizer: returns an id past its vocabulary."""

    def encode(self, text):
        return np.array([65, 999], np.int32)


def test_token_id_outside_the_vocabulary_is_an_error(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=r"a\.jsonl: tokenizer 'byte' produced id 999, outside "
                                        r"its vocabulary \[0, 262\)"):
        run(tmp_path, [path], tokenizer=_OutOfRange())


def test_out_that_is_a_file_or_a_foreign_directory_is_refused_untouched(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    (tmp_path / "file").write_text("mine")
    with pytest.raises(DataError, match="--out .*file exists and is not a directory"):
        run(tmp_path, [path], out="file")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"holds files that `data prepare` did not write "
                                        r"\(notes\.txt\).*Nothing was deleted"):
        run(tmp_path, [path], out="mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"
    assert (tmp_path / "file").read_text() == "mine"


def test_bad_options_name_their_flag(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    for value in (1.0, -0.1):
        with pytest.raises(ConfigError, match=rf"--val-fraction={value} must lie in \[0, 1\)"):
            run(tmp_path, [path], val_fraction=value)
    with pytest.raises(ConfigError, match="--bad-lines='ignore'; allowed values: error, skip"):
        run(tmp_path, [path], bad_lines="ignore")
    with pytest.raises(ConfigError, match=r"--tokenizer=.*nope\.json': cannot read the file.*"
                                          r"allowed values: 'byte'"):
        run(tmp_path, [path], tokenizer=str(tmp_path / "nope.json"))


def test_cli_prepare_prints_a_summary_and_errors_as_one_line(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello"}])
    base = ["data", "prepare", "--tokenizer", "byte", "--no-progress", "--workers", "1"]
    assert cli.main([*base, "--input", str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "1 documents, 6 tokens" in out and "tokens/s" in out
    assert cli.main([*base, "--input", str(tmp_path / "*.none"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gigajax: error: --input") and err.count("\n") == 1
    assert cli.main([*base, "--input", str(path), "--out", str(tmp_path / "o"), "--bogus"]) == 2
    assert "--bogus" in capsys.readouterr().err


def test_cli_train_tokenizer_writes_a_loadable_tokenizer(tmp_path, capsys):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": "hello world " * 20}])
    out = tmp_path / "tok" / "tokenizer.json"
    assert cli.main(["data", "train-tokenizer", "--input", str(path), "--vocab-size", "300",
                     "--out", str(out), "--no-progress"]) == 0
    assert "eos 1" in capsys.readouterr().out
    manifest = run(tmp_path, [path], tokenizer=str(out), val_fraction=0)
    assert manifest["tokenizer"]["spec"] == str(out.resolve())
    assert manifest["tokenizer"]["fim_prefix_id"] == 3
