"""Issue 22 (hardening): a leading ``~`` in config paths and command-line path arguments is the home directory
(``output_dir: ~/runs/x`` made a literal ``./~`` directory)."""

from __future__ import annotations

import json

from tuneforge.cli import main


def test_a_tilde_in_config_paths_is_the_home_directory(tmp_path, monkeypatch):
    from tuneforge.config import validate_config

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = validate_config({"output_dir": "~/runs/x", "model": {"name_or_path": "m"},
                           "data": {"train": "~/train.jsonl", "eval": ["~/eval.jsonl", "rel.jsonl"],
                                    "mix": [{"path": "~/general.jsonl", "weight": 0.05}]}}, "run.yaml")
    assert cfg.output_dir == str(tmp_path / "runs" / "x")  # not a literal ./~ directory
    assert cfg.data.train == [str(tmp_path / "train.jsonl")]
    assert cfg.data.eval == [str(tmp_path / "eval.jsonl"), "rel.jsonl"]
    assert cfg.data.mix[0].path == str(tmp_path / "general.jsonl")
    assert validate_config(cfg.model_dump(mode="json"), "again").output_dir == cfg.output_dir  # idempotent


def test_a_tilde_in_command_line_paths_is_the_home_directory(tmp_path, monkeypatch, capsys):
    from tuneforge.cli import build_parser, expand_user_paths

    monkeypatch.setenv("HOME", str(tmp_path))
    args = expand_user_paths(build_parser().parse_args(
        ["abtest", "~/a", "~/b", "--prompts=~/p.jsonl", "--out=~/sheet.html"]))
    assert (args.args, args.prompts, args.out) == ([f"{tmp_path}/a", f"{tmp_path}/b"], f"{tmp_path}/p.jsonl", f"{tmp_path}/sheet.html")
    args = expand_user_paths(build_parser().parse_args(["generate", "~/run", "--prompt", "~/keep me as I am"]))
    assert args.model == f"{tmp_path}/run" and args.prompt == ["~/keep me as I am"]  # text is not a path
    args = expand_user_paths(build_parser().parse_args(
        ["data", "augment", "~/in.jsonl", "--out=~/out.jsonl", "--teacher", "http://127.0.0.1:1/v1", "--mode",
         "rewrite"]))
    assert (args.input, str(args.out)) == (f"{tmp_path}/in.jsonl", f"{tmp_path}/out.jsonl")
    # end to end: `--out=~/sheet.html` is the sheet in the home directory (refused there: it exists)
    (tmp_path / "sheet.html").write_text("earlier sheet")
    (tmp_path / "p.jsonl").write_text(json.dumps({"text": "hi"}) + "\n")
    assert main(["abtest", "x", "y", "--prompts=~/p.jsonl", "--out=~/sheet.html"]) == 2
    assert f"{tmp_path}/sheet.html already exists" in capsys.readouterr().err
