"""Commands: merge (LoRA into its base, or a mergekit-style recipe), export (int8/int4). Light module."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this group's subcommands."""
    p = sub.add_parser(
        "merge",
        help="fold a run's LoRA adapter into its base, or merge several models from a YAML recipe",
        description="RUN_OR_ADAPTER: the adapter is merged into its base and checked against adapter inference. "
        "RECIPE.yaml: mergekit-format recipe (merge_method: linear | slerp | ties | dare_ties | dare_linear | "
        "task_arithmetic).",
    )
    p.add_argument("source", metavar="RUN_OR_ADAPTER_OR_RECIPE")
    p.add_argument("--out", required=True,
                   help="new output model directory (never an input or a directory holding one; written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed max |logit| difference, adapter vs merged (default 1e-3 for fp32)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="saved precision (LoRA merge)")
    p.add_argument("--base", default=None, help="base model directory to merge into (default: the adapter's own)")
    p.add_argument("--max-shard-size", default="2GB", help="recipe merges: largest safetensors file")
    p.add_argument("--strategy", default="auto", choices=["auto", "memory", "sharded"],
                   help="LoRA merge: in memory with the logit check, or shard by shard for bases larger than memory "
                        "(auto: in memory when the estimate fits --max-memory)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="LoRA merge: memory budget, e.g. 16GB or 512MiB (default: the RAM available now)")
    p.set_defaults(func=merge_command)

    p = sub.add_parser(
        "export", help="int8/int4 HF export with its perplexity delta, or one GGUF + Ollama Modelfile (--format gguf)",
        description="--format hf (default): bitsandbytes int8/int4 weight-only HF directory, its perplexity delta "
        "measured. --format gguf: merge the adapter, write one GGUF (f16 | bf16 | q8_0 | q4_0; llama and qwen2 "
        "families) with the run's tokenizer and chat template, an Ollama Modelfile and a README; kept only when the "
        "file, reloaded through transformers' GGUF loader, tokenizes and answers like the merged model.",
    )
    p.add_argument("source", metavar="RUN_OR_MODEL")
    p.add_argument("--format", default="hf", choices=["hf", "gguf"], help="hf (int8/int4) or gguf")
    p.add_argument("--quantize", required=True, metavar="TYPE",
                   help="hf: int8 | int4; gguf: f16 | bf16 | q8_0 | q4_0")
    p.add_argument("--out", required=True,
                   help="new output model directory (never the source or a directory holding it; written atomically)")
    p.add_argument("--force", action="store_true", help="replace an existing non-empty --out")
    p.add_argument("--data", default=None,
                   help="hf: text for the perplexity check (.txt paragraphs or .jsonl with text); default: stdlib docs")
    p.add_argument("--base", default=None, help="gguf: base model to merge the adapter into (default: its own)")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget, e.g. 16GB or 512MiB (default: the RAM available now); the estimate is printed "
                        "first and an export that does not fit is refused, or for gguf streamed tensor by tensor")
    p.add_argument("--strategy", default="auto", choices=["auto", "memory", "streaming"],
                   help="gguf: in memory with the logit gate, or tensor by tensor with a per-tensor gate for models "
                        "larger than memory (auto: in memory when the estimate fits --max-memory)")
    p.set_defaults(func=export_command)


def is_recipe(path: str) -> bool:
    """A merge argument is a recipe when it is a .yaml/.yml file."""
    return Path(path).suffix in (".yaml", ".yml") and Path(path).is_file()


def merge_inputs(source: str, base: str | None = None) -> list[str]:
    """Every local path a merge reads: the argument, a recipe's models and base, each one's run, adapter and base.

    What cannot be resolved is kept as given (the merge itself reports it); :func:`tuneforge.utils.prepare_output`
    keeps ``--out`` clear of all of them.
    """
    from tuneforge.errors import UserError
    from tuneforge.models.reference import resolve

    given = [source, base]
    if is_recipe(source):
        from tuneforge.merge.recipe import load_recipe

        recipe = load_recipe(source)
        folder = Path(source).parent
        names = [recipe.base_model, *(entry.model for entry in recipe.models)]
        for name in filter(None, names):
            parts = [name, *name.split("+", 1)] if "+" in name else [name]
            given += [candidate for part in parts for candidate in (part, str(folder / part))]
    found: list[str] = []
    for item in filter(None, given):
        found.append(item)
        if not Path(item).exists():
            continue
        try:
            ref = resolve(item)
        except UserError:
            continue
        found += [p for p in (ref.run_dir, ref.adapter, ref.base) if p]
    return found


def merge_command(args: argparse.Namespace) -> int:
    from tuneforge.utils import prepare_output, sigterm_raises

    prepare_output(args.out, merge_inputs(args.source, args.base), force=args.force)
    with sigterm_raises():  # SIGTERM unwinds through the temporary directories' cleanup
        if is_recipe(args.source):
            from tuneforge.merge.recipe import merge_recipe

            merge_recipe(args.source, args.out, max_shard_size=args.max_shard_size)
            return 0
        from tuneforge.merge.lora import merge_lora
        from tuneforge.utils import parse_size

        budget = parse_size(args.max_memory, "--max-memory") if args.max_memory else None
        merge_lora(args.source, args.out, tolerance=args.tolerance, dtype=args.dtype, base=args.base,
                   strategy=args.strategy, max_memory=budget)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from tuneforge.errors import UserError
    from tuneforge.merge.export import QUANTIZE, export_model
    from tuneforge.merge.gguf import QUANT_TYPES
    from tuneforge.utils import sigterm_raises

    allowed = QUANT_TYPES if args.format == "gguf" else QUANTIZE
    if args.quantize not in allowed:
        other = "hf" if args.format == "gguf" else "gguf"
        hint = f" ({args.quantize} is a --format {other} type)" if args.quantize in (QUANTIZE if other == "hf"
                                                                                       else QUANT_TYPES) else ""
        raise UserError(f"--quantize {args.quantize!r} with --format {args.format}: choose one of "
                        f"{', '.join(allowed)}{hint}")
    if args.format == "gguf" and args.data:
        raise UserError("--data is the perplexity text of --format hf; --format gguf gates on its own sample prompts")
    from tuneforge.utils import parse_size

    budget = parse_size(args.max_memory, "--max-memory") if args.max_memory else None
    with sigterm_raises():  # SIGTERM unwinds through the temporary directories' cleanup
        if args.format == "gguf":
            from tuneforge.merge.gguf import export_gguf

            export_gguf(args.source, args.out, quantize=args.quantize, force=args.force, base=args.base,
                        max_memory=budget, strategy=args.strategy)
        else:
            if args.base:
                raise UserError("--base applies to --format gguf only")
            if args.strategy != "auto":
                raise UserError("--strategy applies to --format gguf only (int8/int4 quantize in memory)")
            export_model(args.source, args.out, quantize=args.quantize, data=args.data, force=args.force,
                         max_memory=budget)
    return 0
