"""``mechkit report`` on a tiny model: every analysis writes its results and figures, the page
shows them, re-runs reuse and resume, and bad input is refused before any work."""

from __future__ import annotations

import errno
import json

import matplotlib.pyplot as plt
import pytest

from mechkit.cli import main, parse_settings
from mechkit.errors import MechkitError
from mechkit.report import ALL, report
from mechkit.viz.checks import figure_problems, figure_texts

# Small enough for CI (the whole report on a 2-layer model in well under a minute).
TINY_SETTINGS = {
    "layer-probes": {"per_relation": 3, "control": 1},
    "jailbreak-probes": {"n": 40, "control": 1},
    "position-probes": {"dataset": "sentiment", "control": 1, "min_examples": 4},
    "head-attribution": {"examples": 2},
    "function-heads": {"per_function": 6, "random_draws": 1},
    "component-attribution": {"examples": 2},
}


def report_words() -> list[str]:
    """Every word of the built-in relations and tasks, so that a word-level tiny model reads them
    as single tokens (classification and attribution need single-token answers)."""
    from mechkit.data.relations import builtin_relations
    from mechkit.data.tasks import TASK_NAMES, builtin_task

    words = set()
    for relation in builtin_relations():
        for pair in relation.pairs:
            for text in pair:
                words.update(str(text).split())
    for name in TASK_NAMES:
        task = builtin_task(name)
        for texts in (task.clean, task.answers, task.corrupted, task.corrupted_answers):
            for text in texts:
                words.update(str(text).split())
    return sorted(words)


@pytest.fixture(scope="session")
def report_model(tmp_path_factory):
    from mechkit.models.synthetic import tiny_hf_model

    folder = tmp_path_factory.mktemp("models") / "tiny-report-llama"
    hf_model, tokenizer, _ = tiny_hf_model("llama", words=report_words(), n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_report(report_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "out"
    lines: list[str] = []
    with pytest.MonkeyPatch.context() as patch:  # the abliterated variant is saved in a throwaway model cache
        patch.setenv("MECHKIT_CACHE", str(tmp_path_factory.mktemp("cache")))
        page = report([str(report_model)], out, settings=TINY_SETTINGS, progress=False, echo=lines.append)
    return out, page, lines


def _manifest(out):
    return json.loads((out / "report.json").read_text())


def test_report_runs_every_analysis_and_writes_a_page(tiny_report):
    out, page, lines = tiny_report
    manifest = _manifest(out)
    assert manifest["status"] == "complete" and manifest["analyses"] == list(ALL)
    assert {label.split("/")[0] for label in manifest["units"]} == set(ALL)
    html = page.read_text()
    for unit in manifest["units"].values():
        assert unit["figures"], f"{unit['analysis']} drew no figure"
        for figure in unit["figures"]:
            assert (out / figure["png"]).stat().st_size > 1000 and (out / figure["svg"]).exists()
            assert f'src="{figure["png"]}"' in html and figure["caption"][:60] in html.replace("&#x27;", "'")
            assert figure["problems"] == [], figure["problems"]  # tick labels apart, colour bars labelled
        assert unit["summary"], f"{unit['analysis']} wrote no summary"
    for name in ("mechkit", "transformer_lens", "torch"):
        assert manifest["versions"][name] in html
    assert all(f"[{i}/" in "\n".join(lines) for i in range(1, len(manifest["units"]) + 1))  # the progress display
    assert list((out / "head-attribution").iterdir())[0].joinpath("knowledge_recall.npz").exists()


def test_rerunning_reuses_finished_analyses_and_resumes_the_rest(tiny_report, report_model):
    out, page, _ = tiny_report
    (out / "component-attribution").joinpath(next(iter((out / "component-attribution").iterdir())).name,
                                             "done.json").unlink()  # as if the run had stopped there
    lines: list[str] = []
    report([str(report_model)], out, settings=TINY_SETTINGS, progress=False, echo=lines.append)
    reused = [line for line in lines if "reused" in line]
    assert len(reused) == len(_manifest(out)["units"]) - 1
    assert any("Component attribution" in line and "done in" in line for line in lines)
    assert page.exists() and _manifest(out)["status"] == "complete"


def test_other_settings_or_foreign_files_are_refused_unless_forced(tiny_report, report_model, tmp_path):
    out, _, _ = tiny_report
    other = {**TINY_SETTINGS, "head-attribution": {"examples": 3}}
    with pytest.raises(MechkitError, match="other settings.*head-attribution"):
        report([str(report_model)], out, settings=other, progress=False, echo=lambda _: None)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("mine")
    with pytest.raises(MechkitError, match="not a mechkit report"):
        report([str(report_model)], foreign, analyses=["head-classification"], progress=False, echo=lambda _: None)
    lines: list[str] = []
    report([str(report_model)], foreign, analyses=["head-classification"], force=True, progress=False, echo=lines.append)
    assert (foreign / "thesis.tex").read_text() == "mine" and (foreign / "index.html").exists()
    lines.clear()
    report([str(report_model)], foreign, analyses=["head-classification"], force=True, progress=False, echo=lines.append)
    assert not any("reused" in line for line in lines)  # --force recomputes


def test_bad_names_are_refused_before_any_work(tmp_path, report_model):
    with pytest.raises(MechkitError, match="Unknown model 'gemma-3-27'"):
        report(["gemma-3-27"], tmp_path / "a", progress=False)
    with pytest.raises(MechkitError, match="unknown analysis"):
        report([str(report_model)], tmp_path / "b", analyses=["probes"], progress=False)
    with pytest.raises(MechkitError, match="has no setting"):
        report([str(report_model)], tmp_path / "c", settings={"head-attribution": {"exmaples": 2}}, progress=False)
    clash = tmp_path / "retrieval.jsonl"  # a user task named like a built-in one would overwrite its results
    clash.write_text('{"clean": "a", "answer": " b"}\n')
    with pytest.raises(MechkitError, match="two tasks are both named 'retrieval'"):
        report([str(report_model)], tmp_path / "d", settings={"head-attribution": {"tasks": ["all", str(clash)]}},
               progress=False)
    assert not any((tmp_path / name).exists() for name in "abcd")


def test_a_full_disk_leaves_no_report_looking_complete(tmp_path, report_model, monkeypatch):
    from mechkit.report import analyses

    def full(self, fig, stem, caption):
        plt.close(fig)
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "out"
    report([str(report_model)], out, analyses=["head-classification"], progress=False, echo=lambda _: None)
    assert (out / "index.html").exists()
    monkeypatch.setattr(analyses.Unit, "figure", full)
    with pytest.raises(MechkitError, match="disk is full"):
        report([str(report_model)], out, analyses=["head-classification"], force=True, progress=False,
               echo=lambda _: None)
    assert not (out / "index.html").exists()
    assert not list(out.rglob("done.json"))
    assert _manifest(out)["status"].startswith("stopped")


def test_cli_report_takes_settings_and_a_method(report_model, tmp_path, capsys):
    out = tmp_path / "cli"
    code = main(["report", "--model", str(report_model), "--out", str(out), "--analysis", "head-attribution",
                 "--method", "atp*", "--set", "head-attribution.examples=2", "--set",
                 'head-attribution.tasks=["retrieval"]', "--quiet"])
    assert code == 0
    manifest = _manifest(out)
    assert manifest["settings"]["head-attribution"] == {"method": "atp*", "examples": 2, "tasks": ["retrieval"]}
    assert "report:" in capsys.readouterr().out
    assert main(["report", "--model", str(report_model), "--out", str(out), "--analysis", "nope"]) == 2
    assert parse_settings(["a.b=text", "a.c=1.5"]) == {"a": {"b": "text", "c": 1.5}}
    with pytest.raises(MechkitError, match="ANALYSIS.SETTING=VALUE"):
        parse_settings(["examples=2"])


def test_figure_checks_find_overlapping_ticks_unlabelled_colour_bars_and_texts():
    fig, ax = plt.subplots(figsize=(2, 2))
    image = ax.imshow([[0, 1], [1, 0]])
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["a very long tick label", "another very long tick label"])
    fig.colorbar(image, ax=ax)
    ax.set_xlabel("Layer")
    ax.plot([0], [0], label="planted head")
    ax.legend()
    problems = figure_problems(fig)
    assert any("overlap" in p for p in problems) and any("colour bar without a label" in p for p in problems)
    assert {"Layer", "planted head"} <= set(figure_texts(fig))
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.set_xticks([0, 1])
    ax.set_xticklabels(["a", "b"])
    assert figure_problems(fig) == []
    plt.close(fig)


def _chromium():
    """A headless Chromium driven by Selenium, or a skip (a failure where CI requires the browser)."""
    import os
    import shutil

    missing = [name for name in ("chromium", "chromedriver") if shutil.which(name) is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium")
    if missing:
        message = f"{missing} not installed (Debian: apt-get install chromium chromium-driver; pip install selenium)"
        if os.environ.get("MECHKIT_REQUIRE_BROWSER"):
            pytest.fail(message)
        pytest.skip(message)
    options = Options()
    options.binary_location = shutil.which("chromium")
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(argument)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def _svg_text(path) -> str:
    import xml.etree.ElementTree as ET

    return "\n".join(t.strip() for t in ET.parse(path).getroot().itertext() if t.strip())


def test_the_page_renders_in_headless_chromium(tiny_report):
    from PIL import Image

    out, page, _ = tiny_report
    figures = [f for unit in _manifest(out)["units"].values() for f in unit["figures"]]
    browser = _chromium()
    try:
        browser.get(page.as_uri())
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])")
        height = browser.execute_script("return document.body.scrollHeight")
        browser.set_window_size(1280, min(height, 16000))
        shot = out / "screenshot.png"
        browser.save_screenshot(str(shot))
    finally:
        browser.quit()
    assert sorted(src for src, _, _ in images) == sorted(f["png"] for f in figures)
    assert all(done and width > 0 for _, done, width in images), images  # every image loaded
    with Image.open(shot) as image:
        assert image.size[1] > 1000 and len(image.convert("L").getcolors(1 << 16) or []) > 10  # a page, not blank
    for figure in figures:  # titles, axis labels, colour-bar labels and legend entries are text in the SVG
        text = _svg_text(out / figure["svg"])
        expected = [line for t in figure["texts"] for line in t.split("\n") if line.strip()]
        assert expected and all(line in text for line in expected), (figure["svg"], [e for e in expected if e not in text])


def test_an_edited_user_task_file_invalidates_what_was_made_from_it(report_model, tmp_path):
    from mechkit.data.tasks import builtin_task

    task = builtin_task("retrieval")
    path = tmp_path / "mine.jsonl"

    def write(n):
        path.write_text("\n".join(json.dumps({"clean": c, "answer": a, "corrupted": x, "corrupted_answer": y})
                                  for c, a, x, y in list(zip(task.clean, task.answers, task.corrupted,
                                                             task.corrupted_answers))[:n]))
    write(3)
    settings = {"head-attribution": {"examples": 2, "tasks": [str(path)]}}
    out = tmp_path / "out"
    report([str(report_model)], out, analyses=["head-attribution"], settings=settings, progress=False, echo=lambda _: None)
    lines: list[str] = []
    report([str(report_model)], out, analyses=["head-attribution"], settings=settings, progress=False, echo=lines.append)
    assert any("reused" in line for line in lines)
    write(4)  # the same path, other contents
    lines.clear()
    report([str(report_model)], out, analyses=["head-attribution"], settings=settings, progress=False, echo=lines.append)
    assert not any("reused" in line for line in lines)
