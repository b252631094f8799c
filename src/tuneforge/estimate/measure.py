"""Measure what the bill predicts: bytes saved for backward, and the real peak memory of training steps.

Two instruments:

* :func:`saved_activation_bytes` counts the distinct storages autograd keeps for backward during one forward
  (``torch.autograd.graph.saved_tensors_hooks``), parameters excluded. It is exact and deterministic, so the
  activation formula of :mod:`tuneforge.estimate.bill` is tested against it tensor for tensor.
* :func:`measure_peak` runs real training steps in a **fresh process** and reports the peak memory above the
  process's state before the model existed. On CUDA it is ``torch.cuda.max_memory_allocated``. On CPU it is the
  resident set size: the child resets the kernel's high-water mark (``VmHWM``, by writing ``5`` to
  ``/proc/self/clear_refs``) after building the training state, so load-time transients are excluded, and reports
  ``VmHWM`` minus the ``VmRSS`` measured before the model was built. glibc normally serves allocations under a
  dynamic threshold (up to 32 MiB) from its heaps and keeps freed chunks, so RSS would include memory that is free
  for the allocator; the child therefore runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (every tensor of 64 KiB or more
  is its own mapping, returned to the system when freed) and RSS tracks live tensor bytes, like
  ``max_memory_allocated`` on CUDA. A warm-up step on a tiny copy of the setup runs first so that code pages, thread
  pools and kernel caches are already resident in the baseline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Any


def saved_activation_bytes(model: Any, input_ids: Any) -> int:
    """Bytes of the distinct non-parameter tensors autograd saves in one forward pass with ``labels=input_ids``."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(input_ids=input_ids, labels=input_ids)
    del out
    return sum(seen.values())


# --------------------------------------------------------------------------- the training-state builder

def build_training_state(job: dict) -> tuple[Any, Any]:
    """A from-config Llama with ``job``'s method applied, and its optimizer (fp32, CPU unless CUDA is asked).

    ``job`` keys: hidden, layers, heads, kv_heads, intermediate, vocab, tie, method (full|lora|qlora), r,
    dropout, targets, gc (bool), optim (adamw|adamw_8bit), device.
    """
    import torch
    from transformers import LlamaConfig

    from tuneforge.models.build import build_from_hf_config

    config = LlamaConfig(
        vocab_size=job["vocab"], hidden_size=job["hidden"], intermediate_size=job["intermediate"],
        num_hidden_layers=job["layers"], num_attention_heads=job["heads"],
        num_key_value_heads=job.get("kv_heads") or job["heads"], tie_word_embeddings=job.get("tie", True),
        use_cache=False, max_position_embeddings=max(4096, job.get("seq_len", 0)),
    )
    torch.manual_seed(0)
    device = job.get("device", "cpu")
    if job["method"] == "qlora":
        model = _quantized_model(config, job, device)
    else:
        model = build_from_hf_config(config).to(device)
    if job["method"] in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if job["method"] == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        from tuneforge.models.targets import resolve_target_modules

        targets = resolve_target_modules(model, job.get("targets", "all-linear"))  # as training resolves them
        model = get_peft_model(model, LoraConfig(r=job.get("r", 8), lora_alpha=16, lora_dropout=job.get("dropout", 0.0),
                                                 target_modules=targets))
    if job.get("gc"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if job["method"] != "full":
            model.enable_input_require_grads()
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if job.get("optim") == "adamw_8bit":
        import bitsandbytes as bnb

        optimizer = bnb.optim.AdamW8bit(trainable, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    return model, optimizer


def _quantized_model(config, job: dict, device: str):
    import tempfile

    import torch
    from transformers import BitsAndBytesConfig

    from tuneforge.models.build import build_from_hf_config
    from tuneforge.models.load import load_pretrained

    with tempfile.TemporaryDirectory() as tmp:
        build_from_hf_config(config).save_pretrained(tmp)
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.float32)
        model = load_pretrained(tmp, quantization_config=quant, device_map=device, dtype=torch.float32)
    # Unquantized tensors loaded on CPU are zero-copy views of the memory-mapped safetensors file: the whole file
    # would stay mapped (and its read pages resident) for as long as one of them lives. Copy them out so that RSS
    # holds what a GPU would: the quantized weights and the unquantized ones, nothing of the file.
    for tensor in [*model.parameters(), *model.buffers()]:
        if type(tensor).__name__ != "Params4bit":
            tensor.data = tensor.data.clone()
    return model


def _train_steps(model, optimizer, job: dict, steps: int) -> None:
    import torch

    device = job.get("device", "cpu")
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, job["vocab"], (job["batch"], job["seq_len"]), generator=generator).to(device)
        loss = model(input_ids=ids, labels=ids).loss  # the output (and its logits) is dropped, as the Trainer does
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _rss_kib(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_measure(job: dict) -> dict:
    """Measure one job in this process (call it in a fresh process: see :func:`measure_peak`)."""
    import gc

    import torch

    torch.set_num_threads(int(job.get("threads", 2)))
    cuda = job.get("device", "cpu").startswith("cuda")
    # Warm-up on a tiny copy: loads kernels and code pages, starts thread pools.
    tiny = {**job, "hidden": 64, "intermediate": 128, "layers": job["layers"], "heads": 4, "kv_heads": None,
            "vocab": 512, "batch": 1, "seq_len": 16}
    model, optimizer = build_training_state(tiny)
    _train_steps(model, optimizer, tiny, 2)
    del model, optimizer
    gc.collect()
    started = time.perf_counter()
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_kib("VmRSS") * 1024
    model, optimizer = build_training_state(job)
    gc.collect()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
            handle.write("5")  # reset VmHWM to the current RSS: training-state build transients excluded
    built = time.perf_counter()
    _train_steps(model, optimizer, job, int(job.get("steps", 2)))
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kib("VmHWM") * 1024 - base
    return {"peak_bytes": int(peak), "baseline_bytes": int(base), "build_s": round(built - started, 2),
            "train_s": round(time.perf_counter() - built, 2)}


def measure_peak(job: dict, timeout: float = 600) -> dict:
    """Run :func:`child_measure` for ``job`` in a fresh Python process and return its result dict."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # see the module docstring
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("HF_HUB_OFFLINE", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "tuneforge.estimate.measure", json.dumps(job)],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement failed (exit {proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(lines[-1])


def job_setup(job: dict):
    """The :class:`tuneforge.estimate.bill.Setup` and config dict that price ``job`` (fp32, CPU)."""
    from tuneforge.estimate.bill import Setup

    config = {
        "model_type": "llama", "vocab_size": job["vocab"], "hidden_size": job["hidden"],
        "intermediate_size": job["intermediate"], "num_hidden_layers": job["layers"],
        "num_attention_heads": job["heads"], "num_key_value_heads": job.get("kv_heads") or job["heads"],
        "tie_word_embeddings": job.get("tie", True),
    }
    setup = Setup(
        method=job["method"], r=job.get("r", 8), target_modules=job.get("targets", "all-linear"),
        lora_dropout=job.get("dropout", 0.0), batch_size=job["batch"], seq_len=job["seq_len"],
        gradient_checkpointing=bool(job.get("gc")), precision="fp32", optim=job.get("optim", "adamw"),
        device="cuda" if job.get("device", "cpu").startswith("cuda") else "cpu",
    )
    return setup, config


if __name__ == "__main__":
    print(json.dumps(child_measure(json.loads(sys.argv[1]))))
