"""Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text Generation"):
of the top_k most likely next tokens v, choose

    argmax_v (1 - alpha) p(v | x) - alpha max_j cos(h_v, h_j)

where h are final-normed last-layer features (what transformers' `hidden_states[-1]` is for
LLaMA), h_v that of the candidate and h_j those of every earlier token of the row. Each step
runs the k candidates as k x B rows over copies of the cache, keeps the chosen row's cache and
features, and takes the next token's logits from the chosen candidate's forward, so the model
runs once per step on k x B tokens. Alpha 0 is greedy decoding.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gigajax.infer.loop import Context, State, constrained, record, token_state
from gigajax.model import Decoder


@dataclasses.dataclass(frozen=True)
class ContrastiveSearch:
    top_k: int = 4
    penalty_alpha: float = 0.6
    needs_features = True

    def init(self, logits_BV, cache, features_BSD, prompts_BT, ctx, max_new):
        return dict(token_state(logits_BV, cache, prompts_BT, ctx, max_new, False),
                    features=features_BSD)

    def step(self, model: Decoder, s: State, ctx: Context) -> State:
        B, k, index = s["done"].shape[0], self.top_k, s["index"]
        logits_BV = constrained(s["logits"], s, ctx, jnp.arange(B))
        probs_BC, token_BC = jax.lax.top_k(jax.nn.softmax(logits_BV, axis=-1), k)
        cache = jax.tree.map(lambda c: jnp.repeat(c, k, axis=1), s["cache"])
        h_R1D, cache = model.decode_features(token_BC.reshape(B * k, 1), cache, index,
                                             jnp.repeat(ctx["start"], k))
        h_BCD = h_R1D.reshape(B, k, -1).astype(jnp.float32)
        context_BSD = s["features"].astype(jnp.float32)
        cos_BCS = jnp.einsum("BCD,BSD->BCS", _unit(h_BCD), _unit(context_BSD))
        slots_S = jnp.arange(context_BSD.shape[1])
        earlier_BS = (slots_S[None] >= ctx["start"][:, None]) & (slots_S[None] < index)
        penalty_BC = jnp.max(jnp.where(earlier_BS[:, None], cos_BCS, -jnp.inf), axis=-1)
        score_BC = (1 - self.penalty_alpha) * probs_BC - self.penalty_alpha * penalty_BC
        # a candidate token healing ruled out (fewer allowed tokens than k) is never chosen
        ruled_out_BC = jnp.take_along_axis(logits_BV, token_BC, axis=1) == -jnp.inf
        score_BC = jnp.where(ruled_out_BC, -jnp.inf, score_BC)
        choice_B = jnp.argmax(score_BC, axis=-1)
        rows_B = jnp.arange(B) * k + choice_B
        s = record(s, jnp.take_along_axis(token_BC, choice_B[:, None], axis=1)[:, 0], ctx)
        h_B1D = h_R1D[rows_B]
        features = jax.lax.dynamic_update_slice_in_dim(
            s["features"], h_B1D.astype(s["features"].dtype), index, axis=1)
        return dict(s, logits=model.head(h_B1D)[:, 0],
                    cache=jax.tree.map(lambda c: c[:, rows_B], cache), features=features,
                    index=index + 1, n=s["n"] + 1)

    def finished(self, s: State) -> jax.Array:
        return jnp.all(s["done"])

    def result(self, s: State) -> tuple[jax.Array, jax.Array]:
        return s["tokens"], s["lengths"]


def _unit(x: jax.Array) -> jax.Array:
    """x / |x| over the last dim (transformers' normalisation, no epsilon)."""
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)
