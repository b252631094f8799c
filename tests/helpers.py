"""Builders shared by the tests: stdlib text, tiny model configs, saved bases, adapters and run directories.

Everything is built locally (no network). Test files import from here, never from each other or from conftest.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def stdlib_texts(limit: int = 400) -> list[str]:
    """Paragraphs of the Python documentation shipped with every Python (pydoc_data)."""
    from pydoc_data.topics import topics

    texts = []
    for key in sorted(topics):
        texts.extend(p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 40)
    return texts[:limit]


def tiny_from_config(arch: str = "llama"):
    """Architecture numbers of the tiny test models: 2 layers, hidden 64, 4 heads, vocab 512."""
    from tuneforge.config.schema import FromConfig

    return FromConfig(architecture=arch, hidden_size=64, num_layers=2, num_heads=4, vocab_size=512,
                      max_position_embeddings=256)


def save_base(model, tokenizer, folder: Path) -> Path:
    """Save ``model`` + tokenizer + the chatml template as a plain HF model directory."""
    from tuneforge.data.templates import get_template

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    get_template("chatml").save(folder)
    return folder


def make_adapter(base_dir: Path, folder: Path, *, seed: int = 1, r: int = 4, target_modules=("q_proj", "v_proj"),
                 scale: float = 1.0, **lora_kwargs) -> Path:
    """A LoRA adapter on ``base_dir`` with random non-zero A and B (as if trained), saved with tokenizer/template."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.data.templates import get_template

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(target_modules), init_lora_weights=False,
                        lora_dropout=0.0, **lora_kwargs)
    model = get_peft_model(base, config)
    if scale != 1.0:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.mul_(scale)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(folder)
    get_template("chatml").save(folder)
    return folder


def make_run(run_dir: Path, base_dir: Path, *, method: str = "lora", seed: int = 1, **adapter_kwargs) -> Path:
    """A tuneforge-shaped run directory: config.yaml, template.json and final/ holding a LoRA adapter."""
    from tuneforge.data.templates import get_template

    run_dir.mkdir(parents=True, exist_ok=True)
    make_adapter(base_dir, run_dir / "final", seed=seed, **adapter_kwargs)
    config = {"run_name": run_dir.name, "model": {"name_or_path": str(base_dir)},
              "method": {"name": method}, "data": {"train": ["x.jsonl"]}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    get_template("chatml").save(run_dir)
    _write_manifest(run_dir, method)
    return run_dir


def _write_manifest(run_dir: Path, method: str) -> None:
    """The manifest training writes at commit: the method's declared capabilities (merge reads them)."""
    import json

    from tuneforge.methods import get_method

    manifest = {"tuneforge_run": 1, "run_name": run_dir.name, "replaces": [],
                "capabilities": get_method(method).capabilities().as_dict()}
    (run_dir / "tuneforge_run.json").write_text(json.dumps(manifest), encoding="utf-8")


def write_chat_items(folder: Path, count: int, seed: int, name: str = "train.jsonl") -> Path:
    """``count`` records of the built-in classification set (chat form) written to ``folder/name``."""
    import json

    from tuneforge.data import builtin

    with open(folder / name, "w") as handle:
        for item in builtin.classification_items(seed=seed)[:count]:
            handle.write(json.dumps({"messages": item["messages"]}) + "\n")
    return folder


def tiny_run_config(out: Path, train_file: Path, *, seed: int = 7, dropout: float = 0.1, max_length: int = 128,
                    train: dict | None = None) -> dict:
    """A raw run config: LoRA r=4 SFT of a 2-layer, hidden-64 from-config Llama on ``train_file``, TensorBoard
    off; ``train`` keys are the run's whole ``train`` section."""
    return {
        "run_name": out.name,
        "output_dir": str(out),
        "seed": seed,
        "stage": "sft",
        "model": {"from_config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 512}},
        "method": {"name": "lora", "r": 4, "alpha": 8, "dropout": dropout},
        "data": {"train": [str(train_file)], "max_length": max_length},
        "train": {"report_to": ["none"], **(train or {})},
    }


def kill_at_step(step: int, output_dir_contains: str = ""):
    """A Trainer callback that raises ``KeyboardInterrupt`` (a simulated kill) when training step ``step`` begins,
    in runs whose output directory contains ``output_dir_contains``; pass it in ``run_training(callbacks=[...])``."""
    from transformers import TrainerCallback

    class KillAtStep(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == step and output_dir_contains in str(args.output_dir):
                raise KeyboardInterrupt("simulated kill")

    return KillAtStep()
