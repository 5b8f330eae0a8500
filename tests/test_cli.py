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


def copy_task_file(path, offset: int = 0, n: int = 8):
    """A paired task the tiny tokenizer can read: "the capital of wI is" -> " wI" (corrupted: wJ)."""
    rows = [{"clean": f"the capital of w{i + offset} is", "answer": f" w{i + offset}",
             "corrupted": f"the capital of w{i + offset + 10} is", "corrupted_answer": f" w{i + offset + 10}"}
            for i in range(n)]
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory):
    """A GPT-2-style folder (no MLP gate) and a second Llama of another seed (same shapes)."""
    folders = {}
    for arch, seed in (("gpt2", 0), ("llama", 1)):
        folder = tmp_path_factory.mktemp(f"tiny-{arch}-{seed}")
        kv = {} if arch == "gpt2" else {"n_kv_heads": 2}
        hf_model, tokenizer, _ = tiny_hf_model(arch, n_layers=2, d_model=32, n_heads=4, seed=seed, **kv)
        hf_model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders[arch] = folder
    return folders


def test_attribute_heads_writes_results_a_task_grid_and_a_table(tmp_path, tiny_folder, capsys):
    from mechkit.results import LabelledArray

    task = copy_task_file(tmp_path / "copy.jsonl")
    out = tmp_path / "heads"
    assert main(["attribute-heads", "--model", str(tiny_folder), "--task", str(task), "--method", "atp",
                 "--examples", "5", "--batch-size", "4", "--out", str(out), "--quiet"]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    result = LabelledArray.load(folder / "copy_atp.npz")
    assert result.axes == ("layer", "head") and result.shape == (2, 4)
    assert result.attrs["method"] == "atp" and result.attrs["baseline"]["n"] == 5
    assert (folder / "task_grid_atp.png").exists() and (folder / "task_grid_atp.svg").exists()
    printed = capsys.readouterr().out
    assert "clean metric [95% CI]" in printed and "top-3 heads" in printed
    (row,) = [line for line in printed.splitlines() if line.strip().startswith("copy")]
    assert row.count("L") >= 3 and "[" in row
    summary = json.loads((out / "summary_atp.json").read_text())
    (tasks,) = summary["models"].values()
    assert len(tasks["copy"]["top_heads"]) == 3 and tasks["copy"]["n"] == 5
    assert main(["attribute-heads", "--model", str(tiny_folder), "--task", str(task), "--method", "atp", "--nodes", "qkv",
                 "--examples", "3", "--out", str(out), "--quiet"]) == 0
    nodes = LabelledArray.load(folder / "copy_atp_qkv.npz")
    assert nodes.axes == ("layer", "head", "node") and nodes.labels["node"] == ["q", "k", "v"]
    assert all((folder / f"task_grid_atp_qkv_{node}.svg").exists() for node in "qkv")
    assert main(["attribute-heads", "--model", str(tiny_folder), "--task", "nope", "--out", str(out)]) == 2
    assert main(["attribute-heads", "--model", str(tiny_folder), "--task", str(task), "--examples", "0",
                 "--out", str(out)]) == 2


def test_attribute_components_saves_each_task_the_mean_and_a_checkpoint_diff(tmp_path, tiny_folder, tiny_folders, capsys):
    from mechkit.results import LabelledArray

    tasks = [copy_task_file(tmp_path / "copy_a.jsonl"), copy_task_file(tmp_path / "copy_b.jsonl", offset=20)]
    out = tmp_path / "components"
    assert main(["attribute-components", "--model", str(tiny_folders["gpt2"]), "--task", str(tasks[0]), "--task",
                 str(tasks[1]), "--method", "grad_x_weight", "--examples", "6", "--out", str(out), "--quiet"]) == 0
    (folder,) = [p for p in out.iterdir() if p.is_dir()]
    per_task = LabelledArray.load(folder / "components_copy_a_grad_x_weight_shares.npz")
    mean = LabelledArray.load(folder / "components_mean_grad_x_weight_shares.npz")
    gate = mean.axes.index("component")
    assert np.isnan(mean.sel(component="gate").values).all()  # GPT-2 has no gate: missing, not 0
    np.testing.assert_allclose(np.nansum(mean.values, axis=gate), 1.0, rtol=1e-5)
    assert per_task.attrs["baseline"]["n"] == 6 and mean.attrs["tasks"] == ["copy_a", "copy_b"]
    for stem in ("components_copy_a_grad_x_weight_shares", "components_mean_grad_x_weight_shares"):
        assert (folder / f"{stem}.png").exists() and (folder / f"{stem}.svg").exists()
    assert "gate n/a" in capsys.readouterr().out

    assert main(["attribute-components", "--model", str(tiny_folder), "--compare", str(tiny_folders["llama"]),
                 "--out", str(out)]) == 0
    (diff_file,) = out.glob("*/checkpoint_diff_*.npz")
    diff = LabelledArray.load(diff_file)
    assert diff.attrs["method"] == "checkpoint_diff" and np.isfinite(diff.values).all() and (diff.values > 0).all()
    assert diff_file.with_suffix(".png").exists()
    assert main(["attribute-components", "--model", str(tiny_folder), "--out", str(out)]) == 2  # no task, no compare


def test_function_heads_writes_result_figure_and_tables(tmp_path, tiny_folder, capsys):
    from mechkit.data.function_chains import FUNCTIONS

    chains = tmp_path / "chains.jsonl"
    chains.write_text("\n".join(json.dumps({"id": f"{f}{i}", "steps": [
        {"question": f"w{i} w{i + 1} {f}?", "answer": f"w{(i * 3) % 40}", "function": f}]})
        for f in FUNCTIONS for i in range(6)) + "\n")
    out = tmp_path / "fh"
    assert main(["function-heads", "--model", str(tiny_folder), "--dataset", str(chains), "--answer", "gold",
                 "--null-seeds", "1", "--random-draws", "2", "--patch-top", "2", "--patch-random", "1",
                 "--out", str(out), "--quiet"]) == 0
    folder = next(p for p in out.iterdir() if p.is_dir())
    for name in ("importance.npz", "null.npz", "function_heads.png", "function_heads.svg", "interventions.npz",
                 "probe_vs_cause.npz", "cause_atp.npz", "cause_patching.npz"):
        assert (folder / name).exists(), name
    summary = json.loads((out / "summary_function_heads.json").read_text())
    (model_summary,) = summary["models"].values()
    assert set(model_summary["selected"]) == set(FUNCTIONS)
    printed = capsys.readouterr().out
    assert "head probe accuracy" in printed and "Spearman AtP" in printed
    with pytest.raises(SystemExit):  # argparse refuses an unknown probe family
        main(["function-heads", "--model", str(tiny_folder), "--family", "forest", "--out", str(out)])
    assert main(["function-heads", "--model", str(tiny_folder), "--dataset", str(tmp_path / "none.jsonl"),
                 "--out", str(out)]) == 2


def test_builtin_safety_datasets_by_name():
    from mechkit.probing.datasets import builtin_dataset as _dataset

    by_request, by_template = _dataset("jailbreak"), _dataset("jailbreak_by_template")
    assert len(by_request) == len(by_template) and by_request.class_counts()[0] == by_request.class_counts()[1]
    assert set(by_template.groups) == set(by_template.attrs["family"])  # whole template families held out
    assert set(by_request.groups) == set(by_request.attrs["request"])  # no request on both sides
    assert _dataset("harmful_vs_harmless").name == "harmful_vs_harmless"
