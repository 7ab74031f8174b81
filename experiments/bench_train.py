"""Training throughput (tokens/s) and MFU of a config, beside Hugging Face LlamaForCausalLM with
PyTorch SDPA attention of the same shape where torch and transformers are installed.

gigajax: the config's train step from `train.loop.build_training` (AdamW per `optim`, clipping,
`model.remat`, `attention.impl`), compiled ahead of time and run `--warmup` steps untimed. Then
`--rounds` rounds in which each framework in turn runs `--steps` steps timed as one stretch
(dispatch pipelined, as in training, ending in `block_until_ready` / `cuda.synchronize`): taking
turns means a change of load on a shared machine hits both sides. Tokens/s is that of the median
round; the gigajax / HF ratio is the median of the per-round ratios.
Batches are synthetic: random tokens of the config's [batch_size, seq_len], positions 0..T-1 (in
the ring layout's order under sequence parallelism), one segment, every token in the loss.
By default the run is on one device (mesh sizes set to 1) so that the comparison below is on the
same device; `--config-mesh` keeps the config's mesh (then the comparison is skipped).

MFU = tokens/s x flops_per_token / (peak x devices), with `train.flops.flops_per_token` (PaLM
convention, 6 N + 12 L H E T, no causal discount; docs/mfu.md) and the peak from
`train.flops.peak_flops_per_device`: `train.peak_flops_per_device` if set, else a datasheet
dense bf16 peak for known accelerators (H100 989 TFLOP/s, ...), else none: a CPU has no entry,
so MFU reads "-" there unless `--config.train.peak_flops_per_device=...` is given. Model
TFLOP/s (the numerator) is always printed.

Hugging Face: `LlamaForCausalLM` built from the same sizes (d_model, layers, heads, kv heads,
head_dim, mlp_dim, vocab, tied or not, RoPE theta, RMSNorm eps), `attn_implementation="sdpa"`,
fp32 parameters with `torch.autocast` to the config's compute dtype when it is not fp32,
`torch.optim.AdamW` with the config's lr/betas/eps/weight decay and gradient clipping, fused on
CUDA, eager mode (no torch.compile), constant LR (a schedule costs nothing); TF32 for fp32
matmuls on CUDA as JAX's default precision allows; gradient checkpointing when `model.remat=full`.
JAX's GPU memory preallocation is turned off (XLA_PYTHON_CLIENT_PREALLOCATE) so both fit. Same batch
shape, same synthetic tokens, same device kind (CPU with CPU, CUDA with a JAX GPU). Its parameter
count is checked against gigajax's. The table gives each side and the ratio gigajax / HF.

    python experiments/bench_train.py --config configs/tiny.py --steps 5 --rounds 3 \
        --output runs/bench_train.json        # also writes bench_train.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

# JAX takes 75% of a GPU's memory up front by default; PyTorch shares the GPU here. Read when
# the backend starts (first device query), so this works even if jax is already imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from rich.table import Table  # noqa: E402

from gigajax.config import ModelConfig, load_config  # noqa: E402
from gigajax.errors import GigajaxError  # noqa: E402
from gigajax.parallel.mesh import make_mesh, sequence_permutation  # noqa: E402
from gigajax.parallel.multihost import place_batch  # noqa: E402
from gigajax.plan.planner import abstract_batch  # noqa: E402
from gigajax.train.flops import flops_per_token, peak_flops_per_device  # noqa: E402
from gigajax.train.logger import log_console  # noqa: E402
from gigajax.train.loop import build_training  # noqa: E402

FIELDS = ("framework", "attention", "dtype", "devices", "params", "tokens_per_s",
          "tokens_per_s_min", "tokens_per_s_max", "step_ms", "model_tflops", "mfu", "loss_warmup",
          "loss_end", "compile_s")


def synthetic_batch(cfg: ml_collections.ConfigDict, seed: int, perm: np.ndarray | None = None
                    ) -> dict[str, np.ndarray]:
    """One global batch of random tokens [B, T] with next-token targets, in layout order."""
    B, T = cfg.data.batch_size, cfg.data.seq_len
    tokens_BT1 = np.random.default_rng(seed).integers(0, cfg.model.vocab_size, (B, T + 1))
    batch = {"inputs": tokens_BT1[:, :-1].astype(np.int32),
             "targets": tokens_BT1[:, 1:].astype(np.int32),
             "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
             "segment_ids": np.ones((B, T), np.int32),
             "loss_mask": np.ones((B, T), np.float32)}
    order = np.arange(T) if perm is None else perm
    return {k: np.ascontiguousarray(v[:, order]) for k, v in batch.items()}


class Timed:
    """A framework's train step ready to time: `stretch(steps)` runs that many steps and returns
    their seconds; `info` describes the run (params, losses, compile time)."""

    def __init__(self, info: dict, stretch: Callable[[int], float]):
        self.info, self.stretch = info, stretch


def gigajax_run(cfg: ml_collections.ConfigDict, mesh, warmup: int,
                batches: list[dict[str, np.ndarray]]) -> Timed:
    """The config's train step compiled ahead of time, its state built, `warmup` steps run."""
    with jax.set_mesh(mesh):
        start = time.perf_counter()
        training = build_training(cfg, mesh)
        compiled = training.train_step.lower(training.state.abstract,
                                             abstract_batch(cfg, mesh)).compile()
        compile_s = time.perf_counter() - start
        box = {"state": training.state.init(), "step": 0}
        placed = [place_batch(b, mesh, cfg.data.batch_size) for b in batches]
    info = {"framework": f"gigajax (jax {jax.__version__})", "attention": cfg.attention.impl,
            "devices": mesh.size, "compile_s": compile_s,
            "params": sum(x.size for x in jax.tree.leaves(box["state"]["params"]))}

    def run(steps: int) -> float:  # dispatch pipelined; one wait at the end, as in training
        with jax.set_mesh(mesh):
            start = time.perf_counter()
            for _ in range(steps):
                box["state"], metrics = compiled(box["state"],
                                                 placed[box["step"] % len(placed)])
                box["step"] += 1
            jax.block_until_ready((box["state"], metrics))
            seconds = time.perf_counter() - start
        info["loss_end"] = float(metrics["loss"])
        info.setdefault("loss_warmup", info["loss_end"])
        return seconds

    if warmup:
        run(warmup)
    return Timed(info, run)


def hf_skip_reason(cfg: ml_collections.ConfigDict, devices: int) -> str | None:
    """Why the Hugging Face comparison cannot run here, or None when it can."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as error:
        return (f"torch/transformers are not importable ({error}); `pip install torch "
                "transformers` in this environment to compare")
    if devices > 1:
        return f"the gigajax run uses {devices} devices and the HF one would use 1"
    if cfg.model.sliding_window:
        return "LlamaForCausalLM has no sliding window (model.sliding_window is set)"
    backend = jax.default_backend()
    if backend == "gpu" and not torch.cuda.is_available():
        return "JAX runs on a GPU but this torch build has no CUDA"
    if backend not in ("cpu", "gpu"):
        return f"no PyTorch device for JAX backend {backend!r}"
    return None


def hf_run(cfg: ml_collections.ConfigDict, warmup: int,
           batches: list[dict[str, np.ndarray]]) -> Timed:
    """The same model shape, batch and optimizer in HF transformers + PyTorch SDPA, eager."""
    import contextlib

    import torch
    import transformers

    m = ModelConfig.from_config(cfg)
    cuda = jax.default_backend() == "gpu"
    device = torch.device("cuda" if cuda else "cpu")
    config = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.d_model, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.n_layers, num_attention_heads=m.n_heads,
        num_key_value_heads=m.n_kv_heads, head_dim=m.head_dim, hidden_act="silu",
        max_position_embeddings=max(m.max_seq_len, cfg.data.seq_len), rms_norm_eps=m.norm_eps,
        rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings, attention_bias=False,
        mlp_bias=False, use_cache=False, attn_implementation="sdpa")
    if cuda:  # JAX's default precision lets fp32 matmuls use TF32 on recent GPUs: so may torch
        precise = jax.config.jax_default_matmul_precision in ("highest", "float32")
        torch.set_float32_matmul_precision("highest" if precise else "high")
    torch.manual_seed(cfg.train.seed)
    model = transformers.LlamaForCausalLM(config).to(device=device, dtype=torch.float32)
    assert model.config._attn_implementation == "sdpa", model.config._attn_implementation
    if m.remat == "full":
        model.gradient_checkpointing_enable()
    model.train()
    o = cfg.optim
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                            weight_decay=o.weight_decay, **({"fused": True} if cuda else {}))
    compute = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(m.dtype)
    autocast = (torch.autocast(device.type, dtype=compute) if compute
                else contextlib.nullcontext())
    tensors = [{k: torch.from_numpy(np.asarray(b[k], np.int64)).to(device)
                for k in ("inputs", "targets")} for b in batches]

    def step(batch):
        with autocast:
            logits = model(input_ids=batch["inputs"]).logits
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1),
                                                 batch["targets"].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o.clip_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
        opt.step()
        return loss

    info = {"framework": f"HF transformers {transformers.__version__}, torch {torch.__version__}",
            "attention": "sdpa", "devices": 1, "torch_threads": torch.get_num_threads(),
            "params": sum(p.numel() for p in model.parameters()), "compile_s": None}
    box = {"step": 0}

    def run(steps: int) -> float:  # queued on CUDA like JAX's dispatch; one sync at the end
        start = time.perf_counter()
        for _ in range(steps):
            loss = step(tensors[box["step"] % len(tensors)])
            box["step"] += 1
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        info["loss_end"] = float(loss.detach())
        info.setdefault("loss_warmup", info["loss_end"])
        return seconds

    if warmup:
        run(warmup)
    return Timed(info, run)


def finish(info: dict, rounds_s: list[float], cfg: ml_collections.ConfigDict, steps: int,
           peak: float) -> dict:
    """A table row: tokens/s of the median round, its spread, model TFLOP/s and MFU."""
    tokens = steps * cfg.data.batch_size * cfg.data.seq_len
    seconds = statistics.median(rounds_s)
    model = ModelConfig.from_config(cfg)
    flops_s = tokens / seconds * flops_per_token(model, cfg.data.seq_len)
    row = {**info, "dtype": model.dtype, "tokens_per_s": tokens / seconds,
           "tokens_per_s_min": tokens / max(rounds_s), "tokens_per_s_max": tokens / min(rounds_s),
           "step_ms": seconds / steps * 1e3, "model_tflops": flops_s / 1e12,
           "mfu": flops_s / (peak * info["devices"]) if peak else None}
    return {k: row.get(k) for k in FIELDS}


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for col in ("framework", "attention", "dtype", "params", "tokens/s", "min-max", "ms/step",
                "model TFLOP/s", "MFU", "loss warm-up/end", "compile s"):
        table.add_column(col, justify="left" if col in ("framework", "attention") else "right")
    for r in rows:
        table.add_row(r["framework"], r["attention"], r["dtype"], f"{r['params']:,}",
                      f"{r['tokens_per_s']:,.0f}",
                      f"{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}",
                      f"{r['step_ms']:.1f}", f"{r['model_tflops']:.4f}", fmt(r["mfu"], ".2%"),
                      f"{r['loss_warmup']:.3f} / {r['loss_end']:.3f}", fmt(r["compile_s"], ".1f"))
    log_console().print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps (the first compiles)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed rounds, the frameworks taking turns; the median is shown")
    parser.add_argument("--config-mesh", action="store_true",
                        help="keep the config's mesh (default: one device, mesh sizes 1)")
    parser.add_argument("--hf", choices=("auto", "off"), default="auto",
                        help="auto: compare with HF LlamaForCausalLM where torch is installed")
    parser.add_argument("--output", default="runs/bench_train.json",
                        help="JSON path; the CSV goes beside it with suffix .csv")
    args, overrides = parser.parse_known_args(argv)
    console = log_console()
    try:  # a bad config or mesh: its message, no traceback (as the CLI does)
        cfg = load_config(args.config, overrides)
        if not args.config_mesh:
            cfg.mesh.update(data=1, fsdp=1, sequence=1, tensor=1)
        mesh = make_mesh(cfg.mesh, None if args.config_mesh else jax.devices()[:1],
                         cfg.attention)
    except GigajaxError as error:
        console.print(f"error: {error}")
        return 2
    perm = sequence_permutation(mesh, cfg.data.seq_len, cfg.attention.layout)
    seeds = [cfg.train.seed + i for i in range(max(1, min(args.warmup + args.steps, 4)))]
    with console.status(f"gigajax: compiling {args.config} for {mesh.size} device(s)"):
        runs = [gigajax_run(cfg, mesh, args.warmup,
                            [synthetic_batch(cfg, seed, perm) for seed in seeds])]
    skipped = "--hf off" if args.hf == "off" else hf_skip_reason(cfg, mesh.size)
    if skipped is None:
        with console.status("Hugging Face LlamaForCausalLM + SDPA: building"):
            runs.append(hf_run(cfg, args.warmup, [synthetic_batch(cfg, seed) for seed in seeds]))
    rounds_s: list[list[float]] = [[] for _ in runs]
    for i in range(args.rounds):  # taking turns: a load change on the machine hits both
        with console.status(f"round {i + 1} of {args.rounds}"):
            for run, seconds in zip(runs, rounds_s, strict=True):
                seconds.append(run.stretch(args.steps))
    peak = peak_flops_per_device(cfg.train.peak_flops_per_device)
    rows = [finish(run.info, s, cfg, args.steps, peak)
            for run, s in zip(runs, rounds_s, strict=True)]
    device = jax.devices()[0]
    print_table(rows, f"{args.config}: batch {cfg.data.batch_size} x {cfg.data.seq_len} tokens, "
                      f"{args.rounds} rounds of {args.steps} steps after {args.warmup} warm-up, "
                      f"{device.device_kind} ({jax.default_backend()})")
    if not peak:
        console.print(f"MFU: no peak FLOP/s known for {device.device_kind!r}; set "
                      "--config.train.peak_flops_per_device to get one")
    result = {"config": args.config, "overrides": overrides, "backend": jax.default_backend(),
              "device": device.device_kind, "machine": platform.machine(),
              "jax": jax.__version__, "batch_size": cfg.data.batch_size,
              "seq_len": cfg.data.seq_len, "warmup": args.warmup, "steps": args.steps,
              "rounds": args.rounds, "round_seconds": rounds_s,
              "peak_flops_per_device": peak or None, "rows": rows, "hf_skipped": skipped,
              "torch_threads": runs[1].info["torch_threads"] if len(runs) > 1 else None}
    for row, seconds in zip(rows, rounds_s, strict=True):
        if max(seconds) > 1.5 * min(seconds):  # the load changed under the run
            spread = max(seconds) / min(seconds)
            console.print(f"note: {row['framework']}: rounds differ {spread:.1f}x (a busy "
                          "machine?); see round_seconds in the JSON")
    if skipped:
        console.print(f"HF comparison skipped: {skipped}")
    else:  # per round (the two ran back to back), then the median of the rounds
        ratios = [h / g for g, h in zip(*rounds_s, strict=True)]
        result["gigajax_over_hf_tokens_per_s"] = statistics.median(ratios)
        result["round_ratios"] = ratios
        ours, theirs = rows
        same = "same" if ours["params"] == theirs["params"] else "DIFFERENT"
        console.print(f"gigajax / HF tokens/s: {statistics.median(ratios):.2f}x (rounds "
                      f"{min(ratios):.2f}-{max(ratios):.2f}; {same} parameter count: "
                      f"{ours['params']:,} vs {theirs['params']:,})")
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
