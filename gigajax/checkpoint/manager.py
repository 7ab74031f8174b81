"""Orbax checkpoints under `<workdir>/checkpoints/<step>/`: async, retained, checksummed, any mesh.

A step directory holds three Orbax items: `state` (the train state, sharded, StandardSave), `meta`
(JSON: config, step) and, when the loop passes its grain iterator, `data` (grain's own handler: one
JSON file of iterator state per process). Restoring takes an abstract state whose leaves carry the
*target* shardings, so a checkpoint written on one mesh loads onto another. Retention: the last
`max_to_keep` steps plus every multiple of `keep_every` (Orbax's keep_period).

Integrity: Orbax 0.12.8 raises on a truncated or deleted array file, but a flipped byte inside a
zstd-compressed chunk restores silently wrong values, and a deleted `state/_METADATA` restores
without complaint. So process 0 writes `checksums.json` (size and sha256 of every file) into the
step directory after the data is committed and before Orbax renames the directory into place
(AsyncOptions.post_finalization_callback), and restoring verifies it first: any file that is not
as written makes the checkpoint corrupt. `restore_latest` moves a corrupt checkpoint to
`<dir>/corrupt/<step>-<time>` and falls back to the next older one.
Nothing here unpickles: Orbax reads JSON metadata and TensorStore arrays, grain reads JSON.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from gigajax.errors import GigajaxError

CHECKSUMS = "checksums.json"
# Written by Orbax after our callback (commit marker, step metadata): not needed to restore.
UNCHECKED = frozenset({CHECKSUMS, "commit_success.txt", "_CHECKPOINT_METADATA"})
TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX  # "<step>.orbax-checkpoint-tmp" until commit


class _NoItemMetadataWarning(logging.Filter):
    """Orbax warns 'Metadata file does not exist: .../state/_CHECKPOINT_METADATA' whenever it
    reads an item directory (state/, params/) on its own: the step metadata lives one level up,
    in the step directory. Nothing is missing, but it reads like corruption, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_NoItemMetadataWarning())


class CorruptCheckpoint(GigajaxError):
    """A checkpoint's files are not the ones that were written (or cannot be read)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)  # releases the GIL: files hash in parallel threads
    return digest.hexdigest()


def _files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in UNCHECKED)


def write_checksums(directory: str | Path) -> None:
    """Record the size and sha256 of every file under `directory` in `directory/checksums.json`."""
    directory = Path(directory)
    files = _files(directory)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(_sha256, files))
    record = {"algorithm": "sha256", "files": {
        str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": d}
        for p, d in zip(files, digests, strict=True)}}
    with (directory / CHECKSUMS).open("w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def verify_checksums(directory: str | Path) -> str | None:
    """None if `directory` matches its checksums.json (or has none); else what is wrong."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} is missing"
    if not (directory / CHECKSUMS).exists():
        return None  # written before checksums existed: Orbax's own checks are all there are
    try:
        files = json.loads((directory / CHECKSUMS).read_text())["files"]
    except (OSError, ValueError, KeyError) as error:
        return f"{CHECKSUMS} is unreadable: {error}"
    for name, want in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if (size := path.stat().st_size) != want["size"]:
            return f"{name} has {size} bytes, {want['size']} were written"
    names = list(files)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        digests = pool.map(lambda n: _sha256(directory / n), names)
        for name, digest in zip(names, digests, strict=True):
            if digest != files[name]["sha256"]:
                return f"{name} has a different sha256 than was written"
    return None


def _path_key(path: tuple) -> str:
    """`('opt_state', 1, 0, 'mu', 'embed', 'value')` as 'opt_state/1/0/mu/embed/value', whatever
    the node types (namedtuple fields in the state are dict keys in Orbax's metadata)."""
    names = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return "/".join(str(n) for n in names)


def tree_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
    """Each leaf's shape by its '/'-joined path: arrays, ShapeDtypeStructs or Orbax metadata."""
    return {_path_key(path): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def shape_mismatch(saved: dict, wanted: dict, what: str = "checkpoint") -> str | None:
    """The first few differences between two `tree_shapes`, or None if they agree."""
    problems = [f"{k} has shape {saved[k]} in the {what} but {wanted[k]} is wanted"
                for k in wanted if k in saved and saved[k] != wanted[k]]
    problems += [f"{k} is missing from the {what}" for k in wanted if k not in saved]
    problems += [f"{k} is in the {what} but not wanted" for k in saved if k not in wanted]
    if not problems:
        return None
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    return "; ".join(problems[:3]) + more


def _agree(reason: str | None) -> str | None:
    """Across processes: a reason if any process has one (all must pick the same step)."""
    if jax.process_count() == 1:
        return reason
    failed = multihost_utils.process_allgather(np.int32(reason is not None))
    return (reason or "failed on another process") if np.any(failed) else None


def tree_metadata(item: Path) -> Any:
    """The saved tree (shapes and dtypes) of an Orbax pytree item, read from its metadata."""
    try:
        return ocp.PyTreeCheckpointer().metadata(item).item_metadata.tree
    except Exception as error:  # noqa: BLE001  (Orbax raises whatever the reader raised)
        raise CorruptCheckpoint(f"{item}: Orbax metadata is unreadable: {error}") from error


class Checkpointer:
    """The train state, its metadata and the data iterator, via one `ocp.CheckpointManager`."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, keep_every: int = 0,
                 async_save: bool = True, log: Callable[[str], None] = print):
        self.directory = Path(directory).absolute()
        self.async_save, self.log = async_save, log
        self._saving: int | None = None  # the step whose save the background thread finishes
        # always Orbax's async path (the checksum hook needs it); async_save=False waits at once
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=True, cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._record_checksums)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def save(self, step: int, state: Any, meta: dict, data_iter=None, force: bool = False
             ) -> bool:
        """Start saving; with async_save it returns before the files are written (the caller may
        donate `state` to the next step). False if this step is already saved or Orbax declines
        it (a step not after the latest)."""
        if step in self.manager.all_steps():
            return False
        self.manager.wait_until_finished()  # the previous save's callback must see its own step
        self._saving = step
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_iter is not None:  # blocking and small: the iterator's state as of now
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if not self.async_save:
            self.manager.wait_until_finished()
        return saved

    def _record_checksums(self) -> None:
        """Orbax's post-finalization hook (background thread, primary process): the data is
        committed and the directory not yet renamed, so the record lands atomically with it."""
        final = self.step_dir(self._saving)
        tmp = final.with_name(final.name + TMP_SUFFIX)  # absent where Orbax writes in place
        try:
            write_checksums(tmp if tmp.is_dir() else final)
        except OSError as error:  # a checkpoint without checksums is still a checkpoint
            self.log(f"checkpoint {self._saving}: could not write {CHECKSUMS} ({error})")

    def restore(self, step: int, like_state: Any, data_iter=None) -> tuple[Any, dict]:
        """Restore `step` into the shapes, dtypes and shardings of `like_state` (and the data
        iterator's position in place). Raises CorruptCheckpoint if its files fail the checksums,
        GigajaxError if it holds a different tree (another model or optimizer)."""
        directory = self.step_dir(step)
        reason = _agree(verify_checksums(directory) if jax.process_index() == 0 else None)
        if reason is not None:
            raise CorruptCheckpoint(reason)
        saved = tree_metadata(directory / "state")
        if problem := shape_mismatch(tree_shapes(saved), tree_shapes(like_state)):
            raise GigajaxError(
                f"checkpoint {step} in {self.directory} holds a different train state: {problem}."
                " It was written with another model or optimizer config (its config is in "
                f"{directory}/meta); resume with that config or use a new workdir.")
        items = {"state": ocp.args.StandardRestore(like_state), "meta": ocp.args.JsonRestore()}
        if data_iter is not None and (directory / "data").is_dir():
            # grain's handler keeps one file per process, named for the process count
            mine = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
            if (directory / "data" / mine).exists():
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            else:
                self.log(f"checkpoint {step} holds the data iterator of another process count "
                         f"({', '.join(sorted(p.name for p in (directory / 'data').iterdir()))})"
                         "; the data iterator is not restored")
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored.state, restored.meta

    def restore_latest(self, like_state: Any, data_iter=None) -> tuple[Any, dict, int] | None:
        """Restore the newest readable checkpoint: (state, meta, step), or None if there is none.

        A checkpoint that fails its checksums (or, without checksums, fails to restore) is
        reported through `log`, moved to `<dir>/corrupt/` out of Orbax's view so that the step
        can be saved again, and the next older one is tried.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        bad = []
        for i, step in enumerate(steps):
            checked = (self.step_dir(step) / CHECKSUMS).exists()
            try:
                state, meta = self.restore(step, like_state, data_iter)
                reason = None
            except CorruptCheckpoint as error:
                reason = str(error)
            except GigajaxError:
                raise
            except Exception as error:  # noqa: BLE001
                if checked:  # the files are the ones written: not corruption (OOM, bug, ...)
                    raise
                reason = f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"
            if (reason := _agree(reason)) is None:
                return state, meta, step
            older = steps[i + 1] if i + 1 < len(steps) else None
            self.log(f"checkpoint {step} is unreadable ({reason}); "
                     + (f"falling back to {older}" if older is not None else "no older one left"))
            bad.append(f"{step} ({reason}) -> {self._set_aside(step)}")
        raise GigajaxError(f"every checkpoint in {self.directory} is unreadable: "
                           + "; ".join(bad) + ". Rerunning starts from step 0.")

    def _set_aside(self, step: int) -> Path:
        """Move a bad step directory to `<dir>/corrupt/<step>-<time>` and make Orbax forget it."""
        target = self.directory / "corrupt" / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0 and self.step_dir(step).exists():
            target.parent.mkdir(exist_ok=True)
            while target.exists():  # the same step set aside twice within a second
                target = target.with_name(target.name + "+")
            shutil.move(self.step_dir(step), target)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"gigajax_checkpoint_set_aside_{step}")
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Block until every pending async save is on disk (raises what the save raised)."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
