"""`gigajax generate` and `LM.generate`/`LM.complete` around the decoding loop: every strategy
from the command line on a trained model (the PassKey fixture) and on an imported Hugging Face
fixture, the chat template, and generation with the weights sharded over a mesh."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import gigajax
from gigajax.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
PASSKEY = ROOT / "tests" / "fixtures" / "passkey_tiny"  # a trained params checkpoint (bytes)
LLAMA = ROOT / "tests" / "fixtures" / "hf" / "llama"  # a Hugging Face directory (BPE)
PROMPT = "The pass key is 40221. Remember it. The pass key is"
STRATEGY_FLAGS = {"greedy": [], "sample": ["--temperature", "0.8", "--top-k", "20",
                                           "--top-p", "0.9", "--seed", "3"],
                  "beam": ["--num-beams", "3", "--early-stopping", "true"],
                  "contrastive": ["--top-k", "3", "--penalty-alpha", "0.5"]}


@pytest.fixture(scope="module")
def passkey_lm():
    return gigajax.load(PASSKEY)


def run_cli(tmp_path, checkpoint, strategy, *extra, prompt=PROMPT) -> list[dict]:
    out = tmp_path / f"{strategy}.jsonl"
    argv = ["generate", "--checkpoint", str(checkpoint), "--prompt", prompt,
            "--max-new-tokens", "7", "--strategy", strategy, *STRATEGY_FLAGS[strategy],
            "--output", str(out), *extra]
    assert cli_main(argv) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def python_options(strategy: str) -> dict:
    """STRATEGY_FLAGS as LM.generate's keyword arguments."""
    flags = STRATEGY_FLAGS[strategy]
    options = {flags[i][2:].replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
    return {k: (True if v == "true" else float(v) if "." in v else int(v))
            for k, v in options.items()}


@pytest.mark.parametrize("strategy", list(STRATEGY_FLAGS))
def test_every_strategy_from_the_cli_equals_lm_generate(strategy, passkey_lm, tmp_path, capsys):
    """The streamed text is the prompt and the continuation; the record is what the Python
    call gives for the same options; the trained model repeats the key greedily."""
    (record,) = run_cli(tmp_path, PASSKEY, strategy)
    printed = capsys.readouterr().out
    assert printed.startswith(PROMPT + record["text"])
    want = passkey_lm.generate(PROMPT, 7, strategy=strategy, **python_options(strategy))
    assert record["text"] == want and record["stop"] in ("length", "stop token")
    if strategy == "greedy":
        assert want.lstrip().startswith("40221")


def test_a_prompts_file_runs_in_batches_and_each_equals_its_own_run(passkey_lm, tmp_path,
                                                                    capsys):
    """Three prompts of different lengths in batches of 2 (left-padded): each continuation
    equals the prompt generated alone."""
    prompts = [PROMPT, "The pass key is 7. The pass key is", "Remember 123456. The pass key is"]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    assert cli_main(["generate", "--checkpoint", str(PASSKEY), "--prompts-file",
                     str(tmp_path / "p.jsonl"), "--batch-size", "2", "--max-new-tokens", "6",
                     "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    assert "--- prompt 3" in capsys.readouterr().out
    for prompt, record in zip(prompts, records, strict=True):
        assert record["text"] == passkey_lm.generate(prompt, 6)


@pytest.mark.parametrize("strategy", list(STRATEGY_FLAGS))
def test_every_strategy_runs_on_an_imported_hf_model(strategy, tmp_path):
    """A Hugging Face directory straight from the CLI (BPE tokenizer); greedy and beam are
    checked against transformers' ids in test_generate_hf.py, here the CLI's ids equal the
    Python call's for the same prompt, and sampling repeats by seed."""
    (record,) = run_cli(tmp_path, LLAMA, strategy, prompt="hello world")
    assert len(record["tokens"]) == 7 or record["stop"] == "stop token"
    lm = gigajax.load(LLAMA)
    want = lm.generate(lm.encode("hello world"), 7, strategy=strategy, **python_options(strategy))
    assert record["tokens"] == want.tolist()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory) -> Path:
    """The Llama fixture with a chat template that uses the EOS token as end of turn."""
    where = tmp_path_factory.mktemp("chat") / "llama"
    shutil.copytree(LLAMA, where)
    (where / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role[0] }}:{{ m.content }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}a:{% endif %}")
    return where


def test_chat_prompts_render_the_template_and_keep_contents_plain(chat_model, tmp_path):
    """--chat: the template's own text has its specials parsed (EOS between turns is the EOS
    id), the message content is plain text (an "</s>" typed by the user is not EOS), and the
    assistant's turn is opened."""
    lm = gigajax.load(chat_model)
    eos = lm.tokenizer.eos_id
    eos_text = json.loads((chat_model / "tokenizer_config.json").read_text())["eos_token"]
    eos_text = eos_text["content"] if isinstance(eos_text, dict) else eos_text
    content = f"hi {eos_text}"
    ids = lm.chat_ids(content).tolist()
    want = [*lm.encode("u:").tolist(), *lm.encode(content).tolist(), eos,
            *lm.encode("a:").tolist()]
    assert ids == want and ids.count(eos) == 1
    reply = lm.generate(content, 5, chat=True)
    assert reply == lm.tokenizer.decode(lm.generate(ids, 5))
    (tmp_path / "chats.jsonl").write_text(json.dumps(
        {"messages": [{"role": "user", "content": content}]}) + "\n")
    out = tmp_path / "out.jsonl"
    assert cli_main(["generate", "--checkpoint", str(chat_model), "--chat", "--prompts-file",
                     str(tmp_path / "chats.jsonl"), "--max-new-tokens", "5", "--output",
                     str(out)]) == 0
    assert json.loads(out.read_text())["text"] == reply


def test_load_on_a_tensor_fsdp_mesh_generates_what_one_device_does(passkey_lm):
    """`load(..., mesh="tensor=2,fsdp=2")`: each device holds a quarter of wq (the weights are
    never whole on one device), and every strategy gives the one-device tokens."""
    sharded = gigajax.load(PASSKEY, mesh="tensor=2,fsdp=2")
    wq = sharded.model.blocks.attn.wq[...]
    assert len(wq.sharding.device_set) == 4
    assert wq.addressable_shards[0].data.size * 4 == wq.size
    assert "mesh" in repr(sharded)
    prompts = [PROMPT, "The pass key is 7. The pass key is"]
    for strategy in ("greedy", "beam"):
        want = passkey_lm.complete(prompts, 6, strategy=strategy)
        got = sharded.complete(prompts, 6, strategy=strategy)
        assert [g.tokens.tolist() for g in got] == [w.tokens.tolist() for w in want]
    want = passkey_lm.logits(PROMPT)  # fp32, summed in another order over tensor
    np.testing.assert_allclose(sharded.logits(PROMPT), want, rtol=1e-5,
                               atol=1e-5 * np.abs(want).max())
