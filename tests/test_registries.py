"""One registration shape for every plug-in kind: each registry, the config schema, the CLI and the docs' lists
agree (stages, data formats, retention terms, augment modes; methods: tests/test_methods_registry.py)."""

from __future__ import annotations

import ast
import importlib.util
import re
import typing
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _docs_list(kind: str) -> list[str]:
    """The names docs/architecture.md's "Plug-in registries" table lists for ``kind``."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    row = next((line for line in text.splitlines() if line.startswith(f"| {kind} |")), None)
    assert row is not None, f"docs/architecture.md has no '| {kind} |' row in its plug-in registries table"
    return re.findall(r"`([^`]+)`", row.split("|")[-2])


def _subcommand(parser, *names):
    for name in names:
        parser = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[name]
    return parser


def _option(parser, flag: str):
    return next(a for a in parser._actions if flag in a.option_strings)


def _defines(module: str, function: str) -> bool:
    """Whether ``module`` (a tuneforge module, not imported: trainer modules import torch) defines ``function``."""
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"{module} does not exist"
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    return any(isinstance(node, ast.FunctionDef) and node.name == function for node in tree.body)


# --------------------------------------------------------------------------- stages


def test_stages_registry_schema_and_docs_agree():
    from tuneforge.config.schema import RunConfig
    from tuneforge.config.stages import DATA_KINDS, STAGES

    assert {"pt", "sft"} <= set(STAGES)
    assert typing.get_args(RunConfig.model_fields["stage"].annotation) == tuple(STAGES)
    for name, spec in STAGES.items():
        assert spec.data in DATA_KINDS and spec.help
        if spec.trainer is None:
            assert spec.data in ("text", "chat"), f"{name}: only the causal-LM stages run without a trainer module"
        else:
            assert spec.trainer.startswith("tuneforge.train.stages.") and _defines(spec.trainer, "stage"), name
        if spec.section is not None:
            field = RunConfig.model_fields.get(spec.section)
            assert field is not None, f"stage {name}: section {spec.section!r} is not a RunConfig field"
            assert spec.config in typing.get_args(field.annotation), f"RunConfig.{spec.section} is not {spec.config}"
            assert set(spec.keys) | set(spec.defaults) <= set(spec.config.model_fields), name
    assert _docs_list("stage") == list(STAGES)


def test_a_stage_section_belongs_to_its_stages_only():
    from tuneforge.config import validate_config
    from tuneforge.config.stages import STAGES
    from tuneforge.errors import UserError

    base = {"model": {"name_or_path": "m"}, "data": {"train": ["a.jsonl"]}}
    for name, spec in STAGES.items():
        if spec.section is None or spec.required:
            continue
        cfg = validate_config({**base, "stage": name})
        assert getattr(cfg, spec.section) == spec.config()  # the section's defaults are filled in
        other = next(n for n, s in STAGES.items() if s.section != spec.section)
        with pytest.raises(UserError, match=f"{spec.section}: is for stage"):
            validate_config({**base, "stage": other, spec.section: {}})


# --------------------------------------------------------------------------- data formats


def test_formats_registry_schema_cli_and_docs_agree():
    from tuneforge.cli import build_parser
    from tuneforge.config.formats import DATA_FORMATS, FORMAT_CHOICES
    from tuneforge.config.schema import DataConfig
    from tuneforge.config.stages import DATA_KINDS
    from tuneforge.data import readers

    assert list(readers._CONVERTERS) == list(DATA_FORMATS)  # every declared format is readable, in detection order
    assert typing.get_args(DataConfig.model_fields["format"].annotation) == FORMAT_CHOICES
    assert all(spec.record in DATA_KINDS for spec in DATA_FORMATS.values())
    augment = _option(_subcommand(build_parser(), "data", "augment"), "--format")
    assert list(augment.choices) == ["auto", *(n for n, s in DATA_FORMATS.items() if s.selectable and s.record == "chat")]
    assert _docs_list("data format") == list(DATA_FORMATS)
    with pytest.raises(ValueError, match="not declared"):
        readers.register_format("yaml-ish", lambda row, source: row, lambda row: False)


@pytest.mark.parametrize("row, expected", [
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, "preference"),
    ({"prompt": "q", "completion": "a", "label": True}, "kto"),
    ({"prompt": "q", "answer": 4}, "prompt"),
    ({"messages": [{"role": "user", "content": "q"}]}, "chat"),
    ({"instruction": "q", "output": "a"}, "alpaca"),
    ({"text": "t"}, "text"),
])
def test_each_format_is_detected_from_its_keys(row, expected):
    from tuneforge.data.readers import detect_format

    assert detect_format(row, "t:1") == expected


# --------------------------------------------------------------------------- retention terms


def test_retention_terms_registry_schema_and_docs_agree():
    from tuneforge.config.retention import RETENTION_CONFIGS
    from tuneforge.config.schema import TrainConfig
    from tuneforge.train.retention import known_terms, register

    union = typing.get_args(typing.get_args(TrainConfig.model_fields["retention"].annotation)[0])[0]
    assert set(typing.get_args(union)) == set(RETENTION_CONFIGS.values())
    assert set(known_terms()) == set(RETENTION_CONFIGS) | {"distill"}
    assert _docs_list("retention term") == sorted(RETENTION_CONFIGS)
    with pytest.raises(ValueError, match="no config class"):
        register("not_declared")


# --------------------------------------------------------------------------- augment modes


def test_augment_modes_registry_cli_and_docs_agree():
    from tuneforge.cli import build_parser
    from tuneforge.data.augment import AUGMENT_MODES, MODES, check_options

    assert MODES == tuple(AUGMENT_MODES)
    help_text = _option(_subcommand(build_parser(), "data", "augment"), "--mode").help
    for name, mode in AUGMENT_MODES.items():
        assert f"{name}: {mode.help}" in help_text
        assert mode.compare in ("user", "assistant")
        assert set(mode.reply) <= {"instruction", "reasoning", "answer"}
        assert check_options(name, "1", "0.7")[0] == name
    assert _docs_list("augment mode") == list(AUGMENT_MODES)
    docs = (ROOT / "docs" / "data.md").read_text(encoding="utf-8")
    assert all(f"| `{name}` |" in docs for name in AUGMENT_MODES), "docs/data.md's mode table misses a mode"


def test_every_registry_the_schema_reads_is_pure():
    """The schema's registries live in tuneforge.config and import no other tuneforge package (nor torch)."""
    for module in ("methods", "stages", "retention", "formats", "schema"):
        tree = ast.parse((SRC / "tuneforge" / "config" / f"{module}.py").read_text(encoding="utf-8"))
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        outside = {m for m in imported if m.startswith("tuneforge.") and not m.startswith("tuneforge.config")}
        assert not outside and not {m for m in imported if m.split(".")[0] in ("torch", "transformers")}, module


def test_top_level_help_lists_every_registered_value():
    from tuneforge.cli import build_parser
    from tuneforge.config.formats import FORMAT_CHOICES
    from tuneforge.config.retention import RETENTION_CONFIGS
    from tuneforge.config.schema import METHOD_NAMES
    from tuneforge.config.stages import STAGES

    lines = build_parser().format_help().splitlines()
    for key, names in (("stage", STAGES), ("method.name", METHOD_NAMES), ("data.format", FORMAT_CHOICES),
                       ("train.retention.method", RETENTION_CONFIGS)):
        row = next(line for line in lines if line.split() and line.split()[0] == key)
        assert row.split()[1:] == " | ".join(names).split(), key
