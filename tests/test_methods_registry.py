"""One registration per method: registry, config union, METHOD_NAMES and the CLI choices agree; config stays light."""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

from tuneforge.errors import UserError


def _option(parser, command: str, flag: str):
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices[command]
    return next(a for a in sub._actions if flag in a.option_strings)


def test_registry_schema_names_and_cli_agree():
    from tuneforge.cli import build_parser
    from tuneforge.config.methods import METHOD_CONFIGS
    from tuneforge.config.schema import METHOD_NAMES, MethodConfig
    from tuneforge.estimate import bill
    from tuneforge.methods import get_method, known_methods, priced_methods, registrations

    regs = registrations()
    union = typing.get_args(typing.get_args(MethodConfig)[0])
    assert list(METHOD_NAMES) == list(regs) == sorted(METHOD_CONFIGS)
    assert set(union) == {reg.config for reg in regs.values()} and len(union) == len(regs)
    for name, reg in regs.items():
        assert reg.config(name=name).name == name  # defaults alone make a valid section
        assert reg.config is METHOD_CONFIGS[name]  # the schema's class (config/methods.py, below the methods)
        if reg.method is not None:
            assert reg.method.__module__ == f"tuneforge.methods.{name}"  # one implementation module per method
            assert get_method(name).name == name
    assert known_methods() == [n for n, reg in regs.items() if reg.method is not None]
    assert set(regs) - set(known_methods()) == {"auto"}
    with pytest.raises(UserError, match="resolved to a concrete method before training"):
        get_method("auto")

    parser = build_parser()
    assert list(_option(parser, "estimate", "--method").choices) == priced_methods() == list(bill.METHODS)
    assert {"full", "lora", "qlora", "galore"} <= set(priced_methods()) <= set(known_methods())
    inspect_help = _option(parser, "inspect", "--method").help
    assert all(name in inspect_help for name in known_methods())


def test_auto_validates_with_a_budget_and_says_what_it_needs_without():
    from tuneforge.config import validate_config

    raw = {"model": {"name_or_path": "m"}, "data": {"train": ["a.jsonl"]}, "method": {"name": "auto"}}
    with pytest.raises(UserError, match="memory_budget_gb"):
        validate_config(raw)
    assert validate_config({**raw, "train": {"memory_budget_gb": 8}}).method.r == 16


def test_importing_config_and_validating_leaves_torch_out():
    """`tuneforge validate` stays instant: the schema reads config/methods.py; no method module may import torch at import time."""
    code = (
        "import sys\n"
        "from tuneforge.config import validate_config\n"
        "validate_config({'model': {'name_or_path': 'm'}, 'data': {'train': ['a.jsonl']}, 'method': {'name': 'vera'}})\n"
        "import tuneforge.methods.lora, tuneforge.estimate.cli, tuneforge.commands.inspect\n"
        "heavy = sorted(m for m in ('torch', 'transformers', 'peft', 'bitsandbytes') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
