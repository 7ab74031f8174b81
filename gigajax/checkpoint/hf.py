"""Hugging Face safetensors <-> gigajax params: a table from each HF tensor name to our path, and
the reshape between them.

HF stores a Linear as [out, in]; gigajax stores projections [in, *out] ('DHE' for q) with the
layers stacked on a leading axis. Each `Tensor` says how HF's two dims split into ours and which
come first; no q/k permutation is needed (both use rotate-half RoPE).

Reading is lazy and sliced: `hf_params` returns `HFTensor`s, each reading only the index it is
asked for (`safe_open(...).get_slice`), one layer at a time, so a process that fills its shards of
a sharded array (`parallel/shardings.place_shards`) reads only those bytes and the file is unmapped
after each read.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import math
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_collections
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gigajax.config import ModelConfig
from gigajax.config.hf import from_hf_config, hf_family, read_hf_config
from gigajax.data.tokenizer import Tokenizer, get_tokenizer
from gigajax.errors import ConfigError, GigajaxError
from gigajax.model.moe import ROUTING_BIAS

INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16),
                "F16": np.dtype(np.float16)}
IGNORED_TENSORS = ("rotary_emb.inv_freq",)  # buffers older checkpoints saved; recomputed here


@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor (per layer {i} of `layers`, per expert {j} of `experts`): its rows split as
    `rows`, its columns as `cols`; ours is that reshape, transposed (columns first) when
    `transpose`, stacked over the layers and then the experts."""

    ours: tuple[str, ...]  # path in the nnx.to_pure_dict tree
    hf: str  # name, with {i} for the layer and {j} for the expert
    rows: tuple[int, ...]
    cols: tuple[int, ...] = ()
    transpose: bool = False
    layers: range | None = None  # the HF layers of a stacked tensor (None: not per layer)
    experts: int = 0  # > 0: one HF tensor per expert, stacked after the layers

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return (math.prod(self.rows),) + ((math.prod(self.cols),) if self.cols else ())

    @property
    def our_shape(self) -> tuple[int, ...]:
        """Per HF tensor (without the stacked `layers` and expert axes)."""
        return self.cols + self.rows if self.transpose else self.rows + self.cols

    @property
    def stacked(self) -> tuple[int, ...]:
        """The sizes of our leading axes that run over HF tensors: layers, then experts."""
        return (((len(self.layers),) if self.layers is not None else ())
                + ((self.experts,) if self.experts else ()))

    def name(self, *position: int) -> str:
        """The HF name at a position of the stacked axes (layer index in the stack, expert)."""
        layer = self.layers[position[0]] if self.layers is not None else None
        expert = position[-1] if self.experts else None
        return self.hf.format(i=layer, j=expert)

    def names(self) -> Iterator[tuple[str, tuple[int, ...]]]:
        """(HF name, position in the stacked axes) of every HF tensor this one gathers."""
        for position in itertools.product(*map(range, self.stacked)):
            yield self.name(*position), position

    def to_ours(self, hf_RC: np.ndarray) -> np.ndarray:
        x = hf_RC.reshape(self.rows + self.cols)
        if self.transpose:
            n = len(self.rows)
            x = x.transpose(tuple(range(n, x.ndim)) + tuple(range(n)))
        return x

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        if self.transpose:
            n = len(self.cols)
            ours = ours.transpose(tuple(range(n, ours.ndim)) + tuple(range(n)))
        return np.ascontiguousarray(ours.reshape(self.hf_shape))


def tensor_table(cfg: ModelConfig) -> list[Tensor]:
    """Every tensor of the HF checkpoint of `cfg`, in HF's order: dense blocks in `blocks`, a
    mixture of experts' blocks (after its `first_dense_layers`) in `moe_blocks`."""
    D, V = cfg.d_model, cfg.vocab_size
    moe = bool(cfg.moe.n_routed_experts)
    n_dense = cfg.moe.first_dense_layers if moe else cfg.n_layers
    table = [Tensor(("embed",), "model.embed_tokens.weight", (V,), (D,))]
    for stack, layers in (("blocks", range(n_dense)), ("moe_blocks", range(n_dense, cfg.n_layers))):
        if layers:
            table += _block_tensors(cfg, stack, layers)
    table.append(Tensor(("final_norm", "scale"), "model.norm.weight", (D,)))
    if not cfg.tie_embeddings:
        table.append(Tensor(("lm_head",), "lm_head.weight", (V,), (D,), True))
    return table


def _block_tensors(cfg: ModelConfig, stack: str, layers: range) -> list[Tensor]:
    """The tensors of the blocks `layers`, our stack `stack` (moe_blocks: routed experts)."""
    D, H, K, E, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.mlp_dim
    attn, layer = "model.layers.{i}.self_attn.", "model.layers.{i}."

    def per_layer(ours: tuple[str, ...], hf: str, rows, cols=(), transpose=False, experts=0):
        return Tensor((stack, *ours), hf, rows, cols, transpose, layers, experts)

    table = [per_layer(("attn_norm", "scale"), layer + "input_layernorm.weight", (D,))]
    for name, heads in (("q", H), ("k", K), ("v", K)):
        table.append(per_layer(("attn", f"w{name}"), attn + f"{name}_proj.weight", (heads, E),
                               (D,), True))
        if cfg.qkv_bias:
            table.append(per_layer(("attn", f"b{name}"), attn + f"{name}_proj.bias",
                                   (heads, E)))
    table.append(per_layer(("attn", "wo"), attn + "o_proj.weight", (D,), (H, E), True))
    if cfg.qk_norm:
        table += [per_layer(("attn", "q_norm", "scale"), attn + "q_norm.weight", (E,)),
                  per_layer(("attn", "k_norm", "scale"), attn + "k_norm.weight", (E,))]
    table.append(per_layer(("mlp_norm", "scale"), layer + "post_attention_layernorm.weight",
                           (D,)))
    if stack == "blocks":
        return table + [
            per_layer(("mlp", "w_gate"), layer + "mlp.gate_proj.weight", (F,), (D,), True),
            per_layer(("mlp", "w_up"), layer + "mlp.up_proj.weight", (F,), (D,), True),
            per_layer(("mlp", "w_down"), layer + "mlp.down_proj.weight", (D,), (F,), True)]
    moe = cfg.moe
    if moe.n_shared_experts:
        raise ConfigError("model.moe.n_shared_experts > 0: Mixtral and Qwen3-MoE checkpoints "
                          "have no shared experts.")
    X, Fx = moe.n_routed_experts, moe.expert_mlp_dim or cfg.mlp_dim
    family = hf_family(cfg.qk_norm, cfg.qkv_bias, cfg.sliding_window, moe=True)
    mlp, (gate, up, down) = ((layer + "block_sparse_moe.", ("w1", "w3", "w2"))
                             if family == "mixtral" else
                             (layer + "mlp.", ("gate_proj", "up_proj", "down_proj")))
    expert = mlp + "experts.{j}."
    return table + [
        per_layer(("mlp", "router"), mlp + "gate.weight", (X,), (D,), True),
        per_layer(("mlp", "w_gate"), expert + gate + ".weight", (Fx,), (D,), True, X),
        per_layer(("mlp", "w_up"), expert + up + ".weight", (Fx,), (D,), True, X),
        per_layer(("mlp", "w_down"), expert + down + ".weight", (D,), (Fx,), True, X)]


def hf_shapes(cfg: ModelConfig) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(HF name, shape) of every tensor of the HF checkpoint of `cfg`."""
    for spec in tensor_table(cfg):
        for name, _ in spec.names():
            yield name, spec.hf_shape


def tensor_files(hf_dir: Path) -> dict[str, Path]:
    """Each tensor name -> the safetensors file holding it: from the index when there is one
    (every shard it names must exist), else from the headers of every *.safetensors file."""
    index = hf_dir / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise GigajaxError(f"{index} is not a safetensors index (a JSON object with a "
                               f"weight_map): {error}") from None
        files = {name: hf_dir / file for name, file in weight_map.items()}
        for path in sorted(set(files.values())):
            if not path.is_file():
                raise GigajaxError(f"{index} names shard {path.name}, which is missing from "
                                   f"{hf_dir}.")
        return files
    shards = sorted(hf_dir.glob("*.safetensors"))
    if not shards:
        raise GigajaxError(f"{hf_dir} holds no *.safetensors file (PyTorch .bin checkpoints "
                           "are not read: re-save with `save_pretrained(..., "
                           "safe_serialization=True)`).")
    files = {}
    for path in shards:
        with _open(path) as f:
            files.update({name: path for name in f.keys()})
    return files


def _open(path: Path):
    try:
        return safe_open(str(path), framework="numpy")
    except Exception as error:  # safetensors raises its own SafetensorError
        raise GigajaxError(f"{path} is not a readable safetensors file ({error}).") from None


class HFTensor:
    """One gigajax parameter read lazily from HF files: `x[index]` reads that slice only.
    Shape is ours (stacked layers, then experts, first where the tensor has them); dtype is
    the file's."""

    def __init__(self, spec: Tensor, files: dict[str, Path], dtype: np.dtype):
        self.spec, self.files = spec, files
        self.shape = spec.stacked + spec.our_shape
        self.dtype = dtype
        self.bytes_read = 0

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        x = self[...]  # a new array: no second copy when the dtype already matches
        return x if dtype is None else x.astype(dtype, copy=False)

    def __getitem__(self, index: Any) -> np.ndarray:
        slices = _slices(index, self.shape)
        n = len(self.spec.stacked)
        if not n:
            return self._read(self.spec.hf, slices)
        ranges = [range(*s.indices(size)) for s, size in zip(slices[:n], self.shape, strict=False)]
        if not all(ranges):
            raise IndexError(f"HFTensor: empty slice {index!r} of a {self.shape} tensor")
        parts = [self._read(self.spec.name(*position), slices[n:])
                 for position in itertools.product(*ranges)]
        return np.stack(parts).reshape(tuple(map(len, ranges)) + parts[0].shape)

    def _read(self, name: str, slices: tuple[slice, ...]) -> np.ndarray:
        """Our slice `slices` of one HF tensor: the covering rows x columns read from the file,
        then reshaped and cut to the exact slice."""
        s = self.spec
        ours_rows, ours_cols = ((slices[len(s.cols):], slices[:len(s.cols)]) if s.transpose
                                else (slices[:len(s.rows)], slices[len(s.rows):]))
        row_range, row_cut = _covering(ours_rows, s.rows)
        col_range, col_cut = _covering(ours_cols, s.cols)
        with _open(self.files[name]) as f:
            part = f.get_slice(name)
            block = part[row_range, col_range] if s.cols else part[row_range]
        self.bytes_read += block.nbytes
        rows = (row_range.stop - row_range.start) // math.prod(s.rows[1:])
        cols = ((col_range.stop - col_range.start) // math.prod(s.cols[1:]),) if s.cols else ()
        x = block.reshape((rows,) + s.rows[1:] + cols + s.cols[1:])
        x = x[row_cut + col_cut]
        if s.transpose:
            n = len(s.rows)
            x = x.transpose(tuple(range(n, x.ndim)) + tuple(range(n)))
        return x


def _slices(index: Any, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """An index (Ellipsis, or a tuple of slices as shardings give them) as one slice per dim."""
    if index is Ellipsis:
        index = ()
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, slice) or i.step not in (None, 1) for i in index):
        raise TypeError(f"HFTensor takes slices with step 1 only, got {index!r}")
    full = tuple(slice(*s.indices(n)) for s, n in zip(index, shape, strict=False))
    return full + tuple(slice(0, n) for n in shape[len(full):])


def _covering(slices: tuple[slice, ...], dims: tuple[int, ...]) -> tuple[slice, tuple]:
    """The flat HF range covering our slices of `dims` (whole inner dims from the first one's
    range) and the cut that leaves exactly those slices."""
    if not dims:
        return slice(None), ()
    first = slices[0].indices(dims[0])
    inner = math.prod(dims[1:])
    flat = slice(first[0] * inner, first[1] * inner)
    return flat, (slice(None),) + tuple(slices[1:])


def hf_params(hf_dir: str | Path, cfg: ModelConfig) -> dict:
    """The params of an HF checkpoint as a pure dict (nnx.to_pure_dict layout) of lazy
    `HFTensor`s, after checking that every tensor is present with its shape and a float dtype
    and that no unexpected tensor is (GigajaxError naming the tensor and the file). A mixture
    of experts' routing bias, which Mixtral and Qwen3-MoE lack, is zero."""
    hf_dir = Path(hf_dir)
    files = tensor_files(hf_dir)
    table = tensor_table(cfg)
    expected = {name: s for s in table for name, _ in s.names()}
    extra = sorted(n for n in files if n not in expected
                   and not n.endswith(IGNORED_TENSORS)
                   and not (cfg.tie_embeddings and n == "lm_head.weight"))
    if extra:
        raise GigajaxError(f"{files[extra[0]]}: tensor {extra[0]!r} has no place in the "
                           f"gigajax model of this config.json ({len(extra)} such tensors); is "
                           "the config's architecture the checkpoint's?")
    dtypes = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name not in files:
            raise GigajaxError(f"{hf_dir}: tensor {name!r} is missing (not in "
                               f"{INDEX if (hf_dir / INDEX).is_file() else 'any shard'}).")
        by_file.setdefault(files[name], []).append(name)
    for path, names in by_file.items():
        with _open(path) as f:
            present = set(f.keys())
            for name in names:
                if name not in present:
                    raise GigajaxError(f"{INDEX} puts {name!r} in {path.name}, which does not "
                                       "hold it.")
                part = f.get_slice(name)
                shape, dtype = tuple(part.get_shape()), part.get_dtype()
                if shape != expected[name].hf_shape:
                    raise GigajaxError(f"{path}: tensor {name!r} has shape {list(shape)}, but "
                                       f"config.json implies {list(expected[name].hf_shape)}.")
                if dtype not in FLOAT_DTYPES:
                    raise GigajaxError(f"{path}: tensor {name!r} has dtype {dtype}; gigajax "
                                       f"reads {', '.join(FLOAT_DTYPES)} (quantized checkpoints "
                                       "are not supported).")
                dtypes.setdefault(expected[name].ours, set()).add(dtype)
    params: dict = {}
    for spec in table:
        found = dtypes[spec.ours]
        dtype = FLOAT_DTYPES[next(iter(found))] if len(found) == 1 else np.dtype(np.float32)
        node = params
        for key in spec.ours[:-1]:
            node = node.setdefault(key, {})
        node[spec.ours[-1]] = HFTensor(spec, files, dtype)
    if cfg.moe.n_routed_experts:
        moe_layers = cfg.n_layers - cfg.moe.first_dense_layers
        params["moe_blocks"]["mlp"][ROUTING_BIAS] = np.zeros(
            (moe_layers, cfg.moe.n_routed_experts), np.float32)
    return params


def _leaf(params: dict, path: tuple[str, ...]) -> Any:
    for key in path:
        params = params[key]
    return params


def hf_tensors(params: dict, cfg: ModelConfig, dtype: np.dtype) -> Iterator[tuple[str, Any]]:
    """(HF name, a function giving the array) for every tensor of the HF checkpoint of `params`
    (our pure dict, host arrays), in HF's order; each array is made when called. A trained
    routing bias is refused: the HF model would route its tokens differently."""
    if cfg.moe.n_routed_experts:
        bias = np.asarray(params["moe_blocks"]["mlp"][ROUTING_BIAS])
        if np.any(bias):
            raise ConfigError(f"the routing bias is not zero (max |bias| {np.abs(bias).max():.3g}"
                              ", trained by model.moe.bias_update_rate > 0): Mixtral and "
                              "Qwen3-MoE route without one, so the export would pick other "
                              "experts. Cannot export.")
    def make(spec: Tensor, ours: Any, position: tuple[int, ...]) -> np.ndarray:
        # one HF tensor's slice, read only now (an HFTensor takes slices only)
        part = ours[tuple(slice(k, k + 1) for k in position)][(0,) * len(position)]
        return spec.to_hf(np.asarray(part, dtype))

    for spec in tensor_table(cfg):
        ours = _leaf(params, spec.ours)
        for name, position in spec.names():
            yield name, functools.partial(make, spec, ours, position)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shard_plan(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Tensor names grouped in order into shards of at most `max_shard_bytes` (a tensor larger
    than that gets a shard of its own)."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, size in sizes:
        if shards[-1] and used + size > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += size
    return shards


def write_safetensors(out: Path, tensors: list[tuple[str, Any]], shapes: dict[str, tuple],
                      dtype: np.dtype, max_shard_bytes: int) -> list[str]:
    """Write `tensors` as `model.safetensors`, or as `model-0000K-of-0000N.safetensors` with
    `model.safetensors.index.json` when they exceed one shard; one shard in memory at a time.
    Returns the file names."""
    sizes = [(name, math.prod(shapes[name]) * dtype.itemsize) for name, _ in tensors]
    plan = shard_plan(sizes, max_shard_bytes)
    make = dict(tensors)
    names = (["model.safetensors"] if len(plan) == 1 else
             [f"model-{k + 1:05d}-of-{len(plan):05d}.safetensors" for k in range(len(plan))])
    for file, shard in zip(names, plan, strict=True):
        save_file({name: make[name]() for name in shard}, str(out / file),
                  metadata={"format": "pt"})
        os.chmod(out / file, 0o666 & ~_umask())  # safetensors creates its files 0600
    if len(plan) > 1:
        index = {"metadata": {"total_size": sum(size for _, size in sizes)},
                 "weight_map": {name: file for file, shard in zip(names, plan, strict=True)
                                for name in shard}}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return names


def hf_model_config(hf_dir: str | Path, ignore: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """The gigajax config of an HF model directory, with data.tokenizer set to its tokenizer
    file when it has one (checked against the vocabulary)."""
    hf_dir = Path(hf_dir).absolute()
    cfg = from_hf_config(read_hf_config(hf_dir), f"{hf_dir}/config.json", ignore)
    tokenizer = next((hf_dir / n for n in ("tokenizer.json", "tokenizer.model")
                      if (hf_dir / n).is_file()), None)
    if tokenizer is not None:
        check_tokenizer(get_tokenizer(str(tokenizer), field=str(tokenizer)), cfg, tokenizer)
        cfg.data.tokenizer = str(tokenizer)
    return cfg


def check_tokenizer(tok: Tokenizer, cfg: ml_collections.ConfigDict, where: Path | str) -> None:
    """A tokenizer whose ids reach past the embedding table is refused (a smaller vocabulary is
    fine: models pad theirs)."""
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError(f"{where}: the tokenizer has {tok.vocab_size} tokens but config.json's "
                          f"vocab_size is {cfg.model.vocab_size}: they are not the same model's.")
