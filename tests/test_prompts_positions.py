import pytest

from mechkit.activations import NAMED_POSITIONS, Position, Prompt, as_position, encode
from mechkit.errors import MechkitError


def test_bos_added_exactly_once(tiny_llama):
    bos = tiny_llama.tokenizer.bos_token_id
    plain = encode(tiny_llama, Prompt("the capital of France is")).ids
    already = encode(tiny_llama, Prompt("<bos> the capital of France is")).ids
    assert plain[0] == bos and plain[1] != bos
    assert already == plain


def test_spans_become_token_ranges(tiny_llama):
    text = "the capital of France is Paris"
    encoded = encode(tiny_llama, Prompt(text, spans={"question": (0, 24), "exact_answer": (25, 30)}))
    # ids: <bos> the capital of France is Paris
    assert encoded.spans == {"question": (1, 6), "exact_answer": (6, 7)}
    assert NAMED_POSITIONS["last_q"].resolve(encoded) == 5
    assert NAMED_POSITIONS["exact_answer_first"].resolve(encoded) == 6
    assert NAMED_POSITIONS["exact_answer_last"].resolve(encoded) == 6
    assert NAMED_POSITIONS["exact_answer_before_first"].resolve(encoded) == 5
    assert NAMED_POSITIONS["first_answer"].resolve(encoded) is None  # no "answer" span
    assert as_position(-1).resolve(encoded) == 6
    assert as_position("0").resolve(encoded) == 0


def test_second_answer_missing_when_answer_is_one_token(tiny_llama):
    encoded = encode(tiny_llama, Prompt("the capital is Paris", spans={"answer": (15, 20)}))
    assert NAMED_POSITIONS["first_answer"].resolve(encoded) == 4
    assert NAMED_POSITIONS["second_answer"].resolve(encoded) is None


def test_bad_positions_and_prompts_are_explained(tiny_llama):
    encoded = encode(tiny_llama, Prompt("the capital"))
    with pytest.raises(MechkitError, match="outside a prompt of 3 tokens"):
        as_position(-4).resolve(encoded)
    with pytest.raises(MechkitError, match="unknown position 'middle'"):
        as_position("middle")
    with pytest.raises(MechkitError, match="not a non-empty range"):
        Prompt("abc", spans={"answer": (2, 9)})
    assert as_position("span:answer:last") == Position("span:answer:last", "answer", "end", 0)


def test_chat_prompt_refused_without_template(tiny_llama):
    with pytest.raises(MechkitError, match="no chat template"):
        encode(tiny_llama, Prompt("hello", chat=True))
