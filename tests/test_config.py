"""Config: every shipped config validates; typos and bad values are explained; overrides work."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.cli import main
from tuneforge.config import apply_overrides, load_config, validate_config
from tuneforge.errors import UserError

# Run configs; the search spaces (configs/search-*.yaml) are validated by tests/test_search_space.py.
CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").glob("*.yaml")
                 if not p.name.startswith("search-"))

BASE = {
    "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4}},
    "data": {"train": ["a.jsonl"]},
}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    cfg = load_config(path)
    assert cfg.output_dir


def test_shipped_configs_exist():
    assert len(CONFIGS) >= 3


def _error(raw: dict) -> str:
    with pytest.raises(UserError) as info:
        validate_config(raw)
    return str(info.value)


def test_key_typo_suggests_the_right_key():
    message = _error({**BASE, "train": {"schedular": "cosine"}})
    assert "train.schedular" in message and "did you mean 'scheduler'" in message


def test_trainer_style_name_maps_to_ours():
    message = _error({**BASE, "train": {"learning_rate": 1e-4}})
    assert "did you mean 'lr'" in message


def test_bad_literal_names_allowed_values():
    message = _error({**BASE, "train": {"scheduler": "cosin"}})
    assert "train.scheduler" in message and "'cosin'" in message and "did you mean 'cosine'" in message


def test_unknown_method_lists_known_ones():
    message = _error({**BASE, "method": {"name": "lorra"}})
    assert "did you mean 'lora'" in message and "qlora" in message and "galore" in message


def test_option_of_another_method_is_rejected_with_its_key():
    message = _error({**BASE, "method": {"name": "lora", "lr_ratio": 16}})
    assert "method.lr_ratio" in message


def test_model_needs_exactly_one_source():
    assert "exactly one of" in _error({"model": {}, "data": {"train": ["a"]}})


def test_dotted_overrides_set_nested_values_and_parse_numbers():
    raw = apply_overrides(BASE, ["train.lr=1e-4", "method.r=16", "data.packing=false"])
    cfg = validate_config({**raw, "method": {"name": "lora", **raw["method"]}})
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.method.r == 16
    assert cfg.data.packing is False
    assert BASE["model"] == {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4}}  # not mutated


def test_output_dir_defaults_to_runs_name():
    assert validate_config({**BASE, "run_name": "abc"}).output_dir == "runs/abc"


def test_validate_command_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.yaml"
    good.write_text("model: {name_or_path: gpt2}\ndata: {train: [a.jsonl]}\n")
    assert main(["validate", str(good)]) == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {name_or_path: gpt2}\ndata: {train: [a.jsonl]}\ntrain: {epocs: 2}\n")
    assert main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "train.epocs" in err and "did you mean 'epochs'" in err and "Traceback" not in err


def test_broken_yaml_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "broken.yaml"
    bad.write_text("model:\n  name_or_path: gpt2\n data: [\n")
    assert main(["validate", str(bad)]) == 2
    assert f"{bad}:" in capsys.readouterr().err
