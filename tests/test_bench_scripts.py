"""experiments/bench_attention.py and bench_train.py at the tiniest settings: every row written to
JSON and CSV, its times, speed-ups, TFLOP/s and MFU the ones its own measurements give, a wrong
kernel reported with a large error and a slow one with a speed-up below 1, the kernels agreeing
with the reference, and the HF comparison either run on the same model shape or skipped with
its reason."""

import csv
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_script(name: str):
    """An experiments/ script as a module (experiments/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_attention_rows_times_and_flops(tmp_path):
    bench = load_script("bench_attention")
    out = tmp_path / "attention.json"
    assert bench.main(["--seq-lens", "64,128", "--heads", "2", "--kv-heads", "1",
                       "--head-dim", "16", "--block-q", "32", "--block-kv", "32",
                       "--warmup", "1", "--repeats", "2", "--output", str(out)]) == 0
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [(int(r["seq_len"]), r["impl"]) for r in rows] == [
        (t, i) for t in (64, 128) for i in ("reference", "blockwise", "xla", "cudnn", "ring")]
    reference = {int(r["seq_len"]): r for r in rows if r["impl"] == "reference"}
    for r in rows:
        if r["impl"] == "cudnn":  # CPU tests: the row says why instead of failing
            assert r["status"] == "unavailable on cpu" and not r["median_ms"]
            continue
        assert r["status"] == "ok"
        median, base = float(r["median_ms"]), float(reference[int(r["seq_len"])]["median_ms"])
        assert 0 < float(r["min_ms"]) <= median
        # TFLOP/s and the speed-up are the formula's FLOPs and the reference's time over this
        # row's median (GFLOP / ms = TFLOP/s), at the row's own length
        assert float(r["tflops"]) == pytest.approx(float(r["formula_gflop"]) / median)
        assert float(r["speedup_vs_reference"]) == pytest.approx(base / median)
        assert float(r["out_rel_err"]) < 1e-5 and float(r["dq_rel_err"]) < 1e-5  # fp32
    for r in rows:
        if r["impl"] == "reference":  # XLA counts the full square: twice the causal formula
            assert 1.9 < float(r["xla_over_formula"]) < 2.6
    B, T, H, E = 1, 128, 2, 16  # forward 4 B H T^2 E / 2 (causal), fwd+bwd 3x that
    assert bench.causal_attention_flops(B, T, H, E) == (2 * B * H * T * T * E,
                                                        6 * B * H * T * T * E)
    assert float(reference[128]["formula_gflop"]) == pytest.approx(6 * B * H * T * T * E / 1e9)
    meta = json.loads(out.read_text())
    assert meta["dtype"] == "float32" and len(meta["rows"]) == 10


def slowed(attend, seconds: float):
    """`attend` after a host callback that sleeps `seconds` on every call (forward; the
    backward passes the cotangent through): the same result, later."""
    import time

    import jax

    def pause(x):
        return jax.pure_callback(lambda a: (time.sleep(seconds), a)[1],
                                 jax.ShapeDtypeStruct(x.shape, x.dtype), x)

    @jax.custom_vjp
    def delayed(x):
        return pause(x)

    delayed.defvjp(lambda x: (pause(x), None), lambda _, g: (g,))
    return lambda q, k, v: attend(delayed(q), k, v)


def test_bench_attention_reports_a_wrong_kernel_and_a_slow_one(tmp_path, monkeypatch):
    """Measured, not assumed: `blockwise` replaced by a kernel that ignores the causal mask is
    reported with a large error against the reference, and `xla` slowed by 40 ms a call with
    at least that median and a speed-up over the reference below 1."""
    bench = load_script("bench_attention")
    real = bench.attention_fn

    def broken(impl, block_q, block_kv):
        if impl == "blockwise":
            return lambda q, k, v: bench.blockwise_attention(
                q, k, v, causal=False, block_q=block_q, block_kv=block_kv)[0]
        if impl == "xla":
            return slowed(real(impl, block_q, block_kv), 0.04)
        return real(impl, block_q, block_kv)

    monkeypatch.setattr(bench, "attention_fn", broken)
    out = tmp_path / "attention.json"
    assert bench.main(["--seq-lens", "64", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
                       "--block-q", "32", "--block-kv", "32", "--impls", "reference,blockwise,xla",
                       "--warmup", "1", "--repeats", "2", "--output", str(out)]) == 0
    rows = {r["impl"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows["blockwise"]["out_rel_err"] > 0.1 and rows["blockwise"]["dq_rel_err"] > 0.1
    assert rows["xla"]["out_rel_err"] < 1e-5  # slower, still right
    assert rows["xla"]["min_ms"] >= 40
    assert rows["xla"]["speedup_vs_reference"] == pytest.approx(
        rows["reference"]["median_ms"] / rows["xla"]["median_ms"])
    assert rows["xla"]["speedup_vs_reference"] < 1


def test_bench_train_tokens_per_s_and_hf_row_or_reason(tmp_path):
    import statistics
    import time

    from gigajax.config import ModelConfig, load_config
    from gigajax.model.inventory import param_count
    from gigajax.train.flops import flops_per_token

    bench = load_script("bench_train")
    out = tmp_path / "train.json"
    model_flags = ["--config.model.d_model=64", "--config.model.mlp_dim=128",
                   "--config.model.n_layers=2", "--config.data.seq_len=64",
                   "--config.data.batch_size=4", "--config.attention.block_q=32",
                   "--config.attention.block_kv=32"]
    start = time.perf_counter()
    assert bench.main(["--config", "configs/tiny.py", "--steps", "2", "--warmup", "1",
                       "--rounds", "2", "--output", str(out), *model_flags,
                       "--config.train.peak_flops_per_device=1e11"]) == 0
    wall = time.perf_counter() - start
    result = json.loads(out.read_text())
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert len(rows) == len(result["rows"]) and rows[0]["framework"].startswith("gigajax")
    model = ModelConfig.from_config(load_config(ROOT / "configs" / "tiny.py", model_flags))
    assert int(rows[0]["params"]) == param_count(model) and int(rows[0]["devices"]) == 1
    tokens = 2 * 4 * 64  # steps x batch x seq_len per round
    assert len(result["round_seconds"]) == len(rows)
    for r, seconds in zip(rows, result["round_seconds"], strict=True):
        # the rates are those of the rounds it timed, which happened within this call
        assert len(seconds) == 2 and all(s > 0 for s in seconds) and sum(seconds) < wall
        median = statistics.median(seconds)
        assert float(r["tokens_per_s"]) == pytest.approx(tokens / median)
        assert float(r["tokens_per_s_min"]) == pytest.approx(tokens / max(seconds))
        assert float(r["tokens_per_s_max"]) == pytest.approx(tokens / min(seconds))
        assert float(r["step_ms"]) == pytest.approx(median / 2 * 1e3)
        tflops = tokens / median * flops_per_token(model, 64) / 1e12
        assert float(r["model_tflops"]) == pytest.approx(tflops)
        assert float(r["mfu"]) == pytest.approx(tflops * 1e12 / 1e11)  # one device of 1e11
        assert 0 < float(r["mfu"]) < 1
    if result["hf_skipped"]:
        assert len(rows) == 1 and "torch" in result["hf_skipped"]
    else:
        assert len(rows) == 2 and rows[1]["params"] == rows[0]["params"]
        assert result["gigajax_over_hf_tokens_per_s"] == pytest.approx(statistics.median(
            h / g for g, h in zip(*result["round_seconds"], strict=True)))


def test_bench_attention_rejects_unknown_impl():
    bench = load_script("bench_attention")
    with pytest.raises(SystemExit):
        bench.parse_args(["--impls", "reference,flash3"])


def test_hf_parity_table_rows_and_worst_difference(tmp_path):
    parity = load_script("hf_parity")
    out = tmp_path / "parity.json"
    assert parity.main(["--fixtures", "qwen3_moe,llama_yarn", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["fixture"] for r in result["rows"]] == ["qwen3_moe", "llama_yarn"]
    moe, dense = result["rows"]
    assert all(moe[layout] is not None for layout in parity.LAYOUTS)
    assert [dense[layout] for layout in parity.EXPERT_LAYOUTS] == [None, None]
    differences = [r[k] for r in result["rows"] for k in parity.LAYOUTS if r[k] is not None]
    assert result["worst"] == max(differences) <= 1e-4
    assert len(list(csv.DictReader(open(out.with_suffix(".csv"))))) == 2


def test_import_timing_rows_sizes_and_round_trip(tmp_path):
    """A tiny random HF checkpoint in shards: streamed into fsdp=8 reading each byte once,
    converted, exported back bitwise; each row's ratio is its own transient over the shard."""
    timing = load_script("import_timing")
    out = tmp_path / "import.json"
    argv = ["--workdir", str(tmp_path / "work"), "--output", str(out), "--hidden", "64",
            "--layers", "2", "--heads", "4", "--kv-heads", "2", "--intermediate", "128",
            "--vocab", "512", "--shard-size", "100KB", "--dtypes", "bfloat16",
            "--meshes", "fsdp=8"]
    assert timing.main(argv) == 0
    result = json.loads(out.read_text())
    rows = {(r["job"], r["mesh"]): r for r in result["rows"]}
    assert list(rows) == [("stream", "fsdp=8"), ("convert", ""), ("to_hf", "")]
    assert len(result["checkpoint"]["files"]) > 1
    tensor_mb = result["checkpoint"]["tensor_bytes"] / 2**20
    for r in rows.values():
        assert r["peak_mb"] >= r["baseline_mb"] > 0 and r["seconds"] > 0
        assert r["transient_over_largest_shard"] == pytest.approx(
            r["transient_mb"] / r["largest_shard_mb"])
    stream = rows[("stream", "fsdp=8")]
    assert stream["check"].startswith("ok") and stream["result_mb"] >= 2 * tensor_mb
    assert stream["bytes_read_mb"] == pytest.approx(tensor_mb)  # each byte read once
    assert rows[("to_hf", "")]["check"].startswith("ok")  # bitwise round trip
    assert len(list(csv.DictReader(open(out.with_suffix(".csv"))))) == 3


GENERATE_MODEL = ["--config.model.d_model=32", "--config.model.mlp_dim=64",
                  "--config.model.n_layers=2", "--config.model.n_heads=2",
                  "--config.model.n_kv_heads=1", "--config.model.max_seq_len=64",
                  "--config.data.seq_len=64"]


def test_bench_generate_rates_are_its_rounds_and_ids_are_greedy_decoding(tmp_path):
    """Prefill and decode tokens/s are the batch's tokens over the median of the rounds it
    timed, within this call; the greedy ids it timed are `generate_batch`'s; the transformers
    rows either ran on the same ids or the reason they did not is given."""
    import statistics
    import time

    import jax
    from flax import nnx

    from gigajax.config import ModelConfig, load_config
    from gigajax.infer.generate import generate_batch
    from gigajax.model import Decoder

    bench = load_script("bench_generate")
    out = tmp_path / "generate.json"
    start = time.perf_counter()
    assert bench.main(["--batch-sizes", "1,2", "--prompt-len", "16", "--new-tokens", "8",
                       "--strategies", "greedy,beam", "--num-beams", "2", "--repeats", "2",
                       "--output", str(out), *GENERATE_MODEL]) == 0
    wall = time.perf_counter() - start
    result = json.loads(out.read_text())
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert len(rows) == len(result["rows"])
    ours = [r for r in result["rows"] if r["framework"] == "gigajax"]
    assert [(r["strategy"], r["batch"]) for r in ours] == [
        ("greedy", 1), ("beam", 1), ("greedy", 2), ("beam", 2)]
    for r in ours:
        times = result["round_seconds"][f"gigajax {r['strategy']} {r['batch']}"]
        assert len(times) == 2 and all(p > 0 and d > 0 for p, d in times)
        assert sum(p + d for p, d in times) < wall
        prefill, decode = (statistics.median(t[i] for t in times) for i in (0, 1))
        assert r["prefill_tokens_per_s"] == pytest.approx(r["batch"] * 16 / prefill)
        assert r["decode_tokens_per_s"] == pytest.approx(r["batch"] * 8 / decode)
        assert r["decode_ms_per_step"] == pytest.approx(decode / 8 * 1e3)
        assert r["compile_s"] > 0
    model_cfg = ModelConfig.from_config(load_config(ROOT / "configs" / "tiny.py",
                                                    GENERATE_MODEL))
    model = Decoder(model_cfg, rngs=nnx.Rngs(0))
    assert ours[0]["params"] == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    for b in (1, 2):
        prompts = bench.random_prompts(b, 16, model_cfg.vocab_size, result["prompts_seed"])
        assert result["greedy_tokens"][str(b)] == generate_batch(model, prompts, 8).tolist()
    if result["hf_skipped"]:
        assert len(rows) == 4 and "torch" in result["hf_skipped"]
    else:  # one transformers row per batch, after gigajax's; the ratios are of the rows
        hf = {r["batch"]: r for r in result["rows"] if r["framework"] == "transformers"}
        assert sorted(hf) == [1, 2] and hf[1]["params"] == ours[0]["params"]
        for r in ours:
            assert r["decode_vs_hf"] == pytest.approx(
                r["decode_tokens_per_s"] / hf[r["batch"]]["decode_tokens_per_s"])
            if r["strategy"] == "greedy":
                assert r["same_ids_as_hf"] == "yes"


def test_bench_generate_refuses_more_threads_than_cpus(tmp_path, capsys):
    import os

    bench = load_script("bench_generate")
    too_many = len(os.sched_getaffinity(0)) + 1
    assert bench.main(["--threads", str(too_many), "--output", str(tmp_path / "g.json")]) == 2
    assert f"--threads {too_many}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.parse_args(["--strategies", "greedy,nucleus"])


def test_sft_synthetic_trains_on_chat_data_and_scores_the_replies_it_generated(tmp_path):
    """experiments/sft_synthetic.py at 2 steps: the chats go through the tokenizer's chat
    template, the run logs training and held-out losses, and the exact-match rate is that of
    the greedy replies it reports (held-out conversations, another seed)."""
    from gigajax.data import store

    sft = load_script("sft_synthetic")
    chats = sft.upper_case_chats(3, seed=0)
    assert all(c["messages"][1]["content"] == c["messages"][0]["content"].split()[1].upper()
               for c in chats)
    rows, exact = sft.run(tmp_path, steps=2, chats=6000, held_out=3)
    assert [r["step"] for r in rows] == [1, 2] and all("eval_loss" in r for r in rows)
    manifest = store.read_manifest(tmp_path / "data")
    assert manifest["options"]["chat"] and manifest["has_loss_mask"]
    held_out = sft.upper_case_chats(3, seed=1)
    assert [e["prompt"] for e in exact["examples"]] == [
        c["messages"][0]["content"] for c in held_out]
    assert exact["exact_match"] == pytest.approx(
        sum(e["reply"] == e["wanted"] for e in exact["examples"]) / 3)


def test_bench_moe_rows_are_its_measurements(tmp_path, monkeypatch):
    """experiments/bench_moe.py on the shrunk tiny_moe, two variants: each row's tokens/s is
    its step time's, the ratios are against the first row, and EP=8 holds less state."""
    bench = load_script("bench_moe")
    shrunk = ["--config.model.n_layers=2", "--config.data.seq_len=64",
              "--config.data.batch_size=8", "--config.data.max_bytes=200000"]
    monkeypatch.setattr("sys.argv", ["bench_moe.py", "--out", str(tmp_path), "--steps", "1",
                                     "--rounds", "1", "--warmup", "0", "--variants",
                                     "ragged, data=8 (EP=1);ragged, expert=8", *shrunk])
    bench.main()
    rows = json.loads((tmp_path / "bench_moe.json").read_text())
    assert [r["variant"] for r in rows] == ["ragged, data=8 (EP=1)", "ragged, expert=8"]
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(8 * 64 / (row["step_ms"] / 1000))
        assert row["step_ratio"] == pytest.approx(row["step_ms"] / rows[0]["step_ms"])
        assert row["devices"] == 8 and row["loss_end"] > 0
    assert rows[1]["arguments_mib"] < rows[0]["arguments_mib"]  # experts split 8 ways
    with open(tmp_path / "bench_moe.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_moe_layouts_flags_and_curve_comparison():
    """experiments/moe_layouts.py: a layout's mesh flags (other axes 1) and the largest
    relative loss difference at equal steps."""
    script = load_script("moe_layouts")
    assert script.mesh_flags("expert=4,data=2") == [
        "--config.mesh.data=2", "--config.mesh.fsdp=1", "--config.mesh.expert=4",
        "--config.mesh.sequence=1", "--config.mesh.tensor=1"]
    reference = [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.0, "eval_loss": 4.0}]
    rows = [{"step": 1, "loss": 2.2}, {"step": 2, "loss": 1.0, "eval_loss": 3.0}]
    assert script.compare(reference, rows) == pytest.approx(
        {"loss_rel_diff": 0.1, "eval_loss_rel_diff": 0.25})
