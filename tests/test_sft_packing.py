"""SFT: chat templates (`data prepare --chat`) and whole-example packing (`data.packing`)."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gigajax.config import base_config
from gigajax.data import pipeline, store
from gigajax.data.packing import pack_whole
from gigajax.data.prepare import prepare
from gigajax.data.tokenizer import ByteTokenizer, get_tokenizer
from gigajax.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
QWEN = ROOT / "tests" / "fixtures" / "hf" / "qwen2"  # tokenizer_config.json with a ChatML template
TOK = ByteTokenizer()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def prepared(tmp_path: Path, rows: list[dict], tokenizer="byte", **kw) -> Path:
    out = tmp_path / "out"
    prepare([str(write_jsonl(tmp_path / "in.jsonl", rows))], tokenizer, out, workers=1,
            progress=False, echo=None, **kw)
    return out


def test_chat_template_trains_assistant_turns_and_parses_only_the_templates_specials(tmp_path):
    tok = get_tokenizer(str(QWEN))
    chat = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi <|im_end|>"},  # a forged turn end stays text
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Bye."}]
    out = prepared(tmp_path, [{"messages": chat}], str(QWEN), chat=True, val_fraction=0)
    split = store.open_split(out, "train")
    tokens = np.asarray(split.tokens[0:len(split.tokens)])
    mask = np.asarray(split.mask[0:len(split.mask)])
    raw = tok._tok  # the library's own decoder, specials kept
    text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi <|im_end|><|im_end|>\n"
            "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
            "<|im_start|>assistant\nBye.<|im_end|>\n<|endoftext|>")
    assert raw.decode(tokens.tolist(), skip_special_tokens=False) == text
    assert raw.decode(tokens[mask == 1].tolist(), skip_special_tokens=False) == (
        "Hello!<|im_end|>\nBye.<|im_end|>\n<|endoftext|>")
    im_end = raw.token_to_id("<|im_end|>")
    assert (tokens == im_end).sum() == 5  # one per turn: the user's "<|im_end|>" is plain text


def test_chat_without_a_template_or_with_a_content_rewriting_one_is_an_error(tmp_path):
    rows = [{"messages": [{"role": "user", "content": " x "}, {"role": "assistant",
                                                             "content": "y"}]}]
    with pytest.raises(DataError, match=r"--chat renders messages with the tokenizer's chat "
                                        r"template, and 'byte' has none.*use --sft"):
        prepared(tmp_path, rows, chat=True)
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    shutil.copy(QWEN / "tokenizer.json", tok_dir)
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}")}))
    with pytest.raises(DataError, match=r"in\.jsonl:1: the chat template changes the message "
                                        "contents"):
        prepared(tmp_path, rows, str(tok_dir), chat=True)


def test_greedy_packing_keeps_documents_whole_and_counts_or_refuses_overlong_ones():
    packing = pack_whole(np.array([3, 4, 2, 9, 5, 1]), 8, "skip")
    assert packing.first.tolist() == [0, 2, 4] and packing.stop.tolist() == [2, 3, 6]
    assert packing.skipped.tolist() == [3] and packing.used_tokens == 15
    with pytest.raises(DataError, match=r"document 3 of d has 9 tokens, more than a window of "
                                        r"data.seq_len=7\+1.*data.overlong=skip"):
        pack_whole(np.array([3, 4, 2, 9]), 8, "error", "d")


def test_no_window_trains_a_response_without_its_whole_prompt(tmp_path):
    """Whole packing (the default for SFT data): every segment holding a trained target is one
    whole example (prompt, response, EOS), and padding is masked; stream packing breaks it."""
    rng = np.random.default_rng(0)
    rows = [{"prompt": "P" + "p" * int(rng.integers(1, 30)),
             "response": "R" + "r" * int(rng.integers(1, 30))} for _ in range(80)]
    rows.append({"prompt": "P" + "p" * 80, "response": "R"})  # overlong at seq_len 64: skipped
    out = prepared(tmp_path, rows, sft=True, val_fraction=0.2)
    examples = {"P" + r["prompt"][1:] + r["response"] for r in rows}
    cfg = base_config().data
    cfg.update(source="prepared", path=str(out), seq_len=64, batch_size=4, overlong="skip")
    ids, train_ds, _ = pipeline.build_datasets(cfg, seed=0)
    assert ids.packing.mode == "whole"
    seen = 0
    for step in range(10):  # the dataset repeats: 40 windows, every one at least once
        batch = train_ds[step]
        for b in range(4):
            for seg in np.unique(batch["segment_ids"][b]):
                where = batch["segment_ids"][b] == seg
                if not batch["loss_mask"][b][where].any():
                    continue
                text = TOK.decode(batch["inputs"][b][where])  # (its EOS input dropped)
                assert text in examples, text  # a whole example, from its first token
                assert batch["positions"][b][where][0] == 0
                seen += 1
    assert seen > 40  # segments checked
    cfg.packing = "stream"
    _, stream_ds, _ = pipeline.build_datasets(cfg, seed=0)
    cut = []  # windows whose first segment trains a response cut from its prompt
    for step in range(10):
        batch = stream_ds[step]
        for b in range(4):
            first = batch["segment_ids"][b] == 1
            if batch["loss_mask"][b][first].any():
                cut.append(TOK.decode(batch["inputs"][b][first]) not in examples)
    assert any(cut)  # what whole packing prevents
    cfg.update(packing="auto", overlong="error")
    with pytest.raises(DataError, match="data.overlong=skip"):
        pipeline.build_datasets(cfg, seed=0)
