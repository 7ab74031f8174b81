"""Import time and peak host RSS of a Hugging Face checkpoint, against the size of its files.

Writes a random LLaMA-shaped HF checkpoint (bfloat16 safetensors shards with an index and a
config.json, one shard in memory at a time; reused from --workdir when its shape matches), then
measures each job in a fresh process, so that its RSS is that job's alone:

- `stream`: `StateBuilder.from_params` (the `train.init_from=HF_DIR` path) on simulated CPU
  devices, one run per --meshes entry. The optimizer is `optax.identity()` so that only the
  parameters are placed (AdamW's moments would add 2x the fp32 params and say nothing about
  the import). On CPU the device buffers live in host RAM, so the cost of the import itself is
  the RSS above the baseline and the device arrays made so far: `transient`, taken per
  parameter (the high-water mark from one parameter's assembly to the next, less the arrays
  made by its end: a lower bound at that moment). `transient_end_mb`, the run's peak less
  all the device arrays, understates it: the peak comes before the last arrays exist. The goal
  is transient < 1.5x the largest shard file.
- `convert`: `convert.from_hf` to a params checkpoint, per --dtypes.
- `to_hf`: `convert.to_hf` back from the bfloat16 params checkpoint, checked tensor by tensor
  against the source files (import then export is an identity).

Peak RSS is the kernel's VmHWM, reset (/proc/self/clear_refs) after the baseline is taken, with a
10 ms sampler of VmRSS beside it (RssAnon/RssFile at the sampled peak). Prints a table and writes
JSON and CSV (one row per job).

    python experiments/import_timing.py --output runs/import_timing.json     # ~1.1B, TinyLlama
    python experiments/import_timing.py --hidden 256 --layers 2 --vocab 1000 --shard-size 1MB \\
        --output /tmp/import_smoke.json                                       # seconds
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MB = 2**20
MARKER = "import_timing.json"  # what the writer wrote, for reuse
AFTER = "(after placement: optimizer init, counters)"
FIELDS = ("job", "mesh", "dtype", "seconds", "baseline_mb", "peak_mb", "sampled_peak_mb",
          "peak_anon_mb", "peak_file_mb", "result_mb", "transient_mb", "transient_end_mb",
          "worst_leaf", "largest_shard_mb", "checkpoint_mb", "transient_over_largest_shard",
          "goal_met", "bytes_read_mb",
          "rss_after_mb", "rss_after_release_mb", "check",
          "load_before", "load_after")


# ---------------------------------------------------------------- the checkpoint (no jax)

def hf_config(a: argparse.Namespace) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": a.hidden, "intermediate_size": a.intermediate,
            "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
            "num_key_value_heads": a.kv_heads, "head_dim": a.hidden // a.heads,
            "vocab_size": a.vocab, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
            "initializer_range": 0.02, "tie_word_embeddings": False, "hidden_act": "silu",
            "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "bos_token_id": 1, "eos_token_id": 2, "dtype": "bfloat16", "use_cache": True}


def hf_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of LlamaForCausalLM, in its state_dict order: [out, in] per Linear."""
    D, F, V = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    E = c["head_dim"]
    H, K = c["num_attention_heads"] * E, c["num_key_value_heads"] * E
    shapes = [("model.embed_tokens.weight", (V, D))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.q_proj.weight", (H, D)), (p + "self_attn.k_proj.weight", (K, D)),
                   (p + "self_attn.v_proj.weight", (K, D)), (p + "self_attn.o_proj.weight", (D, H)),
                   (p + "mlp.gate_proj.weight", (F, D)), (p + "mlp.up_proj.weight", (F, D)),
                   (p + "mlp.down_proj.weight", (D, F)), (p + "input_layernorm.weight", (D,)),
                   (p + "post_attention_layernorm.weight", (D,))]
    return shapes + [("model.norm.weight", (D,)), ("lm_head.weight", (V, D))]


def random_bf16(shape: tuple[int, ...], seed: int):
    """Random bfloat16 of magnitude [2^-7, 2^-6), either sign (norms: [1, 2)): random bits in
    the sign and mantissa, a fixed exponent, so no inf/NaN and ~1 GB/s to make."""
    import ml_dtypes
    import numpy as np

    bits = np.random.default_rng(seed).integers(0, 1 << 16, math.prod(shape), dtype=np.uint16)
    bits &= np.uint16(0x007F if len(shape) == 1 else 0x807F)
    bits |= np.uint16(0x3F80 if len(shape) == 1 else 0x3C00)
    return bits.view(ml_dtypes.bfloat16).reshape(shape)


def write_checkpoint(hf_dir: Path, config: dict, shard_bytes: int, seed: int) -> dict:
    """The HF directory of `config` (reused when its marker matches), one shard in memory at a
    time; returns the marker: files and sizes, tensor bytes, seconds to write."""
    from safetensors.numpy import save_file

    want = {"config": config, "shard_bytes": shard_bytes, "seed": seed}
    marker = hf_dir / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if ({k: found.get(k) for k in want} == want
                and all((hf_dir / f).is_file() and (hf_dir / f).stat().st_size == n
                        for f, n in found["files"].items())):
            return {**found, "reused": True}
    shutil.rmtree(hf_dir, ignore_errors=True)
    hf_dir.mkdir(parents=True)
    start = time.perf_counter()
    shapes = hf_shapes(config)
    plan: list[list[tuple[str, tuple]]] = [[]]
    used = 0
    for name, shape in shapes:  # as save_pretrained: a new shard when the next would overflow
        size = 2 * math.prod(shape)
        if plan[-1] and used + size > shard_bytes:
            plan.append([])
            used = 0
        plan[-1].append((name, shape))
        used += size
    names = [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))]
    order = {name: k for k, (name, _) in enumerate(shapes)}
    for file, shard in zip(names, plan, strict=True):
        save_file({n: random_bf16(s, seed * 100_003 + order[n]) for n, s in shard},
                  str(hf_dir / file), metadata={"format": "pt"})
    total = sum(2 * math.prod(s) for _, s in shapes)
    (hf_dir / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total},
         "weight_map": {n: f for f, shard in zip(names, plan, strict=True) for n, _ in shard}},
        indent=2) + "\n")
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    found = {**want, "files": {f: (hf_dir / f).stat().st_size for f in names},
             "tensor_bytes": total, "params": total // 2,
             "write_seconds": time.perf_counter() - start}
    marker.write_text(json.dumps(found, indent=2) + "\n")
    return {**found, "reused": False}


# ---------------------------------------------------------------- memory of this process

def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, bytes."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


class Peak:
    """The baseline RSS, then the kernel's high-water mark from there (VmHWM after writing 5
    to /proc/self/clear_refs) and a 10 ms sampler's peak, with its anon/file split."""

    def __enter__(self) -> Peak:
        import gc

        gc.collect()
        self.baseline = proc_status()["VmRSS"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self.sampled, self.stop = {"VmRSS": 0}, threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.01):
            s = proc_status()
            if s["VmRSS"] > self.sampled["VmRSS"]:
                self.sampled = s

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start
        self.stop.set()
        self.thread.join()
        now = proc_status()
        self.peak, self.after = now["VmHWM"], now["VmRSS"]

    def row(self) -> dict:
        s = self.sampled
        return {"seconds": self.seconds, "baseline_mb": self.baseline / MB,
                "peak_mb": self.peak / MB, "sampled_peak_mb": s["VmRSS"] / MB,
                "peak_anon_mb": s.get("RssAnon", 0) / MB, "peak_file_mb": s.get("RssFile", 0) / MB,
                "rss_after_mb": self.after / MB}


# ---------------------------------------------------------------- the jobs (fresh processes)

def expected_ours(name: str, hf_RC, c: dict):
    """Our layout of one HF tensor, written out here independently of gigajax's table."""
    D, E = c["hidden_size"], c["head_dim"]
    heads = {"q_proj": c["num_attention_heads"], "k_proj": c["num_key_value_heads"],
             "v_proj": c["num_key_value_heads"]}
    kind = name.split(".")[-2]
    if kind in heads:
        return hf_RC.T.reshape(D, heads[kind], E)  # [D, H, E]
    if kind == "o_proj":
        return hf_RC.T.reshape(c["num_attention_heads"], E, D)  # [H, E, D]
    if kind in ("gate_proj", "up_proj", "down_proj") or name == "lm_head.weight":
        return hf_RC.T
    return hf_RC  # embeddings [V, D], norms [D]


OURS = {"embed": "model.embed_tokens.weight", "lm_head": "lm_head.weight",
        "final_norm/scale": "model.norm.weight",
        "blocks/attn_norm/scale": "model.layers.{i}.input_layernorm.weight",
        "blocks/mlp_norm/scale": "model.layers.{i}.post_attention_layernorm.weight",
        **{f"blocks/attn/w{x}": f"model.layers.{{i}}.self_attn.{x}_proj.weight" for x in "qkvo"},
        **{f"blocks/mlp/w_{x}": f"model.layers.{{i}}.mlp.{x}_proj.weight"
           for x in ("gate", "up", "down")}}


def check_placed(params: dict, hf_dir: Path, c: dict) -> str:
    """Every device shard of layers 0 and L-1 (and the unstacked tensors) against the HF files
    read whole and mapped by `expected_ours`; one layer in memory at a time."""
    import numpy as np
    from safetensors import safe_open

    from gigajax.checkpoint.hf import tensor_files

    files, n_layers, checked = tensor_files(hf_dir), c["num_hidden_layers"], 0
    for path, hf_name in OURS.items():
        leaf = params
        for key in path.split("/"):
            leaf = leaf[key]
        for layer in sorted({0, n_layers - 1}) if "{i}" in hf_name else [None]:
            name = hf_name.format(i=layer)
            with safe_open(str(files[name]), framework="numpy") as f:
                want = expected_ours(name, f.get_tensor(name), c).astype(np.float32)
            for shard in leaf.addressable_shards:
                index, got = shard.index, np.asarray(shard.data)
                if layer is not None:
                    start = index[0].start or 0
                    if not start <= layer < (index[0].stop or n_layers):
                        continue
                    got, index = got[layer - start], index[1:]
                if not np.array_equal(got, want[index]):
                    return f"MISMATCH {path} layer {layer} shard {shard.index}"
                checked += 1
    return f"ok ({checked} shards)"


def traced_placement(jax, names: list[str]) -> tuple[list[dict], callable]:
    """Wrap `jax.make_array_from_single_device_arrays` (what `place_shards` calls once per
    parameter, after reading and putting its slices) to take the high-water mark of each window
    from one call to the next: (windows, close)."""
    make, windows = jax.make_array_from_single_device_arrays, []

    def close() -> None:  # the last window (since the previous close) ends here
        if windows:
            windows[-1]["hwm"] = proc_status()["VmHWM"]
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def traced(shape, sharding, arrays, *rest, **kw):
        # a parameter's slices are read and put before this call: its window ends after it
        x = make(shape, sharding, arrays, *rest, **kw)
        done = (windows[-1]["done"] if windows else 0) + sum(
            s.data.nbytes for s in x.addressable_shards)
        windows.append({"leaf": names[len(windows)], "done": done})
        close()
        return x

    jax.make_array_from_single_device_arrays = traced
    return windows, close


def job_stream(spec: dict) -> dict:
    from gigajax.parallel.devices import simulate_cpu_devices

    mesh_sizes = dict(kv.split("=") for kv in spec["mesh"].split(","))
    n = math.prod(int(v) for v in mesh_sizes.values())
    simulate_cpu_devices(n)
    import jax
    import optax
    from flax import nnx

    from gigajax.checkpoint.hf import hf_model_config
    from gigajax.checkpoint.params import read_params
    from gigajax.parallel.mesh import make_mesh
    from gigajax.train.state import StateBuilder, layout_for

    hf_dir = Path(spec["hf_dir"])
    cfg = hf_model_config(hf_dir)
    cfg.mesh.update({k: int(v) for k, v in mesh_sizes.items()})
    mesh = make_mesh(cfg.mesh, jax.devices()[:n], cfg.attention)
    with jax.set_mesh(mesh):
        builder = StateBuilder(cfg, mesh, layout_for(cfg, mesh), optax.identity())
        found = read_params(hf_dir, flag="train.init_from")
        names = [jax.tree_util.keystr(path) for path, _ in jax.tree.leaves_with_path(
            nnx.to_pure_dict(builder.abstract["params"]))]  # from_params's tree.map order
        windows, close = traced_placement(jax, names)
        start = builder._start  # placing ends where the fresh optimizer state begins

        def started(params):  # its window runs from the last parameter's end to the close below
            windows.append({"leaf": AFTER, "done": windows[-1]["done"]})
            return start(params)

        builder._start = started
        with Peak() as peak:
            state = jax.block_until_ready(builder.from_params(found.params, str(hf_dir)))
            close()
    lazy = jax.tree.leaves(found.params)
    row = peak.row()
    # the window of a parameter holds its host copies and those still in flight; its result
    # is counted as made in full, so this transient is a lower bound at that moment
    worst = max((w for w in windows if w["leaf"] != AFTER), key=lambda w: w["hwm"] - w["done"])
    row["windows"] = [{"leaf": w["leaf"], "transient_mb": (w["hwm"] - peak.baseline - w["done"])
                       / MB} for w in windows]
    row["peak_mb"] = max(w["hwm"] for w in windows) / MB
    row["worst_leaf"] = worst["leaf"]
    row["transient_worst_mb"] = (worst["hwm"] - peak.baseline - worst["done"]) / MB
    row["bytes_read_mb"] = sum(x.bytes_read for x in lazy) / MB
    row["result_mb"] = sum(s.data.nbytes for x in jax.tree.leaves(state["params"])
                           for s in x.addressable_shards) / MB
    del found, lazy
    import gc

    gc.collect()
    row["rss_after_release_mb"] = proc_status()["VmRSS"] / MB
    row["check"] = check_placed(nnx.to_pure_dict(state["params"]), hf_dir,
                                json.loads((hf_dir / "config.json").read_text()))
    row["dtype"] = str(jax.tree.leaves(state["params"])[0].dtype)
    return row


def job_convert(spec: dict) -> dict:
    import jax

    from gigajax.checkpoint.convert import from_hf

    jax.devices()
    with Peak() as peak:
        from_hf(spec["hf_dir"], spec["out"], spec["dtype"], overwrite=True)
    return {**peak.row(), "result_mb": 0.0}


def job_to_hf(spec: dict) -> dict:
    import jax
    import numpy as np
    from safetensors import safe_open

    from gigajax.checkpoint.convert import to_hf
    from gigajax.checkpoint.hf import tensor_files

    jax.devices()
    with Peak() as peak:
        to_hf(spec["source"], spec["out"], "bfloat16", spec["shard_bytes"], overwrite=True,
              log=lambda s: None)
    got, want = tensor_files(Path(spec["out"])), tensor_files(Path(spec["hf_dir"]))
    check = f"ok ({len(want)} tensors bitwise)"
    if sorted(got) != sorted(want):
        check = f"MISMATCH names: {sorted(set(got) ^ set(want))[:3]}"
    for name in want if check.startswith("ok") else []:
        with safe_open(str(got[name]), "numpy") as a, safe_open(str(want[name]), "numpy") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        if x.dtype != y.dtype or not np.array_equal(x.view(np.uint16), y.view(np.uint16)):
            check = f"MISMATCH {name}"
            break
    return {**peak.row(), "result_mb": 0.0, "check": check}


JOBS = {"stream": job_stream, "convert": job_convert, "to_hf": job_to_hf}


def run_job(spec: dict) -> dict:
    """`spec` in a fresh interpreter (no simulated-device flag inherited: the job sets its own);
    its result is the last stdout line, after RESULT."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))
    env["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                              env.get("XLA_FLAGS", "")).strip()
    load = os.getloadavg()[0]
    proc = subprocess.run([sys.executable, __file__, "--job", json.dumps(spec)], cwd=ROOT,
                          env=env, stdout=subprocess.PIPE, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"job {spec['kind']} failed (exit {proc.returncode}):\n{proc.stdout}")
    return {**json.loads(lines[-1][len("RESULT "):]), "load_before": load,
            "load_after": os.getloadavg()[0]}


# ---------------------------------------------------------------- main

def cpu_model() -> str:
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def parse_size(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    unit = next((u for u in sorted(units, key=len, reverse=True) if t.endswith(u)), "")
    return int(float(t[:len(t) - len(unit)]) * units.get(unit, 1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/gigajax_import_timing",
                   help="the HF checkpoint (kept, reused) and the converted ones (removed)")
    p.add_argument("--output", "--out", default="runs/import_timing.json",
                   help="JSON path; the CSV goes beside it with suffix .csv")
    p.add_argument("--shard-size", default="500MB", help="safetensors shard size of the source")
    p.add_argument("--hidden", type=int, default=2048)  # default: TinyLlama 1.1B's shape
    p.add_argument("--layers", type=int, default=22)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=5632)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--meshes", default="fsdp=8;tensor=2,fsdp=4",
                   help="';'-separated meshes for the streaming import (mesh.* sizes)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="dtypes for convert from-hf")
    p.add_argument("--skip-convert", action="store_true", help="streaming import only")
    p.add_argument("--skip-to-hf", action="store_true")
    p.add_argument("--job", help=argparse.SUPPRESS)  # internal: run one job, print RESULT
    return p.parse_args(argv)


def print_table(rows: list[dict], title: str) -> None:
    print(title)
    head = ("job", "mesh", "dtype", "s", "base MB", "peak MB", "result MB", "transient MB",
            "/shard", "read MB", "check", "worst parameter")
    print(" | ".join(head))
    for r in rows:
        ratio = r["transient_over_largest_shard"]
        print(" | ".join([r["job"], r["mesh"], r["dtype"], f"{r['seconds']:.1f}",
                          f"{r['baseline_mb']:,.0f}", f"{r['peak_mb']:,.0f}",
                          f"{r['result_mb']:,.0f}", f"{r['transient_mb']:,.0f}",
                          f"{ratio:.2f}x{'' if r['goal_met'] else ' (>1.5)'}",
                          f"{r['bytes_read_mb']:,.0f}" if r["bytes_read_mb"] != "" else "",
                          r["check"], r["worst_leaf"]]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.job:
        spec = json.loads(args.job)
        print("RESULT " + json.dumps(JOBS[spec["kind"]](spec)), flush=True)
        return 0
    config = hf_config(args)
    shard_bytes = parse_size(args.shard_size)
    tag = (f"hf-d{args.hidden}-l{args.layers}-h{args.heads}-k{args.kv_heads}-f"
           f"{args.intermediate}-v{args.vocab}-s{shard_bytes}")
    workdir = Path(args.workdir)
    hf_dir = workdir / tag
    written = write_checkpoint(hf_dir, config, shard_bytes, args.seed)
    largest, total = max(written["files"].values()), sum(written["files"].values())
    print(f"{hf_dir}: {written['params'] / 1e9:.3f}B params, {len(written['files'])} shards, "
          f"largest {largest / MB:,.0f} MB, {total / MB:,.0f} MB in all"
          + (" (reused)" if written["reused"] else f" ({written['write_seconds']:.1f} s)"))
    jobs = [({"kind": "stream", "hf_dir": str(hf_dir), "mesh": m}, m, "")
            for m in args.meshes.split(";") if m]
    free = shutil.disk_usage(workdir).free
    skipped = []
    for dtype in [] if args.skip_convert else args.dtypes.split(","):
        size = written["params"] * (4 if dtype == "float32" else 2)
        if free < 3 * size:
            skipped.append(f"convert {dtype}: {free / 1e9:.0f} GB free < 3x {size / 1e9:.1f} GB")
            continue
        jobs.append(({"kind": "convert", "hf_dir": str(hf_dir), "dtype": dtype,
                      "out": str(workdir / f"params-{dtype}")}, "", dtype))
    if not args.skip_to_hf and any(s.get("dtype") == "bfloat16" for s, _, _ in jobs):
        jobs.append(({"kind": "to_hf", "hf_dir": str(hf_dir), "shard_bytes": shard_bytes,
                      "source": str(workdir / "params-bfloat16"),
                      "out": str(workdir / "exported")}, "", "bfloat16"))
    rows = []
    try:
        for spec, mesh, dtype in jobs:
            print(f"running {spec['kind']} {mesh or dtype} ...", flush=True)
            r = {"job": spec["kind"], "mesh": mesh, "dtype": dtype, "bytes_read_mb": "",
                 "worst_leaf": "", "rss_after_release_mb": "",
                 "check": "", **run_job(spec)}
            r["transient_end_mb"] = r["peak_mb"] - r["baseline_mb"] - r["result_mb"]
            r["transient_mb"] = r.get("transient_worst_mb", r["transient_end_mb"])
            r["largest_shard_mb"], r["checkpoint_mb"] = largest / MB, total / MB
            r["transient_over_largest_shard"] = r["transient_mb"] / r["largest_shard_mb"]
            r["goal_met"] = r["transient_over_largest_shard"] < 1.5
            rows.append(r)
    finally:
        for name in ("params-bfloat16", "params-float32", "exported"):
            shutil.rmtree(workdir / name, ignore_errors=True)
    cpus, jax_version = len(os.sched_getaffinity(0)), importlib.metadata.version("jax")
    print_table(rows, f"{written['params'] / 1e9:.3f}B params, largest shard "
                      f"{largest / MB:,.0f} MB of {total / MB:,.0f} MB; {cpus} CPUs, jax "
                      f"{jax_version}; transient = RSS above the baseline and the arrays made "
                      "(worst parameter for stream), goal < 1.5x the largest shard")
    for s in skipped:
        print(f"skipped {s}")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([sys.executable, *sys.argv]) if argv is None
              else f"main({argv!r})", "argv": sys.argv if argv is None else argv,
              "machine": platform.platform(), "processor": cpu_model(), "cpus": cpus,
              "memory_gb": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 1e9,
              "python": platform.python_version(), "jax": jax_version,
              "hf_dir": str(hf_dir), "hf_config": config, "checkpoint": written,
              "largest_shard_mb": largest / MB, "checkpoint_mb": total / MB,
              "skipped": skipped, "rows": rows}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out} and {out.with_suffix('.csv')}")
    return 0 if all(not r["check"] or r["check"].startswith("ok") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
