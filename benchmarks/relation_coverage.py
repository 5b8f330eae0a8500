"""Coverage report for the built-in MAPS-style relations.

Loads every ``mechkit/data/relations/*.tsv``, validates its format and counts,
for each tokenizer, how many (source, target) pairs survive the single-token
filter (both ``" " + source`` and ``" " + target`` encode to exactly one token).

Usage::

    python benchmarks/relation_coverage.py
    python benchmarks/relation_coverage.py --tokenizer gemma=/tmp/scratch/tok_gemma \
        --tokenizer smollm2=/tmp/scratch/tok_smol --min-pairs 30

Exit status is 1 when any file fails the format check, else 0.
"""

from __future__ import annotations

import argparse
import glob
import os
import sys

HEADER_KEYS = ("relation", "category", "copying", "description")
CATEGORIES = {"algorithmic", "knowledge", "linguistic", "translation"}
DEFAULT_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "mechkit", "data", "relations"
)
DEFAULT_TOKENIZERS = ["gemma=/tmp/scratch/tok_gemma", "smollm2=/tmp/scratch/tok_smol"]


def load_relation(path):
    """Parse one relation file. Returns (header dict, pairs list, list of error strings)."""
    errors = []
    header = {}
    pairs = []
    seen = set()
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    else:
        errors.append("file does not end with a newline")
    in_header = True
    for n, line in enumerate(lines, 1):
        if line != line.rstrip() or line != line.lstrip(" "):
            errors.append(f"line {n}: leading/trailing whitespace")
        if not line.strip():
            errors.append(f"line {n}: blank line")
            continue
        if line.startswith("#"):
            if not in_header:
                errors.append(f"line {n}: header line after pairs")
                continue
            body = line[1:].strip()
            if ":" not in body:
                errors.append(f"line {n}: malformed header {line!r}")
                continue
            key, value = (x.strip() for x in body.split(":", 1))
            if key not in HEADER_KEYS:
                errors.append(f"line {n}: unknown header key {key!r}")
            elif key in header:
                errors.append(f"line {n}: duplicate header key {key!r}")
            header[key] = value
            continue
        in_header = False
        fields = line.split("\t")
        if len(fields) != 2:
            errors.append(f"line {n}: expected 2 tab-separated fields, got {len(fields)}")
            continue
        src, tgt = fields
        if not src.strip() or not tgt.strip():
            errors.append(f"line {n}: blank field")
            continue
        if src != src.strip() or tgt != tgt.strip():
            errors.append(f"line {n}: whitespace around a field")
        if (src, tgt) in seen:
            errors.append(f"line {n}: duplicate pair {src!r} -> {tgt!r}")
            continue
        seen.add((src, tgt))
        pairs.append((src, tgt))
    for key in HEADER_KEYS:
        if key not in header:
            errors.append(f"missing header key {key!r}")
    stem = os.path.splitext(os.path.basename(path))[0]
    if header.get("relation") not in (None, stem):
        errors.append(f"relation name {header.get('relation')!r} != file stem {stem!r}")
    if "category" in header and header["category"] not in CATEGORIES:
        errors.append(f"invalid category {header['category']!r}")
    if "copying" in header and header["copying"] not in ("true", "false"):
        errors.append(f"copying must be true/false, got {header['copying']!r}")
    if header.get("copying") == "true" and any(s != t for s, t in pairs):
        errors.append("copying relation has pairs with source != target")
    if not pairs:
        errors.append("no pairs")
    return header, pairs, errors


def single_token(tok, word, cache):
    if word not in cache:
        ids = tok(" " + word, add_special_tokens=False)["input_ids"]
        cache[word] = len(ids) == 1
    return cache[word]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--relations-dir", default=DEFAULT_DIR, help="folder holding <relation>.tsv files")
    ap.add_argument(
        "--tokenizer",
        action="append",
        metavar="NAME=PATH",
        help="tokenizer to test (repeatable); default: " + ", ".join(DEFAULT_TOKENIZERS),
    )
    ap.add_argument("--min-pairs", type=int, default=30, help="survival threshold (default 30)")
    ap.add_argument("--show-survivors", metavar="RELATION", help="also list surviving pairs of one relation")
    ap.add_argument("--no-tokenizers", action="store_true", help="only run the format checks")
    args = ap.parse_args(argv)

    paths = sorted(glob.glob(os.path.join(args.relations_dir, "*.tsv")))
    if not paths:
        print(f"no relation files found in {args.relations_dir}", file=sys.stderr)
        return 1

    toks = []
    if not args.no_tokenizers:
        from transformers import AutoTokenizer

        for spec in args.tokenizer or DEFAULT_TOKENIZERS:
            name, _, path = spec.partition("=")
            if not path:
                name, path = os.path.basename(spec.rstrip("/")), spec
            toks.append((name, AutoTokenizer.from_pretrained(path), {}))

    bad = False
    rows = []
    for path in paths:
        header, pairs, errors = load_relation(path)
        name = header.get("relation") or os.path.splitext(os.path.basename(path))[0]
        for e in errors:
            print(f"FORMAT {os.path.basename(path)}: {e}", file=sys.stderr)
        bad |= bool(errors)
        counts = []
        for tname, tok, cache in toks:
            surv = [(s, t) for s, t in pairs if single_token(tok, s, cache) and single_token(tok, t, cache)]
            counts.append(len(surv))
            if args.show_survivors == name:
                print(f"[{tname}] {name}: " + ", ".join(f"{s}->{t}" for s, t in surv))
        rows.append((name, header.get("category", "?"), len(pairs), counts, bool(errors)))

    tnames = [t[0] for t in toks]
    w = max(len("relation"), *(len(r[0]) for r in rows))
    head = f"{'relation':<{w}}  {'category':<11}  {'total':>5}" + "".join(f"  {n:>9}" for n in tnames)
    print(head)
    print("-" * len(head))
    under = {n: [] for n in tnames}
    for name, cat, total, counts, err in rows:
        cells = ""
        for n, c in zip(tnames, counts):
            mark = "*" if c < args.min_pairs else " "
            cells += f"  {c:>8}{mark}"
            if c < args.min_pairs:
                under[n].append(name)
        print(f"{name:<{w}}  {cat:<11}  {total:>5}{cells}" + ("  FORMAT-ERROR" if err else ""))
    print("-" * len(head))
    print(f"{len(rows)} relations, {sum(r[2] for r in rows)} pairs; * = fewer than {args.min_pairs} surviving pairs")
    for n in tnames:
        print(f"under {args.min_pairs} on {n}: {', '.join(under[n]) if under[n] else 'none'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
