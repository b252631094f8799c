"""Every fine-tuning method side by side in one process, on the same model, data and number of steps.

Setup: a from-config Llama (hidden 256, 4 layers, 4 heads, vocab 4096; tokenizer trained on the standard library's
``pydoc_data`` text), first pretrained briefly with full fine-tuning on half of that text (so the adapters have a
base worth adapting); then every method starts from a copy of that base and trains the same number of steps on
the same blocks of 128 tokens, batch 4, from the other half, with the same seed. The optimizer is the method's own
(LoRA+, GaLore), else AdamW; learning rates are per method family (column ``lr``).

Figures per method:

* ``trainable`` — trained parameters (``tuneforge.models.params.count_parameters``; peft's own count);
* ``peak_mb`` — peak resident memory (RSS) above the pre-method baseline, sampled every 2 ms by a thread reading
  ``/proc/self/statm``, over build + training; freed memory is returned to the OS (``malloc_trim``) before each
  method so the baseline is comparable. It includes the model copy the method trains, activations and optimizer
  state (not the shared pretrained base kept for the next method);
* ``state_mb`` — the memory a method must hold, counted exactly from tensors after training: model parameters
  and buffers (quantized storage as stored), gradients of the trained parameters, optimizer state (incl. GaLore's
  projection matrices);
* ``tokens_per_s`` — training tokens / wall time of steps 2..N (the first step's one-off work is excluded);
* ``final_loss`` — mean training loss of the last 5 steps; ``eval_loss`` — cross-entropy on 8 held-out blocks.

Also rows for ``train.neftune_alpha`` (LoRA + NEFTune noise on the input embeddings, via transformers' hook) and
``train.optim: adamw_8bit`` (LoRA + bitsandbytes' AdamW8bit), as the trainer maps them.

    .venv/bin/python benchmarks/methods.py [--steps 30] [--pretrain-steps 60] [--threads 1] [--json out.json]

Prints a table, then one JSON object (also written to ``--json`` if given).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

SEQ = 128
BATCH = 4
MODEL = {"architecture": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "vocab_size": 4096}

# method → (config, lr). Adapters get adapter-typical rates, full-parameter methods full-tuning ones.
METHODS: dict[str, tuple[dict, float]] = {
    "full": ({"name": "full"}, 3e-4),
    "lora": ({"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 2e-3),
    "qlora": ({"name": "qlora", "r": 8, "alpha": 16, "dropout": 0.0, "compute_dtype": "fp32"}, 2e-3),
    "dora": ({"name": "dora", "r": 8, "alpha": 16, "dropout": 0.0}, 2e-3),
    "rslora": ({"name": "rslora", "r": 8, "alpha": 16, "dropout": 0.0}, 2e-3),
    "pissa": ({"name": "pissa", "r": 8, "alpha": 8, "dropout": 0.0, "niter": 4}, 2e-3),
    "lora_plus": ({"name": "lora_plus", "r": 8, "alpha": 16, "dropout": 0.0, "lr_ratio": 16}, 2e-3),
    "adalora": ({"name": "adalora", "init_r": 12, "target_r": 8, "dropout": 0.0, "tinit": 5, "tfinal": 5,
                 "target_modules": "all-linear"}, 2e-3),
    "vera": ({"name": "vera", "r": 256, "target_modules": "attention"}, 1e-2),
    "prefix_tuning": ({"name": "prefix_tuning", "num_virtual_tokens": 16}, 1e-2),
    "ia3": ({"name": "ia3"}, 1e-2),
    "galore": ({"name": "galore", "rank": 64, "update_proj_gap": 50, "scale": 0.25}, 3e-4),
    "lora+neftune": ({"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 2e-3),
    "lora+adamw_8bit": ({"name": "lora", "r": 8, "alpha": 16, "dropout": 0.0}, 2e-3),
}
NEFTUNE_ALPHA = 5.0


def texts() -> list[str]:
    """Paragraphs of the Python documentation shipped with Python (``pydoc_data``)."""
    from pydoc_data.topics import topics

    out = []
    for key in sorted(topics):
        out.extend(p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 40)
    return out


def blocks(paragraphs: list[str], tokenizer, count: int):
    """``count`` blocks of ``SEQ`` tokens from the paragraphs joined with EOS, as one tensor (count × SEQ)."""
    import torch

    ids: list[int] = []
    for text in paragraphs:
        ids.extend(tokenizer(text)["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= count * SEQ:
            break
    if len(ids) < count * SEQ:
        raise SystemExit(f"not enough text for {count} blocks of {SEQ} tokens")
    return torch.tensor(ids[: count * SEQ]).view(count, SEQ)


class RssPeak:
    """Peak RSS (bytes) above the value at ``start``, sampled by a thread every 2 ms."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.base = 0
        self._stop = threading.Event()

    def rss(self) -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * self.page

    def __enter__(self) -> RssPeak:
        gc.collect()
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed arenas back so the baseline is honest
        except OSError:
            pass
        self.base = self.peak = self.rss()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def state_bytes(model, optimizer) -> int:
    """Bytes of parameters + buffers + gradients + optimizer state (tensors counted once)."""
    import torch

    seen: set[int] = set()
    total = 0

    def add(tensor) -> None:
        nonlocal total
        if isinstance(tensor, torch.Tensor) and id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()

    for param in model.parameters():
        if id(param) not in seen and param.requires_grad:
            total += param.numel() * param.element_size()  # its gradient (freed by zero_grad by now)
        add(param)
    for buffer in model.buffers():
        add(buffer)
    for state in optimizer.state.values():
        for value in state.values():
            add(value)
            add(getattr(value, "ortho_matrix", None))  # GaLore's projector
    return total


def pretrain(model, data, steps: int, lr: float) -> float:
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = float("nan")
    for step in range(steps):
        batch = data[(step * BATCH) % len(data):][:BATCH]
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = float(out.loss)
    return loss


def eval_loss(model, data) -> float:
    """Plain next-token cross-entropy (no method-specific loss terms such as AdaLoRA's orthogonality penalty)."""
    import torch

    model.eval()
    with torch.no_grad():
        logits = model(input_ids=data).logits[:, :-1]
        return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                       data[:, 1:].reshape(-1)))


def run_method(label: str, base_dir: Path, base, train_data, held_out, steps: int) -> dict:
    import torch
    from pydantic import TypeAdapter
    from transformers import AutoModelForCausalLM

    from tuneforge.config.schema import MethodConfig, TrainConfig
    from tuneforge.methods import get_method
    from tuneforge.models.params import count_parameters

    raw, lr = METHODS[label]
    cfg = TypeAdapter(MethodConfig).validate_python(raw)
    method = get_method(cfg.name)
    train_cfg = TrainConfig(lr=lr, optim="adamw_8bit" if label.endswith("adamw_8bit") else "adamw_torch")
    torch.manual_seed(0)
    losses, times = [], []
    with RssPeak() as mem:
        if cfg.name == "qlora":
            model = AutoModelForCausalLM.from_pretrained(base_dir, device_map="cpu",
                                                         **method.model_load_kwargs(cfg, torch.float32))
        else:
            model = copy.deepcopy(base)
        model = method.apply(model, cfg)
        trainable, total = count_parameters(model)
        optimizer = method.create_optimizer(model, cfg, train_cfg)
        if optimizer is None:
            params = [p for p in model.parameters() if p.requires_grad]
            if train_cfg.optim == "adamw_8bit":
                import bitsandbytes as bnb

                optimizer = bnb.optim.AdamW8bit(params, lr=lr)
            else:
                optimizer = torch.optim.AdamW(params, lr=lr)
        if label.endswith("neftune"):
            from transformers.integrations.neftune import neftune_post_forward_hook

            embeddings = model.get_input_embeddings()
            embeddings.neftune_noise_alpha = NEFTUNE_ALPHA
            embeddings.register_forward_hook(neftune_post_forward_hook)
        callbacks = method.callbacks(cfg, steps)
        state = type("State", (), {"global_step": 0})()
        for cb in callbacks:
            cb.on_train_begin(None, state, None, model=model)
        model.train()
        for step in range(steps):
            batch = train_data[(step * BATCH) % len(train_data):][:BATCH]
            start = time.perf_counter()
            out = model(input_ids=batch, labels=batch)
            out.loss.backward()
            optimizer.step()
            for cb in callbacks:
                cb.on_optimizer_step(None, state, None, model=model)
            optimizer.zero_grad()
            state.global_step += 1
            times.append(time.perf_counter() - start)
            losses.append(float(out.loss))
    timed = times[1:] or times
    result = {
        "method": label,
        "lr": lr,
        "trainable": trainable,
        "trainable_pct": round(100 * trainable / total, 3),
        "peak_mb": round(mem.delta_mb, 1),
        "tokens_per_s": round(len(timed) * BATCH * SEQ / sum(timed), 1),
        "final_loss": round(sum(losses[-5:]) / len(losses[-5:]), 4),
        "eval_loss": round(eval_loss(model, held_out), 4),
    }
    result["state_mb"] = round(state_bytes(model, optimizer) / 2**20, 2)
    del model, optimizer
    return result


def table(rows: list[dict], baseline: dict) -> str:
    head = (f"{'method':<16} {'lr':>7} {'trainable':>11} {'%':>8} {'state MB':>8} {'peak MB':>8} {'tok/s':>8} {'×full':>6} "
            f"{'final loss':>10} {'eval loss':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        speed = r["tokens_per_s"] / baseline["tokens_per_s"] if baseline else math.nan
        lines.append(f"{r['method']:<16} {r['lr']:>7.0e} {r['trainable']:>11,} {r['trainable_pct']:>8.3f} "
                     f"{r['state_mb']:>8.2f} {r['peak_mb']:>8.1f} {r['tokens_per_s']:>8.1f} {speed:>6.2f} {r['final_loss']:>10.4f} "
                     f"{r['eval_loss']:>9.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--pretrain-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 default: steadier on a shared machine, and LAPACK's SVD — GaLore, "
                             "PiSSA — is pathologically slow on 2 contended OpenMP threads)")
    parser.add_argument("--methods", nargs="*", default=list(METHODS))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from tuneforge.config.schema import FromConfig
    from tuneforge.models import build_model, train_tokenizer

    torch.set_num_threads(args.threads)
    paragraphs = texts()
    half = len(paragraphs) // 2
    tokenizer = train_tokenizer(paragraphs, vocab_size=MODEL["vocab_size"])
    pre_data = blocks(paragraphs[:half], tokenizer, 64)
    tune = blocks(paragraphs[half:], tokenizer, BATCH * args.steps + 8)
    train_data, held_out = tune[:-8], tune[-8:]

    torch.manual_seed(0)
    base = build_model(FromConfig(**MODEL), tokenizer)
    t0 = time.perf_counter()
    pre_loss = pretrain(base, pre_data, args.pretrain_steps, lr=1e-3)
    print(f"base: {sum(p.numel() for p in base.parameters()):,} parameters, pretrained {args.pretrain_steps} steps "
          f"in {time.perf_counter() - t0:.0f} s (loss {pre_loss:.3f}); eval loss before tuning "
          f"{eval_loss(base, held_out):.4f}", file=sys.stderr)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        base.save_pretrained(tmp)  # QLoRA loads the same weights quantized from here
        # Warm-up (discarded): one-off library initialisation must not be charged to the first method's memory.
        run_method("lora", Path(tmp), base, train_data, held_out, 2)
        for label in args.methods:
            t0 = time.perf_counter()
            try:
                rows.append(run_method(label, Path(tmp), base, train_data, held_out, args.steps))
            except Exception as exc:  # a method that cannot run here is reported, not fatal
                rows.append({"method": label, "error": f"{type(exc).__name__}: {exc}"})
            print(f"  {label}: {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    ok = [r for r in rows if "error" not in r]
    baseline = next((r for r in ok if r["method"] == "full"), None)
    print(table(ok, baseline))
    for r in rows:
        if "error" in r:
            print(f"{r['method']}: could not run — {r['error']}")
    result = {
        "setup": {"model": MODEL, "seq_len": SEQ, "batch": BATCH, "steps": args.steps,
                  "pretrain_steps": args.pretrain_steps, "threads": args.threads,
                  "memory": "peak RSS above the pre-method baseline, /proc/self/statm sampled every 2 ms",
                  "tokens_per_s": "training tokens / wall time of steps 2..N"},
        "methods": rows,
        "ratios_vs_full": {r["method"]: {"tokens_per_s": round(r["tokens_per_s"] / baseline["tokens_per_s"], 3),
                                         "state_mb": round(r["state_mb"] / baseline["state_mb"], 3)}
                           for r in ok} if baseline else {},
    }
    print(json.dumps(result, indent=2))
    if args.json:
        from tuneforge.utils import atomic_write_json

        atomic_write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
