"""Progressive LoRA (method.continue_from): earlier adapters frozen under a new one, the stack kept in the run,
loaded, merged and resumed like any run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from tests.helpers import kill_at_step
from tuneforge.cli import main
from tuneforge.config import validate_config

pytestmark = pytest.mark.slow  # whole-pipeline runs (the fast tier: scripts/test.sh)

OLD_PROMPTS = ["Repeat the word w4", "Repeat the word w10"]


def _task_file(path: Path, task: str, n: int) -> Path:
    rows = []
    for i in range(n):
        if task == "echo":
            messages = [{"role": "user", "content": f"Repeat the word w{i}"}, {"role": "assistant", "content": f"w{i}"}]
        else:
            messages = [{"role": "user", "content": f"What is {i} plus {i}?"},
                        {"role": "assistant", "content": f"{2 * i}"}]
        rows.append({"task": task, "messages": messages})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _cfg(out: Path, train_file: Path, *, base: Path | None = None, continue_from: Path | None = None,
         steps: int = 12, **train) -> dict:
    model = {"name_or_path": str(base)} if base else {
        "from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}}
    method = {"name": "lora", "r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    if continue_from is not None:
        method["continue_from"] = str(continue_from)
    return {"run_name": out.name, "output_dir": str(out), "seed": 3, "stage": "sft", "model": model, "method": method,
            "data": {"train": [str(train_file)], "max_length": 64},
            "train": {"max_steps": steps, "batch_size": 4, "lr": 5e-3, "logging_steps": 1, "report_to": ["none"],
                      "monitor": {"enabled": False}, **train}}


def _train(raw: dict, **kwargs):
    from tuneforge.train.run import run_training

    return run_training(validate_config(raw), echo=lambda *_: None, **kwargs)


def _ids(tokenizer, texts):
    import torch

    return [torch.tensor([tokenizer(t)["input_ids"]]) for t in texts]


def _logits(model, batches):
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=ids).logits.float() for ids in batches]


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def _losses(run_dir: Path) -> list[float]:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [line["loss"] for line in lines if line.get("event") == "log" and "loss" in line]


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    """first (echo task) → second (add task, continue_from first) → third (echo again, continue_from second)."""
    folder = tmp_path_factory.mktemp("progressive")
    old = _task_file(folder / "old.jsonl", "echo", 32)
    new = _task_file(folder / "new.jsonl", "add", 32)
    first = folder / "first"
    _train(_cfg(first, old))
    base = first / "base"
    second = folder / "second"
    result = _train(_cfg(second, new, base=base, continue_from=first))
    third = folder / "third"
    _train(_cfg(third, old, base=base, continue_from=second, steps=4))
    return {"folder": folder, "old": old, "new": new, "base": base, "first": first, "second": second,
            "third": third, "result": result}


def test_the_earlier_adapter_is_frozen_and_the_new_one_trains(chain):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    second, model = chain["second"], chain["result"].model
    tokenizer = AutoTokenizer.from_pretrained(chain["base"])
    batches = _ids(tokenizer, OLD_PROMPTS)
    # base + the earlier adapter, unmerged, as the first run left it
    before = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chain["base"]), str(chain["first"] / "final"))
    with model.disable_adapter():  # the frozen part of the continued model: base + merged earlier adapter
        frozen = _logits(model, batches)
    assert _max_diff(_logits(before, batches), frozen) < 1e-5
    plain = AutoModelForCausalLM.from_pretrained(chain["base"])
    assert _max_diff(_logits(plain, batches), frozen) > 1e-2  # the earlier adapter matters: it is really there
    assert _max_diff(_logits(model, batches), frozen) > 1e-2  # and the new adapter changed something
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and ".default." in name for name in trainable)
    assert len(trainable) == 2 * 3 * 2  # A and B on q, v, down of 2 layers: nothing of the earlier adapter trains
    losses = _losses(second)
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    # the run keeps its own copy of the earlier adapter and says where it came from
    copied = second / "stack" / "00"
    assert (copied / "adapter_model.safetensors").read_bytes() == \
        (chain["first"] / "final" / "adapter_model.safetensors").read_bytes()
    summary = json.loads((second / "summary.json").read_text())
    assert summary["continued_from"] == str(chain["first"])
    assert summary["stack"] == [{"dir": "stack/00", "from": str(chain["first"] / "final")}]
    manifest = json.loads((second / "tuneforge_run.json").read_text())
    assert manifest["stack"] == summary["stack"]


def test_loading_the_run_gives_the_in_training_logits(chain):
    from tuneforge.models.reference import load_for_inference, resolve

    ref = resolve(chain["second"])
    assert ref.stack == (str(chain["second"] / "stack" / "00"),)
    assert ref.base_key != ref.base
    loaded = load_for_inference(ref, device="cpu")
    batches = _ids(loaded.tokenizer, OLD_PROMPTS + ["What is 3 plus 3?"])
    assert _max_diff(_logits(chain["result"].model, batches), _logits(loaded.model, batches)) < 1e-5


def test_a_stack_of_two_loads_and_merges_like_the_adapters_unmerged(chain, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tuneforge.merge.lora import merge_lora
    from tuneforge.models.reference import load_for_inference, resolve

    third = chain["third"]
    assert [Path(p).name for p in resolve(third).stack] == ["00", "01"]
    assert json.loads((third / "summary.json").read_text())["stack"] == [
        {"dir": "stack/00", "from": str(chain["second"] / "stack" / "00")},
        {"dir": "stack/01", "from": str(chain["second"] / "final")}]
    # Three adapters active together on the plain base, nothing merged.
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(chain["base"]),
                                         str(chain["first"] / "final"), adapter_name="a")
    unmerged.load_adapter(str(chain["second"] / "final"), adapter_name="b")
    unmerged.load_adapter(str(third / "final"), adapter_name="c")
    unmerged.base_model.set_adapter(["a", "b", "c"])
    loaded = load_for_inference(third, device="cpu")
    batches = _ids(loaded.tokenizer, OLD_PROMPTS + ["What is 3 plus 3?"])
    reference = _logits(unmerged, batches)
    assert _max_diff(reference, _logits(loaded.model, batches)) < 1e-4
    # tuneforge merge folds the whole stack into one plain model
    report = merge_lora(third, tmp_path / "merged")
    assert any("2 earlier adapter(s)" in note for note in report.notes)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert _max_diff(reference, _logits(merged, batches)) < 1e-4


def test_resume_of_a_progressive_run_equals_uninterrupted(chain, tmp_path, monkeypatch):
    import torch
    from safetensors.torch import load_file


    raw = _cfg(tmp_path / "straight", chain["new"], base=chain["base"], continue_from=chain["first"], steps=6,
               save_steps=2)
    _train(raw)

    raw2 = {**raw, "run_name": "interrupted", "output_dir": str(tmp_path / "interrupted")}
    with pytest.raises(KeyboardInterrupt):
        _train(raw2, callbacks=[kill_at_step(4)])
    assert (tmp_path / "interrupted" / "stack" / "00").is_dir()
    _train(raw2, resume=True)
    a = load_file(str(tmp_path / "straight" / "final" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "interrupted" / "final" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6, msg=key)


def _exit_code(tmp_path: Path, raw: dict, capsys) -> tuple[int, str]:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(raw))
    code = main(["train", str(config)])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["unfinished", "other_base", "from_config", "prefix", "qlora", "missing"])
def test_refused_cases_name_the_key_and_write_nothing(chain, tmp_path, capsys, case):
    out = tmp_path / "run"
    earlier = chain["first"]
    raw = _cfg(out, chain["new"], base=chain["base"], continue_from=earlier)
    expect = "method.continue_from"
    if case == "unfinished":
        earlier = tmp_path / "unfinished"
        shutil.copytree(chain["first"], earlier, ignore=shutil.ignore_patterns("final"))
        raw["method"]["continue_from"] = str(earlier)
        expect += r".*did the training run finish"
    elif case == "other_base":
        other = tmp_path / "other"
        shutil.copytree(chain["base"], other)
        raw["model"] = {"name_or_path": str(other)}
        expect += r".*same base model"
    elif case == "from_config":
        raw["model"] = _cfg(out, chain["new"])["model"]
        expect += r".*model.from_config"
    elif case == "prefix":
        earlier = tmp_path / "prefix"
        shutil.copytree(chain["first"], earlier)
        config = json.loads((earlier / "final" / "adapter_config.json").read_text())
        config["peft_type"] = "PREFIX_TUNING"
        (earlier / "final" / "adapter_config.json").write_text(json.dumps(config))
        raw["method"]["continue_from"] = str(earlier)
        expect += r".*cannot be merged"
    elif case == "qlora":
        raw["method"]["name"] = "qlora"
        expect += r".*unquantized"
    else:
        raw["method"]["continue_from"] = str(tmp_path / "nope")
        expect += r".*does not exist"
    code, err = _exit_code(tmp_path, raw, capsys)
    assert code == 2
    import re

    assert re.search(expect, err.replace("\n", " ")), err
    assert not out.exists()


def test_serve_keeps_a_progressive_run_off_the_plain_base_and_recipes_refuse_it(chain, tmp_path):
    """Two runs on the same base path but different weights under their adapters (the progressive one has its stack
    merged in) must not share one loaded base in serve; a merge recipe cannot read such an adapter against the
    bare base."""
    from tuneforge.errors import UserError
    from tuneforge.merge.recipe import merge_recipe
    from tuneforge.models.generation import GenerationSettings, complete
    from tuneforge.models.reference import load_for_inference
    from tuneforge.serve.engine import Engine

    engine = Engine([f"first={chain['first']}", f"second={chain['second']}"], device="cpu")
    first, second = engine.get("first"), engine.get("second")
    assert first.model is not second.model
    settings = GenerationSettings(max_new_tokens=6)
    alone = load_for_inference(chain["second"], device="cpu")
    expected = complete(alone.model, alone.tokenizer, alone.template, OLD_PROMPTS, settings)
    second.activate()
    served = complete(second.model, second.tokenizer, second.template, OLD_PROMPTS, settings)
    assert [c.text for c in served] == [c.text for c in expected]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(chain["first"] / "final"), "parameters": {"weight": 0.5}},
        {"model": str(chain["second"]), "parameters": {"weight": 0.5}}]}))
    with pytest.raises(UserError, match="progressive run"):
        merge_recipe(recipe, tmp_path / "out")


def test_inspect_lists_the_stack_in_merge_order(chain, capsys):
    assert main(["inspect", str(chain["third"])]) == 0
    out = capsys.readouterr().out
    assert "stack: 2 earlier adapter(s) merged into the base first" in out
    assert out.index(str(chain["third"] / "stack" / "00")) < out.index(str(chain["third"] / "stack" / "01"))
