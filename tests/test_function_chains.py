"""Function-labelled chains: sizes, distinct questions, gold context, correct arithmetic, bad files refused."""

import json
import operator
import re
from collections import Counter, defaultdict

import pytest

from mechkit.data.function_chains import (
    FUNCTIONS,
    FUNCTIONS_DIR,
    MAX_STEPS,
    SubQuestion,
    counts,
    function_dataset,
    load_function_chains,
    load_seeds,
)
from mechkit.data.tasks import TASK_NAMES
from mechkit.errors import MechkitError

CHAINS = FUNCTIONS_DIR / "chains.jsonl"
SEEDS = FUNCTIONS_DIR / "seeds.jsonl"
FILLS = FUNCTIONS_DIR / "fills.json"

# Arithmetic recomputed from the question text, independently of the loader's OPS.
MATH_PATTERNS = [
    (r"What is (\d+) (?:plus|\+|more than) (\d+)\?", operator.add),
    (r"What is the sum of (\d+) and (\d+)\?", operator.add),
    (r"Add (\d+) and (\d+)\. What do you get\?", operator.add),
    (r"What is (\d+) (?:minus|-) (\d+)\?", operator.sub),
    (r"What is the difference between (\d+) and (\d+)\?", operator.sub),
    (r"What is (\d+) less than (\d+)\?", lambda b, a: a - b),
    (r"What is (\d+) (?:times|\*|multiplied by) (\d+)\?", operator.mul),
    (r"What is the product of (\d+) and (\d+)\?", operator.mul),
    (r"What is (\d+) (?:divided by|/) (\d+)\?", lambda a, b: a / b),
    (r"What is (?:double|twice) (\d+)\?", lambda a: 2 * a),
    (r"What is half of (\d+)\?", lambda a: a / 2),
    (r"What is one more than (\d+)\?|What number comes after (\d+)\?", lambda a: a + 1),
    (r"What is one less than (\d+)\?", lambda a: a - 1),
    (r"How many letters (?:are in|does) the word '?([A-Za-z]+)'?(?: have)?\?", len),
]


def _recompute(question: str):
    """The answer worked out from the question text, or None when no pattern knows the question."""
    for pattern, operation in MATH_PATTERNS:
        match = re.fullmatch(pattern, question)
        if match:
            args = [int(g) if g.isdigit() else g for g in match.groups() if g is not None]
            result = operation(*args)
            assert result == int(result), question
            return str(int(result))
    return None


def _chains() -> dict[str, list[SubQuestion]]:
    by_chain: dict[str, list[SubQuestion]] = defaultdict(list)
    for q in load_function_chains(CHAINS):
        by_chain[q.chain_id].append(q)
    return by_chain


def test_functions_are_the_task_names():
    assert FUNCTIONS == TASK_NAMES and len(FUNCTIONS) == 8


def test_builtin_chains_have_two_to_four_steps_and_cover_every_function():
    chains = _chains()
    assert len(chains) >= 60
    for chain_id, steps in chains.items():
        assert 2 <= len(steps) <= 4, chain_id
        assert [q.step for q in steps] == list(range(len(steps))), chain_id
    per_function = counts(q for steps in chains.values() for q in steps)
    assert min(per_function.values()) >= 10, per_function


def test_at_least_150_subquestions_and_30_seeds_per_function():
    everything = function_dataset()
    tally = counts(everything)
    assert list(tally) == list(FUNCTIONS)
    assert min(tally.values()) >= 150, tally
    assert sum(tally.values()) == len(everything)
    seeds = Counter(expanded[0].function for _, expanded in load_seeds())
    assert set(seeds) == set(FUNCTIONS) and min(seeds.values()) >= 30, seeds
    assert load_function_chains() == everything


def test_questions_distinct_within_each_function():
    seen: dict[tuple[str, str], str] = {}
    for q in function_dataset():
        key = (q.function, " ".join(q.question.lower().split()))
        assert key not in seen, f"{q.question!r} appears in {seen[key]} and {q.chain_id}"
        seen[key] = q.chain_id


def test_answers_short_non_empty_and_every_slot_filled():
    for q in function_dataset():
        assert q.answer.strip() == q.answer and 1 <= len(q.answer.split()) <= 3, (q.question, q.answer)
        assert not re.search(r"[{}]", q.question + q.answer), q.question
        assert q.target == " " + q.answer
        if q.function == "math_calculation":
            assert q.answer.isdigit(), (q.question, q.answer)


def test_context_is_the_gold_answers_of_earlier_steps_in_order():
    raw = {row["id"]: row["steps"] for row in map(json.loads, CHAINS.read_text().splitlines())}
    chains = _chains()
    assert set(chains) == set(raw)
    for chain_id, steps in chains.items():
        for k, q in enumerate(steps):
            assert (q.question, q.answer, q.function) == (raw[chain_id][k]["question"], raw[chain_id][k]["answer"],
                                                         raw[chain_id][k]["function"])
            assert q.context == tuple((s["question"], s["answer"]) for s in raw[chain_id][:k])
            assert q.prompt.count("Q: ") == k + 1 and q.prompt.endswith(f"Q: {q.question}\nA:")
    for q in function_dataset():
        if q.chain_id.startswith("seed"):
            assert q.context == () and q.step == 0 and q.prompt == f"Q: {q.question}\nA:"


def test_prompt_and_target_format():
    q = SubQuestion("How many letters are in the word Paris?", "5", "math_calculation",
                    (("What is the capital of France?", "Paris"),), "c001", 1)
    assert q.prompt == "Q: What is the capital of France?\nA: Paris\nQ: How many letters are in the word Paris?\nA:"
    assert q.target == " 5"
    with pytest.raises(MechkitError, match="unknown function 'memory'"):
        SubQuestion("Q?", "a", "memory")
    with pytest.raises(MechkitError, match="answer is empty"):
        SubQuestion("Q?", " ", "inference")


def test_math_answers_recomputed_from_the_question_text():
    math = [q for q in function_dataset() if q.function == "math_calculation"]
    checked = 0
    for q in math:
        expected = _recompute(q.question)
        if expected is not None:
            assert q.answer == expected, q.question
            checked += 1
        else:
            assert q.chain_id.startswith("seed"), f"hand-written chain step {q.question!r} is not checked"
    assert checked >= 0.6 * len(math), (checked, len(math))


def test_math_answers_recomputed_from_the_seed_spec():
    ops = {"add": lambda r: r["a"] + r["b"], "subtract": lambda r: r["a"] - r["b"],
           "multiply": lambda r: r["a"] * r["b"], "divide": lambda r: r["a"] // r["b"],
           "double": lambda r: 2 * r["a"], "half": lambda r: r["a"] // 2, "successor": lambda r: r["a"] + 1,
           "predecessor": lambda r: r["a"] - 1, "letters": lambda r: len(r["word"])}
    fills = json.loads(FILLS.read_text())
    expanded = dict(load_seeds())
    seen = 0
    for number, line in enumerate(SEEDS.read_text().splitlines(), 1):
        seed = json.loads(line) if line.strip() else {}
        if "op" not in seed:
            continue
        rows = fills[seed["fill"]] if "fill" in seed else seed["rows"]
        if seed["op"] in ("divide", "half"):
            assert all(r["a"] % (r["b"] if seed["op"] == "divide" else 2) == 0 for r in rows), number
        assert [q.answer for q in expanded[number]] == [str(ops[seed["op"]](r)) for r in rows], number
        seen += len(rows)
    assert seen >= 100


def test_function_dataset_balanced_sample():
    a, b = function_dataset(per_function=150, seed=0), function_dataset(per_function=150, seed=0)
    assert a == b and set(counts(a).values()) == {150}
    assert function_dataset(per_function=150, seed=1) != a
    with pytest.raises(MechkitError, match="per_function=100000"):
        function_dataset(per_function=100000)


def test_user_chain_file_loads(tmp_path):
    path = tmp_path / "mine.jsonl"
    steps = [{"question": "What is 2 plus 2?", "answer": " 4 ", "function": "math_calculation"},
             {"question": "Is 4 even?", "answer": "yes", "function": "logical_reasoning"}]
    path.write_text(json.dumps({"id": "x1", "steps": steps}) + "\n\n" +
                    json.dumps({"id": "x2", "steps": steps[:1]}) + "\n")
    qs = load_function_chains(path)
    assert [(q.chain_id, q.step) for q in qs] == [("x1", 0), ("x1", 1), ("x2", 0)]
    assert qs[1].context == (("What is 2 plus 2?", "4"),) and qs[0].target == " 4"


def _step(**override):
    return {"question": "What is 1 plus 1?", "answer": "2", "function": "math_calculation", **override}


GOOD = json.dumps({"id": "ok", "steps": [_step()]})


@pytest.mark.parametrize("bad, message", [
    ('{"id": "c2", "steps": [', r"not valid JSON"),
    ('["c2"]', r"expected a JSON object"),
    (json.dumps({"id": "c2"}), r"missing field\(s\) \['steps'\]"),
    (json.dumps({"steps": [_step()]}), r"missing field\(s\) \['id'\]"),
    (json.dumps({"id": "ok", "steps": [_step()]}), r"chain id 'ok' repeats line 1"),
    (json.dumps({"id": "c2", "steps": []}), r"chain 'c2' has no steps"),
    (json.dumps({"id": "c2", "steps": [_step()] * (MAX_STEPS + 1)}), rf"{MAX_STEPS + 1} steps, more than MAX_STEPS"),
    (json.dumps({"id": "c2", "steps": [_step(), "Q?"]}), r"step 2 of chain 'c2' is not a JSON object"),
    (json.dumps({"id": "c2", "steps": [{"question": "Q?", "function": "inference"}]}),
     r"step 1 of chain 'c2': missing field\(s\) \['answer'\]"),
    (json.dumps({"id": "c2", "steps": [_step(function="memory")]}),
     r"unknown function 'memory'; use one of \['knowledge_recall', .*'math_calculation'\]"),
    (json.dumps({"id": "c2", "steps": [_step(), _step(answer="  ")]}), r"step 2 of chain 'c2': answer is empty"),
    (json.dumps({"id": "c2", "steps": [_step(question="two\nlines")]}), r"question spans several lines"),
])
def test_bad_chain_lines_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "chains.jsonl"
    path.write_text(GOOD + "\n" + bad + "\n")
    with pytest.raises(MechkitError, match=rf"chains\.jsonl:2: .*{message}"):
        load_function_chains(path)


def test_missing_and_empty_chain_files(tmp_path):
    with pytest.raises(MechkitError, match="does not exist"):
        load_function_chains(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(MechkitError, match="holds nothing"):
        load_function_chains(tmp_path / "empty.jsonl")


@pytest.mark.parametrize("bad, message", [
    ({"function": "math_calculation", "question": "What is {a} plus {b}?", "op": "power", "rows": [{"a": 1, "b": 2}]},
     "unknown op 'power'"),
    ({"function": "math_calculation", "question": "What is {a} divided by {b}?", "op": "divide",
      "rows": [{"a": 7, "b": 2}]}, "7 / 2 is not a whole number"),
    ({"function": "math_calculation", "question": "What is {a} minus {b}?", "op": "subtract",
      "rows": [{"a": 2, "b": 7}]}, "gives -5"),
    ({"function": "math_calculation", "question": "What is {a} plus {b}?", "op": "add",
      "rows": [{"a": 1, "b": "2"}]}, "needs slot 'b' to be int"),
    ({"function": "retrieval", "question": "Where is {x}?", "answer": "{y}", "rows": [{"x": 1}]},
     r"slot \{y\} has no value"),
    ({"function": "retrieval", "question": "Where is {x}?", "answer": "{x}", "fill": "nope"},
     "unknown fill list 'nope'"),
    ({"function": "retrieval", "question": "Q?", "answer": "a", "op": "add"}, "not both"),
    ({"function": "retrieval", "question": "Q?"}, r"missing field\(s\) \['answer \(or op\)'\]"),
    ({"function": "memory", "question": "Q?", "answer": "a"}, "unknown function 'memory'"),
    ({"function": "retrieval", "question": "Where is {x}?", "answer": "{x}", "rows": [{"x": "Ann"}, {"x": " "}]},
     "row 2: the answer is empty"),
    ({"function": "inference", "question": "Is it on?", "answer": "yes"}, "repeats line 1"),
])
def test_bad_seed_lines_name_file_and_line(tmp_path, bad, message):
    path = tmp_path / "seeds.jsonl"
    (tmp_path / "fills.json").write_text('{"names": [{"x": "Ann"}]}')
    path.write_text(json.dumps({"function": "inference", "question": "Is it on?", "answer": "no"}) + "\n" +
                    json.dumps(bad) + "\n")
    with pytest.raises(MechkitError, match=rf"seeds\.jsonl:2: .*{message}"):
        load_seeds(path)


def test_user_seed_file_expands_rows_and_fills(tmp_path):
    path = tmp_path / "seeds.jsonl"
    (tmp_path / "fills.json").write_text('{"names": [{"x": "Ann"}, {"x": "Bo"}]}')
    lines = [{"function": "retrieval", "question": "Say {x}.", "answer": "{x}", "fill": "names"},
             {"function": "math_calculation", "question": "Letters in {word}?", "op": "letters",
              "rows": [{"word": "kite"}]}]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    seeds = load_seeds(path)
    assert [n for n, _ in seeds] == [1, 2]
    assert [(q.question, q.answer, q.chain_id) for q in seeds[0][1]] == [("Say Ann.", "Ann", "seed001"),
                                                                         ("Say Bo.", "Bo", "seed001")]
    assert seeds[1][1][0].answer == "4"
