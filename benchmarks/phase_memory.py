"""How close is `tuneforge estimate --phase merge|export|eval|serve` to the real peak memory of each command?

Each job runs one real ``tuneforge`` command (merge, export, eval, generate) in a fresh process and measures its
peak memory above the process's state just before the command starts, with the heavy libraries already imported
(torch, transformers, peft, the command's own modules): the preflight of a command runs at that point too, so the
memory those imports hold is already gone from the "available" figure it compares with. Instrument (CPU):

* ``VmHWM`` − ``VmRSS`` at the start (the kernel's resident high-water mark, reset by ``clear_refs`` when the
  command starts): everything resident, including file pages of a memory-mapped safetensors file;
* the largest ``RssAnon`` seen by a sampling thread (every 2 ms) minus its starting value: memory the process
  allocated itself (file pages excluded). Short peaks between two samples can be missed, so this is a lower bound.

The child runs with ``MALLOC_MMAP_THRESHOLD_=65536`` (as ``benchmarks/estimate_accuracy.py``): every buffer of 64 KiB
or more is its own mapping, returned when freed, so RSS follows live buffers instead of glibc's cached heap.

Models: ``tiny`` (a from-config Llama, 4 layers, hidden 256, SmolLM2's 49,152-token vocabulary and tokenizer; with
``--vocab N`` a byte-level BPE tokenizer of N entries trained here on the Python standard library's source files
instead, with the ChatML template — the vocabulary terms of the bills measured on other sizes, no model hub) and
``real`` (SmolLM2-135M-Instruct from ``scripts/fetch_real_model.sh``: the Q4_1 GGUF, converted once to fp32 by
``tuneforge.models.gguf.materialize``). Each gets a LoRA adapter (r 16, all linear layers, random B) saved as a run
adapter. The estimate of each job is ``tuneforge.estimate.phases.phase_bill`` with the job's own numbers.

Usage: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/phase_memory.py [--tier tiny|real|all] [--only PHASE]
[--vocab N] [--json-out FILE]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REAL_GGUF = Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge")) / "real" / \
    "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=4, tie_word_embeddings=True, max_position_embeddings=2048)
RANK = 16
EVAL_ROWS, EVAL_WIDTH = 4, 512          # perplexity: --batch-size rows of exactly --max-length tokens
GEN_ROWS, GEN_NEW = 8, 64               # generation: generate()'s 8 rows, --max-new-tokens
SERVE_ROWS, SERVE_NEW = 8, 256          # serve: completions at once, max_tokens each


# --------------------------------------------------------------------------- fixtures (parent process)

def build_fixtures(tier: str, root: Path, vocab: int | None = None) -> dict:
    """Base model directory (several shards), adapter directory and data files of ``tier`` under ``root``; with
    ``vocab`` (tiny tier only) the tokenizer is :func:`local_tokenizer` of that size instead of SmolLM2's."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from tuneforge.models.gguf import materialize

    template = None
    if vocab:
        from tuneforge.data.templates import get_template

        tokenizer, template = local_tokenizer(vocab), get_template("chatml")
        tokenizer.chat_template = template.jinja  # the generation row renders its prompts with it
    else:
        real_dir = materialize(REAL_GGUF)
        tokenizer = AutoTokenizer.from_pretrained(real_dir)
    torch.manual_seed(0)
    if tier == "real":
        model = LlamaForCausalLM.from_pretrained(real_dir, dtype=torch.float32)
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                             eos_token_id=tokenizer.eos_token_id, **TINY))
    base = root / "base"
    # Shards of a quarter of the model each: the shard-by-shard merge then has something to save.
    shard = max(1, sum(p.numel() for p in model.parameters()) * 4 // 4 // 10 ** 6)
    model.save_pretrained(base, max_shard_size=f"{shard}MB")
    tokenizer.save_pretrained(base)
    if template is not None:
        template.save(base)
    peft_model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=32, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.02)  # a merge that changes the weights
    adapter = root / "adapter"
    peft_model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(base)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(adapter)
    if template is not None:
        template.save(adapter)
    return {"base": str(base), "adapter": str(adapter), **_data_files(tokenizer, root)}


def local_tokenizer(vocab: int):
    """A byte-level BPE tokenizer of ``vocab`` entries (``tuneforge.models.tokenizer.train_tokenizer``) trained on
    the source files of this Python's standard library (tests excluded: ~12 MB of code and docstrings on Python 3.11,
    enough for up to ~44k entries): a corpus every machine has, the same for a given Python version."""
    import sysconfig

    from tuneforge.models.tokenizer import train_tokenizer

    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(path for path in root.rglob("*.py")
                   if not {"site-packages", "test", "tests"} & set(path.relative_to(root).parts))
    tokenizer = train_tokenizer((path.read_text(encoding="utf-8", errors="replace") for path in files),
                                vocab_size=vocab)
    if len(tokenizer) != vocab:
        raise SystemExit(f"--vocab {vocab}: the standard library's text gives only {len(tokenizer)} entries")
    return tokenizer


def _data_files(tokenizer, root: Path) -> dict:
    import random

    words = [w for w in tokenizer.get_vocab() if w.isalpha() and 3 < len(w) < 9][:3000]
    rng = random.Random(0)
    texts = []
    for _ in range(EVAL_ROWS * 2):  # longer than the window: every window is EVAL_WIDTH tokens wide
        text = " ".join(rng.choice(words) for _ in range(EVAL_WIDTH * 2))
        texts.append({"text": text})
    ppl = root / "ppl.jsonl"
    ppl.write_text("".join(json.dumps(t) + "\n" for t in texts))
    short = [{"text": " ".join(rng.choice(words) for _ in range(200))} for _ in range(EVAL_ROWS * 2)]
    export_data = root / "export.jsonl"  # export's perplexity check: windows as wide as its longest text
    export_data.write_text("".join(json.dumps(t) + "\n" for t in short))
    export_tokens = max(len(tokenizer(t["text"])["input_ids"]) for t in short)
    chat = root / "chat.jsonl"
    rows = [{"messages": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(40))},
                          {"role": "assistant", "content": "yes"}]} for _ in range(GEN_ROWS)]
    chat.write_text("".join(json.dumps(r) + "\n" for r in rows))
    prompt_tokens = max(len(tokenizer.apply_chat_template(r["messages"][:1], add_generation_prompt=True,
                                                          tokenize=True, return_dict=False)) for r in rows)
    return {"ppl_data": str(ppl), "chat_data": str(chat), "prompt_tokens": int(prompt_tokens),
            "export_data": str(export_data), "export_tokens": int(export_tokens)}


# --------------------------------------------------------------------------- jobs

def jobs(fx: dict, tier: str, out: Path) -> list[dict]:
    """(label, argv, bill kwargs) of every measured command of ``tier``."""
    adapter = fx["adapter"]
    gen_seq = fx["prompt_tokens"] + GEN_NEW
    return [
        {"label": "merge in memory (fp32)", "phase": "merge", "bill": {},
         "argv": ["merge", adapter, "--out", str(out / "m1"), "--strategy", "memory"]},
        {"label": "merge in memory (bf16 saved)", "phase": "merge", "bill": {"precision": "bf16"},
         "argv": ["merge", adapter, "--out", str(out / "m2"), "--strategy", "memory", "--dtype", "bf16",
                  "--tolerance", "100"]},  # a random adapter on the real model moves bf16 logits by up to ~2
        {"label": "merge shard by shard (fp32)", "phase": "merge", "bill": {}, "sharded": True,
         "argv": ["merge", adapter, "--out", str(out / "m3"), "--strategy", "sharded"]},
        {"label": "export gguf q8_0 (+ gate)", "phase": "export", "bill": {"quantize": "q8_0"},
         "argv": ["export", adapter, "--format", "gguf", "--quantize", "q8_0", "--out", str(out / "g1")]},
        {"label": "export gguf f16 (+ gate)", "phase": "export", "bill": {"quantize": "f16"},
         "argv": ["export", adapter, "--format", "gguf", "--quantize", "f16", "--out", str(out / "g2")]},
        {"label": f"export hf int8 (check 4 x {fx['export_tokens']})", "phase": "export",
         "bill": {"quantize": "int8", "seq_len": fx["export_tokens"]},
         "argv": ["export", adapter, "--format", "hf", "--quantize", "int8", "--out", str(out / "h1"),
                  "--data", fx["export_data"]]},
        {"label": f"serve {SERVE_ROWS} rows x (prompt + {SERVE_NEW})", "phase": "serve", "bill": {"batch_size": SERVE_ROWS},
         "argv": ["serve", f"adapter={adapter}", "--port", str(_free_port()), "--max-batch-size", str(SERVE_ROWS),
                  "--max-tokens-limit", str(SERVE_NEW), "--device", "cpu"]},
        {"label": f"eval ppl b{EVAL_ROWS} x {EVAL_WIDTH}", "phase": "eval",
         "bill": {"batch_size": EVAL_ROWS, "seq_len": EVAL_WIDTH},
         "argv": ["eval", adapter, "--data", fx["ppl_data"], "--metrics", "ppl", "--batch-size", str(EVAL_ROWS),
                  "--max-length", str(EVAL_WIDTH), "--no-save", "--json", "--device", "cpu"]},
        {"label": f"eval generation b{GEN_ROWS} x {gen_seq}", "phase": "eval",
         "bill": {"batch_size": GEN_ROWS, "seq_len": gen_seq, "generation": True},
         "argv": ["eval", adapter, "--data", fx["chat_data"], "--metrics", "exact", "--max-new-tokens", str(GEN_NEW),
                  "--no-save", "--json", "--device", "cpu"]},
    ]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --------------------------------------------------------------------------- the measured child

def _status() -> dict:
    values = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def child(argv: list[str]) -> dict:
    """Run ``tuneforge ARGV`` in this process and return its peak memory above the start (see the docstring)."""
    import gc
    import io

    import datasets  # noqa: F401  (eval's record reading imports datasets/pyarrow/pandas: ~90 MiB of libraries)
    import peft  # noqa: F401  (imported before the baseline: the command's libraries are not its memory)
    import torch
    import transformers  # noqa: F401

    from tuneforge import cli
    from tuneforge.evaluate import runner  # noqa: F401
    if argv[0] == "serve":  # serve's HTTP stack (uvicorn, FastAPI: ~10 MiB of libraries) loads lazily
        import uvicorn  # noqa: F401

        from tuneforge.serve import app  # noqa: F401
    from tuneforge.merge import export, lora, sharded  # noqa: F401

    torch.set_num_threads(1)
    parser = cli.build_parser()  # every command module imported
    del parser
    # the trace's wrappers and the modules they import exist before the baseline (after it, they added 7 MiB to a
    # traced shard-by-shard merge; the marks themselves still add 1-3 MiB)
    marks = _trace() if os.environ.get("PHASE_MEMORY_TRACE") else None
    gc.collect()
    start = _status()
    peak = {"anon": start["RssAnon"]}
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak["anon"] = max(peak["anon"], _status()["RssAnon"])
            time.sleep(0.002)

    with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
        handle.write("5")
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    started = time.perf_counter()
    saved, sys.stdout = sys.stdout, io.StringIO()
    served: dict = {}
    try:
        code = _serve_and_load(cli, argv, served) if argv[0] == "serve" else cli.main(argv)
    finally:
        sys.stdout = saved
    seconds = time.perf_counter() - started
    stop.set()
    thread.join()
    end = _status()
    result = {"exit": code, "peak_bytes": end["VmHWM"] - start["VmRSS"],
              "anon_peak_bytes": peak["anon"] - start["RssAnon"], "baseline_bytes": start["VmRSS"],
              "seconds": round(seconds, 1)}
    if marks is not None:
        result["trace"] = [(f"start (rss {start['VmRSS'] // 2 ** 20}, anon {start['RssAnon'] // 2 ** 20}, file "
                            f"{start['RssFile'] // 2 ** 20} MiB)", 0.0)]
        result["trace"] += [(name, round((rss - start["VmRSS"]) / 2 ** 20, 1)) for name, rss in marks]
    result.update(served)
    return result


def _serve_and_load(cli, argv: list[str], served: dict) -> int:
    """``tuneforge serve`` in a thread, :data:`SERVE_ROWS` completions at once (each a long prompt and
    :data:`SERVE_NEW` new tokens), then the KV tokens they held (prompt + completion tokens, from ``usage``)."""
    import socket
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    port = int(argv[argv.index("--port") + 1])
    threading.Thread(target=cli.main, args=(argv,), daemon=True).start()
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.5)
    prompt = " ".join(["the quick brown fox jumps over the lazy dog"] * 12)

    def ask(i: int) -> dict:
        body = json.dumps({"model": "adapter", "prompt": f"{i} {prompt}", "max_tokens": SERVE_NEW,
                           "temperature": 0}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=900) as response:
            return json.loads(response.read())["usage"]

    with ThreadPoolExecutor(SERVE_ROWS) as pool:
        usages = list(pool.map(ask, range(SERVE_ROWS)))
    served["kv_tokens"] = sum(u["prompt_tokens"] + u["completion_tokens"] for u in usages)
    # what the engine holds: its KV store sized at admission for rows x the longest prompt + max_tokens (the
    # scheduler's cost of the batch), and the prefix-reuse store keeping every prompt (8 entries of >= 16 tokens)
    served["admitted_tokens"] = SERVE_ROWS * max(u["prompt_tokens"] + SERVE_NEW for u in usages)
    served["prefix_tokens"] = sum(u["prompt_tokens"] for u in usages)
    return 0


def _trace() -> list:
    """Diagnostics (PHASE_MEMORY_TRACE=1): RSS above the start and the high-water mark when each step of the GGUF
    export and the merge begins and ends (which step holds the peak)."""
    from tuneforge.merge import export, gguf, lora, sharded
    from tuneforge.models import gguf as models_gguf
    from tuneforge.models import reference

    marks: list = []

    def wrap(module, name):
        original = getattr(module, name)

        def traced(*args, **kwargs):
            marks.append(_mark(f"{name} start"))
            try:
                return original(*args, **kwargs)
            finally:
                marks.append(_mark(f"{name} end"))

        setattr(module, name, traced)

    for module, name in ((lora, "load_base_and_adapter"), (gguf, "_merge_with_parity"), (gguf, "write_gguf"),
                         (gguf, "gate"), (models_gguf, "read_gguf"), (lora, "merge_lora"),
                         # the HF int8/int4 export: the merge, each perplexity check, the quantized load and reload
                         (export, "load_base_and_adapter"), (export, "perplexity"), (reference, "load_model_dir"),
                         # the LoRA merge's steps: each probe pass, the check, each shard, the tokenizer's loads
                         (lora, "logits_on"), (lora, "logit_difference"), (sharded, "merge_shards"),
                         (reference, "load_tokenizer_of")):
        if hasattr(module, name):
            wrap(module, name)
    _trace_serve(marks)
    return marks


def _mark(label: str) -> tuple[str, int]:
    """A trace mark: ``label`` with the high-water mark and the resident memory split into anonymous and file pages
    (of them the libtorch code's), and the resident bytes."""
    status = _status()
    return (f"{label} (hwm {status['VmHWM'] // 2 ** 20}, anon {status['RssAnon'] // 2 ** 20}, file "
            f"{status['RssFile'] // 2 ** 20}, of it libtorch code {_libtorch_rss() // 2 ** 20} MiB)", status["VmRSS"])


def _libtorch_rss() -> int:
    """Resident bytes of the libtorch shared libraries' mappings (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            head = line.split(maxsplit=1)[0]
            if "-" in head and not head.endswith(":"):  # a mapping's header line
                inside = "libtorch" in line
            elif inside and head == "Rss:":
                total += int(line.split()[1]) * 1024
    return total


def _trace_serve(marks: list) -> None:
    """Serve's marks: the models loaded, each KV-store allocation (its capacity) and each prefill, with the resident
    memory split into anonymous and file pages (which part of the peak is the weights' mapped file)."""
    from tuneforge.models import decoding
    from tuneforge.serve import engine

    def mark(label: str) -> None:
        marks.append(_mark(label))

    def wrap(cls, name, describe=None):
        original = getattr(cls, name)

        def traced(self, *args, **kwargs):
            mark(f"{cls.__name__}.{name} start")
            try:
                return original(self, *args, **kwargs)
            finally:
                mark(f"{cls.__name__}.{name} end{describe(self) if describe else ''}")

        setattr(cls, name, traced)

    def capacity(store) -> str:
        if not getattr(store, "buffers", None):
            return ""
        keys = store.buffers[0][0]
        size = sum(k.nbytes + v.nbytes for k, v in store.buffers)
        return f" [{keys.shape[0]} rows x {keys.shape[2]} columns, {size // 2 ** 20} MiB, window {store.end - store.start}]"

    from tuneforge.serve import app, preflight

    for module, name in ((preflight, "plan_serve"), (app, "create_app")):
        original_function = getattr(module, name)

        def traced_function(*args, _original=original_function, _name=name, **kwargs):
            mark(f"{_name} start")
            try:
                return _original(*args, **kwargs)
            finally:
                mark(f"{_name} end")

        setattr(module, name, traced_function)
    wrap(engine.Engine, "__init__")
    wrap(engine.Served, "prompt_ids")
    wrap(decoding._KVStore, "_allocate", capacity)
    wrap(decoding.ContinuousBatch, "_prefill_group")


def measure(argv: list[str], timeout: float = 1800) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TUNEFORGE_AUTO_PRECISION": "fp32"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], capture_output=True, text=True,
                          timeout=timeout, env=env, check=False)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{\"exit")]
    if not lines:
        raise RuntimeError(f"{' '.join(argv[:2])} failed (exit {proc.returncode}): {proc.stderr[-2500:]}")
    result = json.loads(lines[-1])
    if result["exit"] != 0:
        raise RuntimeError(f"tuneforge {' '.join(argv)} exited {result['exit']}: {proc.stderr[-2500:]}")
    return result


# --------------------------------------------------------------------------- estimates

def estimate(job: dict, fx: dict) -> int:
    from tuneforge.estimate.phases import phase_bill
    from tuneforge.estimate.spec import model_spec

    if job.get("sharded"):
        from tuneforge.merge.sharded import estimate_merge_bytes

        return estimate_merge_bytes(Path(fx["base"]), Path(fx["adapter"]), 4)["sharded"]
    spec = model_spec(fx["base"])
    return phase_bill(spec, job["phase"], r=RANK, **job["bill"]).total_bytes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--tier", choices=["tiny", "real", "all"], default="all")
    parser.add_argument("--only", help="jobs whose label contains this text")
    parser.add_argument("--json-out", help="also write the rows to this JSON file")
    parser.add_argument("--vocab", type=int, help="tiny tier only: a BPE tokenizer of this many entries trained on "
                        "the standard library's source instead of SmolLM2's 49,152-entry one")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))), flush=True)
        os._exit(0)  # a served child still has its server thread running
    if args.vocab and args.tier != "tiny":
        parser.error("--vocab needs --tier tiny")
    if not args.vocab and not REAL_GGUF.is_file():
        print(f"{REAL_GGUF} missing: run scripts/fetch_real_model.sh first", file=sys.stderr)
        return 2
    rows = []
    print(f"machine: {_cpu()}; load before: {os.getloadavg()[0]:.1f}")
    header = f"{'model':<6} {'job':<34} {'estimate MiB':>12} {'measured MiB':>12} {'anon MiB':>9} {'error':>7} {'s':>6}"
    print(header)
    print("-" * len(header))
    for tier in ("tiny", "real") if args.tier == "all" else (args.tier,):
        with tempfile.TemporaryDirectory(prefix=f"phase-memory-{tier}-") as tmp:
            fx = build_fixtures(tier, Path(tmp), args.vocab)
            model = f"v{args.vocab}" if args.vocab else tier  # the model column: the tiny model's vocabulary
            if args.vocab:
                print(f"tiny model with a {args.vocab}-entry BPE tokenizer (the standard library's source)")
            for job in jobs(fx, tier, Path(tmp) / "out"):
                if args.only and args.only not in job["label"]:
                    continue
                try:
                    got = measure(job["argv"])
                    if "kv_tokens" in got:  # serve: bill the KV tokens the scheduler admitted and the prompts
                        job["bill"]["token_budget"] = got["admitted_tokens"]  # the prefix store kept
                        job["bill"]["prefix_tokens"] = got["prefix_tokens"]
                        print(f"    serve: {got['kv_tokens']} KV tokens used of {got['admitted_tokens']} admitted, "
                              f"{got['prefix_tokens']} prompt tokens in the prefix store")
                    est = estimate(job, fx)
                except RuntimeError as exc:
                    print(f"{model:<6} {job['label']:<34} failed: {str(exc)[-300:]}", flush=True)
                    rows.append({"model": model, "job": job["label"], "failed": str(exc)[-1000:]})
                    continue
                for name, above in got.get("trace", ()):  # PHASE_MEMORY_TRACE=1
                    print(f"    {above:>8.1f} MiB above the start  {name}")
                error = est / got["peak_bytes"] - 1
                row = {"model": model, "job": job["label"], "argv": job["argv"], "estimate_bytes": est,
                       "measured_bytes": got["peak_bytes"], "anon_bytes": got["anon_peak_bytes"],
                       "error": round(error, 4), "seconds": got["seconds"], "load": round(os.getloadavg()[0], 1)}
                rows.append(row)
                print(f"{model:<6} {job['label']:<34} {est / 2**20:>12.1f} {got['peak_bytes'] / 2**20:>12.1f} "
                      f"{got['anon_peak_bytes'] / 2**20:>9.1f} {100 * error:>+6.1f}% {got['seconds']:>6.1f}",
                      flush=True)
    within = sum(abs(r.get("error", 1)) <= 0.15 for r in rows)
    print(f"\n{within}/{len(rows)} within ±15%")
    print(json.dumps({"rows": rows}))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows}, indent=1))
    return 0 if within == len(rows) else 1


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    return "unknown CPU"


if __name__ == "__main__":
    sys.exit(main())
