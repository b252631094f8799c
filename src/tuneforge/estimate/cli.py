"""``tuneforge estimate``: the memory bill of a training setup, and which setup fits a budget.

Light module: torch/transformers are imported inside the command.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tuneforge.errors import UserError

#: CLI defaults, applied after a run config (if any) has filled in its own values
DEFAULTS = {"method": "lora", "r": 16, "batch_size": 2, "seq_len": 2048, "optim": "adamw",
            "grad_accum": 1, "device": "cuda", "target_modules": "all-linear", "lora_dropout": 0.05}


def add_commands(subparsers) -> None:
    """Register ``estimate``."""
    p = subparsers.add_parser(
        "estimate", help="memory bill of a training setup; --recommend picks one that fits",
        description="Estimate the peak memory of fine-tuning MODEL_OR_CONFIG (a hub id, a local model directory, a "
                    "built-in model name, or a run config .yaml) without downloading weights.",
    )
    p.add_argument("source", metavar="MODEL_OR_CONFIG")
    from tuneforge.methods import priced_methods

    p.add_argument("--method", choices=priced_methods())
    p.add_argument("--r", type=int, help="LoRA rank (default 16)")
    p.add_argument("--target-modules", help="attention | mlp | all-linear | comma-separated names")
    p.add_argument("--batch-size", type=int, help="micro-batch (default 2)")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default 2048)")
    p.add_argument("--grad-accum", type=int, help="gradient accumulation steps (default 1)")
    p.add_argument("--grad-checkpointing", action="store_true", default=None)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="default bf16 (fp32 with --device cpu)")
    p.add_argument("--optim", choices=["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"])
    p.add_argument("--galore-rank", type=int, help="GaLore projection rank (default 128)")
    p.add_argument("--loss-chunk", type=_loss_chunk, metavar="N|auto|off",
                   help="train.loss_chunk: logits of supervised positions only, N at a time; auto (training's "
                        "default): chunks of <= 256 MiB of logits; off: the model's own loss over every position")
    p.add_argument("--device", choices=["cuda", "cpu"], help="cuda bills the CUDA context (default cuda)")
    p.add_argument("--gpus", type=int, help="data-parallel GPUs: the bill is per GPU (default 1)")
    p.add_argument("--strategy", choices=["ddp", "fsdp", "zero1", "zero2", "zero3"],
                   help="how the state is spread over --gpus (default ddp, or the run config's distributed:)")
    p.add_argument("--gpu-mem", type=float, help="memory budget in GiB: says whether the setup fits")
    p.add_argument("--recommend", action="store_true", help="choose method, rank, batch, accumulation, checkpointing")
    p.add_argument("--target-batch", type=int, help="effective batch for --recommend (default 16, the guide's)")
    p.add_argument("--margin", type=float, default=0.10, help="safety margin of the budget (default 0.10)")
    p.add_argument("--phase", choices=["train", "merge", "export", "eval", "serve"], default="train",
                   help="which phase to bill: training (default), the LoRA merge, an export (--quantize), evaluation "
                        "(--batch-size x --seq-len) or serving (--token-budget)")
    p.add_argument("--quantize", default="q8_0", help="--phase export: int8 | int4 | f16 | bf16 | q8_0 | q4_0")
    p.add_argument("--token-budget", type=int, default=32768, help="--phase serve: KV cache budget in tokens")
    p.add_argument("--generation", action="store_true",
                   help="--phase eval: generating (--seq-len = prompt + new tokens) instead of scoring (perplexity)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_estimate)


def _settings(args) -> tuple[object, dict, dict]:
    """(model source, Setup kwargs, run-config extras) from the flags and, for a .yaml source, the run config."""
    from dataclasses import asdict

    values: dict = {}
    extras: dict = {}
    source: object = args.source
    if Path(args.source).suffix in (".yaml", ".yml"):
        from tuneforge.config.load import load_config
        from tuneforge.estimate.choose import setup_from_run

        cfg = load_config(args.source)
        extras["budget_gb"] = cfg.train.memory_budget_gb
        extras["target_batch"] = cfg.train.batch_size * cfg.train.grad_accum
        if cfg.method.name == "auto":
            extras["auto"] = True
            source = cfg.model.name_or_path or cfg.model.from_config
            values.update(seq_len=cfg.data.max_length, batch_size=cfg.train.batch_size,
                          grad_accum=cfg.train.grad_accum)
        else:
            source, setup = setup_from_run(cfg)
            values.update(asdict(setup))
            values["strategy"] = strategy_of(cfg.distributed)
    flags = {"method": args.method, "r": args.r, "batch_size": args.batch_size, "seq_len": args.seq_len,
             "grad_accum": args.grad_accum, "gradient_checkpointing": args.grad_checkpointing,
             "precision": args.precision, "optim": args.optim, "galore_rank": args.galore_rank,
             "device": args.device, "loss_chunk": args.loss_chunk}
    flags.update(gpus=args.gpus, strategy=args.strategy)
    if args.target_modules:
        names = [n.strip() for n in args.target_modules.split(",") if n.strip()]
        flags["target_modules"] = names[0] if len(names) == 1 and names[0] in ("attention", "mlp", "all-linear") \
            else names
    values.update({k: v for k, v in flags.items() if v is not None})
    for key, default in DEFAULTS.items():
        values.setdefault(key, default)
    # CPUs without native bf16 train in fp32 (ENVIRONMENT.md); GPUs in bf16.
    values.setdefault("precision", "fp32" if values["device"] == "cpu" else "bf16")
    return source, values, extras


def strategy_of(section) -> str:
    """The estimator's strategy name for a run config's ``distributed:`` section."""
    if section.strategy == "deepspeed":
        return f"zero{section.deepspeed.zero_stage}"
    if section.strategy == "fsdp":
        return "fsdp" if section.fsdp.sharding != "shard_grad_op" else "zero2"  # SHARD_GRAD_OP shards as ZeRO-2
    return "ddp"


def _loss_chunk(text: str) -> int | str:
    """``--loss-chunk`` values: a positive count, ``auto`` or ``off``."""
    if text in ("auto", "off"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a number of positions, auto or off") from None


def run_estimate(args) -> int:
    from tuneforge.estimate.bill import GiB, Setup, estimate_memory
    from tuneforge.estimate.choose import DEFAULT_TARGET_BATCH, recommend
    from tuneforge.estimate.spec import model_spec

    source, values, extras = _settings(args)
    if args.margin < 0 or args.margin >= 1:
        raise UserError(f"--margin {args.margin}: expected a fraction in [0, 1)")
    for key in ("r", "batch_size", "seq_len", "grad_accum", "target_batch", "loss_chunk"):
        value = values.get(key) if key != "target_batch" else args.target_batch
        if isinstance(value, int) and value <= 0:
            raise UserError(f"--{key.replace('_', '-')} must be positive (got {value})")
    spec = model_spec(source)
    if args.phase != "train":
        return _print_phase(spec, args)
    budget = args.gpu_mem if args.gpu_mem is not None else extras.get("budget_gb")
    if args.recommend or extras.get("auto"):
        if budget is None:
            raise UserError("--recommend needs a budget: give --gpu-mem GiB (or train.memory_budget_gb in the config)")
        target = args.target_batch or extras.get("target_batch") or DEFAULT_TARGET_BATCH
        rec = recommend(spec, budget, seq_len=values["seq_len"], target_batch=target, device=values["device"],
                        precision=args.precision, r=args.r, margin=args.margin,
                        target_modules=values["target_modules"])
        if args.json:
            print(json.dumps(rec.to_json(), default=str))
        else:
            _print_bill(rec.bill, budget, args.margin)
            from tuneforge.console import out as console_out

            console = console_out()
            console.print(f"\n[bold]Recommendation[/bold]: method: {rec.method_section()}  train: {rec.train_overrides()}")
            console.print(rec.explanation)
        return 0
    setup = Setup(**{k: v for k, v in values.items() if k in Setup.__dataclass_fields__})
    bill = estimate_memory(spec, setup)
    if args.json:
        data = bill.to_json()
        if budget is not None:
            data["budget_bytes"] = int(budget * GiB)
            data["fits"] = bill.total_bytes <= budget * GiB * (1 - args.margin)
        print(json.dumps(data, default=str))
    else:
        _print_bill(bill, budget, args.margin)
    return 0


LABELS = {
    "weights": "weights", "master_weights": "fp32 master weights", "gradients": "gradients",
    "optimizer": "optimizer states", "activations": "activations", "logits": "logits (fp32, loss)",
    "temporaries": "temporaries", "framework": "framework (CUDA context)",
    "overlap": "overlap (not resident at the peak)", "distributed": "distributed buffers (buckets, gathered)",
}


def _display_name(model: str) -> str:
    """The model's name for a table title: a local path's last component (a long path wraps the title over lines and
    its tail is the part that tells models apart); hub ids and built-in names as they are."""
    path = Path(model)
    return path.name if len(path.parts) > 2 or path.is_absolute() else model


def _print_bill(bill, budget_gb: float | None, margin: float) -> None:
    from rich.table import Table

    from tuneforge.console import out as console_out
    from tuneforge.estimate.bill import GiB
    from tuneforge.methods import method_class

    s = bill.setup
    title = (f"{_display_name(bill.model)}: {s['method']}"
             + (f" r={s['r']}" if method_class(s["method"]).is_adapter else "")
             + f", batch {s['batch_size']} x seq {s['seq_len']}, {s['precision']}, {s['optim']}"
             + (", grad checkpointing" if s["gradient_checkpointing"] else "")
             + (f", accum {s['grad_accum']}" if s["grad_accum"] > 1 else "")
             + (f", per GPU of {s['gpus']} ({s['strategy']})" if s.get("gpus", 1) > 1 else ""))
    table = Table(title=title)
    table.add_column("component")
    table.add_column("GiB", justify="right")
    table.add_column("share", justify="right")
    for name, value in bill.components.items():
        if value == 0:
            continue
        table.add_row(LABELS.get(name, name), f"{value / GiB:.3f}", f"{100 * value / bill.total_bytes:.0f}%")
    table.add_row("[bold]peak[/bold]", f"[bold]{bill.total_bytes / GiB:.3f}[/bold]", "100%")
    console = console_out()
    console.print(table)
    console.print(f"parameters: {bill.total_params:,} total, {bill.trainable_params:,} trainable "
                  f"({100 * bill.trainable_params / max(bill.total_params, 1):.2f}%)")
    for note in bill.notes:
        console.print(f"  {note}")
    if budget_gb is not None:
        usable = budget_gb * GiB * (1 - margin)
        if bill.total_bytes <= usable:
            console.print(f"[green]fits[/green] in {budget_gb:g} GiB with a {margin:.0%} margin "
                          f"({(usable - bill.total_bytes) / GiB:.2f} GiB to spare)")
        else:
            console.print(f"[red]does not fit[/red] in {budget_gb:g} GiB with a {margin:.0%} margin: "
                          f"{(bill.total_bytes - usable) / GiB:.2f} GiB over; try --recommend")


def _print_phase(spec, args) -> int:
    """``estimate --phase merge|export|eval|serve``: the phase's bill, as a table or one JSON object."""
    from rich.table import Table

    from tuneforge.console import out as console_out
    from tuneforge.estimate.bill import GiB
    from tuneforge.estimate.phases import phase_bill

    bill = phase_bill(spec, args.phase, precision=args.precision or "fp32", r=args.r or DEFAULTS["r"],
                      quantize=args.quantize, batch_size=args.batch_size or 8, seq_len=args.seq_len or 2048,
                      token_budget=args.token_budget, generation=args.generation)
    if args.json:
        data = bill.to_json()
        if args.gpu_mem is not None:
            data["fits"] = bill.total_bytes <= args.gpu_mem * GiB * (1 - args.margin)
        print(json.dumps(data))
        return 0
    table = Table(title=f"{_display_name(bill.model)}: {args.phase}")
    table.add_column("component")
    table.add_column("GiB", justify="right")
    for name, value in bill.components.items():
        table.add_row(name, f"{value / GiB:.3f}")
    table.add_row("peak", f"{bill.total_bytes / GiB:.3f}")
    console = console_out()
    console.print(table)
    for note in bill.notes:
        console.print(f"  {note}", markup=False)
    if args.gpu_mem is not None:
        fits = bill.total_bytes <= args.gpu_mem * GiB * (1 - args.margin)
        console.print(f"{'fits' if fits else 'does not fit'} in {args.gpu_mem:g} GiB with a {args.margin:.0%} margin")
    return 0


# argparse type hint for tests/tools that build the parser alone
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge")
    add_commands(parser.add_subparsers())
    return parser
