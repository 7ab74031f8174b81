"""PassKey prompts are deterministic and well formed; scoring gives 1.0 to a model that always
answers right and 0.0 to one that never does; the heatmap is written."""

import numpy as np
import pytest

from gigajax.data.tokenizer import ByteTokenizer
from gigajax.eval import passkey

TOK = ByteTokenizer()


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_prompt_has_the_length_and_the_needle_at_its_depth(depth):
    prompt = passkey.make_prompt(TOK, 1000, depth, seed=3)
    assert len(prompt.ids) == 1000 and len(prompt.key) == 5 and prompt.key.isdigit()
    text = TOK.decode(prompt.ids)
    assert text.startswith(passkey.INSTRUCTION) and text.endswith(passkey.QUESTION)
    at = text.index(f"The pass key is {prompt.key}.")
    filler_start = len(passkey.INSTRUCTION)
    filler_len = 1000 - len(TOK.encode(passkey.INSTRUCTION + passkey.NEEDLE.format(
        key=prompt.key) + passkey.QUESTION))
    assert at - filler_start == round(depth * filler_len)


def test_prompts_are_a_function_of_seed_length_depth_and_sample():
    a = passkey.make_prompt(TOK, 600, 0.5, seed=1, sample=2)
    b = passkey.make_prompt(TOK, 600, 0.5, seed=1, sample=2)
    np.testing.assert_array_equal(a.ids, b.ids)
    keys = {passkey.make_prompt(TOK, 600, 0.5, seed=1, sample=s).key for s in range(10)}
    assert len(keys) > 5  # the key changes with the sample
    assert passkey.make_prompt(TOK, 600, 0.5, seed=2, sample=2).key != a.key or \
        passkey.make_prompt(TOK, 600, 0.5, seed=3, sample=2).key != a.key


def test_too_short_a_length_is_refused():
    with pytest.raises(ValueError, match="shorter than the prompt"):
        passkey.make_prompt(TOK, 50, 0.5, seed=0)


def oracle(right: bool):
    """A fake model that reads the key out of the prompt (and answers it, or a wrong one)."""
    def generate(ids, new_tokens):
        text = TOK.decode(ids)
        key = text.split("The pass key is ")[1][:5]
        answer = key if right else str((int(key) + 1) % 100000).zfill(5)
        return TOK.encode(" " + answer + ".")[:new_tokens]

    return generate


def test_scores_of_an_always_right_and_an_always_wrong_model(tmp_path):
    lengths, depths = [300, 600], [0.0, 0.5, 1.0]
    right = passkey.score_grid(oracle(True), TOK, lengths, depths, samples=3)
    wrong = passkey.score_grid(oracle(False), TOK, lengths, depths, samples=3)
    assert right["mean"] == 1.0 and np.all(np.asarray(right["scores"]) == 1.0)
    assert wrong["mean"] == 0.0 and np.asarray(wrong["scores"]).shape == (2, 3)
    passkey.plot_heatmap(right, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").read_bytes()[:4] == b"\x89PNG"


def test_answer_scoring_is_binary_on_the_key_prefix():
    assert passkey.is_right(" 12345. Done", "12345")
    assert not passkey.is_right("1234", "12345") and not passkey.is_right("x12345", "12345")
