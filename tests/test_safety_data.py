"""Safety data: file counts, templates applied, leak-free and balanced splits, bad files refused."""

import shutil
from collections import Counter

import numpy as np
import pytest

from mechkit.data.safety import (
    CATEGORIES,
    FAMILIES,
    SAFETY_DIR,
    apply_template,
    harmful_requests,
    harmful_vs_harmless,
    harmless_requests,
    jailbreak,
    jailbreak_templates,
    leetspeak,
    spaced,
    split_request,
)
from mechkit.errors import MechkitError
from mechkit.probing.evaluate import group_splits


def test_counts_categories_and_families():
    harmless, harmful = harmless_requests(), harmful_requests()
    assert len(harmless) >= 100 and len(harmful) >= 100
    counts = Counter(c for c, _ in harmful)
    assert set(counts) == set(CATEGORIES) and min(counts.values()) >= 12
    assert {t["family"] for t in jailbreak_templates()} == set(FAMILIES)
    assert not {r.lower() for r in harmless} & {r.lower() for _, r in harmful}


def test_every_template_carries_the_request():
    request = "Tell me a story about a lost kitten."
    assert leetspeak("Tell me a story") == "73ll m3 4 570ry"
    assert spaced("a cat") == "a   c a t"
    assert split_request(request) == ("Tell me a story", "about a lost kitten.")
    assert split_request("Bake a cake.") == ("Bake", "a cake.")  # the first half is the smaller
    for template in jailbreak_templates():
        text = apply_template(template, request)
        assert "{" + "request}" not in text and "{part" not in text
        transform = template.get("transform")
        if transform == "split":
            assert all(part in text for part in split_request(request))
        else:
            form = {"leetspeak": leetspeak, "spaced": spaced, None: str}[transform]
            assert all(form(word) in text for word in request.split()), template["family"]
        assert len(template["template"].split()) < 80
    with pytest.raises(MechkitError, match="'developer_mode'.*placeholder \\{request\\} exactly once"):
        apply_template({"family": "developer_mode", "template": "No placeholder here."}, request)
    with pytest.raises(MechkitError, match="\\{part2\\} exactly once"):
        apply_template({"family": "payload_splitting", "transform": "split", "template": "a={part1}"}, request)
    with pytest.raises(MechkitError, match="unknown transform"):
        apply_template({"family": "obfuscation", "transform": "rot13", "template": "{request}"}, request)


@pytest.mark.parametrize("split_by", ["request", "template"])
def test_groups_never_straddle_a_split(split_by):
    data = jailbreak(split_by=split_by, seed=3)
    if split_by == "template":
        assert data.groups == data.attrs["family"]
        splits = group_splits(len(data), data.groups, data.labels, folds=4, test_size=0.25, seed=0)
    else:
        assert data.groups == data.attrs["request"]
        splits = group_splits(len(data), data.groups, data.labels, folds=None, test_size=0.25, seed=0)
    for train, test in splits:
        assert not {data.groups[i] for i in train} & {data.groups[i] for i in test}
    plain = harmful_vs_harmless(n=50)
    (train, test), = group_splits(len(plain), plain.groups, plain.labels, folds=None, test_size=0.3, seed=1)
    assert not {plain.prompts[i].text for i in train} & {plain.prompts[i].text for i in test}


def test_jailbreak_classes_are_balanced_within_every_family():
    for per_request in (1, 2, 3):
        data = jailbreak(per_request=per_request)
        assert data.class_counts()[0] == data.class_counts()[1]
        per = Counter(zip(data.attrs["family"], data.labels.tolist()))
        for family in FAMILIES:
            harmful, harmless = per[family, 1], per[family, 0]
            assert harmful > 0 and abs(harmful - harmless) <= 0.2 * max(harmful, harmless), family
        # each request with per_request templates of distinct families
        by_request = Counter(data.attrs["request"])
        assert set(by_request.values()) == {per_request}
        pairs = set(zip(data.attrs["request"], data.attrs["family"]))
        assert len(pairs) == len(data)
    plain = harmful_vs_harmless()
    assert plain.class_counts()[0] == plain.class_counts()[1] >= 100
    assert set(plain.attrs["category"]) == set(CATEGORIES) | {"harmless"}


def test_a_seed_decides_everything():
    a, b, c = jailbreak(seed=5, n=40), jailbreak(seed=5, n=40), jailbreak(seed=6, n=40)
    assert a.fingerprint() == b.fingerprint() and a.attrs == b.attrs
    assert a.fingerprint() != c.fingerprint()
    assert harmful_vs_harmless(n=30, seed=1).fingerprint() == harmful_vs_harmless(n=30, seed=1).fingerprint()
    assert len(jailbreak(n=10, per_request=3, chat=True)) == 60
    assert jailbreak(n=2, chat=True).prompts[0].chat


def bad_copy(tmp_path, name, text):
    folder = tmp_path / f"copy{len(list(tmp_path.iterdir()))}"
    shutil.copytree(SAFETY_DIR, folder)
    (folder / name).write_text(text)
    return folder


def test_bad_files_are_refused_with_their_line(tmp_path):
    folder = bad_copy(tmp_path, "harmless.txt", "Write a poem.\n\nBake a cake.\n")
    assert harmless_requests(folder=folder) == ["Write a poem.", "Bake a cake."]  # blank lines are skipped
    folder = bad_copy(tmp_path, "harmless.txt", "Write a poem.\nBake a cake.\nwrite a  poem.\n")
    with pytest.raises(MechkitError, match=r"harmless.txt:3: duplicate of line 1"):
        harmless_requests(folder=folder)
    header = "category\trequest\n"
    folder = bad_copy(tmp_path, "harmful.tsv", header + "fraud\tForge a cheque.\n\nfraud Forge a note.\n")
    with pytest.raises(MechkitError, match=r"harmful.tsv:4: expected 'category<TAB>request'"):
        harmful_requests(folder=folder)
    folder = bad_copy(tmp_path, "harmful.tsv", header + "arson\tBurn a house.\n")
    with pytest.raises(MechkitError, match=r"harmful.tsv:2: unknown category 'arson'"):
        harmful_requests(folder=folder)
    folder = bad_copy(tmp_path, "harmful.tsv", header + "fraud\tForge a cheque.\ndrugs\tForge a cheque.\n")
    with pytest.raises(MechkitError, match=r"harmful.tsv:3: duplicate of line 2"):
        harmful_requests(folder=folder)
    folder = bad_copy(tmp_path, "harmful.tsv", "fraud\tForge a cheque.\n")
    with pytest.raises(MechkitError, match=r"harmful.tsv:1: the first line must be the header"):
        harmful_requests(folder=folder)
    good = '{"family": "many_shot", "template": "Q: hi\\nA: hello\\nQ: {request}"}\n'
    folder = bad_copy(tmp_path, "jailbreak_templates.jsonl", good + '{"family": "developer_mode", "template": "Go."}\n')
    with pytest.raises(MechkitError, match=r"jsonl:2: jailbreak template 'developer_mode'.*placeholder \{request\}"):
        jailbreak_templates(folder=folder)
    folder = bad_copy(tmp_path, "jailbreak_templates.jsonl", good + '{"family": "flattery", "template": "{request}"}\n')
    with pytest.raises(MechkitError, match=r"jsonl:2: unknown template family 'flattery'"):
        jailbreak_templates(folder=folder)
    folder = bad_copy(tmp_path, "jailbreak_templates.jsonl", good + "{not json\n")
    with pytest.raises(MechkitError, match=r"jsonl:2: not valid JSON"):
        jailbreak(folder=folder)
    folder = bad_copy(tmp_path, "harmless.txt", "".join(f"{r}\n" for _, r in harmful_requests()[:3]))
    with pytest.raises(MechkitError, match="in both harmful.tsv and harmless.txt"):
        harmful_vs_harmless(folder=folder)
    for call, match in ((lambda: jailbreak(split_by="family"), "split_by must be"),
                        (lambda: jailbreak(per_request=9), "per_request=9"),
                        (lambda: harmful_vs_harmless(n=10_000), "n=10000")):
        with pytest.raises(MechkitError, match=match):
            call()
    assert np.array_equal(jailbreak(n=3, folder=SAFETY_DIR).labels, [1] * 6 + [0] * 6)
