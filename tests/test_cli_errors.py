"""Every command answers a bad value of each of its flags with one message and exit 2: never a
traceback, never a file written. The messages name the flag (or the config field)."""

from pathlib import Path

import pytest
from support import TINY_MODEL

from gigajax.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.py")
SMALL = [*TINY_MODEL, "--config.data.max_bytes=200000", "--config.train.eval_every=100",
         "--config.optim.warmup_steps=0", "--config.model.dtype=float32",
         "--config.checkpoint.async_save=false"]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A two-step run (with a checkpoint) for the commands that read one."""
    workdir = tmp_path_factory.mktemp("cli") / "run"
    assert cli_main(["train", "--config", TINY, "--workdir", str(workdir), "--no-progress",
                     *SMALL, "--config.train.steps=2"]) == 0
    return workdir


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "a.txt"
    path.write_text("hello world, hello tokens\n" * 50)
    return path


def cases(run: Path, text: Path, tmp: Path) -> list[tuple[list[str], str]]:
    """(argv, what the message must contain), one or more per flag of every command."""
    (tmp / "file").write_text("x")
    file, missing = str(tmp / "file"), str(tmp / "missing")
    train = ["train", "--config", TINY, "--workdir", str(tmp / "w")]
    layouts = ["check-layouts", "--config", TINY, *SMALL]
    plan = ["plan", "--config", TINY]
    tok = ["data", "train-tokenizer", "--input", str(text), "--out", str(tmp / "t.json")]
    prep = ["data", "prepare", "--input", str(text), "--tokenizer", "byte", "--out",
            str(tmp / "p")]
    passkey = ["eval", "passkey", "--checkpoint", str(run), "--lengths", "256",
               "--output", str(tmp / "e")]
    export = ["ckpt", "export", "--workdir", str(run), "--out", str(tmp / "x")]
    average = ["ckpt", "average", "--workdir", str(run), "--steps", "2", "--out", str(tmp / "a")]
    hf_dir = str(ROOT / "tests" / "fixtures" / "hf" / "llama")
    from_hf = ["convert", "from-hf", hf_dir, "--out", str(tmp / "x")]
    to_hf = ["convert", "to-hf", str(run), "--out", str(tmp / "x")]
    gen = ["generate", "--checkpoint", str(run), "--prompt", "def ", "--output",
           str(tmp / "g.jsonl")]
    (tmp / "prompts.jsonl").write_text('{"prompt": "a"}\n{"text": "b"}\n')
    return [
        (["generate", "--checkpoint", str(run)], "--prompt"),
        (["generate", "--checkpoint", missing, "--prompt", "x"], "does not exist"),
        ([*gen, "--strategy", "nucleus"], "invalid choice"),
        ([*gen, "--strategy", "sample", "--top-p", "1.5"], "--top-p 1.5"),
        ([*gen, "--strategy", "sample", "--top-p", "0"], "--top-p 0"),
        ([*gen, "--strategy", "sample", "--temperature", "0"], "--temperature"),
        ([*gen, "--strategy", "sample", "--min-p", "1"], "--min-p"),
        ([*gen, "--temperature", "0.7"], "--temperature applies to --strategy sample"),
        ([*gen, "--strategy", "beam", "--top-k", "3"], "--top-k applies"),
        ([*gen, "--strategy", "beam", "--num-beams", "0"], "--num-beams 0"),
        ([*gen, "--strategy", "contrastive", "--penalty-alpha", "2"], "--penalty-alpha"),
        ([*gen, "--strategy", "sample", "--seed", "-1"], "--seed"),
        ([*gen, "--max-new-tokens", "0"], "--max-new-tokens"),
        ([*gen, "--max-new-tokens", "100000"], "exceed model.max_seq_len"),
        ([*gen, "--token-healing", "-1"], "--token-healing"),
        ([*gen, "--batch-size", "0"], "--batch-size"),
        ([*gen, "--mesh", "sequence=2"], "generation splits the model over fsdp and tensor"),
        ([*gen, "--mesh", "tensor=x"], "tensor=x"),
        ([*gen, "--chat"], "chat template"),
        ([*gen[:5], "--prompts-file", str(tmp / "prompts.jsonl")], "prompts.jsonl:2"),
        ([*gen, "--config.model.d_model=32"], "not its sizes"),
        (["convert", "from-hf", missing, "--out", str(tmp / "x")], "does not exist"),
        (["convert", "from-hf", str(run), "--out", str(tmp / "x")], "`convert to-hf` exports"),
        (["convert", "from-hf", hf_dir, "--out", file], "already exists"),
        ([*from_hf, "--dtype", "int8"], "--dtype"),
        ([*from_hf, "--ignore-field"], "--ignore-field"),
        ([*from_hf, "--config.train.steps=2"], "unknown argument"),
        ([*to_hf, "--max-shard-size", "lots"], "--max-shard-size 'lots'"),
        ([*to_hf, "--max-shard-size", "0"], "--max-shard-size '0'"),
        ([*to_hf, "--step", "99999"], "no checkpoint of step 99999"),
        (["convert", "to-hf", hf_dir, "--out", str(tmp / "x"), "--step", "3"],
         "leave --step out"),
        (["convert", "to-hf", missing, "--out", str(tmp / "x")], "does not exist"),
        ([*to_hf, "--dtype", "float64"], "--dtype"),
        (["frobnicate"], "invalid choice"),
        (["train", "--config", missing, "--workdir", str(tmp / "w")], "does not exist"),
        (["train", "--config", file, "--workdir", str(tmp / "w")], file),
        (["train", "--config", TINY, "--workdir", file], "is a file"),
        (["train", "--config", TINY, "--workdir", f"{file}/run"], "is a file"),
        ([*train, "--config.train.seed=-1"], "train.seed"),
        ([*train, "--config.train.stepz=3"], "did you mean"),
        ([*train, "--config.data.mixture=a=inf"], "data.mixture"),
        ([*train, "--config.data.path=somewhere"], "data.path"),
        ([*train, "--bogus"], "--bogus"),
        ([*train, "--num-processes", "0"], "--num-processes"),
        ([*train, "--num-processes", "2", "--process-id", "5",
          "--coordinator", "127.0.0.1:1234"], "--process-id"),
        ([*train, "--coordinator", "nohost"], "--coordinator"),
        ([*train, "--num-processes", "x"], "invalid int"),
        ([*layouts, "--layouts", "data=2", "--steps", "0"], "--steps"),
        ([*layouts, "--layouts", "data=x"], "data=x"),
        ([*layouts, "--layouts", "warp=2"], "warp"),
        ([*layouts, "--layouts", "data=2", "--output", str(tmp)], str(tmp)),
        ([*plan, "--devices", "0"], "--devices"),
        ([*plan, "--devices", "-3"], "--devices"),
        ([*plan, "--advise", "--max-memory", "lots"], "lots"),
        ([*plan, "--advise", "--top", "0"], "--top"),
        ([*plan, "--advise", "--compile"], "--advise"),
        (["data", "train-tokenizer", "--input", missing, "--out", str(tmp / "t.json")],
         missing),
        ([*tok, "--vocab-size", "0"], "--vocab-size"),
        ([*tok, "--min-frequency", "0"], "--min-frequency"),
        ([*tok, "--bad-utf8", "maybe"], "invalid choice"),
        (["data", "train-tokenizer", "--input", str(text), "--out", str(tmp)], str(tmp)),
        (["data", "prepare", "--input", missing, "--tokenizer", "byte", "--out",
          str(tmp / "p")], missing),
        ([*prep[:-2], "--out", file], file),
        (["data", "prepare", "--input", str(text), "--tokenizer", missing, "--out",
          str(tmp / "p")], missing),
        ([*prep, "--val-fraction", "2"], "--val-fraction"),
        ([*prep, "--workers", "0"], "--workers"),
        ([*prep, "--min-doc-tokens", "-1"], "--min-doc-tokens"),
        ([*prep, "--shard-tokens", "0"], "--shard-tokens"),
        ([*prep, "--field", ""], "--field"),
        ([*prep, "--bad-lines", "sometimes"], "invalid choice"),
        (["data", "verify", missing], missing),
        (["ckpt", "export", "--workdir", missing, "--out", str(tmp / "x")], missing),
        ([*export, "--step", "99"], "99"),
        ([*export[:-2], "--out", file], file),
        ([*export, "--dtype", "int8"], "invalid choice"),
        ([*average[:5], "a,b", *average[6:]], "--steps"),
        ([*average[:5], "2,99", *average[6:]], "99"),
        ([*average[:5], "", *average[6:]], "--steps"),
        (["eval", "passkey", "--checkpoint", missing, "--lengths", "256"], missing),
        ([*passkey[:6], "--lengths", "abc", *passkey[6:]], "--lengths"),
        ([*passkey[:6], "--lengths", "0", *passkey[6:]], "--lengths"),
        ([*passkey, "--depths", "2"], "--depths"),
        ([*passkey, "--samples", "0"], "--samples"),
        ([*passkey, "--seed", "-1"], "--seed"),
        ([*passkey, "--key-digits", "0"], "--key-digits"),
        ([*passkey, "--rope", "ntk"], "ntk"),
        ([*passkey, "--rope", "linear", "--rope-factor", "0.5"], "--rope-factor"),
        ([*passkey, "--batch-size", "0"], "--batch-size"),
        ([*passkey, "--step", "99"], "99"),
        ([*passkey[:-2], "--output", file], file),
        ([*passkey, "--config.model.d_model=32"], "not its sizes"),
    ]


def test_every_flag_refuses_a_bad_value_with_one_message(run, text, tmp_path, capsys):
    capsys.readouterr()
    failures = []
    for argv, expected in cases(run, text, tmp_path):
        try:
            code = cli_main(argv)
        except SystemExit as exit_:  # argparse's usage errors
            code = exit_.code
        except BaseException as error:  # noqa: BLE001  (the bug this test is for)
            failures.append(f"{' '.join(argv)}: raised {type(error).__name__}: {error}")
            continue
        err = capsys.readouterr().err
        if code != 2 or expected not in err or "Traceback" in err:
            failures.append(f"{' '.join(argv)}: exit {code}, stderr {err.strip()[-300:]!r}")
    for leftover in ("w", "t.json", "p", "x", "a", "e", "g.jsonl"):
        if (tmp_path / leftover).exists():
            failures.append(f"{leftover} was written by a refused command")
    assert not failures, "\n".join(failures)
