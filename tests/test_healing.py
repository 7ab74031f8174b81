"""Token healing: the tables equal a brute force on a small byte-level BPE; backing up keeps a
token and skips specials; the seed's URL example (`http:` goes on as ` //site.com` without
healing, `http://site.com` with it) on a hand-set bigram decoder, through `generate` and
`LM.generate`; on the byte tokenizer healing changes nothing but the token count; every beam
and every sample spells the removed text again; `token_bytes` of a ByteLevel tokenizer."""

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gigajax.api import LM
from gigajax.config import ModelConfig, load_config
from gigajax.data.tokenizer import ByteTokenizer, HFTokenizer
from gigajax.infer.beam import NEG, BeamSearch
from gigajax.infer.generate import GenerateOptions, Watcher, generate
from gigajax.infer.healing import allowed_tables, back_up, healing_mask
from gigajax.infer.sampling import Sampling
from gigajax.model import Decoder

ROOT = Path(__file__).resolve().parents[1]
URL = 'link is <a href="http:'
# byte-level BPE merges (in GPT-2's byte alphabet: "Ġ" is a space, "Ã©" is "é")
MERGES = [("h", "t"), ("ht", "t"), ("htt", "p"), (":", "/"), (":/", "/"), ("/", "/"),
          ("Ġ", "//"), ("s", "i"), ("si", "t"), ("sit", "e"), (".", "c"), (".c", "o"),
          (".co", "m"), ("Ġ", "i"), ("Ġi", "s"), ("Ġ", "<"), ("=", '"'), ("l", "i"),
          ("li", "n"), ("lin", "k"), ("Ã", "©")]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory) -> HFTokenizer:
    """A byte-level BPE whose merges make "http", ":", "://", "//", " //", "site", ".com"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(["<|endoftext|>",
                                         *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    for a, b in MERGES:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=MERGES))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


def config():
    return load_config(ROOT / "configs" / "tiny.py", [
        "--config.model.dtype=float32", "--config.model.n_layers=2",
        "--config.model.d_model=64", "--config.model.mlp_dim=128"])


def decoder() -> Decoder:
    with nnx.use_eager_sharding(False):  # names stay metadata: one device, no mesh
        return Decoder(ModelConfig.from_config(config()), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def m() -> Decoder:
    return decoder()


def ids(tok, text: str) -> list[int]:
    return [int(i) for i in tok.encode(text)]


@pytest.fixture(scope="module")
def bigram(bpe) -> Decoder:
    """A decoder whose logits depend on the last token only: the blocks' output projections
    are zero, so the residual stream is the embedding, a one-hot of the token's class (the
    final RMSNorm scales it by a positive number: the argmax stays); the head's row of a
    class holds the scores of the tokens that follow it."""
    model = decoder()
    one = {t: ids(bpe, t)[0] for t in ("http", ":", "://", "//", " //", "site", ".com")}
    follows = {"http": {"://": 10.0, ":": 5.0}, ":": {" //": 10.0, "//": 5.0},
               "://": {"site": 10.0}, " //": {"site": 10.0}, "//": {"site": 10.0},
               "site": {".com": 10.0}, ".com": {"<|endoftext|>": 10.0}}
    V, D = model.embed.shape
    embed_VD, head_DV = np.zeros((V, D), np.float32), np.zeros((D, V), np.float32)
    embed_VD[:, 0] = 1.0  # class 0: every other token, followed by EOS (all scores tie)
    for c, (text, nexts) in enumerate(follows.items(), start=1):
        embed_VD[one[text]] = np.eye(D)[c]
        for nxt, score in nexts.items():
            head_DV[c, one.get(nxt, bpe.eos_id)] = score
    model.embed[...] = jnp.asarray(embed_VD)
    model.lm_head[...] = jnp.asarray(head_DV)
    model.blocks.attn.wo[...] = jnp.zeros_like(model.blocks.attn.wo[...])
    model.blocks.mlp.w_down[...] = jnp.zeros_like(model.blocks.mlp.w_down[...])
    return model


def spelled(token_bytes: list[bytes], tokens) -> bytes:
    """The bytes the tokens spell (ids past the tokenizer's vocabulary spell nothing)."""
    return b"".join(token_bytes[int(t)] if t < len(token_bytes) else b"" for t in tokens)


# -- the tables and backing up ----------------------------------------------------------------

def spellable(text: bytes, token_bytes: list[bytes]) -> bool:
    """Whether some tokens' bytes start with `text` (spell it, the last may overhang)."""
    return not text or any(b and (b.startswith(text) or (
        text.startswith(b) and spellable(text[len(b):], token_bytes))) for b in token_bytes)


def brute_force(removed: bytes, token_bytes: list[bytes], vocab_size: int) -> np.ndarray:
    """allowed [len(removed) + 1, V]: at offset i, token v's bytes and the rest of the text
    agree on their common prefix (v extends the rest, or is a prefix of it and tokens can
    spell what it leaves); then anything."""
    table = np.ones((len(removed) + 1, vocab_size), bool)
    for i in range(len(removed)):
        rest = removed[i:]
        for v in range(vocab_size):
            b = token_bytes[v] if v < len(token_bytes) else b""
            k = min(len(b), len(rest))
            table[i, v] = bool(b) and b[:k] == rest[:k] and spellable(rest[k:], token_bytes)
    return table


def test_allowed_tables_equal_a_brute_force_on_a_bpe_vocabulary(bpe, m):
    tb, V = bpe.token_bytes(), m.cfg.vocab_size  # the model's vocabulary is the larger
    removed = [b":", b"http:", b"://", b"site.com", b" //s", b"", b"\xc3\xa9"]
    allowed, token_len, lengths = allowed_tables(removed, tb, V)
    R = max(map(len, removed))
    assert allowed.shape == (len(removed), R + 1, V)
    assert token_len.tolist() == [len(b) for b in tb] + [0] * (V - len(tb))
    assert lengths.tolist() == [len(r) for r in removed]
    for row, text in enumerate(removed):
        want = brute_force(text, tb, V)
        np.testing.assert_array_equal(allowed[row, :len(text) + 1], want)
        assert allowed[row, len(text):].all()  # past the end: every token
    # the tokens that may start healing ":" are the ones that begin with it
    start = {tb[v] for v in np.flatnonzero(allowed[0, 0])}
    assert start == {b":", b":/", b"://"}
    # the mask the loop takes: row spelled[b] (clipped to the last row) of each table
    mask = np.asarray(healing_mask(jnp.asarray(allowed), jnp.asarray([0, 4, 1, 9, 0, 0, 1])))
    want = [allowed[0, 0], allowed[1, 4], allowed[2, 1], allowed[3, R], allowed[4, 0],
            allowed[5, 0], allowed[6, 1]]
    np.testing.assert_array_equal(mask, np.stack(want))


def test_allowed_tables_leave_no_dead_end_where_a_byte_has_no_token():
    """No token is "t": "h" would leave "ttp", which nothing spells; "ht" leaves "tp"."""
    tb = [b"", b"h", b"ht", b"http", b"tp", b"p", b"x"]
    allowed, _, _ = allowed_tables([b"http"], tb, len(tb))
    np.testing.assert_array_equal(allowed[0], brute_force(b"http", tb, len(tb)))
    assert np.flatnonzero(allowed[0, 0]).tolist() == [2, 3]  # "ht", "http"; not "h"
    assert np.flatnonzero(allowed[0, 2]).tolist() == [4]  # "tp"


def test_back_up_removes_last_tokens_keeps_one_and_never_an_empty_one(bpe):
    tb, eos = bpe.token_bytes(), bpe.eos_id
    url = np.asarray(ids(bpe, URL))
    one, two = back_up([url], tb, 1), back_up([url], tb, 2)
    assert one.prompts[0].tolist() == url[:-1].tolist() and one.removed == [b":"]
    assert two.prompts[0].tolist() == url[:-2].tolist() and two.removed == [b"http:"]
    short = back_up([url[:1], url[:2]], tb, 5)  # at least one token stays
    assert [p.tolist() for p in short.prompts] == [url[:1].tolist(), url[:1].tolist()]
    assert short.removed == [b"", tb[url[1]]]
    specials = back_up([np.asarray([*url[:3], eos]), np.asarray([url[0], eos, url[1]])], tb, 2)
    assert specials.prompts[0].tolist() == [*url[:3], eos] and specials.removed[0] == b""
    assert specials.prompts[1].tolist() == [url[0], eos] and specials.removed[1] == tb[url[1]]


# -- the URL example end to end ---------------------------------------------------------------

def test_url_prompt_is_healed_into_http_site_com(bigram, bpe):
    prompt = np.asarray(ids(bpe, URL))
    run = dict(tokenizer=bpe, stop_ids=[bpe.eos_id])
    plain, = generate(bigram, [prompt], GenerateOptions(max_new_tokens=6), **run)
    pieces = []
    healed, = generate(bigram, [prompt], GenerateOptions(max_new_tokens=6, token_healing=1),
                       on_text=lambda row, text: pieces.append(text), segment=2, **run)
    assert plain.text == " //site.com"  # the failure without healing
    assert plain.prompt.tolist() == prompt.tolist()
    assert healed.prompt.tolist() == prompt[:-1].tolist()  # backed up by ":"
    assert bpe.decode(healed.tokens) == "://site.com"  # "://" chosen as one token
    assert healed.text == "//site.com"  # the text after the prompt as given
    assert URL + healed.text == 'link is <a href="http://site.com'
    assert healed.stop == "stop token"
    assert "".join(pieces) == healed.text  # streamed in segments of 2 tokens: ":// site"...

    lm = LM(bigram, config(), bpe)
    assert lm.generate(URL, 6) == " //site.com"
    assert lm.generate(URL, 6, token_healing=1) == "//site.com"


# -- the byte tokenizer -----------------------------------------------------------------------

def test_byte_tokenizer_healing_respells_the_byte_and_then_continues_as_without(m):
    """Each token is one byte, so the removed byte is the only allowed first token: greedy
    decoding then runs from the very prompt it had without healing, one token later."""
    tok, N = ByteTokenizer(), 8
    prompts = [tok.encode(URL).astype(np.int32), tok.encode("naïve café").astype(np.int32)]
    plain = generate(m, prompts, GenerateOptions(max_new_tokens=N), tokenizer=tok)
    healed = generate(m, prompts, GenerateOptions(max_new_tokens=N, token_healing=1),
                      tokenizer=tok)
    for p, a, b in zip(prompts, plain, healed, strict=True):
        assert b.prompt.tolist() == p[:-1].tolist()
        assert b.tokens[0] == p[-1]
        assert b.tokens[1:].tolist() == a.tokens[:N - 1].tolist()
        assert b.text == tok.decode(a.tokens[:N - 1])


# -- every beam, every sample -----------------------------------------------------------------

def test_every_sample_spells_the_removed_text_again(m, bpe):
    """Hot sampling from an untrained model over a 384-token vocabulary: without the
    constraint almost no row would start with the removed text."""
    tb = bpe.token_bytes()
    prompts = [np.asarray(ids(bpe, t)) for t in (URL, "link is site.com", URL, "é http")] * 2
    opts = GenerateOptions(strategy="sample", max_new_tokens=8, token_healing=2,
                           sampling=Sampling(temperature=2.0), seed=3)
    outs = generate(m, prompts, opts, tokenizer=bpe)
    firsts = set()
    for p, out in zip(prompts, outs, strict=True):
        removed = spelled(tb, p[len(out.prompt):])
        assert len(p) - len(out.prompt) == 2 and removed
        assert spelled(tb, out.tokens).startswith(removed)
        firsts.add((len(out.prompt), int(out.tokens[0])))
    assert len(firsts) > 3  # the rows did not all draw the same tokens


def test_every_beam_spells_the_removed_text_again(m, bpe, monkeypatch):
    """Each running beam and each finished hypothesis (the state beam search ends in) starts
    with the removed text; the best is returned."""
    tb, N = bpe.token_bytes(), 8
    final = {}
    result = BeamSearch.result

    def keep_state(self, s):
        final.update(s)
        return result(self, s)

    monkeypatch.setattr(BeamSearch, "result", keep_state)
    prompts = [np.asarray(ids(bpe, t)) for t in (URL, "link is site.com")]
    outs = generate(m, prompts, GenerateOptions(strategy="beam", num_beams=3,
                                                max_new_tokens=N, token_healing=2),
                    tokenizer=bpe)
    n = int(final["n"])
    for b, (p, out) in enumerate(zip(prompts, outs, strict=True)):
        removed = spelled(tb, p[len(out.prompt):])
        assert removed in (b"http:", b"site.com") and spelled(tb, out.tokens).startswith(removed)
        beams = [final["running"][b, k, :n] for k in range(3)
                 if final["running_scores"][b, k] > NEG / 2]
        beams += [final["finished"][b, k, :final["finished_lengths"][b, k]] for k in range(3)
                  if final["finished_scores"][b, k] > NEG / 2]
        assert beams
        for tokens in beams:
            assert spelled(tb, tokens).startswith(removed)


def test_contrastive_search_spells_the_removed_text_again(m, bpe):
    """Fewer tokens may start the removed text than contrastive search's top_k candidates: a
    candidate the constraint removed (probability 0) must not win on a low degeneration
    penalty."""
    tb = bpe.token_bytes()
    prompts = [np.asarray(ids(bpe, t)) for t in ("a href://", 'x="http:', "is é", "http://")]
    outs = generate(m, prompts, GenerateOptions(strategy="contrastive", top_k=8,
                                                penalty_alpha=0.9, max_new_tokens=4,
                                                token_healing=1), tokenizer=bpe)
    for p, out in zip(prompts, outs, strict=True):
        removed = spelled(tb, p[len(out.prompt):])
        assert removed and spelled(tb, out.tokens).startswith(removed)


# -- token bytes ------------------------------------------------------------------------------

def test_byte_level_token_bytes_decode_as_the_tokenizer_decodes(bpe):
    tb = bpe.token_bytes()
    chosen = ids(bpe, ' is://site.com é') + ids(bpe, "ü")[:1] + ids(bpe, URL)
    assert ids(bpe, " is")[0] in chosen and tb[ids(bpe, " is")[0]] == b" is"  # "Ġis"
    assert tb[ids(bpe, "é")[0]] == "é".encode()  # a merged two-byte character
    for i in chosen:
        assert tb[i].decode("utf-8", errors="replace") == bpe.decode([i])
    assert tb[bpe.eos_id] == b""
    assert len(tb) == bpe.vocab_size


def test_sentencepiece_style_pieces_and_the_healed_text_after_them(tmp_path):
    """"▁" is a space and "<0x0A>" a byte; the text of a healed row is what follows the
    removed text, though the decoder strips the leading space of the first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    pieces = ["<unk>", "</s>", "▁", "w", "o", "r", "l", "d", "!", "<0x0A>", "▁w", "▁wo",
              "▁wor", "▁worl", "▁world"]
    merges = [("▁", "w"), ("▁w", "o"), ("▁wo", "r"), ("▁wor", "l"), ("▁worl", "d")]
    tok = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=merges,
                               unk_token="<unk>"))
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tok.add_special_tokens(["</s>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    sp = HFTokenizer(tmp_path / "tokenizer.json")
    tb = sp.token_bytes()
    world, bang = ids(sp, " world!")
    assert (tb[world], tb[bang], tb[pieces.index("<0x0A>")], tb[1]) == (
        b" world", b"!", b"\n", b"")
    assert sp.decode([world, bang]) == "world!"  # the leading space stripped
    watch = Watcher(sp, [], [b" world", b" wor", b""], None, tb)
    assert watch.text(0, [world, bang]) == "!"
    assert watch.text(1, [world, bang]) == "ld!"
    assert watch.text(1, [pieces.index("▁w")]) == ""  # not yet spelled again
    assert watch.text(2, [world, bang]) == "world!"  # not healed: the tokenizer's decode
