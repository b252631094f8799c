"""``tuneforge serve RUN --engine vllm|sglang``: the command a run turns into (base + LoRA modules, the run's own chat
template file, stop tokens, generation defaults, tuneforge's model names), the refusal on a machine without the
engine or a GPU, and ``--check-engine`` (greedy token agreement with another OpenAI server)."""

from __future__ import annotations

import json

import pytest

from tests.helpers import make_run
from tests.helpers_serve import running_server, tiny_base


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("engines")
    base = tiny_base(root / "base", tiny_tokenizer)
    other = tiny_base(root / "other", tiny_tokenizer, seed=1)
    return {"base": base, "a": make_run(root / "a", base, seed=1, r=4),
            "b": make_run(root / "b", base, seed=2, r=8),
            "dora": make_run(root / "dora", base, seed=3, use_dora=True),
            "elsewhere": make_run(root / "elsewhere", other, seed=4)}


def flag(argv: list[str], name: str, count: int = 1):
    index = argv.index(name)
    return argv[index + 1] if count == 1 else argv[index + 1:index + 1 + count]


def test_vllm_command_serves_the_base_with_each_run_as_a_lora_module(runs, tmp_path, tiny_tokenizer):
    from tuneforge.models.reference import load_template, resolve
    from tuneforge.serve.engines import engine_command

    launch = engine_command("vllm", [str(runs["a"]), f"second={runs['b']}"], port=8100, api_key="k",
                            workdir=tmp_path, default_max_tokens=99, default_temperature=0.3)
    argv = launch.argv
    assert argv[:3] == ["vllm", "serve", str(runs["base"])]
    assert flag(argv, "--port") == "8100" and "--enable-lora" in argv
    assert flag(argv, "--lora-modules", 2) == [f"a={runs['a'] / 'final'}", f"second={runs['b'] / 'final'}"]
    assert flag(argv, "--max-lora-rank") == "8" and launch.names == ["a", "second"]  # tuneforge's names
    template = load_template(resolve(str(runs["a"])).template_dir, tiny_tokenizer)
    assert open(flag(argv, "--chat-template")).read() == template.jinja  # the run's own template, verbatim
    defaults = json.loads(flag(argv, "--override-generation-config"))
    assert tiny_tokenizer.eos_token_id in defaults["eos_token_id"]
    assert set(template.stop_token_ids(tiny_tokenizer)) <= set(defaults["eos_token_id"])
    assert defaults["max_new_tokens"] == 99 and defaults["temperature"] == 0.3
    assert "k" not in argv and launch.env == {"VLLM_API_KEY": "k"}  # the key never on the command line


def test_sglang_command(runs, tmp_path):
    from tuneforge.serve.engines import engine_command

    argv = engine_command("sglang", [str(runs["a"])], workdir=tmp_path).argv
    assert argv[:3] == ["python", "-m", "sglang.launch_server"] and flag(argv, "--model-path") == str(runs["base"])
    assert flag(argv, "--lora-paths") == f"a={runs['a'] / 'final'}"
    assert "stop_token_ids" in json.loads(flag(argv, "--preferred-sampling-params"))
    assert flag(argv, "--chat-template").endswith("chat_template.jinja")


def test_runs_an_engine_cannot_serve_together_are_refused(runs, tmp_path):
    from tuneforge.errors import UserError
    from tuneforge.serve.engines import engine_command

    with pytest.raises(UserError, match="different bases"):
        engine_command("vllm", [str(runs["a"]), str(runs["elsewhere"])], workdir=tmp_path)
    with pytest.raises(UserError, match="DoRA.*merge it first"):
        engine_command("vllm", [str(runs["dora"])], workdir=tmp_path)
    with pytest.raises(UserError, match="not one of"):
        engine_command("tgi", [str(runs["a"])], workdir=tmp_path)


def test_this_machine_refuses_to_start_an_engine_and_dry_run_prints_it(runs, capsys):
    import torch

    from tuneforge.cli import main
    from tuneforge.serve.engines import engine_available

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the refusal is for machines without one")
    assert "no GPU" in engine_available("vllm")
    code = main(["serve", str(runs["a"]), "--engine", "vllm"])
    err = " ".join(capsys.readouterr().err.split())
    assert code != 0 and "--engine vllm cannot run on this machine" in err and "no GPU" in err
    assert main(["serve", str(runs["a"]), "--engine", "sglang", "--dry-run"]) == 0
    assert "sglang.launch_server" in capsys.readouterr().out


def test_check_engine_reports_token_agreement(runs, capsys):
    """Another OpenAI server serving the same runs (here tuneforge itself) agrees token for token."""
    import torch

    from tuneforge.cli import main
    from tuneforge.serve.engines import check_engine

    with running_server([str(runs["a"])], engine_options={"dtype": torch.float32}, local_only=True) as (url, _):
        results = check_engine(url, [str(runs["a"])], prompts=["What is a list?", "Hello"], max_tokens=8,
                               device="cpu")
        assert len(results) == 2 and all(r.identical and r.model == "a" for r in results)
        assert main(["serve", str(runs["a"]), "--check-engine", url, "--check-max-tokens", "6", "--device",
                     "cpu"]) == 0
    assert "answers identical" in capsys.readouterr().out
