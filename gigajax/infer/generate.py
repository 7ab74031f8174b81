"""Generation from prompts: the options a user picks, checked; prompts left-padded into one
batch; the compiled loop (`loop.py`) run in one piece, or a segment of tokens at a time when
text is streamed or stop strings are watched; the results cut at their stops.

    outs = generate(model, [ids_a, ids_b], GenerateOptions(strategy="beam", num_beams=4))

Stop tokens end a row inside the loop; stop strings are matched on the decoded text between
segments (every `segment` tokens), and the row is cut at the token that completes one. Beam
search cuts its best hypothesis at a stop string once it has finished.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gigajax.data.tokenizer import Tokenizer
from gigajax.errors import GigajaxError
from gigajax.infer import loop
from gigajax.infer.beam import BeamSearch
from gigajax.infer.contrastive import ContrastiveSearch
from gigajax.infer.healing import allowed_tables, back_up
from gigajax.infer.sampling import Sampling
from gigajax.model import Decoder

STRATEGIES = ("greedy", "sample", "beam", "contrastive")
PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this: fewer distinct programs


@dataclasses.dataclass(frozen=True)
class GenerateOptions:
    """How to continue a prompt; the field names are `gigajax generate`'s flags."""

    strategy: str = "greedy"  # greedy | sample | beam | contrastive
    max_new_tokens: int = 32
    sampling: Sampling = Sampling()  # sample: every field; greedy: the repetition penalty
    seed: int = 0  # sample: the same seed and prompts give the same tokens
    num_beams: int = 4  # beam
    length_penalty: float = 1.0  # beam: scores / length ** length_penalty
    early_stopping: bool | str = False  # beam: True, False or "never" (transformers' meaning)
    top_k: int = 4  # contrastive: candidates per step
    penalty_alpha: float = 0.6  # contrastive: weight of the degeneration penalty
    token_healing: int = 0  # prompt tokens to back up and spell again (0: off)
    prefill_chunk: int = 512  # prompt tokens per prefill step

    def __post_init__(self) -> None:
        ints = {"max_new_tokens": 1, "num_beams": 1, "top_k": 1, "token_healing": 0,
                "prefill_chunk": 1, "seed": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise GigajaxError(f"--{_flag(name)} {value!r}: give an integer >= {low}.")
        if self.strategy not in STRATEGIES:
            raise GigajaxError(f"--strategy {self.strategy!r}: choose one of "
                               f"{', '.join(STRATEGIES)}.")
        if not 0 <= self.penalty_alpha <= 1:
            raise GigajaxError(f"--penalty-alpha {self.penalty_alpha!r}: give a number in "
                               "[0, 1] (0 is greedy decoding).")
        if self.early_stopping not in (True, False, "never"):
            raise GigajaxError(f"--early-stopping {self.early_stopping!r}: use true, false or "
                               "never.")

    def strategy_object(self) -> loop.Strategy:
        """The static strategy the compiled loop runs."""
        if self.strategy == "sample":
            return loop.TokenByToken(self.sampling, self.sampling.repetition_penalty)
        if self.strategy == "beam":
            return BeamSearch(self.num_beams, float(self.length_penalty), self.early_stopping)
        if self.strategy == "contrastive":
            return ContrastiveSearch(self.top_k, float(self.penalty_alpha))
        return loop.TokenByToken(None, self.sampling.repetition_penalty)


SAMPLING_FLAGS = ("temperature", "top_p", "min_p")  # and top_k: sample's, or contrastive's
APPLIES_TO = {"temperature": ("sample",), "top_p": ("sample",), "min_p": ("sample",),
              "top_k": ("sample", "contrastive"), "seed": ("sample",),
              "num_beams": ("beam",), "length_penalty": ("beam",), "early_stopping": ("beam",),
              "penalty_alpha": ("contrastive",)}


def options_for(strategy: str = "greedy", **flags) -> GenerateOptions:
    """GenerateOptions from flat flags, as `gigajax generate` and `LM.generate` take them:
    `temperature`, `top_p`, `min_p`, `repetition_penalty` go into `sampling`; `top_k` is
    sampling's under sample and the candidate count under contrastive. A flag given (not None)
    for a strategy it does not apply to is an error naming it, never silently ignored."""
    given = {k: v for k, v in flags.items() if v is not None}
    known = {f.name for f in dataclasses.fields(GenerateOptions)} | {*SAMPLING_FLAGS,
                                                                      "repetition_penalty"}
    if unknown := sorted(set(given) - known - {"strategy"}):
        raise GigajaxError(f"unknown generation option(s) {', '.join(unknown)}: use "
                           f"{', '.join(sorted(known - {'sampling'}))}.")
    if strategy not in STRATEGIES:
        raise GigajaxError(f"--strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}.")
    for name in given:
        if strategy not in APPLIES_TO.get(name, STRATEGIES):
            raise GigajaxError(f"--{_flag(name)} applies to --strategy "
                               f"{' or '.join(APPLIES_TO[name])}, not {strategy}.")
    sampling = {k: given.pop(k) for k in (*SAMPLING_FLAGS, "repetition_penalty") if k in given}
    if strategy == "sample" and "top_k" in given:
        sampling["top_k"] = given.pop("top_k")
    if sampling:
        if "sampling" in given:
            raise GigajaxError("give either sampling=Sampling(...) or its fields, not both.")
        given["sampling"] = Sampling(**sampling)
    return GenerateOptions(strategy=strategy, **given)


def _flag(name: str) -> str:
    return name.replace("_", "-")


@dataclasses.dataclass
class Generation:
    """One prompt's continuation."""

    tokens: np.ndarray  # generated ids [N'] (a stop token included)
    stop: str  # "stop token", "stop string" or "length"
    prompt: np.ndarray  # the prompt as run (token healing backs it up)
    text: str | None = None  # tokens decoded (with a tokenizer): what follows the prompt given


def generate(model: Decoder, prompts: Sequence[np.ndarray], options: GenerateOptions, *,
             tokenizer: Tokenizer | None = None, stop_ids: Sequence[int] = (),
             stop_strings: Sequence[str] = (), on_text: Callable[[int, str], None] | None = None,
             segment: int | None = None, rules: tuple | None = None) -> list[Generation]:
    """The continuations of `prompts` (token ids, any lengths), run as one batch.

    `on_text(row, text)` receives each row's new text every `segment` tokens (default 16
    when streaming or watching stop strings, else the whole generation in one loop). On a
    mesh, call inside `jax.set_mesh` with the model's params sharded; `rules` are the
    activation rules (logical name -> mesh axes, as items).
    """
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    if not prompts or min(len(p) for p in prompts) == 0:
        raise GigajaxError("give at least one prompt, each at least one token long.")
    if (stop_strings or options.token_healing or on_text) and tokenizer is None:
        raise GigajaxError("stop strings, token healing and streaming need the tokenizer.")
    cfg, N = model.cfg, options.max_new_tokens
    removed, token_bytes = [b""] * len(prompts), None
    stops = sorted(set(int(i) for i in stop_ids))  # padded with -1 to a multiple of 4 ids
    stops += [-1] * (-len(stops) % 4 or (0 if stops else 4))
    ctx: loop.Context = {"stop_ids": jnp.asarray(stops, jnp.int32),
                         "key": jax.random.key(options.seed)}
    if options.token_healing:
        token_bytes = tokenizer.token_bytes()
        healed = back_up(prompts, token_bytes, options.token_healing)
        prompts, removed = healed.prompts, healed.removed
        allowed, token_len, _ = allowed_tables(removed, token_bytes, cfg.vocab_size)
        ctx.update(allowed=jnp.asarray(allowed), token_len=jnp.asarray(token_len))
    T = -(-max(len(p) for p in prompts) // PROMPT_BUCKET) * PROMPT_BUCKET
    prompts_BT = np.zeros((len(prompts), T), np.int32)
    for b, p in enumerate(prompts):
        prompts_BT[b, T - len(p):] = p
    ctx["start"] = jnp.asarray([T - len(p) for p in prompts], jnp.int32)

    strategy = options.strategy_object()
    graphdef, params = nnx.split(model)
    state = loop.start(params, jnp.asarray(prompts_BT), ctx, graphdef=graphdef,
                       strategy=strategy, max_new=N, chunk=options.prefill_chunk, rules=rules)
    watch = (Watcher(tokenizer, stop_strings, removed, on_text, token_bytes) if tokenizer
             else None)
    per_token = not isinstance(strategy, BeamSearch)
    step = segment or (16 if (on_text or stop_strings) and per_token else N)
    while True:
        n = int(state["n"])
        state = loop.run(params, state, ctx, jnp.int32(min(n + step, N)), graphdef=graphdef,
                         strategy=strategy, rules=rules)
        if watch is not None and per_token:
            state = watch.update(state)
        if int(state["n"]) >= N or bool(strategy.finished(state)):
            break
    tokens_BN, lengths_B = (np.asarray(x) for x in strategy.result(state))
    outs = []
    for b, prompt in enumerate(prompts):
        tokens = tokens_BN[b, :lengths_B[b]]
        stop = "stop token" if len(tokens) and tokens[-1] in set(stop_ids) else "length"
        text = None
        if watch is not None:
            cut = watch.stop_at(b, tokens)
            if cut is not None:
                tokens, stop = tokens[:cut], "stop string"
            text = watch.text(b, tokens)
            if on_text and text[watch.shown[b]:]:  # beams at the end; the held-back rest
                on_text(b, text[watch.shown[b]:])
        outs.append(Generation(tokens, stop, prompt, text))
    return outs


class Watcher:
    """Decoded text of the rows as they grow: streamed pieces and stop strings."""

    def __init__(self, tokenizer: Tokenizer, stop_strings: Sequence[str],
                 removed: Sequence[bytes], on_text: Callable[[int, str], None] | None,
                 token_bytes: Sequence[bytes] | None = None):
        self.tokenizer, self.stop_strings, self.on_text = tokenizer, list(stop_strings), on_text
        self.removed, self.token_bytes = list(removed), token_bytes
        self.shown = [0] * len(removed)

    def text(self, row: int, tokens: np.ndarray) -> str:
        """The row's text after the prompt as given. A healed row's tokens first spell the
        removed bytes again: its text is their bytes after those (decoding the tokens and
        cutting characters would lose text where the decoder strips a leading space, as
        SentencePiece's does)."""
        if not self.removed[row]:
            return self.tokenizer.decode(tokens)
        tb = self.token_bytes
        data = b"".join(tb[t] if t < len(tb) else b"" for t in tokens)
        return data[len(self.removed[row]):].decode("utf-8", errors="replace")

    def stop_at(self, row: int, tokens: np.ndarray) -> int | None:
        """The fewest tokens whose text contains a stop string, or None."""
        if not self.stop_strings or not any(s in self.text(row, tokens)
                                            for s in self.stop_strings):
            return None
        return next(k for k in range(1, len(tokens) + 1)
                    if any(s in self.text(row, tokens[:k]) for s in self.stop_strings))

    def update(self, state: loop.State) -> loop.State:
        """Stream each row's new text; stop the rows that reached a stop string."""
        tokens_BN, lengths_B = np.asarray(state["tokens"]), np.array(state["lengths"])
        done_B = np.asarray(state["done"]).copy()
        for b in range(len(lengths_B)):
            tokens = tokens_BN[b, :lengths_B[b]]
            cut = None if done_B[b] else self.stop_at(b, tokens)
            if cut is not None:
                tokens, done_B[b], lengths_B[b] = tokens[:cut], True, cut
            if self.on_text:
                text = self.text(b, tokens)
                ready = len(text.rstrip("\ufffd"))  # an unfinished UTF-8 character waits
                if ready > self.shown[b]:
                    self.on_text(b, text[self.shown[b]:ready])
                    self.shown[b] = ready
        return dict(state, done=jnp.asarray(done_B), lengths=jnp.asarray(lengths_B))


def generate_batch(model: Decoder, prompts_BT: np.ndarray, max_new_tokens: int,
                   prefill_chunk: int = 512) -> np.ndarray:
    """Greedy continuations [B, max_new_tokens] of prompts [B, T] (no stop token)."""
    outs = generate(model, list(prompts_BT), GenerateOptions(
        max_new_tokens=max_new_tokens, prefill_chunk=prefill_chunk))
    return np.stack([o.tokens for o in outs])
