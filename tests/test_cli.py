import json
import subprocess
import sys

import numpy as np
import pytest

from mechkit.activations import ActivationSet
from mechkit.cli import main
from mechkit.models.synthetic import tiny_hf_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llama")
    hf_model, tokenizer, _ = tiny_hf_model("llama", n_layers=2, d_model=32, n_heads=4, n_kv_heads=2)
    hf_model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_models_lists_bundled(capsys):
    assert main(["models", "--json"]) == 0
    names = [row["name"] for row in json.loads(capsys.readouterr().out)]
    assert names[:2] == ["gemma-3-270m", "smollm2-135m-instruct"]


def test_activations_writes_a_loadable_folder(tmp_path, tiny_folder, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps(row) for row in [
        {"text": "the capital of France is Paris", "spans": {"exact_answer": [25, 30]}},
        {"text": "the capital of Italy is Rome", "spans": {"exact_answer": [24, 28]}},
    ]))
    out = tmp_path / "acts"
    code = main(["activations", "--model", str(tiny_folder), "--prompts", str(prompts), "--hook",
                 "blocks.1.hook_resid_post", "--hook", "blocks.0.attn.hook_z", "--position", "exact_answer_first",
                 "--position", "-2", "--out", str(out)])
    assert code == 0
    acts = ActivationSet.load(out)
    assert acts["blocks.0.attn.hook_z"].shape == (2, 2, 4, 8)
    assert acts.positions == ["exact_answer_first", "-2"]
    assert np.isfinite(acts["blocks.1.hook_resid_post"].numpy()).all()


def test_errors_are_one_line_and_exit_2(tmp_path, tiny_folder, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the capital\n")
    code = main(["activations", "--model", str(tiny_folder), "--prompts", str(prompts), "--hook", "blocks.9.hook_z",
                 "--out", str(tmp_path / "o")])
    assert code == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["activations", "--model", "gemma-3-207m", "--prompts", str(prompts), "--hook", "x",
                 "--out", str(tmp_path / "o")]) == 2


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "mechkit.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "activations" in result.stdout


def test_classify_heads_writes_results_figures_and_summary(tmp_path, tiny_folder):
    relation = tmp_path / "next_word.tsv"
    relation.write_text("# relation: next_word\n# category: algorithmic\n"
                        + "".join(f"w{i}\tw{i + 1}\n" for i in range(35)))
    out = tmp_path / "heads"
    code = main(["classify-heads", "--model", str(tiny_folder), "--out", str(out), "--relations", str(relation),
                 "--only", "next_word"])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary.values()
    assert set(entry["category_counts"]) >= {"unclassified", "algorithmic", "2 categories"}
    assert entry["relations"]["next_word"]["kept"] == 35
    assert (out / "category_map.png").exists() and (out / "category_map.svg").exists()
    from mechkit.heads import HeadClassification

    result = HeadClassification.load(next(p for p in out.iterdir() if p.is_dir()))
    assert result.scores.shape == (2, 4, 1)
    assert main(["classify-heads", "--model", str(tiny_folder), "--out", str(out), "--only", "nope"]) == 2


def test_probe_layers_and_positions_write_results_and_figures(tmp_path, tiny_folder):
    rows = []
    for i in range(40):
        word = ["Paris", "Rome"][i % 2]
        text = f"the capital w{i % 7} w{i % 5} is {word}"
        rows.append({"text": text, "label": i % 2, "group": f"g{i // 2}", "spans": {"answer": [len(text) - len(word), len(text)]}})
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "layers"
    assert main(["probe", "layers", "--model", str(tiny_folder), "--dataset", str(data), "--out", str(out),
                 "--control", "1"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metric"] == "f1" and summary["best"]["value"] > 0.9
    assert (out / "probe_layers.png").exists() and (out / "probe_layers.svg").exists()
    out = tmp_path / "positions"
    assert main(["probe", "positions", "--model", str(tiny_folder), "--dataset", str(data), "--out", str(out),
                 "--position", "first_answer", "--position", "-2", "--control", "1"]) == 0
    assert json.loads((out / "summary.json").read_text())["attrs"]["examples_per_position"] == {"first_answer": 40, "-2": 40}
    assert main(["probe", "layers", "--model", str(tiny_folder), "--dataset", "nope", "--out", str(out)]) == 2
