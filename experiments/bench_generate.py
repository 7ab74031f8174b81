"""Decoding throughput (tokens/s) of `infer.loop`, prefill and decode timed apart, for each batch
size and strategy, beside `transformers.generate` (greedy, KV cache) on the same CPU where torch
and transformers are installed.

gigajax: a Decoder of the config (random weights, seed `--seed`) on one device; `--batch-sizes`
rows of `--prompt-len` random tokens (no padding), no stop token, so every row runs
`--new-tokens` steps. `loop.start` (the chunked prefill into a cache of prompt + new slots) and
`loop.run` (the while_loop over the new tokens) are compiled ahead of time for each (strategy,
batch), compile time reported apart, and run `--warmup` times untimed. Each of `--repeats`
rounds then times one `start` and one `run`, each ended by `block_until_ready`:
  prefill tokens/s = batch x prompt_len / start's seconds
  decode tokens/s  = batch x steps / run's seconds (one model call per step; beam search and
                     contrastive search run num_beams or top_k cache rows per prompt row)

Hugging Face: the same weights written as an HF directory by `checkpoint.convert.to_hf` (fp32),
loaded with `AutoModelForCausalLM` (SDPA attention, eager PyTorch, `torch.no_grad`), the same
prompts, greedy `generate(use_cache=True)` with no end-of-sequence token. Its prefill is
`generate(max_new_tokens=1)` (one forward of the prompt plus generate's set-up), its decode
`generate(max_new_tokens=N)` minus that, over N - 1 decode forwards:
  prefill tokens/s = batch x prompt_len / t(1)
  decode tokens/s  = batch x (N - 1) / (t(N) - t(1))
The table's ratios are gigajax's median tokens/s over HF's, and "same ids" says whether
gigajax's greedy tokens equal transformers' (else where the first one differs).

Rounds take turns (gigajax's rows, then HF's, per batch size), so a change of load on a shared
machine hits both. Threads: `--threads N` pins the process to N CPUs before JAX starts its
backend (XLA's CPU thread pool is sized by the CPUs the process may run on) and gives torch the
same N (`torch.set_num_threads`); without it both use every CPU the process may run on.

    python experiments/bench_generate.py --config configs/tiny.py --batch-sizes 1,16 \
        --prompt-len 128 --new-tokens 64 --output runs/bench_generate.json   # also the .csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from rich.table import Table

from gigajax.checkpoint import convert
from gigajax.checkpoint.params import FORMAT, save_params
from gigajax.config import ModelConfig, load_config
from gigajax.errors import GigajaxError
from gigajax.infer import loop
from gigajax.infer.generate import STRATEGIES, GenerateOptions
from gigajax.model import Decoder
from gigajax.train.logger import log_console
from gigajax.train.preflight import preflight

FIELDS = ("framework", "strategy", "batch", "prompt_len", "new_tokens", "prefill_ms",
          "prefill_tokens_per_s", "decode_ms", "decode_ms_per_step", "decode_tokens_per_s",
          "prefill_vs_hf", "decode_vs_hf", "same_ids_as_hf", "compile_s", "params")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (else the platform's processor string)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pin_threads(threads: int) -> int:
    """Restrict this process to `threads` of its CPUs (0: leave it); the count now allowed."""
    allowed = sorted(os.sched_getaffinity(0))
    if threads:
        if threads > len(allowed):
            raise GigajaxError(f"--threads {threads}: this process may run on {len(allowed)} "
                               f"CPUs; give 1 to {len(allowed)}, or 0 for all.")
        os.sched_setaffinity(0, allowed[:threads])
    return len(os.sched_getaffinity(0))


def random_prompts(batch: int, length: int, vocab: int, seed: int) -> np.ndarray:
    """[batch, length] random token ids (batch size 1 takes the first row of batch 16's)."""
    return np.random.default_rng(seed).integers(0, vocab, (max(batch, 16), length),
                                                dtype=np.int32)[:batch]


def strategy_options(name: str, args: argparse.Namespace) -> GenerateOptions:
    return GenerateOptions(strategy=name, max_new_tokens=args.new_tokens,
                           num_beams=args.num_beams, top_k=args.top_k,
                           prefill_chunk=args.prefill_chunk, seed=args.seed)


class GigajaxCase:
    """One (strategy, batch) compiled and warmed up: `time()` runs a timed prefill then a timed
    decode and returns (prefill s, decode s); `tokens` the last run's ids [B, N]."""

    def __init__(self, model: Decoder, prompts_BT: np.ndarray, options: GenerateOptions,
                 warmup: int):
        self.graphdef, self.params = nnx.split(model)
        self.strategy = options.strategy_object()
        B = prompts_BT.shape[0]
        self.prompts_BT = jnp.asarray(prompts_BT)
        self.ctx = {"stop_ids": jnp.full((4,), -1, jnp.int32), "start": jnp.zeros(B, jnp.int32),
                    "key": jax.random.key(options.seed)}
        self.stop_at = jnp.int32(options.max_new_tokens)
        begin = time.perf_counter()
        self.start = loop.start.lower(
            self.params, self.prompts_BT, self.ctx, graphdef=self.graphdef,
            strategy=self.strategy, max_new=options.max_new_tokens,
            chunk=options.prefill_chunk).compile()
        state = self.start(self.params, self.prompts_BT, self.ctx)
        self.run = loop.run.lower(self.params, state, self.ctx, self.stop_at,
                                  graphdef=self.graphdef, strategy=self.strategy).compile()
        self.compile_s = time.perf_counter() - begin
        self.steps, self.tokens = 0, None
        for _ in range(warmup):
            self.time()

    def time(self) -> tuple[float, float]:
        begin = time.perf_counter()
        state = jax.block_until_ready(self.start(self.params, self.prompts_BT, self.ctx))
        prefill_s = time.perf_counter() - begin
        begin = time.perf_counter()
        state = jax.block_until_ready(self.run(self.params, state, self.ctx, self.stop_at))
        decode_s = time.perf_counter() - begin
        self.steps = int(state["n"])
        self.tokens = np.asarray(self.strategy.result(state)[0])
        return prefill_s, decode_s


def hf_skip_reason() -> str | None:
    """Why the transformers comparison cannot run here, or None when it can."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        return (f"torch/transformers are not importable ({error}); run with an environment "
                "that has them (the [hf] extra) to compare")
    if jax.default_backend() != "cpu":
        return f"JAX runs on {jax.default_backend()}; this comparison is CPU with CPU"
    return None


def write_hf(model: Decoder, cfg: ml_collections.ConfigDict, directory: Path) -> Path:
    """The model's params as an HF model directory (fp32), by way of a params checkpoint."""
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    meta = {"format": FORMAT, "config": cfg.to_dict(), "source_steps": [],
            "made_by": "experiments/bench_generate.py", "dtype": "float32",
            "num_params": sum(x.size for x in jax.tree.leaves(params))}
    save_params(directory / "params", params, meta)
    convert.to_hf(directory / "params", directory / "hf", dtype="float32",
                  log=lambda _: None)
    return directory / "hf"


class HFCase:
    """transformers' greedy generate for one batch: `time()` returns (t(1), t(N)) seconds."""

    def __init__(self, model, prompts_BT: np.ndarray, new_tokens: int, warmup: int):
        import torch

        self.torch, self.model, self.new_tokens = torch, model, new_tokens
        self.ids = torch.from_numpy(prompts_BT.astype(np.int64))
        self.mask = torch.ones_like(self.ids)
        self.tokens = None
        for _ in range(warmup):
            self.time()

    def generate(self, new_tokens: int):
        with self.torch.no_grad():
            return self.model.generate(input_ids=self.ids, attention_mask=self.mask,
                                       max_new_tokens=new_tokens, min_new_tokens=0,
                                       do_sample=False, num_beams=1, use_cache=True,
                                       eos_token_id=None, pad_token_id=0)

    def time(self) -> tuple[float, float]:
        begin = time.perf_counter()
        self.generate(1)
        first_s = time.perf_counter() - begin
        begin = time.perf_counter()
        out = self.generate(self.new_tokens)
        all_s = time.perf_counter() - begin
        self.tokens = out[:, self.ids.shape[1]:].numpy()
        assert self.tokens.shape[1] == self.new_tokens, self.tokens.shape  # no early stop
        return first_s, all_s


def load_hf(hf_dir: Path, threads: int):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = None  # every row runs all new tokens, as ours
    return model


def same_ids(ours: np.ndarray, theirs: np.ndarray) -> str:
    """'yes', or where the first token differs."""
    if np.array_equal(ours, theirs):
        return "yes"
    rows, cols = np.nonzero(ours != theirs)
    first = int(np.argmin(cols))
    return (f"no: row {rows[first]} token {cols[first]} first; "
            f"{np.mean(ours == theirs):.0%} equal")


def row_of(framework: str, strategy: str, batch: int, args: argparse.Namespace,
           prefill_s: list[float], decode_s: list[float], decode_tokens: int, steps: int,
           compile_s: float | None, params: int) -> dict:
    """A table row from the medians of the timed rounds."""
    p, d = statistics.median(prefill_s), statistics.median(decode_s)
    return {"framework": framework, "strategy": strategy, "batch": batch,
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
            "prefill_ms": p * 1e3, "prefill_tokens_per_s": batch * args.prompt_len / p,
            "decode_ms": d * 1e3, "decode_ms_per_step": d / steps * 1e3,
            "decode_tokens_per_s": decode_tokens / d, "prefill_vs_hf": None,
            "decode_vs_hf": None, "same_ids_as_hf": None, "compile_s": compile_s,
            "params": params}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("framework", "strategy", "batch", "prefill ms", "prefill tok/s", "decode ms",
                "ms/step", "decode tok/s", "prefill vs HF", "decode vs HF", "same ids as HF",
                "compile s"):
        table.add_column(col, justify="left" if col in ("framework", "strategy",
                                                        "same ids as HF") else "right")
    for r in rows:
        table.add_row(r["framework"], r["strategy"], str(r["batch"]), f"{r['prefill_ms']:.1f}",
                      f"{r['prefill_tokens_per_s']:,.0f}", f"{r['decode_ms']:.1f}",
                      f"{r['decode_ms_per_step']:.2f}", f"{r['decode_tokens_per_s']:,.0f}",
                      fmt(r["prefill_vs_hf"], ".2f"), fmt(r["decode_vs_hf"], ".2f"),
                      r["same_ids_as_hf"] or "-", fmt(r["compile_s"], ".1f"))
    log_console().print(table)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/tiny.py")
    p.add_argument("--batch-sizes", default="1,16", help="comma-separated")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--strategies", default="greedy",
                   help=f"comma-separated, of {','.join(STRATEGIES)}")
    p.add_argument("--num-beams", type=int, default=4, help="beam")
    p.add_argument("--top-k", type=int, default=4, help="contrastive")
    p.add_argument("--prefill-chunk", type=int, default=512)
    p.add_argument("--warmup", type=int, default=1, help="untimed runs after compiling")
    p.add_argument("--repeats", type=int, default=3, help="timed rounds; the median is shown")
    p.add_argument("--threads", type=int, default=0,
                   help="CPUs for JAX and torch alike (0: every CPU this process may use)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf", choices=("auto", "off"), default="auto",
                   help="auto: compare with transformers.generate where torch is installed")
    p.add_argument("--output", default="runs/bench_generate.json",
                   help="JSON path; the CSV goes beside it with suffix .csv")
    args, overrides = p.parse_known_args(argv)
    strategies = args.strategies.split(",")
    if unknown := [s for s in strategies if s not in STRATEGIES]:
        p.error(f"--strategies: unknown {unknown}; choose from {','.join(STRATEGIES)}")
    args.strategies = strategies
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        p.error(f"--batch-sizes {args.batch_sizes!r}: give integers such as 1,16")
    if min(args.batch_sizes) < 1 or args.prompt_len < 1 or args.new_tokens < 2:
        p.error("--batch-sizes and --prompt-len must be >= 1, --new-tokens >= 2")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    console = log_console()
    try:  # a bad config or flag: its message, no traceback (as the CLI does)
        threads = pin_threads(args.threads)
        cfg = load_config(args.config, overrides)
        cfg.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)
        preflight(cfg)
        model_cfg = ModelConfig.from_config(cfg)
        if args.prompt_len + args.new_tokens > model_cfg.max_seq_len:
            raise GigajaxError(f"--prompt-len + --new-tokens = "
                               f"{args.prompt_len + args.new_tokens} exceeds model.max_seq_len "
                               f"{model_cfg.max_seq_len}; raise --config.model.max_seq_len.")
        options = {s: strategy_options(s, args) for s in args.strategies}
    except GigajaxError as error:
        console.print(f"error: {error}")
        return 2
    with jax.default_device(jax.devices()[0]):
        model = Decoder(model_cfg, rngs=nnx.Rngs(args.seed))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    prompts = {b: random_prompts(b, args.prompt_len, model_cfg.vocab_size, args.seed + 1)
               for b in args.batch_sizes}
    ours: dict[tuple[str, int], GigajaxCase] = {}
    for s in args.strategies:
        for b in args.batch_sizes:
            with console.status(f"gigajax: compiling {s}, batch {b}"):
                ours[s, b] = GigajaxCase(model, prompts[b], options[s], args.warmup)
    skipped = "--hf off" if args.hf == "off" else hf_skip_reason()
    theirs: dict[int, HFCase] = {}
    hf_info: dict = {}
    if skipped is None:
        import torch
        import transformers

        with console.status("transformers: writing and loading the HF directory"), \
                tempfile.TemporaryDirectory() as tmp:
            hf_model = load_hf(write_hf(model, cfg, Path(tmp)), threads)
        hf_info = {"transformers": transformers.__version__, "torch": torch.__version__,
                   "torch_threads": torch.get_num_threads(),
                   "params": sum(p.numel() for p in hf_model.parameters())}
        for b in args.batch_sizes:
            with console.status(f"transformers: warm-up, batch {b}"):
                theirs[b] = HFCase(hf_model, prompts[b], args.new_tokens, args.warmup)
    seconds: dict[str, list[tuple[float, float]]] = {}
    for i in range(args.repeats):  # taking turns: a load change on the machine hits both
        with console.status(f"round {i + 1} of {args.repeats}"):
            for b in args.batch_sizes:
                for s in args.strategies:
                    seconds.setdefault(f"gigajax {s} {b}", []).append(ours[s, b].time())
                if b in theirs:
                    seconds.setdefault(f"hf greedy {b}", []).append(theirs[b].time())
    rows = []
    for b in args.batch_sizes:
        for s in args.strategies:
            case, times = ours[s, b], seconds[f"gigajax {s} {b}"]
            rows.append(row_of("gigajax", s, b, args,
                               [t[0] for t in times], [t[1] for t in times], b * case.steps,
                               case.steps, case.compile_s, n_params))
        if b not in theirs:
            continue
        times = seconds[f"hf greedy {b}"]
        hf_row = row_of("transformers", "greedy", b, args,
                        [t[0] for t in times], [t[1] - t[0] for t in times],
                        b * (args.new_tokens - 1), args.new_tokens - 1, None,
                        hf_info["params"])
        for r in rows:
            if r["batch"] == b and r["framework"].startswith("gigajax"):
                r["prefill_vs_hf"] = r["prefill_tokens_per_s"] / hf_row["prefill_tokens_per_s"]
                r["decode_vs_hf"] = r["decode_tokens_per_s"] / hf_row["decode_tokens_per_s"]
                if r["strategy"] == "greedy":
                    r["same_ids_as_hf"] = same_ids(ours["greedy", b].tokens, theirs[b].tokens)
        rows.append(hf_row)
    device = jax.devices()[0]
    print_table(rows, f"{args.config}: {n_params:,} params, prompt {args.prompt_len} + "
                      f"{args.new_tokens} new tokens, median of {args.repeats} rounds after "
                      f"{args.warmup} warm-up, {cpu_model()} ({jax.default_backend()}), "
                      f"{threads} threads, jax {jax.__version__}"
                      + (f", transformers {hf_info['transformers']}, torch {hf_info['torch']}"
                         if hf_info else ""))
    if skipped:
        console.print(f"transformers comparison skipped: {skipped}", markup=False)
    result = {"config": args.config, "overrides": overrides, "backend": jax.default_backend(),
              "device": device.device_kind, "cpu": cpu_model(), "threads": threads,
              "cpus_online": os.cpu_count(), "jax": jax.__version__,
              "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "batch_sizes": args.batch_sizes, "strategies": args.strategies,
              "warmup": args.warmup, "repeats": args.repeats, "params": n_params,
              "round_seconds": seconds, "rows": rows, "hf_skipped": skipped, "hf": hf_info,
              "greedy_tokens": {str(b): ours["greedy", b].tokens.tolist()
                                for b in args.batch_sizes if ("greedy", b) in ours},
              "prompts_seed": args.seed + 1}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    out.write_text(json.dumps(result, indent=2))
    console.print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
