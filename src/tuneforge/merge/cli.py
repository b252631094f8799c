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
    p.add_argument("--out", required=True, help="output model directory (replaced atomically)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed max |logit| difference, adapter vs merged (default 1e-3 for fp32)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="saved precision (LoRA merge)")
    p.add_argument("--base", default=None, help="base model directory to merge into (default: the adapter's own)")
    p.add_argument("--max-shard-size", default="2GB", help="recipe merges: largest safetensors file")
    p.set_defaults(func=merge_command)

    p = sub.add_parser("export", help="int8/int4 weight-only quantized export with its perplexity delta")
    p.add_argument("source", metavar="RUN_OR_MODEL")
    p.add_argument("--quantize", required=True, choices=["int8", "int4"])
    p.add_argument("--out", required=True, help="output model directory (replaced atomically)")
    p.add_argument("--data", default=None,
                   help="text for the perplexity check (.txt paragraphs or .jsonl with text); default: stdlib docs")
    p.set_defaults(func=export_command)


def is_recipe(path: str) -> bool:
    """A merge argument is a recipe when it is a .yaml/.yml file."""
    return Path(path).suffix in (".yaml", ".yml") and Path(path).is_file()


def merge_command(args: argparse.Namespace) -> int:
    if is_recipe(args.source):
        from tuneforge.merge.recipe import merge_recipe

        merge_recipe(args.source, args.out, max_shard_size=args.max_shard_size)
        return 0
    from tuneforge.merge.lora import merge_lora

    merge_lora(args.source, args.out, tolerance=args.tolerance, dtype=args.dtype, base=args.base)
    return 0


def export_command(args: argparse.Namespace) -> int:
    from tuneforge.merge.export import export_model

    export_model(args.source, args.out, quantize=args.quantize, data=args.data)
    return 0
