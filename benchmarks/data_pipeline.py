"""Data preparation at scale: tuneforge's prepared pipeline vs the few lines a user writes with HF ``datasets``.

Arms, each in its own process (wall time, records/s, peak RSS of the process and of its largest worker):

- ``hf``: ``load_dataset("json")`` → ``map(render with the tokenizer's chat template, tokenize, mask the prompt;
  batched, num_proc=2)`` with a fresh ``datasets`` cache (issue 24's baseline); ``hf_cached``: the same again;
- ``prepare``: ``tuneforge.data.prepared.prepare`` (read, clean, render, tokenize, mask, pack; num_proc=2) into
  a fresh cache; ``prepare_cached``: the same again (a cache hit: open the memory-mapped entry);
- ``inmemory``: the in-memory reference pipeline (``build_in_memory``), at the smallest size only (slow), to check
  the prepared pipeline's supervised-token count against it;
- ``stream``: ``data.streaming`` over a pretraining corpus (``{"text"}`` lines) read once from end to end, under
  ``RLIMIT_DATA`` (the heap cap; ``--stream-cap-mb``), at 1× and 10× ``--stream-mb`` (the 10× corpus is several
  times the cap). Neither torch nor transformers is imported in this arm (the stream needs neither; the tokenizer
  is the same ``tokenizer.json`` through ``tokenizers``; a trainer's process adds a constant).

``seconds`` is the data step (after the tokenizer is loaded: what a trainer's process pays on top of its imports);
``process_seconds`` the whole arm; ``peak_rss_mb`` the arm process's VmHWM, ``worker_peak_rss_mb`` its largest
worker's.

Records are generated Alpaca rows (sentences of the Python docs, ~1.2 kB and ~290 tokens each, like the issue's
50k-record file). The tokenizer is SmolLM2-135M-Instruct's (49k vocabulary, its ChatML template) when
``scripts/fetch_real_model.sh`` has fetched it, else a byte-level BPE trained here with the ChatML template.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/data_pipeline.py [--sizes 10000,100000] [--stream-mb 40]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MAX_LENGTH = 1024
NUM_PROC = 2


# ----------------------------------------------------------------------------- inputs


def sentences() -> list[str]:
    from tuneforge.data.builtin import pydoc_topics

    return [s.strip() for text in pydoc_topics().values() for s in text.replace("\n", " ").split(". ")
            if 20 < len(s.strip()) < 200]


def write_alpaca(path: Path, count: int, pool: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as handle:
        for _ in range(count):
            row = {"instruction": rng.choice(pool) + "?",
                   "input": " ".join(rng.sample(pool, rng.randint(1, 3))) if rng.random() < 0.3 else "",
                   "output": ". ".join(rng.sample(pool, rng.randint(4, 12))) + "."}
            handle.write(json.dumps(row) + "\n")


def write_corpus(path: Path, megabytes: float, pool: list[str], seed: int = 0) -> None:
    rng = random.Random(seed)
    target = int(megabytes * 2**20)
    written = 0
    with open(path, "w", encoding="utf-8") as handle:
        while written < target:
            line = json.dumps({"text": ". ".join(rng.sample(pool, rng.randint(10, 60))) + "."}) + "\n"
            handle.write(line)
            written += len(line)


def make_tokenizer(folder: Path) -> str:
    """Save the benchmark's tokenizer into ``folder``; returns a description."""
    from tuneforge.data.templates import CHATML

    root = Path(os.environ.get("TUNEFORGE_CACHE") or Path.home() / ".cache" / "tuneforge") / "real"
    gguf = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if gguf.is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(root), gguf_file=gguf.name)
        tok.save_pretrained(folder)
        return f"SmolLM2-135M-Instruct (vocab {len(tok)}, its chat template)"
    from tuneforge.models import train_tokenizer

    tok = train_tokenizer(sentences()[:20000], vocab_size=8192)
    tok.chat_template = CHATML
    tok.save_pretrained(folder)
    return f"byte-level BPE trained here (vocab {len(tok)}, ChatML)"


# ----------------------------------------------------------------------------- arms (each in its own process)


def arm_hf(data: Path, tok_dir: Path, work: Path) -> dict:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    started = time.perf_counter()

    def render(batch):
        ids_out, labels_out, sup = [], [], []
        for instruction, extra, output in zip(batch["instruction"], batch["input"], batch["output"], strict=True):
            user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
            messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
            prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
            full = tok.apply_chat_template(messages, tokenize=False)
            ids = tok(full, add_special_tokens=False)["input_ids"][:MAX_LENGTH]
            n = len(tok(prompt, add_special_tokens=False)["input_ids"])
            labels = [-100] * min(n, len(ids)) + ids[n:]
            ids_out.append(ids)
            labels_out.append(labels)
            sup.append(len(ids) - min(n, len(ids)))
        return {"input_ids": ids_out, "labels": labels_out, "sup": sup}

    dataset = load_dataset("json", data_files=str(data), split="train", cache_dir=str(work / "hf-cache"))
    mapped = dataset.map(render, batched=True, num_proc=NUM_PROC, remove_columns=dataset.column_names)
    supervised = int(sum(mapped["sup"]))
    return {"records": len(dataset), "samples": len(mapped), "supervised_tokens": supervised,
            "seconds": round(time.perf_counter() - started, 2)}


def arm_prepare(data: Path, tok_dir: Path, work: Path) -> dict:
    from transformers import AutoTokenizer

    from tuneforge.config.schema import DataConfig
    from tuneforge.data.prepared import prepare
    from tuneforge.data.templates import resolve_template

    tok = AutoTokenizer.from_pretrained(tok_dir)
    started = time.perf_counter()
    cfg = DataConfig(train=[str(data)], max_length=MAX_LENGTH, cache_dir=str(work / "cache"))
    bundle = prepare(cfg, "sft", tok, resolve_template("auto", tok), 0, num_proc=NUM_PROC)
    row = bundle.train[len(bundle.train) // 2]  # one row read through the memory map
    s = bundle.stats
    return {"records": s["train_records"], "samples": s["samples"], "rows": s["rows"], "tokens": s["tokens"],
            "supervised_tokens": s["supervised_tokens"], "row_tokens": len(row["input_ids"]),
            "seconds": round(time.perf_counter() - started, 2)}


def arm_inmemory(data: Path, tok_dir: Path, work: Path) -> dict:
    from transformers import AutoTokenizer

    from tuneforge.config.schema import DataConfig
    from tuneforge.data.build import build_in_memory
    from tuneforge.data.templates import resolve_template

    tok = AutoTokenizer.from_pretrained(tok_dir)
    started = time.perf_counter()
    bundle = build_in_memory(DataConfig(train=[str(data)], max_length=MAX_LENGTH), "sft", tok,
                             resolve_template("auto", tok), 0)
    s = bundle.stats
    return {"records": s["train_records"], "samples": s["samples"], "rows": s["rows"], "tokens": s["tokens"],
            "supervised_tokens": s["supervised_tokens"], "seconds": round(time.perf_counter() - started, 2)}


class _Tokenizer:
    """The two things the stream asks of a tokenizer, straight from ``tokenizers`` (no transformers import: the
    streaming arm measures the data pipeline's memory, not the library's)."""

    def __init__(self, folder: Path):
        from tokenizers import Tokenizer

        self.backend = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        eos = config.get("eos_token")
        self.eos_token_id = self.backend.token_to_id(eos["content"] if isinstance(eos, dict) else eos)

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]}


def arm_stream(data: Path, tok_dir: Path, work: Path) -> dict:
    sys.modules["torch"] = None  # the stream needs no torch (the trainer's process adds it: a constant)
    from tuneforge.config.schema import DataConfig
    from tuneforge.data.stream import build_streaming

    tok = _Tokenizer(tok_dir)
    cfg = DataConfig(train=[str(data)], max_length=MAX_LENGTH, streaming=True, shuffle_buffer=100)
    dataset = build_streaming(cfg, "pt", tok, None, 0).train
    rows = tokens = 0
    for row in dataset:  # one full pass: stop when the stream starts reading the corpus again
        rows += 1
        tokens += len(row["input_ids"])
        if rows % dataset.buffer == 0 and max(p.epoch for p in dataset.starts.values()) > 0:
            break
    return {"rows": rows, "tokens": tokens, "corpus_mb": round(data.stat().st_size / 2**20, 1)}


def arm_inmemory_pt(data: Path, tok_dir: Path, work: Path) -> dict:
    """The in-memory pretraining blocks of the same corpus under the same cap (expected to run out of memory)."""
    sys.modules["torch"] = None
    from tuneforge.config.schema import DataConfig
    from tuneforge.data.build import build_in_memory

    try:
        bundle = build_in_memory(DataConfig(train=[str(data)], max_length=MAX_LENGTH), "pt", _Tokenizer(tok_dir),
                                 None, 0)
    except MemoryError:
        return {"result": "MemoryError"}
    return {"result": "ok", "rows": len(bundle.train)}


ARMS = {"hf": arm_hf, "hf_cached": arm_hf, "prepare": arm_prepare, "prepare_cached": arm_prepare,
        "inmemory": arm_inmemory, "stream": arm_stream, "inmemory_pt": arm_inmemory_pt}


def run_arm(args) -> None:
    if args.cap_mb:
        cap = int(args.cap_mb * 2**20)
        resource.setrlimit(resource.RLIMIT_DATA, (cap, cap))
    started = time.perf_counter()
    result = ARMS[args.arm](Path(args.data), Path(args.tok), Path(args.work))
    result["process_seconds"] = round(time.perf_counter() - started, 2)
    result.setdefault("seconds", result["process_seconds"])
    # VmHWM, not ru_maxrss: the latter keeps the high-water mark of the process that forked us across exec
    hwm = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
    result["peak_rss_mb"] = round(int(hwm.split()[1]) / 1024, 1)
    result["worker_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)
    print(json.dumps(result))


def spawn(arm: str, data: Path, tok: Path, work: Path, cap_mb: float | None = None) -> dict:
    cmd = [sys.executable, __file__, "--arm", arm, "--data", str(data), "--tok", str(tok), "--work", str(work)]
    if cap_mb:
        cmd += ["--cap-mb", str(cap_mb)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "true" if arm in ("stream", "inmemory_pt") else "false", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1"}
    if arm in ("stream", "inmemory_pt"):  # numpy's OpenBLAS reserves a buffer per thread: one thread under the heap cap
        env["OPENBLAS_NUM_THREADS"] = "1"
    # the machine is shared: sample the 1-minute load average while the arm runs (every 5 s), so each figure
    # names the load it was measured under
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        while proc.poll() is None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                loads.append(os.getloadavg()[0])
        loads.append(os.getloadavg()[0])
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    load = {"load_mean": round(sum(loads) / len(loads), 2), "load_max": round(max(loads), 2)}
    if proc.returncode != 0:
        return {"error": (stderr or stdout).strip().splitlines()[-1:] or ["failed"], **load}
    return {**json.loads(stdout.strip().splitlines()[-1]), **load}


# ----------------------------------------------------------------------------- main


def stream_arms(args, work: Path, tok_dir: Path, pool: list[str]) -> dict:
    """The streaming arm at 1x and 10x corpus, and the in-memory blocks of the 10x corpus, under the same cap."""
    out: dict = {"cap_mb": args.stream_cap_mb}
    for factor in (1, 10):
        corpus = work / f"corpus-{factor}x.jsonl"
        if not corpus.is_file():
            write_corpus(corpus, args.stream_mb * factor, pool, seed=factor)
        result = spawn("stream", corpus, tok_dir, work, cap_mb=args.stream_cap_mb)
        out[f"{factor}x"] = result
        print(json.dumps({"arm": f"stream {factor}x", **result}), flush=True)
    result = spawn("inmemory_pt", work / "corpus-10x.jsonl", tok_dir, work, cap_mb=args.stream_cap_mb)
    out["inmemory_10x"] = result
    print(json.dumps({"arm": "in-memory pt blocks 10x, same cap", **result}), flush=True)
    one, ten = out.get("1x", {}), out.get("10x", {})
    if "peak_rss_mb" in one and "peak_rss_mb" in ten:
        out["rss_growth_10x"] = round(ten["peak_rss_mb"] / one["peak_rss_mb"] - 1, 3)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="10000,100000", help="record counts (comma-separated)")
    parser.add_argument("--inmemory-max", type=int, default=10000, help="largest size the in-memory arm runs at")
    parser.add_argument("--stream-mb", type=float, default=2.0, help="the 1x streaming corpus (MB)")
    parser.add_argument("--stream-cap-mb", type=float, default=128.0, help="RLIMIT_DATA of the streaming arms")
    parser.add_argument("--skip-stream", action="store_true")
    parser.add_argument("--arms", default="hf,hf_cached,prepare,prepare_cached",
                        help="arms run at each size, in this order (e.g. prepare,prepare_cached at 1M records, where "
                             "one arm takes about an hour here)")
    parser.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tok", help=argparse.SUPPRESS)
    parser.add_argument("--cap-mb", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.arm:
        run_arm(args)
        return 0
    work = Path(args.work or tempfile.mkdtemp(prefix="tf-databench-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokenizer"
    described = work / "tokenizer.txt"
    if not described.is_file():  # made once per working directory (a rerun reuses it)
        described.write_text(make_tokenizer(tok_dir), encoding="utf-8")
    tokenizer = described.read_text(encoding="utf-8")
    pool = sentences()
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "?")
    report: dict = {"machine": cpu, "cores": os.cpu_count(), "tokenizer": tokenizer, "num_proc": NUM_PROC,
                    "max_length": MAX_LENGTH, "sizes": {}}
    print(json.dumps({k: v for k, v in report.items() if k != "sizes"}), flush=True)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    for number, size in enumerate(sizes):
        if number == 1 and not args.skip_stream:  # the streaming arm right after the first size (short)
            report["stream"] = stream_arms(args, work, tok_dir, pool)
        folder = work / f"n{size}"
        folder.mkdir(exist_ok=True)
        data = folder / "alpaca.jsonl"
        if not data.is_file():
            write_alpaca(data, size, pool)
        results = {"file_mb": round(data.stat().st_size / 2**20, 1)}
        for arm in [a for a in args.arms.split(",") if a]:
            results[arm] = spawn(arm, data, tok_dir, folder)
            print(json.dumps({"size": size, "arm": arm, **results[arm]}), flush=True)
        if size <= args.inmemory_max:
            results["inmemory"] = spawn("inmemory", data, tok_dir, folder)
            print(json.dumps({"size": size, "arm": "inmemory", **results["inmemory"]}), flush=True)
        hf, prep, cached = results.get("hf", {}), results.get("prepare", {}), results.get("prepare_cached", {})
        if "seconds" in prep and "seconds" in cached:
            results["ratio_cached_to_prepare"] = round(cached["seconds"] / prep["seconds"], 3)
        if "seconds" in hf and "seconds" in prep:
            results["ratio_prepare_to_hf"] = round(prep["seconds"] / hf["seconds"], 2)
        results["records_per_s"] = {a: round(size / results[a]["seconds"], 1) for a in
                                    ("hf", "prepare") if "seconds" in results.get(a, {})}
        if "supervised_tokens" in results.get("inmemory", {}) and "supervised_tokens" in prep:
            ref = results["inmemory"]["supervised_tokens"]
            results["supervised_vs_inmemory"] = round(prep["supervised_tokens"] / ref - 1, 6)
        report["sizes"][size] = results
    if len(sizes) < 2 and not args.skip_stream:
        report["stream"] = stream_arms(args, work, tok_dir, pool)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
