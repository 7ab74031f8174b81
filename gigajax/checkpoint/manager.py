"""Orbax checkpoints under `<workdir>/checkpoints/<step>/`: async, retained, checksummed, any mesh.

A step directory holds three Orbax items: `state` (the train state, sharded, StandardSave), `meta`
(JSON: config, step) and, when the loop passes its grain iterator, `data` (grain's own handler: one
JSON file of iterator state per process). Restoring takes an abstract state whose leaves carry the
*target* shardings, so a checkpoint written on one mesh loads onto another. Retention: the last
`max_to_keep` steps plus every multiple of `keep_every` (Orbax's keep_period).

Integrity: Orbax 0.12.8 raises on a truncated or deleted array file, but a flipped byte inside a
zstd-compressed chunk restores silently wrong values, and a deleted `state/_METADATA` restores
without complaint. So every step directory gets `checksums.json` (size and sha256 of every file)
before Orbax renames it into place, and restoring verifies it first: any file that is not as
written makes the checkpoint corrupt. `restore_latest` moves a corrupt checkpoint to
`<dir>/corrupt/<step>-<time>` and falls back to the next older one. A checkpoint without
`checksums.json` (older than checksums, or recording them failed) is refused with
`require_checksums` (the default) and restored with a warning without; it is never moved aside.

Hashing is spread over the processes. Saving: at Orbax's barrier after the writes (its
`barrier_sync_fn`, key `async_write_complete`), each process hashes the files it wrote itself
(`written_by`: `ocdbt.process_<i>/`, `array_metadatas/process_<i>`, grain's `process_<i>-of-n`)
into `checksums.process_<i>.json`; process 0 then (AsyncOptions.post_finalization_callback,
before the rename) hashes the shared files and merges all into `checksums.json`. Restoring: each
process verifies a share of the files balanced by bytes, and every verdict is agreed across
processes (`_agreed`), so a failure on one process stops or redirects all of them alike.
Nothing here unpickles: Orbax reads JSON metadata and TensorStore arrays, grain reads JSON.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import os
import re
import shutil
import sys
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
PROCESS_CHECKSUMS = "checksums.process_{}.json"  # one process's files, merged into CHECKSUMS
# Written by Orbax after our callback (commit marker, step metadata): not needed to restore.
UNCHECKED = frozenset({CHECKSUMS, "commit_success.txt", "_CHECKPOINT_METADATA"})
TMP_SUFFIX = ocp.path.atomicity_types.TMP_DIR_SUFFIX  # "<step>.orbax-checkpoint-tmp" until commit
HASH_THREADS = 8  # per process; sha256 runs ~1.9 GB/s per thread (hashlib releases the GIL)
ALLOW_UNVERIFIED = "Set checkpoint.require_checksums=false to load it anyway, with a warning."
_RECORD = re.compile(r"checksums\.process_\d+\.json")
_TMP_ITEM = re.compile(re.escape(TMP_SUFFIX) + r"(?:-\d+)?(?=/|$)")  # `state.orbax-...-tmp/`
_WRITER = re.compile(r"(?:^|[/.])process_(\d+)(?=$|[/-])")
_MESSAGE_BYTES = 4096  # of an error message shared across processes


class _NoItemMetadataWarning(logging.Filter):
    """Orbax warns 'Metadata file does not exist: .../state/_CHECKPOINT_METADATA' whenever it
    reads an item directory (state/, params/) on its own: the step metadata lives one level up,
    in the step directory. Nothing is missing, but it reads like corruption, so it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Metadata file does not exist")


logging.getLogger("absl").addFilter(_NoItemMetadataWarning())


class CorruptCheckpoint(GigajaxError):
    """A checkpoint's files are not the ones that were written (or cannot be read)."""


class UnverifiedCheckpoint(GigajaxError):
    """A checkpoint without checksums.json, refused: its files cannot be verified."""


def to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)  # releases the GIL: files hash in parallel threads
    return digest.hexdigest()


def _names(directory: Path) -> list[str]:
    """Every file to checksum under `directory`, as a '/'-joined relative path."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()
                  and p.name not in UNCHECKED and not _RECORD.fullmatch(p.name))


def written_by(name: str) -> int | None:
    """The process that wrote the file `name` of a step directory, by Orbax's and grain's names
    (`state/ocdbt.process_1/d/...`, `state/array_metadatas/process_1`, `data/process_1-of-2.json`);
    None for a shared file (process 0's, some written only when Orbax finalizes)."""
    match = _WRITER.search(name)
    return int(match.group(1)) if match else None


def _hash(directory: Path, names: list[str], threads: int = HASH_THREADS) -> dict[str, dict]:
    """{name: size, sha256 and mtime} of files; the stat comes first, so a file changed while
    it was hashed shows a newer mtime than recorded."""
    def one(name: str) -> dict:
        stat = (directory / name).stat()
        return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
                "sha256": _sha256(directory / name)}

    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return dict(zip(names, pool.map(one, names), strict=True))


def _write_json(path: Path, record: dict) -> None:
    with path.open("w") as f:
        json.dump(record, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def write_process_checksums(directory: str | Path, process: int) -> int:
    """One process's share of the hashing of a save: the files it wrote itself (`written_by`),
    into `directory/checksums.process_<process>.json` for `write_checksums` to merge. Names are
    recorded as they will be once Orbax has renamed the item directories into place
    (`state.orbax-checkpoint-tmp/` -> `state/`; renaming keeps sizes and mtimes). Returns how
    many files."""
    directory = Path(directory)
    names = [n for n in _names(directory) if written_by(n) == process]
    hashed = _hash(directory, names)
    _write_json(directory / PROCESS_CHECKSUMS.format(process), {"algorithm": "sha256", "files": {
        _TMP_ITEM.sub("", n): entry for n, entry in hashed.items()}})
    return len(names)


def write_checksums(directory: str | Path) -> None:
    """Record the size and sha256 of every file under `directory` in `directory/checksums.json`.
    Files in a `checksums.process_<i>.json` (`write_process_checksums`) with the size and mtime
    recorded there are taken from it (`process` says who hashed each); the rest are hashed here.
    The per-process records are removed once merged."""
    directory = Path(directory)
    records = sorted(directory.glob(PROCESS_CHECKSUMS.format("*")))
    hashed: dict[str, dict] = {}
    for record in records:
        process = int(record.name.split("_")[1].split(".")[0])
        try:
            files = json.loads(record.read_text())["files"]
        except (OSError, ValueError, KeyError):  # unreadable: its files are hashed again below
            continue
        hashed.update({n: {**entry, "process": process} for n, entry in files.items()})
    names = _names(directory)
    for name in names:
        if name in hashed:
            stat = (directory / name).stat()
            if (hashed[name]["size"], hashed[name]["mtime_ns"]) != (stat.st_size,
                                                                     stat.st_mtime_ns):
                del hashed[name]  # changed after its process hashed it
    mine = jax.process_index()
    hashed |= {n: {**entry, "process": mine} for n, entry in _hash(
        directory, [n for n in names if n not in hashed]).items()}
    _write_json(directory / CHECKSUMS, {"algorithm": "sha256", "files": {
        n: {k: hashed[n][k] for k in ("size", "sha256", "process")} for n in names}})
    for record in records:
        record.unlink(missing_ok=True)


def has_checksums(directory: str | Path) -> bool:
    return (Path(directory) / CHECKSUMS).is_file()


def share(files: dict[str, dict], part: int, parts: int) -> list[str]:
    """Part `part` of `parts` of the names in a checksums record, balanced by bytes (largest
    first, each to the lightest part): the same split on every process that reads it."""
    loads, mine = [0] * parts, []
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        lightest = loads.index(min(loads))
        loads[lightest] += files[name]["size"] + 1
        if lightest == part:
            mine.append(name)
    return mine


def verify_checksums(directory: str | Path, part: int = 0, parts: int = 1) -> str | None:
    """None if the files of `directory` are those its checksums.json records, else what is
    wrong (also when it has no checksums.json: `has_checksums` tells the two apart). With
    `parts` > 1, only share `part` of the files is checked (`share`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} is missing"
    if not has_checksums(directory):
        return f"{CHECKSUMS} is missing"
    try:
        files = json.loads((directory / CHECKSUMS).read_text())["files"]
        names = share(files, part, parts)
    except (OSError, ValueError, KeyError, TypeError) as error:
        return f"{CHECKSUMS} is unreadable: {error}"
    for name in names:
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if (size := path.stat().st_size) != files[name]["size"]:
            return f"{name} has {size} bytes, {files[name]['size']} were written"
    with concurrent.futures.ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = pool.map(lambda n: _sha256(directory / n), names)
        for name, digest in zip(names, digests, strict=True):
            if digest != files[name]["sha256"]:
                return f"{name} has a different sha256 than was written"
    return None


def missing_checksums(what: str, allow_hint: str = ALLOW_UNVERIFIED) -> str:
    """The refusal of a checkpoint without checksums.json; `allow_hint` says how to accept it."""
    return (f"{what} has no {CHECKSUMS} (it is older than checksums, or writing them failed), "
            f"so a corrupt file in it would load unnoticed. {allow_hint}")


def check_files(directory: str | Path, what: str, require_checksums: bool = True,
                log: Callable[[str], None] = to_stderr, allow_hint: str = ALLOW_UNVERIFIED) -> bool:
    """Verify all files of `directory` (`what` names it in messages) in this process: True if
    they are as written. Raises CorruptCheckpoint if not; without checksums.json, raises
    UnverifiedCheckpoint if `require_checksums`, else warns through `log` and returns False."""
    directory = Path(directory)
    if directory.is_dir() and not has_checksums(directory):
        if require_checksums:
            raise UnverifiedCheckpoint(missing_checksums(what, allow_hint))
        log(f"warning: {what} has no {CHECKSUMS}: reading it without verifying its files "
            "(require_checksums is off)")
        return False
    if reason := verify_checksums(directory):
        raise CorruptCheckpoint(f"{what} is corrupt: {reason}")
    return True


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


# what a failure is, least severe first: corrupt (fall back), unverified, user error, anything
_KINDS = (CorruptCheckpoint, UnverifiedCheckpoint, GigajaxError, Exception)


def _agreed(fn: Callable[[], Any], what: str) -> Any:
    """`fn()` on every process; if it raised on any, it raises on all, so that none goes on
    alone into a collective that its peers never reach (a hang): the failure of the most severe
    kind (`_KINDS`) wins, raised as it was where it happened, elsewhere as the same kind with
    its message and the process named. `what` prefixes the message of an unexpected error."""
    if jax.process_count() == 1:
        return fn()
    result, error, kind, message = None, None, 0, ""
    try:
        result = fn()
    except Exception as caught:  # noqa: BLE001  (shared below, then raised)
        error = caught
        kind = 1 + next(i for i, k in enumerate(_KINDS) if isinstance(caught, k))
        message = str(caught) if isinstance(caught, GigajaxError) else (
            f"{what}: {type(caught).__name__}: {(str(caught).splitlines() or [''])[0][:300]}")
    row = np.zeros(1 + _MESSAGE_BYTES, np.uint8)
    text = np.frombuffer(message.encode()[:_MESSAGE_BYTES], np.uint8)
    row[0], row[1:1 + len(text)] = kind, text
    rows = np.asarray(multihost_utils.process_allgather(row))  # [processes, 1 + bytes]
    worst = int(rows[:, 0].max())
    if worst == 0:
        return result
    if kind == worst:
        raise error
    process = int(np.argmax(rows[:, 0] == worst))
    shared = bytes(rows[process, 1:]).rstrip(b"\0").decode(errors="replace")
    kind_class = RuntimeError if worst == len(_KINDS) else _KINDS[worst - 1]
    raise kind_class(f"{shared} (on process {process})") from error


def tree_metadata(item: Path) -> Any:
    """The saved tree (shapes and dtypes) of an Orbax pytree item, read from its metadata."""
    try:
        return ocp.PyTreeCheckpointer().metadata(item).item_metadata.tree
    except Exception as error:  # noqa: BLE001  (Orbax raises whatever the reader raised)
        raise CorruptCheckpoint(f"{item}: Orbax metadata is unreadable: {error}") from error


class Checkpointer:
    """The train state, its metadata and the data iterator, via one `ocp.CheckpointManager`.

    `require_checksums=False` restores a checkpoint without checksums.json, with a warning
    through `log`; by default it is refused (UnverifiedCheckpoint)."""

    def __init__(self, directory: str | Path, max_to_keep: int = 3, keep_every: int = 0,
                 async_save: bool = True, log: Callable[[str], None] = print, *,
                 require_checksums: bool = True):
        self.directory = Path(directory).absolute()
        self.async_save, self.log, self.require_checksums = async_save, log, require_checksums
        self._saving: int | None = None  # the step whose save the background thread finishes
        self._hashed: int | None = None  # the last step whose own files this process hashed
        self._barrier = ocp.multihost.get_barrier_sync_fn()  # Orbax's default, wrapped below
        # always Orbax's async path (the checksum hook needs it); async_save=False waits at once
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, keep_period=keep_every or None, create=True,
            enable_async_checkpointing=True, cleanup_tmp_directories=True,
            async_options=ocp.AsyncOptions(post_finalization_callback=self._record_checksums,
                                           barrier_sync_fn=self._sync)))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def step_dir(self, step: int) -> Path:
        return self.directory / str(step)

    def _writing_dir(self) -> Path:
        """The directory the step being saved is written to: `<step>.orbax-checkpoint-tmp`
        until Orbax renames it (the step directory itself where Orbax writes in place)."""
        final = self.step_dir(self._saving)
        tmp = final.with_name(final.name + TMP_SUFFIX)
        return tmp if tmp.is_dir() else final

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

    def _sync(self, *, key: str, timeout_ms: int) -> None:
        """Orbax's barriers (multi-process only), unchanged but for one: at
        `async_write_complete` this process's files of the step being saved are all written, so
        it hashes them first (`write_process_checksums`), every process at once. Whatever goes
        wrong there, the barrier is still reached: process 0 hashes what has no record."""
        if "async_write_complete" in key and self._saving not in (None, self._hashed):
            self._hashed = self._saving
            try:
                write_process_checksums(self._writing_dir(), jax.process_index())
            except Exception as error:  # noqa: BLE001
                self.log(f"checkpoint {self._saving}: process {jax.process_index()} could not "
                         f"hash its files ({error}); process 0 hashes them")
        self._barrier(key=key, timeout_ms=timeout_ms)

    def _record_checksums(self) -> None:
        """Orbax's post-finalization hook (background thread, primary process): the data is
        committed and the directory not yet renamed, so the record lands atomically with it."""
        try:
            write_checksums(self._writing_dir())
        except OSError as error:  # a checkpoint without checksums is still a checkpoint
            self.log(f"checkpoint {self._saving}: could not write {CHECKSUMS} ({error}); it "
                     "restores only with checkpoint.require_checksums=false")

    def _verify(self, step: int) -> bool:
        """This process's share of the checksums of `step` (`share`): True if verified, False
        if it has none and `require_checksums` is off (a warning); else raises."""
        directory, where = self.step_dir(step), f"checkpoint {step} in {self.directory}"
        if directory.is_dir() and not has_checksums(directory):
            if self.require_checksums:
                raise UnverifiedCheckpoint(missing_checksums(where, (
                    "Set checkpoint.require_checksums=false to restore it anyway, with a "
                    f"warning, or move {directory} elsewhere to resume from the checkpoint "
                    "before it.")))
            self.log(f"warning: {where} has no {CHECKSUMS}: restoring it without verifying its "
                     "files (checkpoint.require_checksums=false)")
            return False
        if reason := verify_checksums(directory, jax.process_index(), jax.process_count()):
            raise CorruptCheckpoint(reason)
        return True

    def _items(self, step: int, like_state: Any, data_iter) -> dict:
        """Orbax's restore arguments, once the saved tree is known to match `like_state`."""
        directory = self.step_dir(step)
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
        return items

    def _read(self, step: int, items: dict, verified: bool) -> Any:
        """Orbax's handler restore, without the barrier that `CheckpointManager.restore` ends
        in: a device collective that a process failing before it never reaches, so that its
        peers would wait in it (or gloo would pair it with the next one). `restore` agrees on
        the outcome instead."""
        self.manager.wait_until_finished()
        try:
            return ocp.CompositeCheckpointHandler().restore(self.step_dir(step),
                                                            args=ocp.args.Composite(**items))
        except Exception as error:
            if verified:  # the files are the ones written: not corruption (OOM, a bug, ...)
                raise
            first = (str(error).splitlines() or [""])[0][:200]
            raise CorruptCheckpoint(f"{type(error).__name__}: {first}") from error

    def restore(self, step: int, like_state: Any, data_iter=None) -> tuple[Any, dict]:
        """Restore `step` into the shapes, dtypes and shardings of `like_state` (and the data
        iterator's position in place). Raises CorruptCheckpoint if its files fail the checksums
        (or, unverified, fail to restore), UnverifiedCheckpoint if it has no checksums and they
        are required, GigajaxError if it holds a different tree (another model or optimizer).
        Each stage is agreed across processes: what fails on one raises on all."""
        what = f"restoring checkpoint {step} in {self.directory}"
        verified = _agreed(lambda: self._verify(step), what)
        items = _agreed(lambda: self._items(step, like_state, data_iter), what)
        restored = _agreed(lambda: self._read(step, items, verified), what)
        return restored.state, restored.meta

    def restore_latest(self, like_state: Any, data_iter=None) -> tuple[Any, dict, int] | None:
        """Restore the newest readable checkpoint: (state, meta, step), or None if there is none.

        A corrupt checkpoint (one that fails its checksums or, without checksums, fails to
        restore) is reported through `log`, moved to `<dir>/corrupt/` out of Orbax's view so
        that the step can be saved again, and the next older one is tried. Every other failure
        (no checksums while they are required, another model, an error reading verified files)
        is raised on every process and moves nothing.
        """
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            return None
        bad = []
        for i, step in enumerate(steps):
            try:
                state, meta = self.restore(step, like_state, data_iter)
                return state, meta, step
            except CorruptCheckpoint as error:
                reason = str(error)
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
