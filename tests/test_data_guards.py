"""A prepared dataset that was changed after `gigajax data prepare` is refused, naming the file
(and the token, for ids): overwritten shard bytes, an edited or damaged manifest, a flipped
byte (`gigajax data verify`); and mixture weights that are not a distribution."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from support import TINY_MODEL

from gigajax.cli import main as cli_main
from gigajax.data.prepare import prepare
from gigajax.data.verify import verify_prepared
from gigajax.errors import GigajaxError

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("prep")
    with (root / "a.jsonl").open("w") as f:
        for i in range(300):
            f.write(json.dumps({"text": f"document {i} " + "hello world " * 20}) + "\n")
    prepare([str(root / "a.jsonl")], "byte", root / "good", val_fraction=0.1, progress=False,
            echo=None)
    return root / "good"


def copy(prepared: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(prepared, tmp_path / "copy"))


def train_on(data: str, workdir: Path, capsys, *overrides: str) -> tuple[int, str]:
    code = cli_main(["train", "--config", TINY, "--workdir", str(workdir), "--no-progress",
                     *TINY_MODEL, "--config.data.source=prepared", data,
                     "--config.train.steps=2", *overrides])
    return code, capsys.readouterr().err


def test_a_good_dataset_verifies_and_trains(prepared, tmp_path, capsys):
    assert verify_prepared(prepared, progress=False).summary()
    code, err = train_on(f"--config.data.path={prepared}", tmp_path / "w", capsys)
    assert code == 0, err


def test_overwritten_shard_bytes_are_refused_by_token_before_training_on_them(
        prepared, tmp_path, capsys):
    data = copy(prepared, tmp_path)
    shard = data / "train-00000.tokens"
    tokens = np.fromfile(shard, dtype="<u2")
    tokens[::7] = 60000  # far above the vocabulary; the file keeps its size
    tokens.tofile(shard)
    code, err = train_on(f"--config.data.path={data}", tmp_path / "w", capsys)
    assert code == 2 and "Traceback" not in err
    assert "train-00000.tokens: token " in err and "holds token id 60000" in err
    with pytest.raises(GigajaxError, match=r"train-00000\.tokens: token 0 .*60000"):
        verify_prepared(data, progress=False)


def test_a_manifest_edited_below_its_shards_ids_is_refused(prepared, tmp_path, capsys):
    data = copy(prepared, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["max_token_id"] = 100
    (data / "manifest.json").write_text(json.dumps(manifest))
    code, err = train_on(f"--config.data.path={data}", tmp_path / "w", capsys)
    assert code == 2 and "max_token_id=100" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_a_manifest_missing_a_key_is_one_message_naming_it(prepared, tmp_path, capsys):
    data = copy(prepared, tmp_path)
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["tokenizer"]["spec"]
    (data / "manifest.json").write_text(json.dumps(manifest))
    code, err = train_on(f"--config.data.path={data}", tmp_path / "w", capsys)
    assert code == 2 and "'tokenizer.spec' is missing" in err and "Traceback" not in err


def test_data_verify_finds_a_flipped_byte(prepared, tmp_path, capsys):
    assert cli_main(["data", "verify", str(prepared), "--no-progress"]) == 0
    assert "verified" in capsys.readouterr().out
    data = copy(prepared, tmp_path)
    docs = data / "validation-00000.docs"
    raw = bytearray(docs.read_bytes())
    raw[3] ^= 0x01
    docs.write_bytes(bytes(raw))
    assert cli_main(["data", "verify", str(data), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "validation-00000.docs" in err and "Traceback" not in err


@pytest.mark.parametrize("weights,expected", [
    ("=0.3,{}=0.3", "sum to 0.6"),
    ("=inf", "not a finite positive number"),
    ("=-1", "not a finite positive number"),
    ("=0.5,{}=0.5", "twice"),
])
def test_mixture_weights_must_be_a_distribution(prepared, tmp_path, capsys, weights, expected):
    other = copy(prepared, tmp_path) if weights.count("{}") and expected != "twice" else prepared
    mixture = f"{prepared}" + weights.format(other)
    code, err = train_on(f"--config.data.mixture={mixture}", tmp_path / "w", capsys)
    assert code == 2 and expected in err and "Traceback" not in err
