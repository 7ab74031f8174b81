"""PassKey prompts are deterministic and well formed; scoring gives 1.0 to a model that always
answers right, 0.0 to one that never does, and each (length, depth) cell the share of its own
samples answered right; the heatmap is written. The synthetic training
source (data.source=passkey) is deterministic and trains on the answers only; `gigajax eval
passkey` loads a checkpoint, writes JSON and PNG, and refuses bad input with exit code 2; and
(slow) configs/passkey_tiny.py learns the task."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from gigajax import cli
from gigajax.data import pipeline, synthetic
from gigajax.data.synthetic import PasskeyWindows
from gigajax.data.tokenizer import ByteTokenizer
from gigajax.errors import ConfigError
from gigajax.eval import passkey
from gigajax.infer.loading import build_model, load_trained

ROOT = Path(__file__).resolve().parents[1]
TOK = ByteTokenizer()


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_has_the_length_and_the_needle_at_its_depth(depth):
    prompt = synthetic.make_prompt(TOK, 1000, depth, seed=3)
    assert len(prompt.ids) == 1000 and len(prompt.key) == 5 and prompt.key.isdigit()
    text = TOK.decode(prompt.ids)
    assert text.startswith(synthetic.INSTRUCTION) and text.endswith(synthetic.QUESTION)
    at = text.index(f"The pass key is {prompt.key}.")
    filler_start = len(synthetic.INSTRUCTION)
    filler_len = 1000 - len(TOK.encode(synthetic.INSTRUCTION + synthetic.NEEDLE.format(
        key=prompt.key) + synthetic.QUESTION))
    assert at - filler_start == round(depth * filler_len)


def test_prompts_are_a_function_of_seed_length_depth_and_sample():
    a = synthetic.make_prompt(TOK, 600, 0.5, seed=1, sample=2)
    b = synthetic.make_prompt(TOK, 600, 0.5, seed=1, sample=2)
    np.testing.assert_array_equal(a.ids, b.ids)
    keys = {synthetic.make_prompt(TOK, 600, 0.5, seed=1, sample=s).key for s in range(10)}
    assert len(keys) > 5  # the key changes with the sample
    assert synthetic.make_prompt(TOK, 600, 0.5, seed=2, sample=2).key != a.key or \
        synthetic.make_prompt(TOK, 600, 0.5, seed=3, sample=2).key != a.key


def test_too_short_a_length_is_refused():
    with pytest.raises(ValueError, match="shorter than the prompt"):
        synthetic.make_prompt(TOK, 50, 0.5, seed=0)


def needle_depth(text: str, length: int) -> float:
    """Where the needle sits in the filler of a prompt of `length` byte tokens, as a depth."""
    at = text.index("The pass key is ")
    key = text[at:].split("The pass key is ")[1][:5]
    filler_len = length - len(TOK.encode(synthetic.INSTRUCTION + synthetic.NEEDLE.format(
        key=key) + synthetic.QUESTION))
    return round((at - len(synthetic.INSTRUCTION)) / filler_len, 2)


def oracle(right_rows):
    """A fake model that reads the key out of the prompt and answers it in the first
    `right_rows(length, depth)` prompts of a batch (a cell's samples, in order), a wrong key in
    the rest; length and depth are read from the prompt itself, not told."""
    def generate(ids_BT, new_tokens):
        answers = []
        for row, ids in enumerate(ids_BT):
            text = TOK.decode(ids)
            key = text.split("The pass key is ")[1][:5]
            if row >= right_rows(len(ids), needle_depth(text, len(ids))):
                key = str((int(key) + 1) % 100000).zfill(5)
            answers.append(TOK.encode(" " + key + ".")[:new_tokens])
        return np.stack(answers)

    return generate


def test_scores_of_an_always_right_and_an_always_wrong_model(tmp_path):
    lengths, depths = [300, 600], [0.0, 0.5, 1.0]
    right = passkey.score_grid(oracle(lambda length, depth: 3), TOK, lengths, depths, samples=3)
    wrong = passkey.score_grid(oracle(lambda length, depth: 0), TOK, lengths, depths, samples=3)
    assert right["mean"] == 1.0 and np.all(np.asarray(right["scores"]) == 1.0)
    assert wrong["mean"] == 0.0 and np.all(np.asarray(wrong["scores"]) == 0.0)
    assert np.asarray(wrong["scores"]).shape == (2, 3)
    passkey.plot_heatmap(right, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_each_cell_scores_its_own_length_and_depth():
    """A model right in a different number of a cell's 3 samples at each (length, depth): the
    grid is exactly that count / 3, rows lengths and columns depths, so a transposed or shifted
    cell index, an ignored depth or length, or a wrong denominator fails."""
    lengths, depths = [300, 600], [0.0, 0.5, 1.0]
    right_rows = {(300, 0.0): 0, (300, 0.5): 1, (300, 1.0): 3,
                  (600, 0.0): 2, (600, 0.5): 3, (600, 1.0): 1}
    result = passkey.score_grid(oracle(lambda length, depth: right_rows[length, depth]), TOK,
                                lengths, depths, samples=3)
    want = [[right_rows[n, d] / 3 for d in depths] for n in lengths]
    assert result["scores"] == want
    assert result["mean"] == pytest.approx(10 / 18)
    for i, n in enumerate(lengths):  # every answer recorded, in its cell, with its key
        for j, d in enumerate(depths):
            cell = result["answers"][i][j]
            assert len(cell) == 3
            assert sum(passkey.is_right(a["answer"], a["key"]) for a in cell) == right_rows[n, d]
    assert result["lengths"] == lengths and result["depths"] == depths


def test_answer_scoring_is_binary_on_the_key_prefix():
    assert passkey.is_right(" 12345. Done", "12345")
    assert not passkey.is_right("1234", "12345") and not passkey.is_right("x12345", "12345")


# --- the synthetic training source: data.source=passkey -------------------------------------

def passkey_data_cfg(**overrides):
    from gigajax.config import base_config

    data = base_config().data
    data.update({"source": "passkey", "seq_len": 300, "batch_size": 4, **overrides})
    return data


def test_windows_are_a_function_of_seed_split_and_index():
    a = PasskeyWindows(TOK, 300, seed=1)
    b = PasskeyWindows(TOK, 300, seed=1)
    for i in (0, 7, 123_456_789):
        np.testing.assert_array_equal(a[i][0], b[i][0])
        np.testing.assert_array_equal(a[i][1], b[i][1])
    assert not np.array_equal(a[0][0], a[1][0])
    assert not np.array_equal(a[0][0], PasskeyWindows(TOK, 300, seed=2)[0][0])
    assert not np.array_equal(a[0][0], PasskeyWindows(TOK, 300, seed=1, split="validation")[0][0])


@pytest.mark.parametrize("seq_len", [200, 512])
def test_the_mask_marks_exactly_each_whole_documents_answer(seq_len):
    """Every whole document is prompt + ' <key>.' + EOS with its needle's key; the mask is 1 on
    the answer's tokens and nowhere else (not in the cut-off prompt that ends the window); the
    window starts a document."""
    windows = PasskeyWindows(TOK, seq_len, seed=0)
    docs = 0
    for i in range(40):
        tokens, mask = windows[i]
        assert tokens.shape == mask.shape == (seq_len + 1,)
        assert TOK.decode(tokens).startswith(synthetic.INSTRUCTION)
        ends = np.flatnonzero(tokens == TOK.eos_id)
        starts = np.concatenate([[0], ends + 1])
        want = np.zeros_like(mask)
        for lo, hi in zip(starts, ends, strict=False):  # whole documents only
            text = TOK.decode(tokens[lo:hi])
            key = text.split("The pass key is ")[1][:5]
            assert text.endswith(synthetic.QUESTION + synthetic.ANSWER.format(key=key))
            want[hi - len(synthetic.ANSWER.format(key=key)):hi] = 1
            docs += 1
        np.testing.assert_array_equal(mask, want)
    assert docs >= 40


def test_text_weight_weighs_every_other_token():
    """text_weight: the loss weight of every token but the answer; the tokens stay the same."""
    tokens, answer = PasskeyWindows(TOK, 300, seed=0)[3]
    same, weights = PasskeyWindows(TOK, 300, seed=0, text_weight=0.25)[3]
    np.testing.assert_array_equal(same, tokens)
    np.testing.assert_array_equal(weights, np.where(answer == 1, 1.0, 0.25))


def test_shorter_keys_and_short_documents_only_where_asked():
    """min_key_digits=1: keys of 1 to 5 digits; short_rate=1: no instruction; each document
    still ends with its own key as the answer."""
    windows = PasskeyWindows(TOK, 512, seed=0, min_key_digits=1, short_rate=1.0)
    lengths = set()
    for i in range(30):
        tokens, answer = windows[i]
        assert synthetic.INSTRUCTION not in TOK.decode(tokens)
        ends = np.flatnonzero(tokens == TOK.eos_id)
        for lo, hi in zip([0, *(ends + 1)], ends, strict=False):  # whole documents
            text = TOK.decode(tokens[lo:hi])
            key = text.split("The pass key is ")[1].split(".")[0]
            assert key.isdigit() and text.endswith(synthetic.ANSWER.format(key=key))
            assert TOK.decode(tokens[lo:hi][answer[lo:hi] == 1]) == synthetic.ANSWER.format(key=key)
            lengths.add(len(key))
    assert lengths == {1, 2, 3, 4, 5}


def test_batches_train_on_the_answer_targets_and_resume_by_step():
    ids, train_ds, val = pipeline.build_datasets(passkey_data_cfg(), seed=5)
    assert ids.vocab_size == TOK.vocab_size and ids.eos_id == TOK.eos_id
    batch = train_ds[3]
    assert batch["inputs"].shape == (4, 300)
    for row in range(4):
        learned = batch["targets"][row][batch["loss_mask"][row] == 1]
        text = TOK.decode(learned)
        assert text and set(text) <= set("0123456789 .")  # answer tokens only
        assert len(learned) % len(synthetic.ANSWER.format(key="12345")) == 0
    again = pipeline.build_datasets(passkey_data_cfg(), seed=5)[1]
    iterator = pipeline.batch_iterator(again, start_step=3, prefetch=0)
    resumed = next(iterator)
    for key in batch:
        np.testing.assert_array_equal(resumed[key], batch[key])
    assert pipeline.iterator_step(iterator) == 4
    everything = pipeline.build_datasets(passkey_data_cfg(passkey={"text_weight": 1.0}),
                                         seed=5)[1][3]
    assert np.array_equal(everything["loss_mask"], (batch["inputs"] != TOK.eos_id) * 1.0)
    evals = pipeline.eval_batches(val, seq_len=300, batch_size=4, num_batches=2)
    assert not np.array_equal(evals[0]["inputs"], batch["inputs"])  # its own random stream
    assert evals[0]["loss_mask"].sum() > 0


@pytest.mark.parametrize("overrides, match", [
    ({"passkey": {"key_digits": 0}}, r"data\.passkey\.key_digits=0.*\[1, 32\]"),
    ({"passkey": {"min_key_digits": 6}}, r"data\.passkey\.min_key_digits=6.*1 to 5"),
    ({"passkey": {"text_weight": 1.5}}, r"data\.passkey\.text_weight=1\.5.*\[0, 1\]"),
    ({"passkey": {"short_rate": -0.1}}, r"data\.passkey\.short_rate=-0\.1.*\[0, 1\]"),
    ({"seq_len": 150}, r"data\.seq_len=150 is too short for PassKey.*>= 192"),
    ({"fim_rate": 0.5}, r"data\.fim_rate=0\.5.*PassKey"),
])
def test_bad_passkey_data_config_names_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        pipeline.check_data_config(passkey_data_cfg(**overrides))


# --- gigajax eval passkey ----------------------------------------------------------------------

# configs/passkey_tiny.py shrunk to seconds: 1 layer, D=32, 2 steps of 8 windows of 200 tokens
TINY_RUN = [
    "--config.model.d_model=32", "--config.model.n_heads=2", "--config.model.n_kv_heads=2",
    "--config.model.mlp_dim=64", "--config.model.n_layers=1", "--config.data.seq_len=200",
    "--config.model.max_seq_len=256", "--config.data.batch_size=8", "--config.mesh.data=8",
    "--config.train.steps=2", "--config.train.eval_every=2", "--config.train.eval_batches=1",
    "--config.train.checkpoint_every=2", "--config.attention.block_q=64",
    "--config.attention.block_kv=64", "--config.optim.warmup_steps=1",
    "--config.data.passkey.key_digits=5", "--config.data.passkey.min_key_digits=0"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A workdir with checkpoint 2 of a very small PassKey model (2 steps on 8 devices)."""
    from gigajax.config import load_config
    from gigajax.train.loop import train

    workdir = tmp_path_factory.mktemp("passkey_run")
    train(load_config(ROOT / "configs" / "passkey_tiny.py", TINY_RUN), workdir, progress=False)
    return workdir


def test_cli_writes_json_and_heatmap_and_prints_a_table(trained_run, tmp_path, capsys):
    out = tmp_path / "eval"
    code = cli.main(["eval", "passkey", "--checkpoint", str(trained_run), "--lengths", "200,256",
                     "--depths", "0,1", "--samples", "3", "--rope", "none,linear,yarn",
                     "--output", str(out), "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    result = json.loads((out / "passkey.json").read_text())
    assert (out / "passkey.png").read_bytes()[:4] == b"\x89PNG"
    assert result["step"] == 2 and result["seed"] == 0 and result["samples"] == 3
    assert result["lengths"] == [200, 256] and result["depths"] == [0.0, 1.0]
    assert result["trained_context"] == 200 and result["config"]["data"]["source"] == "passkey"
    assert [run["rope"] for run in result["runs"]] == ["none", "linear", "yarn"]
    assert result["runs"][0]["factors"] == [1.0, 1.0]
    assert result["runs"][2]["factors"] == [1.0, 256 / 200]  # auto: length / trained context
    for run in result["runs"]:
        scores = np.asarray(run["scores"])
        assert scores.shape == (2, 2) and np.all((scores >= 0) & (scores <= 1))
        assert run["mean"] == pytest.approx(scores.mean())
        cells = [cell for row in run["answers"] for cell in row]  # [length][depth][sample]
        assert len(cells) == 4 and all(len(c) == 3 for c in cells)
        right = [np.mean([passkey.is_right(a["answer"], a["key"]) for a in c]) for c in cells]
        assert right == pytest.approx(scores.ravel())
    assert "RoPE as trained" in printed and "YaRN, factor length/200" in printed


def test_python_eval_passkey_returns_the_result_and_writes_it_where_asked(trained_run, tmp_path):
    import gigajax
    from gigajax.eval.benchmark import format_table

    result = gigajax.eval_passkey(trained_run, [200], depths=[0.5], rope="none,yarn", samples=2,
                                  output=tmp_path / "eval")
    assert result["lengths"] == [200] and result["depths"] == [0.5] and result["step"] == 2
    assert [run["rope"] for run in result["runs"]] == ["none", "yarn"]
    assert sorted(Path(f).name for f in result["files"]) == ["passkey.json", "passkey.png"]
    assert json.loads((tmp_path / "eval" / "passkey.json").read_text())["runs"][0]["scores"] == \
        result["runs"][0]["scores"]
    assert "RoPE as trained" in format_table(result)


def test_each_length_runs_under_the_factor_it_reports(trained_run, monkeypatch):
    """The model built per length has the RoPE scaling the JSON reports: auto factor = length /
    trained context (>= 1), original context = the trained one."""
    from gigajax.eval import benchmark

    built = []

    def recording(params, cfg):
        built.append(dict(cfg.model.rope_scaling))
        return build_model(params, cfg)

    monkeypatch.setattr(benchmark, "build_model", recording)
    result = benchmark.run_passkey(load_trained(trained_run), [200, 300], [0.5],
                                   [benchmark.Rope("yarn", None)], samples=1)
    assert result["runs"][0]["factors"] == [1.0, 1.5]
    assert [(b["type"], b["factor"], b["original_max_seq_len"]) for b in built] == [
        ("yarn", 1.0, 200), ("yarn", 1.5, 200)]


def test_a_run_with_its_own_checkpoint_resumes_and_ignores_init_from(trained_run, tmp_path):
    """train.init_from only starts a run: here it names nothing, and the finished run resumes
    from its own step 2 without reading it."""
    import shutil

    from gigajax.config import load_config
    from gigajax.train.loop import train

    workdir = tmp_path / "run"
    shutil.copytree(trained_run, workdir)
    cfg = load_config(ROOT / "configs" / "passkey_tiny.py",
                      [*TINY_RUN, f"--config.train.init_from={tmp_path / 'nope'}"])
    assert train(cfg, workdir, progress=False).summary["step"] == 2


def test_the_model_is_the_checkpoint_whichever_directory_names_it(trained_run, tmp_path):
    from gigajax.checkpoint.params import export

    export(trained_run, tmp_path / "params")
    loaded = [load_trained(path) for path in (
        trained_run, trained_run / "checkpoints", trained_run / "checkpoints" / "2",
        tmp_path / "params")]
    for other in loaded[1:]:
        assert other.step == 2 and other.config.to_dict() == loaded[0].config.to_dict()
        for a, b in zip(jax.tree.leaves(loaded[0].params), jax.tree.leaves(other.params),
                        strict=True):
            np.testing.assert_array_equal(a, b)
    yarn = load_trained(trained_run, ["--config.model.rope_scaling.type=yarn",
                                      "--config.model.rope_scaling.factor=2"])
    model = build_model(yarn.params, yarn.config)
    assert model.cfg.rope.type == "yarn" and model.cfg.rope.factor == 2.0
    np.testing.assert_array_equal(model.embed[...], loaded[0].params["embed"])


@pytest.mark.parametrize("change, message", [
    ({"--checkpoint": "{tmp}/nope"}, "does not exist"),
    ({"--checkpoint": "{tmp}"}, "is not a training workdir"),
    ({"--depths": "0,1.5"}, "--depths '0,1.5'"),
    ({"--lengths": "100"}, "--lengths 100 is shorter than the PassKey prompt"),
    ({"--lengths": "2q"}, "'2q' is not a token count"),
    ({"--rope": "ntk"}, "'ntk' is not a RoPE scaling"),
    ({"--rope-factor": "0.5"}, "--rope-factor '0.5'"),
    ({"--rope-factor": "inf"}, "--rope-factor 'inf'"),
    ({"--rope-factor": "2"}, "--rope-factor 2 scales nothing"),
    ({"--lengths": "256,inf"}, "'inf' is not a token count"),
    ({"--step": "7"}, "no checkpoint of step 7"),
    ({"--config.model.d_model=64": None}, "do not fit the model"),
    ({"--config.model.rope_scaling.type=pi": None}, "model.rope_scaling.type='pi'"),
])
def test_bad_input_exits_2_with_a_message(trained_run, tmp_path, capsys, change, message):
    flags = {"--checkpoint": str(trained_run), "--lengths": "256", "--output": str(tmp_path),
             **change}
    argv = ["eval", "passkey", "--no-progress"]
    for flag, value in flags.items():
        argv += [flag] if value is None else [flag, value.format(tmp=tmp_path)]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_extension_script_fine_tunes_from_the_base_and_draws_every_panel(trained_run, tmp_path):
    """experiments/passkey_extension.py on the 2-step run: the base is reused (not retrained),
    each method fine-tunes from its last checkpoint at twice its length, and the JSON and PNG
    hold the zero-shot and fine-tuned panels."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "passkey_extension", ROOT / "experiments" / "passkey_extension.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path / "ext"
    argv = ["--base", str(trained_run), "--out", str(out), "--lengths", "200,400",
            "--depths", "0,1", "--samples", "2", "--finetune-steps", "1",
            "--finetune-batch", "8", *(f"--set={o}" for o in TINY_RUN)]
    assert script.main(argv) == 0
    result = json.loads((out / "passkey_extension.json").read_text())
    assert (out / "passkey_extension.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["rope"] for r in result["runs"]] == ["none", "linear", "yarn", "linear", "yarn"]
    assert [r["step"] for r in result["runs"]] == [2, 2, 2, 1, 1]
    assert result["runs"][1]["factors"] == [1.0, 2.0]  # zero-shot: length / trained context
    assert result["runs"][3]["factors"] == [2.0, 2.0]  # fine-tuned: its own factor
    assert "fine-tuned 1 steps at 400" in result["runs"][4]["title"]
    tuned = load_trained(out / "runs" / "yarn_x2")
    assert tuned.config.data.seq_len == 400 and tuned.config.model.rope_scaling.factor == 2
    assert str(trained_run) in tuned.config.train.init_from


@pytest.mark.slow(seconds=540)
def test_passkey_tiny_learns_the_task_at_its_training_length(tmp_path):
    """configs/passkey_tiny.py, trained as configured by `gigajax train` (2 simulated devices,
    1,600 steps: about 8 minutes on 2 idle CPU cores), retrieves the 5-digit key in >= 90% of 50
    prompts (5 depths x 10) at its training length."""
    from gigajax.config import load_config

    seq_len = load_config(ROOT / "configs" / "passkey_tiny.py").data.seq_len
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # the CLI picks 2 devices
    gigajax = [sys.executable, "-m", "gigajax.cli"]
    train = subprocess.run([*gigajax, "train", "--config", "configs/passkey_tiny.py",
                            "--workdir", str(tmp_path), "--no-progress"],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=2400)
    assert train.returncode == 0, train.stderr
    evaluate = subprocess.run([*gigajax, "eval", "passkey", "--checkpoint", str(tmp_path),
                               "--lengths", str(seq_len), "--samples", "10", "--no-progress"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert evaluate.returncode == 0, evaluate.stderr
    result = json.loads((tmp_path / "eval" / "passkey.json").read_text())
    assert result["lengths"] == [seq_len] and len(result["depths"]) == 5
    assert result["runs"][0]["mean"] >= 0.9, evaluate.stdout
