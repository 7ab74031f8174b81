"""Metrics out of the loop: metrics.jsonl, TensorBoard scalars, and a progress bar with ETA."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from tensorboardX import SummaryWriter

from gigajax.train.objectives import DPO_METRICS
from gigajax.train.step import MOE_LOAD, MOE_METRICS
from gigajax.train.workdir import write_text_atomic


def log_console(stderr: bool = False) -> Console:
    """A rich Console that keeps lines whole when output goes to a file or pipe (rich's 80 columns
    would break log lines that scripts and tests search)."""
    stream = sys.stderr if stderr else sys.stdout
    return Console(stderr=stderr, soft_wrap=True, width=None if stream.isatty() else 160)


def format_duration(seconds: float) -> str:
    """1h02m, 3m05s, 42s."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class MetricsLogger:
    """Fetches device metrics only every `log_every` steps, so the host never stalls the device."""

    def __init__(self, workdir: Path, start_step: int, total_steps: int, log_every: int,
                 tokens_per_step: int, *, progress: bool = True, peak_flops: float = 0.0,
                 flops_per_token: float = 0.0, enabled: bool = True):
        """`enabled=False` (every process but the first of a multi-process run) writes nothing."""
        self.enabled = enabled
        self.path = Path(workdir) / "metrics.jsonl"
        self.file, self.tb = None, None
        if enabled:
            self._truncate_after(start_step)
            self.file = self.path.open("a")
            self.tb = SummaryWriter(str(Path(workdir) / "tb"))
        self.log_every, self.total_steps = log_every, total_steps
        self.tokens_per_step = tokens_per_step
        self.peak_flops, self.flops_per_token = peak_flops, flops_per_token
        self.console = log_console(stderr=True)
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                 TextColumn("eta"), TimeRemainingColumn(),
                                 console=self.console, disable=not progress)
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step,
                                           status="compiling")
        self.progress.start()
        self.timer_start: float | None = None
        self.timer_step = start_step
        self.pending: list[dict] = []
        self.paused_seconds = 0.0
        self.summary: dict[str, Any] = {}

    def _truncate_after(self, step: int) -> None:
        """Drop lines past the step we resume from: they belong to the run that crashed."""
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):  # a line cut short by a crash
                continue
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def info(self, message: str) -> None:
        if self.enabled:
            self.progress.console.print(message)

    def record(self, step: int, metrics: dict[str, jax.Array],
               eval_loss: float | None = None, paused_seconds: float = 0.0,
               eval_metrics: dict[str, float] | None = None) -> None:
        """Keep this step's (device) metrics; write a line at log steps, eval steps and the end.

        The objective's own metrics (DPO_METRICS, MOE_METRICS, and MOE_LOAD: a MoE model's
        per-layer expert loads, as lists) are logged too, and
        `eval_metrics` (the validation values of the same) as `eval_<name>`.

        Throughput counts training only: `paused_seconds` (evaluation, checkpointing) is left out.
        """
        self.paused_seconds += paused_seconds
        self.pending.append(metrics)  # kept on device until the next logged step
        self.progress.update(self.task, completed=step)
        if self.timer_start is None:  # the first step compiles: time from its end
            jax.block_until_ready(metrics)
            self.timer_start, self.timer_step = time.perf_counter(), step
            self.paused_seconds = 0.0
        if step % self.log_every and eval_loss is None and step != self.total_steps:
            return
        last = jax.device_get(self.pending[-1])
        self.pending = []
        now = time.perf_counter()
        row: dict[str, Any] = {"step": step, "loss": float(last["loss"]),
                               "grad_norm": float(last["grad_norm"]), "lr": float(last["lr"])}
        if step > self.timer_step:
            seconds = now - self.timer_start - self.paused_seconds
            tokens_per_s = (step - self.timer_step) * self.tokens_per_step / seconds
            row["tokens_per_s"] = tokens_per_s
            if self.peak_flops > 0:
                row["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
        row.update({k: float(last[k]) for k in (*DPO_METRICS, *MOE_METRICS) if k in last})
        if MOE_LOAD in last:  # [MoE layers, X], rounded: a line per step stays short
            row[MOE_LOAD] = np.round(np.asarray(last[MOE_LOAD]), 5).tolist()
        if eval_loss is not None:
            row["eval_loss"] = eval_loss
            row.update({f"eval_{k}": v for k, v in (eval_metrics or {}).items()})
        if "skipped" in last:
            row["skipped"] = int(last["skipped"])
            if row["skipped"] > self.summary.get("skipped", 0):
                self.info(f"[yellow]{row['skipped']} step(s) so far had a non-finite loss or "
                          "gradient norm; their updates were dropped (train.nonfinite=skip)")
        if self.enabled:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
            for key, value in row.items():
                if isinstance(value, list):  # per-layer loads: a histogram and max/mean each
                    for layer, load_X in enumerate(np.asarray(value)):
                        self.tb.add_histogram(f"{key}/layer{layer}", load_X, step)
                        self.tb.add_scalar(f"{key}_max/layer{layer}",
                                           load_X.max() * load_X.size, step)
                elif key != "step":
                    self.tb.add_scalar(key, value, step)
        self.summary.update(row)
        status = f"loss {row['loss']:.4f}" + (f" eval {eval_loss:.4f}" if eval_loss else "")
        self.progress.update(self.task, status=status)
        eta = ""  # in every line too: piped and SLURM logs have no progress bar
        if step > self.timer_step and step < self.total_steps:
            per_step = (now - self.timer_start - self.paused_seconds) / (step - self.timer_step)
            eta = f"  eta {format_duration(per_step * (self.total_steps - step))}"
        self.info(f"step {step:>6}  " + "  ".join(
            f"{k} {v:.4g}" for k, v in row.items() if k != "step" and not isinstance(v, list))
            + eta)
        self.timer_start, self.timer_step, self.paused_seconds = now, step, 0.0

    def close(self) -> None:
        self.progress.stop()
        if self.enabled:
            self.file.close()
            self.tb.close()
