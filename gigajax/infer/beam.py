"""Beam search as `transformers.generate` runs it (its vectorised `_beam_search`, v4.50+), so our
beams equal its beams: each step keeps the 2 x num_beams best continuations of all beams,
continues the best num_beams of them that did not stop, and offers those among the first
num_beams that stopped (a stop token, or the length limit) to a pool of finished hypotheses
scored by sum of log-probabilities / generated length ** length_penalty. The cache rows are
reordered to follow their beams' parents every step.

`early_stopping`: True stops a prompt once num_beams hypotheses are finished; False (the
default) once no running beam can beat the worst finished one at its current length; "never"
assumes the running beams may still grow up to the length limit (with a positive penalty).
Rows of the cache are (prompt, beam) pairs: B x num_beams.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from gigajax.infer.loop import Context, State, constrained, is_stop
from gigajax.model import Decoder

NEG = -1.0e9  # transformers' "impossible" score: added, not -inf, so ties break as there


def _take(x_BJ: jax.Array, index_BK: jax.Array) -> jax.Array:
    """x[b, index[b, k], ...] for x [B, J, ...]: the chosen beams of each prompt."""
    index = index_BK.reshape(index_BK.shape + (1,) * (x_BJ.ndim - 2))
    return jnp.take_along_axis(x_BJ, index, axis=1)


@dataclasses.dataclass(frozen=True)
class BeamSearch:
    num_beams: int = 4
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    needs_features = False

    def init(self, logits_BV, cache, features_BSD, prompts_BT, ctx, max_new):
        B, nb = logits_BV.shape[0], self.num_beams
        # every beam starts as the prompt; only beam 0 may continue at the first step
        scores = jnp.where(jnp.arange(nb) == 0, 0.0, NEG)
        s = {"logits": jnp.repeat(logits_BV, nb, axis=0),
             "cache": jax.tree.map(lambda c: jnp.repeat(c, nb, axis=1), cache),
             "index": jnp.int32(prompts_BT.shape[1]), "n": jnp.int32(0),
             "running": jnp.zeros((B, nb, max_new), jnp.int32),
             "running_scores": jnp.broadcast_to(scores, (B, nb)).astype(jnp.float32),
             "finished": jnp.zeros((B, nb, max_new), jnp.int32),
             "finished_scores": jnp.full((B, nb), NEG, jnp.float32),
             "finished_lengths": jnp.zeros((B, nb), jnp.int32),
             "is_finished": jnp.zeros((B, nb), bool),
             "improvable": jnp.ones((B,), bool), "all_stopped": jnp.bool_(False)}
        if "allowed" in ctx:
            s["spelled"] = jnp.zeros(B * nb, jnp.int32)
        return s

    def step(self, model: Decoder, s: State, ctx: Context) -> State:
        B, nb, N = s["running"].shape
        n, lp = s["n"], self.length_penalty
        prompt_of_R = jnp.repeat(jnp.arange(B), nb)
        logits_RV = constrained(s["logits"], s, ctx, prompt_of_R)
        V = logits_RV.shape[-1]
        logp_BnV = (jax.nn.log_softmax(logits_RV, axis=-1).reshape(B, nb, V)
                    + s["running_scores"][:, :, None])
        top_scores, top_index = jax.lax.top_k(logp_BnV.reshape(B, nb * V), 2 * nb)
        parent_BK, token_BK = top_index // V, top_index % V
        candidates = _take(s["running"], parent_BK).at[:, :, n].set(token_BK)
        stopped_BK = is_stop(token_BK.reshape(-1), ctx["stop_ids"]).reshape(B, 2 * nb) | (
            n + 1 >= N)

        # the best num_beams continuations that did not stop keep running
        running_scores, keep = jax.lax.top_k(top_scores + NEG * stopped_BK, nb)
        parent_Bn, token_Bn = _take(parent_BK, keep), _take(token_BK, keep)

        # the first num_beams that stopped join the finished pool if they beat its worst
        new_scores = top_scores / (n + 1.0) ** lp
        pool_full = jnp.all(s["is_finished"], axis=1, keepdims=True) & (
            self.early_stopping is True)
        joins = stopped_BK & (jnp.arange(2 * nb) < nb)
        new_scores = (new_scores + NEG * pool_full + NEG * ~s["improvable"][:, None]
                      + NEG * ~joins)
        merged_scores = jnp.concatenate([s["finished_scores"], new_scores], axis=1)
        _, best = jax.lax.top_k(merged_scores, nb)
        lengths = jnp.concatenate([s["finished_lengths"],
                                   jnp.full((B, 2 * nb), n + 1, jnp.int32)], axis=1)

        rows_R = (jnp.arange(B)[:, None] * nb + parent_Bn).reshape(-1)
        out = dict(s, running=_take(candidates, keep), running_scores=running_scores,
                   finished=_take(jnp.concatenate([s["finished"], candidates], axis=1), best),
                   finished_scores=_take(merged_scores, best),
                   finished_lengths=_take(lengths, best),
                   is_finished=_take(jnp.concatenate([s["is_finished"], joins], axis=1), best),
                   all_stopped=jnp.all(stopped_BK))
        if "spelled" in s:
            out["spelled"] = s["spelled"][rows_R] + ctx["token_len"][token_Bn.reshape(-1)]
        cache = jax.tree.map(lambda c: c[:, rows_R], s["cache"])
        logits_R1V, cache = model.decode(token_Bn.reshape(-1, 1), cache, s["index"],
                                         ctx["start"][prompt_of_R])

        # can a running beam still beat the worst finished hypothesis? (transformers' test)
        length = N if (self.early_stopping == "never" and lp > 0) else n + 1
        best_running = running_scores[:, :1] / jnp.float32(length) ** lp
        worst = jnp.where(out["is_finished"],
                          jnp.min(out["finished_scores"], axis=1, keepdims=True), NEG)
        out["improvable"] = s["improvable"] & jnp.any(best_running > worst, axis=-1)
        return dict(out, logits=logits_R1V[:, 0], cache=cache, index=s["index"] + 1, n=n + 1)

    def finished(self, s: State) -> jax.Array:
        pool_closed = jnp.all(s["is_finished"]) & (self.early_stopping is True)
        return ~jnp.any(s["improvable"]) | pool_closed | s["all_stopped"]

    def result(self, s: State) -> tuple[jax.Array, jax.Array]:
        return s["finished"][:, 0], s["finished_lengths"][:, 0]
