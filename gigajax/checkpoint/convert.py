"""`convert from-hf` and `convert to-hf`: a Hugging Face model directory <-> a gigajax params
checkpoint (or any checkpoint `read_params` reads), exactly: import then export is an identity
on every tensor.

Both write into a temporary directory beside `out` and rename it into place when complete, so a
crash never leaves a half-written output; an existing `out` is refused unless `overwrite`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from gigajax.checkpoint import hf
from gigajax.checkpoint.hf import check_tokenizer, hf_model_config
from gigajax.checkpoint.manager import ALLOW_UNVERIFIED, to_stderr, write_checksums
from gigajax.checkpoint.params import DTYPES, count, merged_lora, read_params, save_params
from gigajax.config import ModelConfig, config_from_dict
from gigajax.config.hf import architecture, read_hf_config, to_hf_config
from gigajax.data.pipeline import data_tokenizer
from gigajax.data.tokenizer import ByteTokenizer, Tokenizer
from gigajax.errors import GigajaxError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
         "GIB": 2**30, "B": 1}


def parse_size(text: str | int, flag: str = "--max-shard-size") -> int:
    """'5GB' / '500MB' / '2GiB' / a byte count -> bytes."""
    if isinstance(text, int):
        return text
    cleaned = str(text).strip().upper()
    unit = next((u for u in sorted(UNITS, key=len, reverse=True) if cleaned.endswith(u)), "")
    try:
        value = float(cleaned[:len(cleaned) - len(unit)] if unit else cleaned)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise GigajaxError(f"{flag} {text!r}: give a size such as 5GB, 500MB or 2GiB.")
    return int(value * UNITS.get(unit, 1))


def from_hf(hf_dir: str | Path, out: str | Path, dtype: str = "float32",
            overwrite: bool = False, ignore: Iterable[str] = (),
            report: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Convert an HF model directory into a gigajax params checkpoint at `out` (params, config
    with data.tokenizer pointing at the copied tokenizer, checksums) and return what was
    written (`report` gets a one-line summary). Usable by `gigajax.load`, as `--config` and
    as `train.init_from`."""
    start = time.perf_counter()
    hf_dir, out = Path(hf_dir).absolute(), Path(out).absolute()
    _check_dtype(dtype)
    staging = _staging(out, overwrite)  # refuse an existing --out before reading anything
    cfg = hf_model_config(hf_dir, ignore)
    lazy = hf.hf_params(hf_dir, ModelConfig.from_config(cfg))
    present = [n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
    vocabulary = next((n for n in ("tokenizer.json", "tokenizer.model") if n in present), None)
    if vocabulary is not None:  # where the copy will lie once `out` is in place
        cfg.data.tokenizer = str(out / "tokenizer" / vocabulary)
    params = jax.tree.map(lambda x: np.asarray(x, DTYPES[dtype]), lazy)
    meta = {"format": "gigajax-params-v1", "config": cfg.to_dict(), "source_steps": [],
            "made_by": "convert from-hf", "dtype": dtype, "num_params": count(params),
            "hf": {"path": str(hf_dir), "tokenizer_files": present,
                   "architecture": architecture(read_hf_config(hf_dir), str(hf_dir))}}
    with staging as directory:
        written = save_params(directory, params, meta)
        del params
        copy_tokenizer_files(hf_dir, directory / "tokenizer")
        write_checksums(directory)  # again, now with the tokenizer files
    written["path"] = str(out)
    return _report(written, start, f"from {hf_dir}", report)


def to_hf(checkpoint: str | Path, out: str | Path, dtype: str = "bfloat16",
          max_shard_size: str | int = "5GB", overwrite: bool = False, step: int | None = None,
          require_checksums: bool = True, log: Callable[[str], None] = to_stderr,
          allow_hint: str = ALLOW_UNVERIFIED, report: Callable[[str], None] | None = None
          ) -> dict[str, Any]:
    """Write the params of `checkpoint` (workdir, step or params directory, or an HF directory)
    as an HF model directory that `transformers` loads with no gigajax code: config.json (with
    the run's RoPE scaling), safetensors shards with an index, the tokenizer files; a LoRA
    run's adapters merged into their weights. `log` gets
    warnings, `report` a one-line summary."""
    start = time.perf_counter()
    _check_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    out = Path(out).absolute()
    staging = _staging(out, overwrite)
    found = read_params(checkpoint, step, require_checksums=require_checksums, log=log,
                        allow_hint=allow_hint)
    if found.config is None:
        raise GigajaxError(f"{found.path} holds no config: cannot tell which model it is.")
    cfg = config_from_dict(found.config)
    if cfg.model.lora.rank:  # a LoRA run: HF gets the merged weights (W + alpha/R A B)
        found.params, merged_config = merged_lora(found.params, found.config, found.path)
        cfg = config_from_dict(merged_config)
    model_cfg = ModelConfig.from_config(cfg)
    tok = _run_tokenizer(cfg, log)
    token_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tok is not None:
        check_tokenizer(tok, cfg, "the run's tokenizer")
        token_ids = {"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id,
                     "pad_token_id": tok.pad_id}
    hf_config = to_hf_config(cfg, dtype, token_ids)
    np_dtype = DTYPES[dtype]
    tensors = list(hf.hf_tensors(found.params, model_cfg, np_dtype))
    shapes = dict(hf.hf_shapes(model_cfg))
    with staging as directory:
        directory.mkdir()
        files = hf.write_safetensors(directory, tensors, shapes, np_dtype, max_bytes)
        (directory / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        files += ["config.json", *write_tokenizer(tok, directory, cfg)]
    size = sum((out / f).stat().st_size for f in files if (out / f).is_file())
    written = {"path": str(out), "num_params": count(found.params), "dtype": dtype,
               "megabytes": size / 2**20, "files": files}
    return _report(written, start, f"from {found.path}", report)


def _run_tokenizer(cfg: ml_collections.ConfigDict, log: Callable[[str], None]
                   ) -> Tokenizer | None:
    """The run's tokenizer, or None (with a note) when it cannot be found here."""
    try:
        return data_tokenizer(cfg.data)
    except GigajaxError as error:
        log(f"note: no tokenizer files written: the run's tokenizer is not readable here "
            f"({error})")
        return None


def copy_tokenizer_files(hf_dir: Path, target: Path) -> list[str]:
    """Copy the tokenizer files (and chat template, generation config) that `hf_dir` has."""
    present = [n for n in TOKENIZER_FILES if (hf_dir / n).is_file()]
    if present:
        target.mkdir(parents=True)
        for name in present:
            shutil.copy2(hf_dir / name, target / name)
    return present


def write_tokenizer(tok: Tokenizer | None, out: Path, cfg: ml_collections.ConfigDict
                    ) -> list[str]:
    """The tokenizer files of an export: the run's own files (with their chat template and
    tokenizer_config.json when beside them), or, for the byte tokenizer, an equivalent
    `tokenizers` byte-level tokenizer.json that transformers loads."""
    if tok is None:
        return []
    if isinstance(tok, ByteTokenizer):
        byte_tokenizer_json(out / "tokenizer.json")
        written = ["tokenizer.json"]
    else:
        source = Path(tok.spec)
        written = [n for n in TOKENIZER_FILES if (source.parent / n).is_file()]
        for name in written:
            shutil.copy2(source.parent / name, out / name)
        if source.name not in written:
            shutil.copy2(source, out / source.name)
            written.append(source.name)
    if "tokenizer_config.json" not in written:
        names = _special_names(tok)
        (out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", **names,
            "model_max_length": int(cfg.model.max_seq_len)}, indent=2) + "\n")
        written.append("tokenizer_config.json")
    return written


def _special_names(tok: Tokenizer) -> dict[str, str]:
    """bos/eos/pad token strings of a gigajax tokenizer (ours are SPECIALS' spellings)."""
    if isinstance(tok, ByteTokenizer):
        return {"bos_token": "<|bos|>", "eos_token": "<|eos|>", "pad_token": "<|pad|>"}
    from tokenizers import Tokenizer as HFTokenizerFile

    try:
        lib = HFTokenizerFile.from_file(tok.spec)
    except Exception:  # a SentencePiece model: its tokenizer_config.json is the user's to add
        return {}
    return {f"{kind}_token": lib.id_to_token(i) for kind, i in
            (("bos", tok.bos_id), ("eos", tok.eos_id), ("pad", tok.pad_id))}


def byte_tokenizer_json(path: Path) -> None:
    """A `tokenizers` tokenizer.json equal to gigajax's ByteTokenizer: byte b is id b (no
    merges), the six specials 256..261 as added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()  # the 256 printable stand-ins for bytes, GPT-2's mapping
    by_byte = _gpt2_byte_chars()
    assert sorted(alphabet) == sorted(by_byte.values())
    vocab = {by_byte[b]: b for b in range(256)}
    lib = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    lib.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    lib.decoder = decoders.ByteLevel()
    from gigajax.data.tokenizer import SPECIALS

    lib.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    lib.save(str(path))


def _gpt2_byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer emits)."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise GigajaxError(f"--dtype {dtype!r}: choose from {', '.join(DTYPES)}.")


class _staging:
    """A temporary directory beside `out` (`.<name>.<pid>.<random>.tmp`), renamed to `out` on
    success, removed on failure; one left by a writer that died (its pid gone) is removed."""

    def __init__(self, out: Path, overwrite: bool):
        if out.exists() and not overwrite:
            raise GigajaxError(f"--out {out} already exists: choose a new directory, or pass "
                               "--overwrite to replace it.")
        if out.exists() and not out.is_dir():
            raise GigajaxError(f"--out {out} is a file: pass a directory.")
        out.parent.mkdir(parents=True, exist_ok=True)
        self.out, self.overwrite = out, overwrite
        for stale in out.parent.glob(f".{out.name}.*.tmp"):
            pid = stale.name[len(out.name) + 2:].split(".")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(stale, ignore_errors=True)

    def __enter__(self) -> Path:
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.{os.getpid()}.",
                                         suffix=".tmp", dir=self.out.parent))
        self.path = self.tmp / "out"
        return self.path

    def __exit__(self, kind, error, tb) -> None:
        if kind is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if self.out.exists():  # --overwrite: the old output goes into the temporary, removed
            os.replace(self.out, self.tmp / "replaced")
        os.replace(self.path, self.out)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _report(written: dict, start: float, source: str,
            report: Callable[[str], None] | None) -> dict:
    written["seconds"] = time.perf_counter() - start
    if report is not None:
        report(f"wrote {written['path']} {source}: {written['num_params'] / 1e6:.2f}M "
               f"parameters ({written['dtype']}), {written['megabytes']:.1f} MB, "
               f"{written['seconds']:.1f} s")
    return written
