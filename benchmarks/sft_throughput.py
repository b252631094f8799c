"""SFT throughput and MFU: the tutorial recipe, tuneforge, a hand-written PyTorch loop, and the matmul peak.

Arms (same from-config Llama of ~17M parameters, same tokenizer, LoRA r=8 on q/v, Alpaca-like samples):

- ``tutorial_pad_to_max``: prompt + answer as one text padded to ``max_length``, pad = eos, LM collator, HF
  Trainer, fp32 (what the tutorials run on a CPU);
- ``tuneforge_packed``: ``run_training`` (answer-only masks, first-fit packing into rows of ``max_length``);
- ``plain_loop_packed``: the very rows tuneforge trains on, in a minimal hand-written loop (``model(**batch)``,
  ``backward``, grad-norm clip, AdamW, cosine schedule; no Trainer, no callbacks, no collator object);
- ``matmul_peak``: GFLOP/s of a large square matmul in fp32 and bf16 (the machine's ceiling for each dtype).

Other processes share this machine's cores, so the arms run *interleaved*: every round runs each arm once (a
subprocess per arm, so peak RSS is per arm; the order rotates between rounds), and the table shows the median of
the rounds plus tuneforge's per-round ratio to the plain loop. MFU = achieved FLOP/s / the peak of the arm's own
dtype measured in the same run; FLOPs per token are 4N for a frozen base with adapters (forward 2N + input
gradients 2N; N = the weights of every matmul, LM head included, embeddings excluded), 6N for trained weights (the
adapters), plus attention 12·L·d·T (PaLM's count: the T×T scores and their weighted sum, forward and backward, over
the row width T that is actually computed).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/sft_throughput.py [--rounds 3] [--samples 256] [--precision auto]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# The anchor model: ~16.8M parameters (4 layers × 3.2M + an 8192 × 512 tied embedding / LM head).
MODEL = {"architecture": "llama", "hidden_size": 512, "num_layers": 4, "num_heads": 8, "vocab_size": 8192}
LORA = {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}
ARMS = ("tutorial_pad_to_max", "tuneforge_packed", "plain_loop_packed", "matmul_peak")
THREADS = 2


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


# ----------------------------------------------------------------------------- arms (each in its own process)


def run_arm(arm: str, work: Path, args) -> dict:
    """Run one arm in this process; return its figures."""
    import torch

    torch.set_num_threads(THREADS)
    if arm == "matmul_peak":
        return matmul_peak(args.peak_size)
    if arm == "tuneforge_packed":
        return _tuneforge_arm(work, args)
    if arm == "plain_loop_packed":
        return _plain_loop_arm(work, args)
    return _tutorial_arm(work, args)


def matmul_peak(size: int, seconds: float = 2.0) -> dict:
    """Best GFLOP/s of ``size``² matmuls per dtype over ``seconds`` each (2·n³ FLOPs per product)."""
    import torch

    peaks = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.mm(a, b)  # kernel selection / packing outside the timing
        best = 0.0
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - t0) / 1e9)
        peaks[name] = round(best, 1)
    return {"arm": "matmul_peak", "size": size, "gflops": peaks}


def _run_config(work: Path, args, name: str) -> dict:
    return {
        "seed": 0,
        "stage": "sft",
        "run_name": name,
        "output_dir": str(work / name),
        "model": {"name_or_path": str(work / "base"), "chat_template": "alpaca", "precision": args.precision},
        "method": {"name": "lora", **LORA},
        "data": {"train": [str(work / "alpaca.jsonl")], "format": "alpaca", "max_length": args.max_length,
                 "clean": {"dedup": False}, "packing": True},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 1e-4, "logging_steps": 1000,
                  "report_to": ["none"], "monitor": {"enabled": False}, **json.loads(args.train_overrides)},
    }


def _tuneforge_arm(work: Path, args) -> dict:
    from tuneforge.config import validate_config
    from tuneforge.train.loss import resolve_loss_chunk
    from tuneforge.train.run import run_training

    cfg = validate_config(_run_config(work, args, "tuneforge"))
    clock = _CpuClock()
    result = run_training(cfg, overwrite=True, echo=lambda *_: None, callbacks=[clock.callback(), clock.steps()])
    stats = result.summary["data"]
    model = result.model
    computed = round(stats["tokens"] / (1 - stats["padding_share"]))
    # train.loss_chunk (auto by default) runs the LM head on supervised positions only
    head_share = stats["supervised_tokens"] / computed if resolve_loss_chunk(cfg, model) else 1.0
    return _figures("tuneforge_packed", result.summary["runtime_s"], computed, stats["tokens"],
                    stats["supervised_tokens"], model, args.max_length, clock.seconds, head_share,
                    steady=clock.steady(args.warmup_steps))


class _CpuClock:
    """CPU seconds (user + system, all threads) of this process between train begin and end.

    Under load from other processes wall time stretches with the share of the cores this process gets; CPU time
    counts only the work done (OpenMP spin-waits included), so tokens per CPU-second is the steadier comparison.
    """

    def __init__(self):
        self.seconds = None
        self._start = None
        self.per_step: list[tuple[float, int]] = []  # (wall seconds, real tokens) of each optimizer step

    def steady(self, warmup: int) -> float | None:
        """Real tokens/s over the steps after the first ``warmup`` (compilation, allocator and cache warm-up)."""
        rest = self.per_step[warmup:]
        return round(sum(t for _, t in rest) / sum(s for s, _ in rest), 1) if rest else None

    def steps(self):
        """A Trainer callback filling :attr:`per_step` (tokens from ``num_input_tokens_seen``, padding excluded)."""
        from transformers import TrainerCallback

        clock = self

        class Steps(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                self.began, self.seen = time.perf_counter(), state.num_input_tokens_seen

            def on_step_end(self, args, state, control, **kwargs):
                clock.per_step.append((time.perf_counter() - self.began, state.num_input_tokens_seen - self.seen))

        return Steps()

    def start(self):
        self._start = time.process_time()

    def stop(self):
        self.seconds = time.process_time() - self._start

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Clock(TrainerCallback):
            def on_train_begin(self, *args, **kwargs):
                clock.start()

            def on_train_end(self, *args, **kwargs):
                clock.stop()

        return Clock()


def packed_rows(work: Path, args):
    """The rows tuneforge trains on (same config, same builder), the tokenizer and the dtype it resolves."""
    from transformers import AutoTokenizer

    from tuneforge.config import validate_config
    from tuneforge.data.build import build_datasets
    from tuneforge.data.templates import resolve_template
    from tuneforge.models.device import resolve_dtype

    cfg = validate_config(_run_config(work, args, "plain"))
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    template = resolve_template("alpaca", tokenizer, {}, cfg.data.system_message)
    bundle = build_datasets(cfg.data, "sft", tokenizer, template, seed=0, packing=True, batch_size=args.batch_size)
    return bundle, tokenizer, resolve_dtype(args.precision, "cpu")


def _plain_loop_arm(work: Path, args) -> dict:
    """The same rows and model in a hand-written loop: the framework-free reference for tuneforge's speed."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    bundle, tokenizer, dtype = packed_rows(work, args)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(work / "base", dtype=dtype)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules=LORA["target_modules"]))
    model.train()
    rows = bundle.train
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps = math.ceil(len(rows) / args.batch_size)

    clock = _CpuClock()
    started = time.time()
    clock.start()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    order = torch.randperm(len(rows)).tolist()
    for step in range(steps):
        began = time.perf_counter()
        batch = [rows[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        width = max(len(r["input_ids"]) for r in batch)
        fill = [width - len(r["input_ids"]) for r in batch]
        inputs = {
            "input_ids": torch.tensor([r["input_ids"] + [pad] * f for r, f in zip(batch, fill, strict=True)]),
            "labels": torch.tensor([r["labels"] + [-100] * f for r, f in zip(batch, fill, strict=True)]),
            "position_ids": torch.tensor([r["position_ids"] + list(range(f)) for r, f in zip(batch, fill, strict=True)]),
        }
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        clock.per_step.append((time.perf_counter() - began, sum(len(r["input_ids"]) for r in batch)))
    clock.stop()
    runtime = time.time() - started
    stats = bundle.stats
    computed = round(stats["tokens"] / (1 - stats["padding_share"]))
    figures = _figures("plain_loop_packed", runtime, computed, stats["tokens"], stats["supervised_tokens"], model,
                       args.max_length, clock.seconds, steady=clock.steady(args.warmup_steps))
    figures["last_loss"] = round(float(loss), 4)
    return figures


def _tutorial_arm(work: Path, args) -> dict:
    """The tutorials' recipe: prompt + answer as one text, padded to max_length, pad = eos, LM collator."""
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
    rows = [json.loads(line) for line in (work / "alpaca.jsonl").read_text().splitlines()][: args.tutorial_samples]
    texts = [f"### Instruction:\n{r['instruction']}\n{r['input']}\n\n### Response:\n{r['output']}{tokenizer.eos_token}"
             for r in rows]
    encoded = [tokenizer(t, max_length=args.max_length, padding="max_length", truncation=True) for t in texts]
    real = sum(sum(e["attention_mask"]) for e in encoded)
    model = AutoModelForCausalLM.from_pretrained(work / "base")
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules=LORA["target_modules"]))
    targs = TrainingArguments(output_dir=str(work / "tutorial"), per_device_train_batch_size=args.batch_size,
                              num_train_epochs=1, learning_rate=1e-4, logging_steps=1000, report_to=[],
                              save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=targs, train_dataset=encoded,
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    clock = _CpuClock()
    trainer.add_callback(clock.callback())
    started = time.time()
    trainer.train()
    runtime = time.time() - started
    computed = len(encoded) * args.max_length
    # The LM collator sets label -100 wherever input == pad (= eos): every EOS goes unsupervised, prompts are trained.
    supervised = sum(sum(1 for t in e["input_ids"] if t != tokenizer.pad_token_id) for e in encoded)
    return _figures("tutorial_pad_to_max", runtime, computed, real, supervised, model, args.max_length,
                    clock.seconds)


def flops_per_token(model, row_width: int, head_share: float = 1.0) -> dict:
    """Training FLOPs per computed token of ``model`` (a PeftModel or a plain model) at ``row_width``.

    Frozen matmul weights cost 4 FLOPs per weight and token (forward, input gradient), trained ones 6 (plus the
    weight gradient); attention adds 12·L·d·T. Embedding lookups are not matmuls and are not counted; a tied LM
    head is counted once as the matmul it is. ``head_share``: the share of computed positions whose LM-head
    matmul the arm runs (1 for full logits; the supervised share under ``train.loss_chunk``, which computes logits
    for supervised positions only) — FLOPs the arm does not execute are not counted; recomputation (a second head
    forward when the chunk is smaller than the supervised positions) is not counted either, as in PaLM's MFU.
    """
    import torch

    frozen = trained = 0
    seen = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            if module.weight.requires_grad:
                trained += module.weight.numel()
            else:
                frozen += module.weight.numel()
    config = model.config
    attention = 12 * config.num_hidden_layers * config.hidden_size * row_width
    head = model.get_output_embeddings().weight
    skipped = (1 - head_share) * (6 if head.requires_grad else 4) * head.numel()
    return {"frozen_matmul_params": frozen, "trained_matmul_params": trained, "lm_head_share": round(head_share, 4),
            "flops_per_token": round(4 * frozen + 6 * trained + attention - skipped),
            "attention_flops_per_token": attention}


def _figures(arm, runtime, computed, real, supervised, model, row_width, cpu_seconds, head_share=1.0,
             steady=None) -> dict:
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dtype = next(p.dtype for p in model.parameters() if not p.requires_grad)
    return {
        "arm": arm,
        "dtype": {"torch.float32": "fp32", "torch.bfloat16": "bf16"}.get(str(dtype), str(dtype)),
        "train_seconds": round(runtime, 2),
        "cpu_seconds": round(cpu_seconds, 2),
        "real_tokens_per_cpu_s": round(real / cpu_seconds, 1),
        "computed_tokens": computed,
        "real_tokens": real,
        "supervised_tokens": supervised,
        "padding_share": round(1 - real / computed, 4) if computed else None,
        "tokens_per_s_computed": round(computed / runtime, 1),
        "tokens_per_s_real": round(real / runtime, 1),
        "tokens_per_s_supervised": round(supervised / runtime, 1),
        "steady_tokens_per_s_real": steady,
        "peak_rss_mb": round(peak_kb / 1024, 1),
        **flops_per_token(model, row_width, head_share),
    }


# ----------------------------------------------------------------------------- driver


def prepare(work: Path, samples: int) -> None:
    """Write the data and a shared base model (tokenizer trained on the stdlib docs)."""
    import torch

    from tuneforge.config.schema import FromConfig
    from tuneforge.data.builtin import pretrain_documents
    from tuneforge.models import build_model, train_tokenizer

    records = alpaca_like(samples)
    (work / "alpaca.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    tokenizer = train_tokenizer(pretrain_documents(), vocab_size=MODEL["vocab_size"])
    torch.manual_seed(0)
    model = build_model(FromConfig(**MODEL), tokenizer)
    model.save_pretrained(work / "base")
    tokenizer.save_pretrained(work / "base")


def summarise(rounds: list[dict]) -> dict:
    """Median figures per arm, MFU against the same run's peak, tuneforge's ratio to the plain loop per round."""
    peaks = [r["matmul_peak"]["gflops"] for r in rounds if "matmul_peak" in r]
    peak = {d: round(max(p[d] for p in peaks), 1) for d in ("fp32", "bf16")} if peaks else {}
    arms = {}
    for name in ARMS[:3]:
        runs = [r[name] for r in rounds if name in r]
        if not runs:
            continue
        first = runs[0]
        rate = statistics.median(r["tokens_per_s_computed"] for r in runs)
        achieved = rate * first["flops_per_token"] / 1e9
        per_cpu_s = statistics.median(r["real_tokens_per_cpu_s"] for r in runs)
        # computed tokens per CPU-second × threads: the rate had the process had its cores to itself
        cpu_rate = statistics.median(r["computed_tokens"] / r["cpu_seconds"] for r in runs) * THREADS
        arms[name] = {
            "dtype": first["dtype"],
            "tokens_per_s_real": statistics.median(r["tokens_per_s_real"] for r in runs),
            "tokens_per_s_computed": rate,
            "padding_share": first["padding_share"],
            "flops_per_token": first["flops_per_token"],
            "achieved_gflops": round(achieved, 1),
            "mfu": round(achieved / peak[first["dtype"]], 3) if first["dtype"] in peak else None,
            "real_tokens_per_cpu_s": per_cpu_s,
            "mfu_cpu_time": (round(cpu_rate * first["flops_per_token"] / 1e9 / peak[first["dtype"]], 3)
                             if first["dtype"] in peak else None),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
            "per_round_tokens_per_s_real": [r["tokens_per_s_real"] for r in runs],
        }
        steady = [r["steady_tokens_per_s_real"] for r in runs if r.get("steady_tokens_per_s_real")]
        if steady:  # after the warm-up steps: computed rate = real / (1 - padding share)
            rate_steady = statistics.median(steady) / (1 - first["padding_share"])
            achieved_steady = rate_steady * first["flops_per_token"] / 1e9
            arms[name].update(steady_tokens_per_s_real=statistics.median(steady),
                              steady_mfu=round(achieved_steady / peak[first["dtype"]], 3) if first["dtype"] in peak
                              else None)
    ratios = [r["tuneforge_packed"]["tokens_per_s_real"] / r["plain_loop_packed"]["tokens_per_s_real"]
              for r in rounds if "tuneforge_packed" in r and "plain_loop_packed" in r]
    cpu_ratios = [r["tuneforge_packed"]["real_tokens_per_cpu_s"] / r["plain_loop_packed"]["real_tokens_per_cpu_s"]
                  for r in rounds if "tuneforge_packed" in r and "plain_loop_packed" in r]
    steady_ratios = [r["tuneforge_packed"]["steady_tokens_per_s_real"] / r["plain_loop_packed"]["steady_tokens_per_s_real"]
                     for r in rounds if r.get("tuneforge_packed", {}).get("steady_tokens_per_s_real")
                     and r.get("plain_loop_packed", {}).get("steady_tokens_per_s_real")]
    out = {"matmul_peak_gflops": peak, "arms": arms,
           "tuneforge_vs_plain_loop_steady_per_round": [round(x, 3) for x in steady_ratios],
           "tuneforge_vs_plain_loop_per_round": [round(x, 3) for x in ratios],
           "tuneforge_vs_plain_loop_median": round(statistics.median(ratios), 3) if ratios else None,
           "tuneforge_vs_plain_loop_cpu_time_per_round": [round(x, 3) for x in cpu_ratios],
           "tuneforge_vs_plain_loop_cpu_time_median": round(statistics.median(cpu_ratios), 3) if cpu_ratios else None}
    if "tutorial_pad_to_max" in arms and "tuneforge_packed" in arms:
        out["tuneforge_vs_tutorial_real_tokens"] = round(
            arms["tuneforge_packed"]["tokens_per_s_real"] / arms["tutorial_pad_to_max"]["tokens_per_s_real"], 2)
    return out


def table(summary: dict) -> str:
    """The summary as a Markdown table."""
    lines = ["| arm | dtype | real tok/s | computed tok/s | padding | GFLOP/s | MFU | real tok/CPU-s | MFU by CPU time "
             "| steady real tok/s | steady MFU | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in summary["arms"].items():
        mfu = _pct(a["mfu"])
        lines.append(f"| {name} | {a['dtype']} | {a['tokens_per_s_real']:,.0f} | {a['tokens_per_s_computed']:,.0f} | "
                     f"{100 * a['padding_share']:.0f}% | {a['achieved_gflops']:.0f} | {mfu} | "
                     f"{a['real_tokens_per_cpu_s']:,.0f} | {_pct(a['mfu_cpu_time'])} | "
                     f"{a.get('steady_tokens_per_s_real') or 0:,.0f} | {_pct(a.get('steady_mfu'))} | "
                     f"{a['peak_rss_mb']:.0f} |")
    for dtype, value in summary["matmul_peak_gflops"].items():
        lines.append(f"| matmul_peak | {dtype} | | | | {value:.0f} | 100% | | | | | |")
    lines.append(f"\ntuneforge / plain loop (real tokens/s, per round): {summary['tuneforge_vs_plain_loop_per_round']}"
                 f" → median {summary['tuneforge_vs_plain_loop_median']}; by CPU time: "
                 f"{summary['tuneforge_vs_plain_loop_cpu_time_per_round']} → median "
                 f"{summary['tuneforge_vs_plain_loop_cpu_time_median']}; steady (after the warm-up steps): "
                 f"{summary['tuneforge_vs_plain_loop_steady_per_round']}")
    return "\n".join(lines)


def _pct(value) -> str:
    return f"{100 * value:.0f}%" if value is not None else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=256)
    parser.add_argument("--tutorial-samples", type=int, default=64,
                        help="the pad-to-max arm computes 9x the tokens; its rate does not depend on the count")
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", default="auto", help="model.precision of tuneforge and the plain loop")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--peak-size", type=int, default=2048)
    parser.add_argument("--train-overrides", default="{}", help="JSON merged into tuneforge's train section")
    parser.add_argument("--warmup-steps", type=int, default=3,
                        help="steps left out of the steady figures (torch.compile, allocator and cache warm-up)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        print(json.dumps(run_arm(args.arm, Path(args.work), args)))
        return
    chosen = [a for a in ARMS if a in args.arms.split(",")]
    passthrough = ["--samples", str(args.samples), "--tutorial-samples", str(args.tutorial_samples),
                   "--max-length", str(args.max_length), "--batch-size", str(args.batch_size),
                   "--precision", args.precision, "--peak-size", str(args.peak_size),
                   "--train-overrides", args.train_overrides, "--warmup-steps", str(args.warmup_steps)]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        prepare(work, args.samples)
        for i in range(args.rounds):
            order = chosen[i % len(chosen):] + chosen[:i % len(chosen)]  # rotate: no arm always runs first
            results = {}
            for arm in order:
                out = subprocess.run([sys.executable, __file__, "--arm", arm, "--work", str(work), *passthrough],
                                     check=True, capture_output=True, text=True).stdout
                results[arm] = json.loads(out.strip().splitlines()[-1])
                print(f"round {i + 1}/{args.rounds} {arm}: "
                      f"{results[arm].get('tokens_per_s_real', results[arm].get('gflops'))}", file=sys.stderr)
            rounds.append(results)
    summary = summarise(rounds)
    result = {"model": MODEL, "lora": LORA, "samples": args.samples, "max_length": args.max_length,
              "batch_size": args.batch_size, "precision": args.precision, "threads": THREADS,
              "train_overrides": json.loads(args.train_overrides), "summary": summary, "rounds": rounds}
    print(json.dumps(result, indent=2))
    print(table(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
