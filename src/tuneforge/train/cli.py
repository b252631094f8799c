"""Commands: quickstart, validate, train, generate (light module: heavy imports inside the functions)."""

from __future__ import annotations

import argparse

from tuneforge.models.generation import add_generation_args


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register this group's subcommands."""
    p = sub.add_parser("quickstart", help="offline demo: pretrain a tiny model on the stdlib docs, LoRA-tune it, evaluate")
    p.add_argument("--out", default="runs/quickstart", help="directory for the two runs and their data")
    p.add_argument("--pretrain-steps", type=int, default=None, help="override the pretraining steps")
    p.add_argument("--sft-steps", type=int, default=None, help="override the SFT steps")
    p.add_argument("--small", action="store_true", help="a much smaller, faster variant (for tests; weaker results)")
    p.add_argument("--force", action="store_true", help="write into a non-empty --out no earlier quickstart made "
                   "(files and runs the quickstart did not make are never replaced)")
    p.set_defaults(func=quickstart_command)

    p = sub.add_parser("validate", help="check run configs against the schema (no model is loaded)")
    p.add_argument("configs", nargs="+")
    p.set_defaults(func=validate_command)

    p = sub.add_parser("train", help="train one run from a YAML config")
    p.add_argument("config")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in output_dir (deleted only once the new run has finished)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: continue although stage, model, method or data differ from the run's config")
    launch = p.add_argument_group("several processes (torchrun; docs/distributed.md)")
    launch.add_argument("--nproc", type=int, help="processes on this node (one per GPU); starts torchrun")
    launch.add_argument("--nnodes", type=int, help="nodes in the job (default 1, or SLURM's)")
    launch.add_argument("--node-rank", type=int, help="this node's index, 0..nnodes-1 (default 0, or SLURM's)")
    launch.add_argument("--master-addr", help="node 0's address, as the other nodes reach it (or SLURM's first host)")
    launch.add_argument("--master-port", type=int, help="a free TCP port on node 0 (default 29500)")
    # REMAINDER so that flags may also follow the overrides (`train x.yaml train.lr=1e-4 --resume`).
    p.add_argument("overrides", nargs=argparse.REMAINDER, help="dotted overrides, e.g. train.lr=1e-4 method.r=16")
    p.set_defaults(func=train_command)

    p = sub.add_parser("generate", help="generate with a run's model, adapter, tokenizer and template")
    p.add_argument("model", help="run directory, model directory or hub id")
    p.add_argument("--prompt", action="append", required=True, help="a user message (repeat for several)")
    p.add_argument("--system", default=None)
    p.add_argument("--raw", action="store_true", help="use the prompt as raw text, without the chat template")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="memory budget of the preflight, e.g. 8GB (default: free RAM, or free GPU memory on CUDA): "
                        "the estimate is printed (stderr) before the model loads; stops when it cannot fit")
    add_generation_args(p)
    p.set_defaults(func=generate_command)


def validate_command(args) -> int:
    from tuneforge.config import load_config

    for path in args.configs:
        cfg = load_config(path)
        print(f"{path}: ok ({cfg.stage}, method {cfg.method.name}, output {cfg.output_dir})")
    return 0


LAUNCH_FLAGS = ("--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port")


def train_command(args) -> int:
    from tuneforge.config import load_config
    from tuneforge.errors import UserError
    from tuneforge.train import distributed

    overrides = []
    flags = ("--resume", "--overwrite", "--allow-config-change")
    items = iter(args.overrides)
    for item in items:
        name, _, value = item.partition("=")
        if item in flags:
            setattr(args, item[2:].replace("-", "_"), True)
        elif name in LAUNCH_FLAGS:  # a launch flag after the overrides
            value = value or next(items, None)
            if value is None:
                raise UserError(f"train: {name} needs a value")
            setattr(args, name[2:].replace("-", "_"), value if name == "--master-addr" else _int(name, value))
        elif item.startswith("-"):
            raise UserError(f"train: unknown option {item!r} (options: {', '.join(flags + LAUNCH_FLAGS)})")
        else:
            overrides.append(item)
    cfg = load_config(args.config, overrides)
    launching = any(getattr(args, f[2:].replace("-", "_")) is not None for f in LAUNCH_FLAGS)
    if launching and distributed.world().distributed:
        raise UserError("train: --nproc/--nnodes/--node-rank/--master-addr/--master-port start torchrun; this "
                        "process already is one of torchrun's ranks, so leave them out")
    if launching:
        plan = distributed.plan_launch(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port)
        argv = [args.config, *overrides] + [f for f in flags if getattr(args, f[2:].replace("-", "_"))]
        return distributed.launch(plan, argv, cfg)
    return _train(cfg, args)


def _train(cfg, args) -> int:
    from tuneforge.errors import UserError
    from tuneforge.train import distributed, train

    try:
        train(cfg, resume=args.resume, overwrite=args.overwrite, allow_config_change=args.allow_config_change)
    except UserError as exc:
        distributed.report_status(exc.exit_code)
        raise
    except BaseException:
        distributed.report_status(1)
        raise
    distributed.report_status(0)
    return 0


def _int(flag: str, value: str) -> int:
    from tuneforge.errors import UserError

    try:
        return int(value)
    except ValueError:
        raise UserError(f"train: {flag} expects a whole number, got {value!r}") from None


def generate_command(args) -> int:
    from tuneforge.evaluate.preflight import generation_preflight
    from tuneforge.models.generation import GenerationSettings, generate, refuse_reward_model
    from tuneforge.models.reference import load_for_inference, load_tokenizer_of, resolve
    from tuneforge.utils import parse_size

    if args.raw:
        prompts = list(args.prompt)
    else:
        system = [{"role": "system", "content": args.system}] if args.system else []
        prompts = [[*system, {"role": "user", "content": text}] for text in args.prompt]
    settings = GenerationSettings.from_args(args)
    refuse_reward_model(args.model, "generate")
    budget = parse_size(args.max_memory, "--max-memory") if args.max_memory else None
    ref = resolve(args.model)
    tokenizer = load_tokenizer_of(ref)  # one copy: the preflight measures the prompts with the model's own
    rows = generation_preflight(ref, prompts, settings, max_memory=budget, tokenizer=tokenizer)  # before loading
    loaded = load_for_inference(ref, tokenizer=tokenizer)
    outputs = generate(loaded.model, loaded.tokenizer, loaded.template, prompts, settings, batch_size=rows)
    for prompt, output in zip(args.prompt, outputs, strict=True):
        if len(args.prompt) > 1:
            print(f"### {prompt}")
        print(output)
    return 0


def quickstart_command(args) -> int:
    from tuneforge.train.quickstart import run_quickstart

    result = run_quickstart(args.out, pretrain_steps=args.pretrain_steps, sft_steps=args.sft_steps, small=args.small,
                            force=args.force)
    return 0 if result["tuned"]["exact"] > result["base"]["exact"] else 1
