"""DPO's reference log-probabilities: computed once from the starting parameters, kept in the
workdir (`dpo_reference.npz`), and put into every batch by the data pipeline.

The reference model of DPO is the model training starts from (`train.init_from`'s params, or
the seeded initialisation). Rather than keep a frozen copy of its parameters beside the policy
(twice the parameter memory, 28 GB more at 7B in fp32, and a second forward pass every step),
one forward pass over the train and validation pairs before step 1 gives each pair half's
summed response log-probability, two floats per pair. They are stored under a key of (data
fingerprint, seq_len, overlong policy, model config, starting point); a resumed run reads them
back, so the reference is exactly the one its first step used, whatever the params are now.
When the file is missing or its key differs, they are computed again from the starting
parameters (re-read or re-initialised), never from a resumed state. docs/design.md has the
trade-off.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from gigajax.data import store
from gigajax.data.packing import PackedWindows, max_pairs
from gigajax.data.pipeline import (
    batch_features,
    check_data_config,
    parse_mixture,
    permute_batch,
    prepared_sources,
    window_source,
)
from gigajax.parallel.multihost import BATCH_SPEC, is_main_process, place_batch
from gigajax.train.objectives import make_pair_log_probs_fn

FILE = "dpo_reference.npz"
Reference = dict[str, np.ndarray]  # split -> [D, 2] (chosen, rejected) summed log-probs


def reference_key(cfg: ml_collections.ConfigDict) -> str:
    """What the stored reference depends on, as a sha256: the data, how it is packed, the
    model and where its parameters start."""
    manifest = store.read_manifest(cfg.data.path, shards=False)
    start = cfg.train.init_from or f"initialisation with train.seed={cfg.train.seed}"
    body = {"data": manifest["fingerprint"], "seq_len": cfg.data.seq_len,
            "overlong": cfg.data.overlong, "model": cfg.model.to_dict(), "start": start}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def pair_windows(cfg: ml_collections.ConfigDict, split: str) -> PackedWindows:
    """The whole-packed windows of a split's pairs, without reference values."""
    ids = check_data_config(cfg.data)
    source = prepared_sources(parse_mixture(cfg.data), split, ids)[0]
    return window_source(source, cfg.data.seq_len, ids.packing, ids.eos_id)


def compute_reference(cfg: ml_collections.ConfigDict, mesh: Mesh, graphdef: nnx.GraphDef,
                      params: nnx.State, param_shardings, rules, rows: slice,
                      perm: np.ndarray | None) -> Reference:
    """Each pair half's summed log-probability under `params`, batch by batch over the
    unshuffled windows of both splits (this process feeds its `rows`; the replicated result
    gives every process all rows)."""
    batch_size, seq_len = cfg.data.batch_size, cfg.data.seq_len
    fn = jax.jit(make_pair_log_probs_fn(graphdef, max_pairs(seq_len), rules,
                                        cfg.train.loss_chunks),
                 in_shardings=(param_shardings, NamedSharding(mesh, BATCH_SPEC)),
                 out_shardings=NamedSharding(mesh, PartitionSpec()))
    out: Reference = {}
    for split in store.SPLITS:
        windows = pair_windows(cfg, split)
        ref = np.zeros((len(windows.doc_ends), 2), np.float32)
        empty = tuple(np.zeros_like(a) for a in windows[0]) if len(windows) else ()
        for start in range(0, len(windows), batch_size):
            picked = [windows[w] if w < len(windows) else empty
                      for w in range(start, start + batch_size)][rows]
            columns = [np.stack(c) for c in zip(*picked, strict=True)]
            batch = permute_batch(batch_features(*columns, eos_id=windows.eos_id), perm)
            sums = np.asarray(jax.device_get(fn(params, place_batch(batch, mesh, batch_size))))
            for r, w in enumerate(range(start, min(start + batch_size, len(windows)))):
                docs = windows.documents(w)
                ref[docs.start:docs.stop] = sums[r, :len(docs)]
        out[split] = ref
    return out


def load_or_compute(cfg: ml_collections.ConfigDict, workdir: Path,
                    compute: Callable[[], Reference], log: Callable[[str], None]
                    ) -> tuple[Reference, bool]:
    """(reference, whether it must be written): the workdir's when its key matches, else
    `compute()`d (from the starting parameters)."""
    key = reference_key(cfg)
    path = workdir / FILE
    if path.is_file():
        with np.load(path) as stored:
            if str(stored["key"]) == key:
                log(f"DPO reference log-probs read from {path}")
                return {split: stored[split] for split in store.SPLITS}, False
        log(f"{path} was computed for other data, model or start; computing it again")
    began = time.perf_counter()
    reference = compute()
    log(f"DPO reference log-probs of {sum(len(r) for r in reference.values()):,} pairs computed "
        f"from the starting parameters in {time.perf_counter() - began:.1f} s")
    return reference, True


def write_reference(workdir: Path, cfg: ml_collections.ConfigDict, reference: Reference) -> None:
    """Write `dpo_reference.npz` atomically (main process only)."""
    if not is_main_process():
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{FILE}.", suffix=".tmp", dir=workdir)
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, key=np.array(reference_key(cfg)), **reference)
        os.replace(tmp, workdir / FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
