"""SFT throughput: tuneforge (answer-only masks, packing) vs the tutorial recipe (pad every sample to max_length).

Both arms train the same from-config Llama (same tokenizer, same LoRA, same samples, same number of samples seen)
with the HF Trainer, each in its own subprocess so that peak memory (RSS high-water mark) is per arm. Prints one JSON
object: per arm tokens/s (all computed tokens and supervised tokens), padding share, peak RSS, and the ratios.

    .venv/bin/python benchmarks/sft_throughput.py [--samples 256] [--max-length 512]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODEL = {"architecture": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "vocab_size": 4096}


def alpaca_like(count: int, seed: int = 0) -> list[dict]:
    """Alpaca-shaped records with Alpaca-like lengths (short instruction, answer of 1-5 sentences)."""
    from tuneforge.data.builtin import pydoc_topics

    sentences = [s.strip() for text in pydoc_topics().values() for s in text.replace("\n", " ").split(". ")
                 if 20 < len(s.strip()) < 200]
    rng = random.Random(seed)
    return [
        {
            "instruction": rng.choice(sentences) + "?",
            "input": rng.choice(sentences) if rng.random() < 0.3 else "",
            "output": ". ".join(rng.sample(sentences, rng.randint(1, 5))) + ".",
        }
        for _ in range(count)
    ]


def run_arm(arm: str, work: Path, samples: int, max_length: int, batch_size: int) -> dict:
    """Train one arm in this process; return its figures."""
    import torch

    torch.set_num_threads(2)
    from tuneforge.config import validate_config
    from tuneforge.train.run import run_training

    data = work / "alpaca.jsonl"
    common = {
        "seed": 0,
        "stage": "sft",
        "model": {"name_or_path": str(work / "base"), "chat_template": "alpaca"},
        "method": {"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "attention"},
        "data": {"train": [str(data)], "format": "alpaca", "max_length": max_length, "clean": {"dedup": False}},
        "train": {"epochs": 1, "batch_size": batch_size, "lr": 1e-4, "logging_steps": 1000, "report_to": ["none"],
                  "monitor": {"enabled": False}},
    }
    if arm == "tuneforge_packed":
        cfg = validate_config({**common, "run_name": arm, "output_dir": str(work / arm),
                               "data": {**common["data"], "packing": True}})
        started = time.time()
        result = run_training(cfg, overwrite=True, echo=lambda *_: None)
        seconds = time.time() - started
        stats = result.summary["data"]
        runtime = result.summary["runtime_s"]
        del seconds
        computed = round(stats["tokens"] / (1 - stats["padding_share"]))
        return _figures(arm, runtime, runtime, computed, stats["tokens"], stats["supervised_tokens"])
    return _tutorial_arm(work, data, max_length, batch_size)


def _tutorial_arm(work: Path, data: Path, max_length: int, batch_size: int) -> dict:
    """The tutorials' recipe: prompt + answer as one text, padded to max_length, pad = eos, LM collator."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,
    )

    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    tokenizer.pad_token = tokenizer.eos_token  # what the tutorials do
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    texts = [f"### Instruction:\n{r['instruction']}\n{r['input']}\n\n### Response:\n{r['output']}{tokenizer.eos_token}"
             for r in rows]
    encoded = [tokenizer(t, max_length=max_length, padding="max_length", truncation=True) for t in texts]
    real = sum(sum(e["attention_mask"]) for e in encoded)
    model = AutoModelForCausalLM.from_pretrained(work / "base")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    args = TrainingArguments(output_dir=str(work / "tutorial"), per_device_train_batch_size=batch_size, num_train_epochs=1,
                             learning_rate=1e-4, logging_steps=1000, report_to=[], save_strategy="no", use_cpu=True,
                             disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=encoded,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    started = time.time()
    trainer.train()
    runtime = time.time() - started
    computed = len(encoded) * max_length
    # The LM collator sets label -100 wherever input == pad (= eos): every EOS goes unsupervised, prompts are trained.
    supervised = sum(sum(1 for t in e["input_ids"] if t != tokenizer.pad_token_id) for e in encoded)
    del torch
    return _figures("tutorial_pad_to_max", runtime, runtime, computed, real, supervised)


def _figures(arm, runtime, wall, computed, real, supervised) -> dict:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "arm": arm,
        "train_seconds": round(runtime, 2),
        "computed_tokens": computed,
        "real_tokens": real,
        "supervised_tokens": supervised,
        "padding_share": round(1 - real / computed, 4) if computed else None,
        "tokens_per_s_computed": round(computed / runtime, 1) if computed else None,
        "tokens_per_s_real": round(real / runtime, 1) if real else None,
        "tokens_per_s_supervised": round(supervised / runtime, 1) if supervised else None,
        "peak_rss_mb": round(peak_kb / 1024, 1),
    }


def prepare(work: Path, samples: int) -> None:
    """Write the data and a shared base model (tokenizer trained on the stdlib docs)."""
    from tuneforge.config.schema import FromConfig
    from tuneforge.data.builtin import pretrain_documents
    from tuneforge.models import build_model, train_tokenizer

    records = alpaca_like(samples)
    (work / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = train_tokenizer(pretrain_documents(), vocab_size=MODEL["vocab_size"])
    import torch

    torch.manual_seed(0)
    model = build_model(FromConfig(**MODEL), tokenizer)
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, Path(args.work), args.samples, args.max_length, args.batch_size)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.samples)
        arms = {}
        for arm in ("tutorial_pad_to_max", "tuneforge_packed"):
            out = subprocess.run(
                [sys.executable, __file__, "--arm", arm, "--work", str(work), "--samples", str(args.samples),
                 "--max-length", str(args.max_length), "--batch-size", str(args.batch_size)],
                check=True, capture_output=True, text=True,
            ).stdout
            arms[arm] = json.loads(out.strip().splitlines()[-1])
    base, ours = arms["tutorial_pad_to_max"], arms["tuneforge_packed"]
    result = {
        "model": MODEL,
        "samples": args.samples,
        "max_length": args.max_length,
        "batch_size": args.batch_size,
        "arms": arms,
        "ratio_real_tokens_per_s": round(ours["tokens_per_s_real"] / base["tokens_per_s_real"], 2),
        "ratio_wall_time": round(base["train_seconds"] / ours["train_seconds"], 2),
        "ratio_peak_rss": round(ours["peak_rss_mb"] / base["peak_rss_mb"], 2),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
