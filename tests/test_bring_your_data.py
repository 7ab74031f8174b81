"""The README's "Bring your data" path end to end: train a BPE tokenizer, prepare jsonl and text
files with it, train on the prepared directory (and on a mixture), resume, export."""

import json
from pathlib import Path

import pytest

from gigajax.cli import main as gigajax

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
SMALL = ["--config.model.d_model=64", "--config.model.mlp_dim=128", "--config.model.n_layers=2",
         "--config.data.seq_len=64", "--config.data.batch_size=8",
         "--config.attention.block_q=32", "--config.attention.block_kv=32",
         "--config.train.log_every=2", "--config.train.eval_every=4",
         "--config.train.eval_batches=2", "--config.train.checkpoint_every=4",
         "--config.optim.warmup_steps=2", "--config.mesh.data=-1"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few hundred small documents: jsonl (code files as records) and plain text files."""
    root = tmp_path_factory.mktemp("corpus")
    sources = sorted((Path(json.__file__).parent).glob("*.py")) + sorted(
        (ROOT / "gigajax").rglob("*.py"))
    with open(root / "code.jsonl", "w") as f:
        for path in sources:
            for k, chunk in enumerate(path.read_text().split("\n\n")):
                if chunk.strip():
                    f.write(json.dumps({"text": chunk, "source": f"{path.name}:{k}"}) + "\n")
    (root / "docs").mkdir()
    for path in sorted((ROOT / "docs").glob("*.md")):
        (root / "docs" / path.name).write_text(path.read_text())
    return root


@pytest.mark.slow(seconds=60)
def test_train_tokenizer_prepare_train_resume_export(corpus, tmp_path, capsys):
    tokenizer = tmp_path / "tok" / "tokenizer.json"
    assert gigajax(["data", "train-tokenizer", "--input", str(corpus / "code.jsonl"),
                    "--input", str(corpus / "docs" / "*.md"), "--vocab-size", "512",
                    "--out", str(tokenizer)]) == 0
    code, docs = tmp_path / "data" / "code", tmp_path / "data" / "docs"
    assert gigajax(["data", "prepare", "--input", str(corpus / "code.jsonl"), "--tokenizer",
                    str(tokenizer), "--out", str(code), "--val-fraction", "0.1"]) == 0
    assert gigajax(["data", "prepare", "--input", str(corpus / "docs" / "*.md"), "--tokenizer",
                    str(tokenizer), "--out", str(docs), "--val-fraction", "0.2"]) == 0
    manifest = json.loads((code / "manifest.json").read_text())
    assert manifest["tokenizer"]["vocab_size"] == 512

    run = tmp_path / "run"
    train = ["train", "--config", TINY, "--workdir", str(run), "--no-progress", *SMALL,
             "--config.data.source=prepared", f"--config.data.path={code}",
             "--config.model.vocab_size=512"]
    assert gigajax([*train, "--config.train.steps=4"]) == 0
    assert gigajax([*train, "--config.train.steps=8", "--config.data.fim_rate=0.5"]) == 0
    err = capsys.readouterr().err
    assert "resuming at step 4" in err
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8] and rows[-1]["loss"] < rows[0]["loss"]

    mixed = ["train", "--config", TINY, "--workdir", str(tmp_path / "mixed"), "--no-progress",
             *SMALL, "--config.data.source=prepared", "--config.model.vocab_size=512",
             f"--config.data.mixture={code}=0.7,{docs}=0.3", "--config.train.steps=4"]
    assert gigajax(mixed) == 0

    out = tmp_path / "export"
    assert gigajax(["ckpt", "export", "--workdir", str(run), "--out", str(out),
                    "--dtype", "bfloat16"]) == 0
    assert out.is_dir()
