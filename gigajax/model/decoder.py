"""Decoder: embed -> L x Block (lax.scan over a stacked `layers` axis) -> RMSNorm -> LM head."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from gigajax.config import ModelConfig
from gigajax.model.block import Block, RMSNorm
from gigajax.model.init import weight_init
from gigajax.model.rope import rope_cos_sin, rope_frequencies
from gigajax.sharding import constrain, param, stacked

# What the backward pass may keep from the forward pass of each block (the rest is recomputed).
REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,  # no jax.checkpoint: keep everything
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
    # keep the blockwise kernel's out and lse: recompute projections and MLP, not attention
    "minimal": jax.checkpoint_policies.save_only_these_names("attention_out", "attention_lse"),
    "full": jax.checkpoint_policies.nothing_saveable,  # keep only each block's input
}


class Decoder(nnx.Module):
    """LLaMA-style decoder language model; parameters float32, compute in `cfg.dtype`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init = weight_init(cfg)
        self.embed = param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        self.blocks = stacked(lambda r: Block(cfg, rngs=r), cfg.n_layers, rngs)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps, rngs=rngs)
        if not cfg.tie_embeddings:
            self.lm_head = param(rngs, init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"))

    def __call__(self, tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray | None = None,
                 segment_ids_BT: jnp.ndarray | None = None) -> jnp.ndarray:
        """Logits [B, T, V] (float32) for integer tokens [B, T]; positions feed RoPE.

        Positions must increase within each segment (pass segment ids when they restart at
        document starts): ring sequence parallelism masks by position.
        """
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        if positions_BT is None:
            mesh = jax.sharding.get_abstract_mesh()
            if not mesh.empty and dict(mesh.shape).get("sequence", 1) > 1:
                raise ValueError("ring attention over mesh axis `sequence` permutes the tokens: "
                                 "pass positions_BT, permuted with them (the batch's positions)")
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        # FSDP-gather the table first; a vocab-parallel lookup is then a masked local gather
        table_VD = constrain(self.embed[...], ("vocab", "embed"))
        x_BTD = constrain(table_VD[tokens_BT].astype(dtype), ("batch", "seq", "embed"))
        inv_freq, mscale = rope_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor,
            cfg.rope_original_max_seq_len, cfg.rope_beta_fast, cfg.rope_beta_slow)
        cos_BTE, sin_BTE = rope_cos_sin(positions_BT, inv_freq, mscale)
        x_BTD = self._run_blocks(x_BTD, cos_BTE, sin_BTE, positions_BT, segment_ids_BT)
        x_BTD = self.final_norm(x_BTD)
        head_DV = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, head_DV.astype(dtype),
                                preferred_element_type=jnp.float32)  # the loss is fp32
        return constrain(logits_BTV, ("batch", "inner_seq", "vocab"))

    def _run_blocks(self, x_BTD, cos_BTE, sin_BTE, positions_BT, segment_ids_BT):
        """Apply the stacked blocks with lax.scan (or a Python loop), under the remat policy."""
        graphdef, stacked_state = nnx.split(self.blocks)

        def one_block(x_BTD, layer_state):
            block = nnx.merge(graphdef, layer_state)
            return block(x_BTD, cos_BTE, sin_BTE, positions_BT, segment_ids_BT), None

        if self.cfg.remat != "none":
            one_block = jax.checkpoint(one_block, policy=REMAT_POLICIES[self.cfg.remat],
                                       prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            x_BTD, _ = jax.lax.scan(one_block, x_BTD, stacked_state)
            return x_BTD
        for i in range(self.cfg.n_layers):
            x_BTD, _ = one_block(x_BTD, jax.tree.map(lambda a, i=i: a[i], stacked_state))
        return x_BTD
