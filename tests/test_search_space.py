"""Search spaces: parsing, door checks (no trial, no model), safe ties, grids, shipped spaces."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuneforge.config import validate_config
from tuneforge.config.load import read_yaml
from tuneforge.errors import UserError
from tuneforge.search.space import compile_tie, evaluate_tie, load_space, tie_names

ROOT = Path(__file__).resolve().parents[1]

BASE = {
    "run_name": "s",
    "model": {"from_config": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
    "method": {"name": "lora", "r": 4, "alpha": 8},
    "data": {"train": ["train.jsonl"], "eval": "eval.jsonl", "max_length": 64},
    "train": {"max_steps": 4, "batch_size": 4, "eval_steps": 2},
}


def _space(tmp_path: Path, spec: dict, base: dict = BASE):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(spec))
    return load_space(path, base)


def test_ties_follow_sampled_values_and_the_base_config(tmp_path):
    space = _space(tmp_path, {
        "method.r": {"choice": [4, 8]},
        "method.alpha": {"tie": "2 * method.r"},
        "method.dropout": {"tie": "0.1 if train.batch_size >= 4 else 0.0"},  # batch size from the run config
        "train.lr": {"log_uniform": ["1e-5", "1e-3"]},  # YAML 1.1 reads 1e-5 as text: still a number
    })
    base = validate_config(BASE)
    values = space.resolve({"method.r": 8, "train.lr": 1e-4}, base)
    assert values["method.alpha"] == 16 and values["method.dropout"] == 0.1
    raw = space.trial_config(BASE, values)
    cfg = validate_config(raw)
    assert (cfg.method.r, cfg.method.alpha, cfg.train.lr) == (8, 16, 1e-4)
    assert BASE["method"]["r"] == 4  # the base mapping is not modified
    lr = next(p for p in space.params if p.key == "train.lr")
    assert (lr.low, lr.high, lr.log) == (1e-5, 1e-3, True)


def test_ties_may_read_other_ties_in_any_file_order(tmp_path):
    space = _space(tmp_path, {
        "method.dropout": {"tie": "method.alpha / 100"},
        "method.alpha": {"tie": "2 * method.r"},
        "method.r": {"choice": [4, 8]},
    })
    values = space.resolve({"method.r": 8}, validate_config(BASE))
    assert values["method.alpha"] == 16 and values["method.dropout"] == 0.16


def test_grid_is_the_product_of_the_choices(tmp_path):
    space = _space(tmp_path, {
        "method.r": {"choice": [4, 8, 16]},
        "train.lr": {"choice": [1e-4, 3e-4]},
        "method.target_modules": {"choice": ["attention", ["q_proj", "v_proj"]]},  # a list value is one choice
        "method.alpha": {"tie": "2 * method.r"},
    })
    assert space.grid_size() == 12
    points = space.grid_points()
    assert len(points) == 12 and len({repr(sorted(p.items())) for p in points}) == 12
    target = next(p for p in space.params if p.key == "method.target_modules")
    encoded = space.grid()["method.target_modules"]
    assert all(isinstance(v, str) for v in encoded)  # optuna stores scalars; lists travel as JSON
    assert target.decode(encoded[1]) == ["q_proj", "v_proj"]


def test_grid_refuses_ranges(tmp_path):
    space = _space(tmp_path, {"train.lr": {"log_uniform": [1e-5, 1e-3]}, "method.r": {"choice": [4, 8]}})
    with pytest.raises(UserError, match=r"train\.lr is a range"):
        space.grid()


@pytest.mark.parametrize(("spec", "message"), [
    ({"train.learning_rate": {"choice": [1e-4]}}, r"'train\.learning_rate' is not a run-config key — did you mean 'train\.lr'"),
    ({"method.rr": {"choice": [4]}}, r"'method\.rr' is not a run-config key — did you mean 'method\.r'"),
    ({"trian.lr": {"choice": [1e-4]}}, r"did you mean 'train\.lr'"),
    ({"method.r": {"choice": []}}, r"method\.r: choice needs a non-empty list"),
    ({"method.r": {"choice": [4, 4]}}, r"lists a value twice"),
    ({"train.lr": {"uniform": [1e-3, 1e-4]}}, r"train\.lr: low \(0\.001\) must be below high \(0\.0001\)"),
    ({"train.lr": {"uniform": [1e-3, 1e-3]}}, r"must be below high"),
    ({"train.lr": {"log_uniform": [0, 1e-3]}}, r"a log range needs low > 0 \(got 0\)"),
    ({"train.warmup_ratio": {"log_uniform": [-0.1, 0.1]}}, r"a log range needs low > 0"),
    ({"method.r": {"int": [4, 64], "log": True, "step": 4}}, r"both log and stepped"),
    ({"method.r": {"int": [4.5, 64]}}, r"int bounds must be integers"),
    ({"method.r": {"choise": [4, 8]}}, r"unknown distribution 'choise' — did you mean 'choice'"),
    ({"method.r": {"choice": [4], "uniform": [1, 2]}}, r"exactly one of"),
    ({"method.r": [4, 8]}, r"expected a mapping"),
    ({"train.lr": {"choice": [-1.0, 1e-4]}}, r"train\.lr: value -1\.0 is not accepted by the run config"),
    ({"method.r": {"choice": [8, 4]}, "method.alpha": {"tie": "method.r - 4"}},
     r"method\.alpha: value 0 \(tie, from method\.r=4\) is not accepted"),
    ({"method.alpha": {"tie": "2 * method.rank"}}, r"reads 'method\.rank', which is not a run-config key — did you mean 'method\.r'"),
    ({"method.alpha": {"tie": "method.r / (method.r - 4)"}}, r"divides by zero"),
    ({"method.alpha": {"tie": "method.dropout * 100"}, "method.dropout": {"tie": "method.alpha / 100"}},
     r"ties form a cycle"),
])
def test_bad_spaces_are_refused_at_the_door(tmp_path, spec, message):
    with pytest.raises(UserError, match=message):
        _space(tmp_path, spec)


def test_an_invalid_combination_is_left_to_the_trial(tmp_path):
    # 48 and 64 are valid widths and 3 and 4 valid head counts; only 64 with 3 heads is not: a failed trial later,
    # not a refusal now.
    space = _space(tmp_path, {"model.from_config.hidden_size": {"choice": [48, 64]},
                              "model.from_config.num_heads": {"choice": [3, 4]}})
    assert space.grid_size() == 4


@pytest.mark.parametrize("expr", [
    "__import__('os').system('true')",
    "__builtins__",
    "(1).__class__",
    "method.r.__class__.__mro__",
    "open('x')",
    "[x for x in range(3)]",
    "lambda: 1",
    "method['r']",
    "'a' * 3",
    "min(1, key=abs)",
])
def test_ties_refuse_anything_but_arithmetic(expr):
    with pytest.raises(UserError):
        compile_tie(expr)


def test_tie_evaluation_is_arithmetic_only():
    values = {"method.r": 8, "train.batch_size": 4}
    assert evaluate_tie("max(1, (32 // method.r) * method.r)", values.__getitem__) == 32
    assert evaluate_tie("round(method.r ** 0.5, 2)", values.__getitem__) == 2.83
    assert evaluate_tie("-method.r if method.r > 4 and train.batch_size < 8 else 0", values.__getitem__) == -8
    assert tie_names("min(method.r, train.batch_size) * 2") == ["method.r", "train.batch_size"]
    with pytest.raises(UserError, match="too large"):
        evaluate_tie("2 ** (method.r ** 3)", values.__getitem__)


def test_shipped_spaces_load_against_the_shipped_config():
    from tuneforge.search.study import SearchOptions, prepare

    config = ROOT / "configs" / "tiny-llama-sft-offline.yaml"
    base = read_yaml(config)
    grid = load_space(ROOT / "configs" / "search-grid.yaml", base)
    assert grid.grid_size() == 81  # the guide's 3 x 3 x 3 x 3
    assert {p.key for p in grid.params} == {"method.r", "method.alpha", "train.lr", "train.batch_size"}
    random = load_space(ROOT / "configs" / "search-random.yaml", base)
    assert {p.kind for p in random.params} == {"int", "log_uniform", "choice"}
    search = prepare(SearchOptions(config=str(config), space=str(ROOT / "configs" / "search-grid.yaml"),
                                   sampler="grid"))
    assert search.trials == 81 and search.study_name == "tiny-sft-search"
    shipped = sorted(p.name for p in (ROOT / "configs").glob("search-*.yaml"))
    assert shipped == ["search-grid.yaml", "search-random.yaml"]
