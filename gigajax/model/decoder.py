"""Decoder: embed -> L x Block (lax.scan over a stacked `layers` axis) -> RMSNorm -> LM head.

A mixture-of-experts model (`model.moe.n_routed_experts` > 0) has two stacks scanned one after
the other: `blocks`, its first `first_dense_layers` dense blocks (absent when 0), and
`moe_blocks`, the rest; a dense model has `blocks` only."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.model.block import Block
from gigajax.model.layers import RMSNorm, residual_init, weight_init
from gigajax.model.lora import add_adapters
from gigajax.model.moe import MoEStats
from gigajax.model.remat import remat_block
from gigajax.model.rope import rope_cos_sin, rope_frequencies
from gigajax.parallel.shardings import constrain, param, stacked


class Decoder(nnx.Module):
    """LLaMA-style decoder language model; parameters float32, compute in `cfg.dtype`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = weight_init(cfg)
        self.embed = param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        n_dense = _dense_layers(cfg)
        if n_dense:
            self.blocks = stacked(lambda r: Block(cfg, rngs=r), n_dense, rngs)
        if n_dense < cfg.n_layers:
            self.moe_blocks = stacked(lambda r: Block(cfg, rngs=r, moe=True),
                                      cfg.n_layers - n_dense, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))
        if cfg.lora.rank:  # last: a seed gives the same base weights with LoRA on or off
            add_adapters(self.blocks, cfg, {"input": init, "residual": residual_init(cfg)}, rngs)

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict, seed: int = 0) -> Decoder:
        """The decoder of a full config (`config.model` + `config.attention`), initialised from
        `seed`; on the default device, or replicated on the current mesh (`jax.set_mesh`)."""
        return cls(ModelConfig.from_config(cfg), rngs=nnx.Rngs(seed))

    def __call__(self, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray | None = None,
                 segment_ids_BT: jnp.ndarray | None = None) -> jnp.ndarray:
        """Logits [B, T, V] (float32) for integer tokens [B, T]; positions feed RoPE.

        Positions must increase within each segment (pass segment ids when they restart at
        document starts): the blockwise kernel and ring sequence parallelism mask by position.
        """
        return self.logits(self.features(tokens_BT, positions_BT, segment_ids_BT))

    def features(self, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray | None = None,
                 segment_ids_BT: jnp.ndarray | None = None,
                 dropout_key: jax.Array | None = None) -> jnp.ndarray:
        """The last block's output [B, T, D] (compute dtype), before the final norm and head:
        a chunked loss applies `logits` to a slice of tokens at a time. `dropout_key`: LoRA
        dropout, in training only (None: off)."""
        return self.features_and_stats(tokens_BT, positions_BT, segment_ids_BT, dropout_key)[0]

    def features_and_stats(self, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray | None = None,
                           segment_ids_BT: jnp.ndarray | None = None,
                           dropout_key: jax.Array | None = None
                           ) -> tuple[jnp.ndarray, MoEStats | None]:
        """`features`, and the MoE layers' statistics stacked over those layers ([L_moe] and
        [L_moe, X]; None for a dense model): the objective adds their auxiliary losses."""
        if positions_BT is None:
            mesh = jax.sharding.get_abstract_mesh()
            if not mesh.empty and dict(mesh.shape).get("sequence", 1) > 1:
                raise ValueError("ring attention over mesh axis `sequence` permutes the tokens: "
                                 "pass positions_BT, permuted with them (the batch's positions)")
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        x_BTD, cos_BTE, sin_BTE = self._embed(tokens_BT, positions_BT)
        return self._run_blocks(x_BTD, cos_BTE, sin_BTE, positions_BT, segment_ids_BT,
                                dropout_key)

    def _embed(self, tokens_BT, positions_BT):
        """Token embeddings in the compute dtype, and RoPE's cos/sin at the positions."""
        cfg = self.cfg
        # FSDP-gather the table first; a vocab-parallel lookup is then a masked local gather
        table_VD = constrain(self.embed[...], ("vocab", "embed"))
        x_BTD = constrain(table_VD[tokens_BT].astype(jnp.dtype(cfg.dtype)),
                          ("batch", "seq", "embed"))
        # dynamic NTK scales by the batch's longest position; the others ignore it
        seq_len = jnp.max(positions_BT) + 1 if cfg.rope.type == "dynamic" else None
        inv_freq, mscale = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope, seq_len)
        return (x_BTD, *rope_cos_sin(positions_BT, inv_freq, mscale))

    def logits(self, x_BTD: jnp.ndarray) -> jnp.ndarray:
        """Final norm and LM head of `features`: float32 logits [B, T, V]."""
        return self.head(self.final_norm(x_BTD))

    def head(self, h_BTD: jnp.ndarray) -> jnp.ndarray:
        """The LM head on final-normed features: float32 logits [B, T, V]."""
        head_DV = self.embed[...].T if self.cfg.tie_embeddings else self.lm_head[...]
        logits_BTV = jnp.einsum("BTD,DV->BTV", h_BTD, head_DV.astype(h_BTD.dtype),
                                preferred_element_type=jnp.float32)  # the loss is fp32
        return constrain(logits_BTV, ("batch", "inner_seq", "vocab"))

    def decode(self, tokens_BT: jnp.ndarray, cache: dict[str, jnp.ndarray], index: jnp.ndarray,
               start_B: jnp.ndarray | None = None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """Logits [B, T, V] of T new tokens at cache slots [index, index+T) given the KV cache
        of the slots before them, and the updated cache (`decode_features`)."""
        h_BTD, cache = self.decode_features(tokens_BT, cache, index, start_B)
        return self.head(h_BTD), cache

    def decode_features(self, tokens_BT: jnp.ndarray, cache: dict[str, jnp.ndarray],
                        index: jnp.ndarray, start_B: jnp.ndarray | None = None
                        ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
        """Final-normed features [B, T, D] of T new tokens at cache slots [index, index+T), and
        the updated cache (`init_cache`: k and v [L, B, S, K, E]).

        Row b's tokens start at slot `start_B[b]` (default 0): the slots before it are left
        padding, never attended to, and slot j holds position j - start_B[b]. No sequence
        parallelism; on a mesh, GSPMD follows the weights' and the cache's shardings.
        """
        B, T = tokens_BT.shape
        start_B = jnp.zeros((B,), jnp.int32) if start_B is None else start_B
        positions_BT = index + jnp.arange(T)[None] - start_B[:, None]
        x_BTD, cos_BTE, sin_BTE = self._embed(tokens_BT, positions_BT)
        ks, vs = [], []
        for stack, layers in self._stacks():
            graphdef, stacked_state = nnx.split(stack)

            def one_block(x_BTD, xs, graphdef=graphdef):
                layer_state, k_BSKE, v_BSKE = xs
                block = nnx.merge(graphdef, layer_state)
                x_BTD, k_BSKE, v_BSKE = block.decode(x_BTD, cos_BTE, sin_BTE, positions_BT,
                                                     k_BSKE, v_BSKE, index, start_B)
                return x_BTD, (k_BSKE, v_BSKE)

            x_BTD, (k, v) = jax.lax.scan(one_block, x_BTD, (stacked_state, cache["k"][layers],
                                                            cache["v"][layers]))
            ks.append(k), vs.append(v)
        if len(ks) == 1:
            return self.final_norm(x_BTD), {"k": ks[0], "v": vs[0]}
        return self.final_norm(x_BTD), {"k": jnp.concatenate(ks), "v": jnp.concatenate(vs)}

    def _stacks(self) -> list[tuple[nnx.Module, slice]]:
        """The stacked blocks in order, each with the layers it holds."""
        n_dense = _dense_layers(self.cfg)
        parts = (("blocks", slice(0, n_dense)), ("moe_blocks", slice(n_dense, self.cfg.n_layers)))
        return [(stack, layers) for name, layers in parts
                if (stack := getattr(self, name, None)) is not None]

    def init_cache(self, batch: int, max_len: int) -> dict[str, jnp.ndarray]:
        """An empty KV cache for `max_len` positions: k and v [L, B, max_len, K, E], kv heads
        sharded as the k/v projections are (on a mesh)."""
        cfg = self.cfg
        shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        names = ("layers", "batch", None, "kv_heads", "head_dim")
        return {name: constrain(jnp.zeros(shape, cfg.dtype), names) for name in ("k", "v")}

    def _run_blocks(self, x_BTD, cos_BTE, sin_BTE, positions_BT, segment_ids_BT,
                    dropout_key=None) -> tuple[jnp.ndarray, MoEStats | None]:
        """Apply the stacked blocks with lax.scan (or a Python loop), under the remat policy;
        a dropout key is split into one per layer, scanned with the layer's weights. Returns
        the output and the MoE layers' statistics, stacked (None without MoE layers)."""
        keys_L = None if dropout_key is None else jax.random.split(dropout_key,
                                                                   self.cfg.n_layers)
        carry, stats = (x_BTD, positions_BT, segment_ids_BT), None
        for stack, layers in self._stacks():
            graphdef, stacked_state = nnx.split(stack)

            # positions and segment ids ride in the scan carry, unchanged: as loop-invariant
            # constants, scan's partial evaluation would hoist every mask tile the attention
            # kernels derive from them out of the loop and keep them all (quadratic in T).
            def one_block(carry, xs, graphdef=graphdef):
                x_BTD, positions_BT, segment_ids_BT = carry
                layer_state, key = xs
                block = nnx.merge(graphdef, layer_state)
                x_BTD, layer_stats = block(x_BTD, cos_BTE, sin_BTE, positions_BT,
                                           segment_ids_BT, key)
                return (x_BTD, positions_BT, segment_ids_BT), layer_stats

            one_block = remat_block(one_block, self.cfg.remat, self.cfg.scan_layers)
            xs = (stacked_state, None if keys_L is None else keys_L[layers])
            if self.cfg.scan_layers:
                carry, stack_stats = jax.lax.scan(one_block, carry, xs)
            else:
                per_layer = []
                for i in range(layers.stop - layers.start):
                    carry, layer_stats = one_block(carry, jax.tree.map(lambda a, i=i: a[i], xs))
                    per_layer.append(layer_stats)
                stack_stats = (None if per_layer[0] is None
                               else jax.tree.map(lambda *a: jnp.stack(a), *per_layer))
            if stack_stats is not None:
                stats = stack_stats
        return carry[0], stats


def _dense_layers(cfg: ModelConfig) -> int:
    """How many blocks (the first ones) have a dense MLP."""
    return cfg.moe.first_dense_layers if cfg.moe.n_routed_experts else cfg.n_layers
