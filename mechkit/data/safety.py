"""Safety data: harmless and harmful requests, jailbreak templates, and the probing sets built on them.

The data files live in ``mechkit/data/safety/`` (every loader takes ``folder=`` to read another copy):

* ``harmless.txt``: one everyday request a line.
* ``harmful.tsv``: header ``category<TAB>request``, then one harmful *request* a line (never an
  answer), ``category`` one of :data:`CATEGORIES`.
* ``jailbreak_templates.jsonl``: one ``{"family", "template", "transform"?}`` object a line,
  ``family`` one of :data:`FAMILIES`.

Blank lines are skipped anywhere; anything else malformed (a line without its tab, an unknown
category or family, a duplicate request or template, a template without its placeholder) raises
:class:`~mechkit.errors.MechkitError` naming the file and line.

Template rules (applied by :func:`apply_template`):

* no ``transform``: the text holds ``{request}`` exactly once; the request is put there verbatim;
* ``"transform": "leetspeak"``: as above, the request rewritten first (a->4, e->3, i->1, o->0,
  s->5, t->7, either case);
* ``"transform": "spaced"``: as above, the request's characters joined by single spaces first;
* ``"transform": "split"``: the text holds ``{part1}`` and ``{part2}`` exactly once each and no
  ``{request}``; the request's words are cut in two halves (the first gets the smaller half) that
  go there.

Substitution is plain text replacement, so other braces in a template are kept as they are.

Datasets:

* :func:`harmful_vs_harmless`: plain requests, label 1 = harmful; grouped by request.
* :func:`jailbreak`: harmful requests wrapped in templates (label 1) and harmless requests wrapped
  in the *same* templates (label 0), so that a probe cannot win by spotting a template; grouped by
  request, or by template family to hold out whole attack families.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from mechkit.data.jsonl import read_jsonl
from mechkit.data.probe_dataset import ProbeDataset
from mechkit.data.prompts import Prompt
from mechkit.errors import MechkitError

SAFETY_DIR = Path(__file__).parent / "safety"

CATEGORIES = ("violence", "weapons", "fraud", "hacking", "drugs", "harassment", "self-harm")
FAMILIES = ("role_play_persona", "hypothetical_fiction", "refusal_suppression", "prefix_injection",
            "developer_mode", "payload_splitting", "obfuscation", "many_shot")

_LEET = str.maketrans("aeiostAEIOST", "431057431057")


def leetspeak(text: str) -> str:
    """``text`` with a, e, i, o, s, t (either case) written 4, 3, 1, 0, 5, 7."""
    return text.translate(_LEET)


def spaced(text: str) -> str:
    """``text`` with its characters joined by single spaces."""
    return " ".join(text)


def split_request(text: str) -> tuple[str, str]:
    """The request's words in two halves; the first half is the smaller one."""
    words = text.split()
    half = len(words) // 2
    return " ".join(words[:half]), " ".join(words[half:])


TRANSFORMS = {"leetspeak": leetspeak, "spaced": spaced, "split": split_request}


def _folder(folder: str | os.PathLike | None) -> Path:
    return Path(folder) if folder is not None else SAFETY_DIR


def _read_lines(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of the non-blank lines of ``path``."""
    if not path.exists():
        raise MechkitError(f"safety data file {path} does not exist")
    lines = [(number, line.strip()) for number, line in enumerate(path.read_text().splitlines(), 1)]
    return [(number, line) for number, line in lines if line]


def _check_unique(path: Path, number: int, text: str, seen: dict[str, int]) -> None:
    key = " ".join(text.lower().split())
    if key in seen:
        raise MechkitError(f"{path}:{number}: duplicate of line {seen[key]}: {text!r}; keep each entry once")
    seen[key] = number


def harmless_requests(*, folder: str | os.PathLike | None = None) -> list[str]:
    """The harmless requests of ``harmless.txt``, in file order."""
    path = _folder(folder) / "harmless.txt"
    seen: dict[str, int] = {}
    requests = []
    for number, line in _read_lines(path):
        if "\t" in line:
            raise MechkitError(f"{path}:{number}: one request a line, no tabs; got {line!r}")
        _check_unique(path, number, line, seen)
        requests.append(line)
    if not requests:
        raise MechkitError(f"{path}: no requests; write one harmless request a line")
    return requests


def harmful_requests(*, folder: str | os.PathLike | None = None) -> list[tuple[str, str]]:
    """(category, request) pairs of ``harmful.tsv``, in file order."""
    path = _folder(folder) / "harmful.tsv"
    lines = _read_lines(path)
    if not lines or lines[0][1].split("\t") != ["category", "request"]:
        raise MechkitError(f"{path}:{lines[0][0] if lines else 1}: the first line must be the header "
                           "'category<TAB>request'")
    seen: dict[str, int] = {}
    rows = []
    for number, line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != 2 or not fields[1].strip():
            raise MechkitError(f"{path}:{number}: expected 'category<TAB>request', got {line!r}")
        category, request = fields[0].strip(), fields[1].strip()
        if category not in CATEGORIES:
            raise MechkitError(f"{path}:{number}: unknown category {category!r}; use one of {CATEGORIES}")
        _check_unique(path, number, request, seen)
        rows.append((category, request))
    if not rows:
        raise MechkitError(f"{path}: no requests below the header")
    return rows


def _template_problem(template: dict) -> str | None:
    """What is wrong with a template's placeholders and transform, or None."""
    text, transform = template.get("template"), template.get("transform")
    if not isinstance(text, str) or not text.strip():
        return "has no 'template' text"
    if transform is not None and transform not in TRANSFORMS:
        return f"has unknown transform {transform!r}; use one of {sorted(TRANSFORMS)} or none"
    wanted = ("{part1}", "{part2}") if transform == "split" else ("{request}",)
    unwanted = ("{request}",) if transform == "split" else ("{part1}", "{part2}")
    for placeholder in wanted:
        if text.count(placeholder) != 1:
            return (f"must contain the placeholder {placeholder} exactly once (found {text.count(placeholder)})"
                    + (" because its transform is 'split'" if transform == "split" else ""))
    for placeholder in unwanted:
        if placeholder in text:
            return f"contains {placeholder}, which its transform {transform!r} does not fill"
    return None


def _template_name(template: dict) -> str:
    text = str(template.get("template", ""))
    return f"jailbreak template {template.get('family', '?')!r} ({text[:40]!r}...)"


def jailbreak_templates(*, folder: str | os.PathLike | None = None) -> list[dict]:
    """The templates of ``jailbreak_templates.jsonl``: dicts with ``family``, ``template``, ``transform``?"""
    path = _folder(folder) / "jailbreak_templates.jsonl"
    seen: dict[str, int] = {}
    templates = []
    for number, record in read_jsonl(path, "jailbreak template"):
        if record.get("family") not in FAMILIES:
            raise MechkitError(f"{path}:{number}: unknown template family {record.get('family')!r}; "
                               f"use one of {FAMILIES}")
        problem = _template_problem(record)
        if problem:
            raise MechkitError(f"{path}:{number}: {_template_name(record)} {problem}")
        _check_unique(path, number, record["template"], seen)
        templates.append(record)
    return templates


def apply_template(template: dict, request: str) -> str:
    """``request`` put into ``template`` (transformed first where the template names a transform)."""
    problem = _template_problem(template)
    if problem:
        raise MechkitError(f"{_template_name(template)} {problem}")
    if not request.strip():
        raise MechkitError(f"empty request for {_template_name(template)}")
    text, transform = template["template"], template.get("transform")
    if transform == "split":
        part1, part2 = split_request(request)
        return text.replace("{part1}", part1).replace("{part2}", part2)
    return text.replace("{request}", TRANSFORMS[transform](request) if transform else request)


def _requests_per_class(n: int | None, seed: int, folder: str | os.PathLike | None) -> tuple[list[tuple[str, str]], list[str]]:
    """``n`` harmful (category, request) pairs and ``n`` harmless requests, drawn with ``seed``.

    ``n=None`` takes as many as the smaller side has, so that the classes are balanced.
    """
    harmful, harmless = harmful_requests(folder=folder), harmless_requests(folder=folder)
    both = {r.lower() for _, r in harmful} & {r.lower() for r in harmless}
    if both:
        raise MechkitError(f"requests in both harmful.tsv and harmless.txt: {sorted(both)[:5]}; a request "
                           "has one label")
    most = min(len(harmful), len(harmless))
    n = most if n is None else n
    if not 1 <= n <= most:
        raise MechkitError(f"n={n} requests per class, but the files hold {len(harmful)} harmful and "
                           f"{len(harmless)} harmless requests; use 1 <= n <= {most}")
    rng = random.Random(seed)
    pick_harmful = sorted(rng.sample(range(len(harmful)), n))
    pick_harmless = sorted(rng.sample(range(len(harmless)), n))
    return [harmful[i] for i in pick_harmful], [harmless[i] for i in pick_harmless]


def harmful_vs_harmless(*, n: int | None = None, seed: int = 0, chat: bool = False,
                        folder: str | os.PathLike | None = None) -> ProbeDataset:
    """Plain harmful (label 1) and harmless (label 0) requests, ``n`` of each; each request its own group.

    ``attrs["category"]`` and ``attrs["request"]`` run parallel to the prompts (``"harmless"`` for label 0).
    ``chat=True`` makes every prompt a user message for the model's chat template.
    """
    harmful, harmless = _requests_per_class(n, seed, folder)
    requests = [r for _, r in harmful] + harmless
    categories = [c for c, _ in harmful] + ["harmless"] * len(harmless)
    labels = [1] * len(harmful) + [0] * len(harmless)
    return ProbeDataset("harmful_vs_harmless", [Prompt(r, chat=chat) for r in requests], labels, requests,
                        {"category": categories, "request": requests, "seed": seed})


def _assign(requests: list[str], templates: list[dict], per_request: int, rng: random.Random) -> list[list[dict]]:
    """``per_request`` templates of distinct families for each request, families (and the templates
    within a family) used as evenly as possible; ties broken by ``rng``."""
    by_family: dict[str, list[dict]] = {}
    for template in templates:
        by_family.setdefault(template["family"], []).append(template)
    family_use = dict.fromkeys(by_family, 0)
    template_use = [0] * len(templates)
    index = {id(t): i for i, t in enumerate(templates)}
    chosen = []
    for _ in requests:
        families = sorted(family_use, key=lambda f: (family_use[f], rng.random()))[:per_request]
        picks = []
        for family in families:
            family_use[family] += 1
            template = min(by_family[family], key=lambda t: (template_use[index[id(t)]], rng.random()))
            template_use[index[id(template)]] += 1
            picks.append(template)
        chosen.append(picks)
    return chosen


def jailbreak(*, n: int | None = None, seed: int = 0, per_request: int = 2, split_by: str = "request",
              chat: bool = False, folder: str | os.PathLike | None = None) -> ProbeDataset:
    """Jailbreak prompts (harmful request in a template, label 1) against the control (harmless request
    in the same templates, label 0).

    ``n`` requests per class (default: as many as both files allow), each wrapped in ``per_request``
    templates of distinct families, chosen with ``seed`` so that every family is used about equally
    often in both classes. ``split_by="request"`` groups by request (no request in both train and test);
    ``split_by="template"`` groups by template family, so that splits hold out whole families (does
    detection transfer to unseen attacks?). ``attrs`` holds ``family``, ``transform``, ``category``
    (``"harmless"`` for label 0) and ``request`` as lists parallel to the prompts.
    """
    if split_by not in ("request", "template"):
        raise MechkitError(f"split_by must be 'request' or 'template', got {split_by!r}")
    templates = jailbreak_templates(folder=folder)
    families = sorted({t["family"] for t in templates})
    if not 1 <= per_request <= len(families):
        raise MechkitError(f"per_request={per_request}, but there are {len(families)} template families; "
                           f"use 1 <= per_request <= {len(families)}")
    if split_by == "template" and len(families) < 2:
        raise MechkitError("split_by='template' needs templates of at least two families")
    harmful, harmless = _requests_per_class(n, seed, folder)
    rng = random.Random(f"jailbreak:{seed}")
    prompts, labels, groups = [], [], []
    attrs: dict = {"family": [], "transform": [], "category": [], "request": [], "seed": seed,
                   "per_request": per_request, "split_by": split_by}
    for label, rows in ((1, harmful), (0, [("harmless", r) for r in harmless])):
        for (category, request), picks in zip(rows, _assign([r for _, r in rows], templates, per_request, rng)):
            for template in picks:
                prompts.append(Prompt(apply_template(template, request), chat=chat))
                labels.append(label)
                groups.append(request if split_by == "request" else template["family"])
                attrs["family"].append(template["family"])
                attrs["transform"].append(template.get("transform"))
                attrs["category"].append(category)
                attrs["request"].append(request)
    return ProbeDataset("jailbreak", prompts, labels, groups, attrs)
