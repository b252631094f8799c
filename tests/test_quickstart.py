"""The quickstart: its built-in task (fast, no model) and the pipeline end to end in its small variant (the full one
is the README's main command)."""

from __future__ import annotations

import json
from collections import Counter

import pytest


def _answer(record: dict) -> str:
    return record["messages"][-1]["content"]


def _user(record: dict) -> str:
    return record["messages"][0]["content"]


def test_module_task_is_balanced_deterministic_and_keeps_heldout_objects_unseen():
    from tuneforge.data import builtin

    task = builtin.module_task(heldout_per_module=20, eval_per_module=5, train_per_module=150, seed=0)
    again = builtin.module_task(heldout_per_module=20, eval_per_module=5, train_per_module=150, seed=0)
    assert (task.train, task.eval, task.test, task.pretrain_docstrings) == (
        again.train, again.eval, again.test, again.pretrain_docstrings)
    # Balanced held-out set: the majority class is exactly one module in eight.
    assert Counter(_answer(r) for r in task.test) == dict.fromkeys(builtin.MODULES, 20)
    assert {_answer(r) for r in task.train} == set(builtin.MODULES)
    assert max(Counter(_answer(r) for r in task.train).values()) <= 150
    # A held-out object (named in its question) is never trained on, in SFT or in pretraining.
    def names(records):
        return {_user(r).rsplit(" defines ", 1)[1] for r in records}

    heldout = names(task.test)
    assert len(heldout) == len(task.test)
    assert not heldout & names(task.train) and not heldout & names(task.eval)
    heldout_sentences = {_user(r).split("\n\n")[0] for r in task.test}
    corpus = "\n".join(builtin.pretrain_documents(task))
    assert not any(sentence in " ".join(corpus.split()) for sentence in heldout_sentences)


@pytest.mark.slow
def test_small_quickstart_runs_the_whole_pipeline(tmp_path, capsys):
    from tuneforge.cli import main
    from tuneforge.train.quickstart import run_quickstart

    out = tmp_path / "qs"
    result = run_quickstart(out, pretrain_steps=20, sft_steps=20, small=True)
    saved = json.loads((out / "results.json").read_text())
    heldout = [json.loads(line) for line in (out / "data" / "heldout.jsonl").read_text().splitlines()]
    assert saved["heldout_items"] == len(heldout) == 160 and saved["majority_class_exact"] == 12.5
    assert saved["base"]["tokens"] == saved["tuned"]["tokens"] > 160
    assert len(saved["tuned"]["predictions"]) == 160 and saved["steps"] == {"pretrain": 20, "sft": 20}
    # Answer-only SFT must make the held-out answers far more likely than the pretrained base finds them.
    assert result["tuned"]["ppl"] < result["base"]["ppl"] / 2, result
    for stage in ("pretrain", "sft"):
        assert (out / stage / "final").is_dir() and (out / "configs" / f"{stage}.yaml").is_file()
        # saved where `tuneforge report` looks, by the evaluation code itself
        assert json.loads((out / stage / "eval_results.json").read_text())[-1]["exact"] == saved[
            "base" if stage == "pretrain" else "tuned"]["exact"]
    printed = capsys.readouterr().out
    assert "exact match" in printed and "majority-class baseline: 12.5%" in printed
    # the samples table: expected answers beside base and tuned answers, and how many the tuned model got right
    assert "base vs tuned answers" in printed and "expected" in printed
    shown = result["tuned"]["predictions"][:8]
    right = sum(p.strip() == _answer(r) for p, r in zip(shown, heldout[:8], strict=True))
    assert f"tuned right on {right} of these 8" in printed
    assert main(["validate", str(out / "configs" / "pretrain.yaml"), str(out / "configs" / "sft.yaml")]) == 0
    from tuneforge.train.quickstart import MARKER, check_out

    assert set(json.loads((out / MARKER).read_text())["files"]) >= {"results.json", "data/sft_train.jsonl"}
    check_out(out)  # its own output: a second quickstart may replace it
    assert main(["generate", str(out / "sft"), "--prompt", "Which module defines Decimal?", "--max-new-tokens", "3"]) == 0


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() if p.is_file() else None for p in sorted(root.rglob("*"))}


def test_quickstart_over_a_users_run_and_data_leaves_both_byte_identical(tmp_path, capsys):
    """Issue 22: `quickstart --out runs` deleted the user's runs/sft and replaced runs/data/sft_train.jsonl. It now
    stops before any work, with or without --force, and leaves every byte where it was."""
    import yaml

    from tuneforge.cli import main

    out = tmp_path / "runs"
    (out / "sft" / "final").mkdir(parents=True)
    (out / "sft" / "config.yaml").write_text(yaml.safe_dump({"run_name": "my-precious-run"}))
    (out / "sft" / "final" / "adapter_model.safetensors").write_bytes(b"weeks of training")
    (out / "data").mkdir()
    (out / "data" / "sft_train.jsonl").write_text('{"text": "my own data"}\n')
    before = _tree(out)
    assert main(["quickstart", "--out", str(out), "--small"]) == 2
    assert "no earlier quickstart made" in capsys.readouterr().err
    assert main(["quickstart", "--out", str(out), "--small", "--force"]) == 2
    err = capsys.readouterr().err
    assert "data/sft_train.jsonl, sft/ were not made by an earlier tuneforge quickstart" in err
    assert _tree(out) == before  # nothing written, nothing replaced: the refusal comes before any work


def test_quickstart_reruns_over_its_own_output_only(tmp_path):
    from tuneforge.errors import UserError
    from tuneforge.train import quickstart as qs

    out = tmp_path / "qs"
    qs.check_out(out)  # new
    out.mkdir()
    qs.check_out(out)  # empty
    qs.write_data(out)
    (out / "configs").mkdir()
    (out / "configs" / "sft.yaml").write_text("run_name: quickstart-sft\n")
    (out / "sft").mkdir()
    (out / "sft" / "config.yaml").write_text("run_name: quickstart-sft\n")
    qs._write_marker(out)
    qs.check_out(out)  # an earlier quickstart's own files and run: replaced without asking
    (out / "notes.txt").write_text("mine")  # a user's file beside them is no reason to stop (never touched)
    qs.check_out(out)
    marker = json.loads((out / qs.MARKER).read_text())
    assert set(marker["files"]) == {"data/pretrain.jsonl", "data/sft_train.jsonl", "data/sft_eval.jsonl",
                                    "data/heldout.jsonl", "configs/sft.yaml"}
    with open(out / "data" / "sft_eval.jsonl", "a") as handle:  # the user edited the quickstart's data
        handle.write('{"text": "added by hand"}\n')
    with pytest.raises(UserError, match="data/sft_eval.jsonl was not made"):
        qs.check_out(out, force=True)
    qs.write_data(out)
    (out / "sft" / "config.yaml").write_text("run_name: someone-elses\n")  # a user's run where ours was
    with pytest.raises(UserError, match="sft/ was not made"):
        qs.check_out(out)
    (out / "pretrain").mkdir()
    (out / "pretrain" / "x").write_text("")
    (out / "sft" / "config.yaml").write_text("run_name: quickstart-sft\n")
    qs.check_out(out)  # pretrain/ is listed in the marker and has no config yet: an interrupted run of ours
    (out / qs.MARKER).write_text(json.dumps({**marker, "runs": ["sft"]}))
    with pytest.raises(UserError, match="pretrain/ was not made"):  # not listed: someone else's
        qs.check_out(out)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="is a file"):
        qs.check_out(tmp_path / "file")
