"""The quickstart end to end, in its small variant (the full one is the README's main command)."""

from __future__ import annotations

import json


def test_small_quickstart_runs_the_whole_pipeline(tmp_path, capsys):
    from tuneforge.cli import main
    from tuneforge.train.quickstart import run_quickstart

    out = tmp_path / "qs"
    result = run_quickstart(out, pretrain_steps=20, sft_steps=20, small=True)
    saved = json.loads((out / "results.json").read_text())
    assert saved["heldout_items"] == 150 and saved["base"]["tokens"] == saved["tuned"]["tokens"] > 150
    # Answer-only SFT must make the held-out answers far more likely than the pretrained base finds them.
    assert result["tuned"]["ppl"] < result["base"]["ppl"] / 2, result
    for stage in ("pretrain", "sft"):
        assert (out / stage / "final").is_dir() and (out / "configs" / f"{stage}.yaml").is_file()
    assert "exact match" in capsys.readouterr().out
    assert main(["validate", str(out / "configs" / "pretrain.yaml"), str(out / "configs" / "sft.yaml")]) == 0
    assert main(["generate", str(out / "sft"), "--prompt", "Is this a statement?", "--max-new-tokens", "3"]) == 0
