"""Load test of ``tuneforge serve``: continuous vs dynamic batching on the same model, in the same run.

Both arms serve the same base and two LoRA adapters of it (``a``, ``b``) with the real command (``tuneforge serve``,
a subprocess bound to 127.0.0.1), differing only in ``--batching continuous|dynamic``; the arms alternate over
``--rounds`` (other processes share the machine) and the table shows each arm's median round. Requests stream
(``/v1/completions``, greedy), so time to first token (TTFT) and per-token latency are measured on the client
(``--stream-share`` < 1 streams only that share of the closed-loop requests: the client shares the CPU).

Workloads per arm:

- **long + short**: two 256-token generations run; meanwhile 4-token requests are sent one after another; their
  latency is compared with the same request on the idle server (target: within 4x);
- **closed loop at 8 / 32 / 64 clients**, a mixed workload: one request in five asks for 128 tokens, the others for
  16; adapter ``a`` only (target: requests/s at 32 clients >= 3x at 8);
- **mixed adapters at 32 clients**: the same load, each request for ``a`` or ``b`` at random (target: >= 0.8x the
  single-adapter throughput);
- **greedy identity**: the answers given under load equal the answers each prompt gets alone.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py [--seconds 15] [--rounds 1]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A small Llama (≈6M parameters): big enough that a forward pass is real work, small enough for 2 shared cores.
MODEL = {"architecture": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "vocab_size": 2048,
         "max_position_embeddings": 512}
ARMS = ("continuous", "dynamic")
CLIENTS = (8, 32, 64)
MAX_BATCH = 64


def build_models(folder: Path) -> list[str]:
    """Save a from-config base, two LoRA adapters of it (``a``, ``b``) with tokenizer and template; return prompts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tuneforge.config.schema import FromConfig
    from tuneforge.data.builtin import pydoc_topics
    from tuneforge.data.templates import get_template
    from tuneforge.models import build_model as build
    from tuneforge.models import train_tokenizer

    texts = [p.strip() for text in pydoc_topics().values() for p in text.split("\n\n") if len(p.strip()) > 40]
    tokenizer = train_tokenizer(texts[:2000], vocab_size=MODEL["vocab_size"])
    torch.manual_seed(0)
    model = build(FromConfig(**MODEL), tokenizer)
    base = folder / "base"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    get_template("chatml").save(base)
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                            init_lora_weights=False, lora_dropout=0.0)
        adapter = get_peft_model(AutoModelForCausalLM.from_pretrained(base), config)
        adapter.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        get_template("chatml").save(folder / name)
    sentences = [s.strip() for text in texts for s in text.replace("\n", " ").split(". ") if 20 < len(s) < 160]
    return sentences[:500]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(folder: Path, batching: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "serve", f"a={folder / 'a'}", f"b={folder / 'b'}", "--host",
         "127.0.0.1", "--port", str(port), "--device", "cpu", "--batching", batching, "--max-batch-size",
         str(MAX_BATCH), "--max-queue", "512", "--max-tokens-limit", "512"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError("the server exited during start-up")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    process.terminate()
    raise RuntimeError("the server did not start within 180 s")


async def one(http, url: str, model: str, prompt: str, max_tokens: int, stream: bool = True) -> dict:
    """One greedy completion: latency, tokens, text; streamed: also TTFT and per-token latency."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": stream}
    sent = time.monotonic()
    if not stream:
        response = await http.post(url + "/v1/completions", json=body, timeout=300)
        if response.status_code != 200:
            return {"ok": False}
        data = response.json()
        return {"ok": True, "latency": time.monotonic() - sent, "tokens": data["usage"]["completion_tokens"],
                "text": data["choices"][0]["text"], "streamed": False}
    body["stream_options"] = {"include_usage": True}
    first = None
    text, tokens = [], 0
    async with http.stream("POST", url + "/v1/completions", json=body, timeout=300) as response:
        if response.status_code != 200:
            await response.aread()
            return {"ok": False}
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return {"ok": False}
            if data.get("usage"):
                tokens = data["usage"]["completion_tokens"]
            for choice in data.get("choices", ()):
                if choice.get("text"):
                    first = first or time.monotonic()
                    text.append(choice["text"])
    end = time.monotonic()
    first = first or end
    return {"ok": True, "latency": end - sent, "ttft": first - sent, "tokens": tokens, "text": "".join(text),
            "per_token": (end - first) / max(1, tokens - 1), "streamed": True}


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def closed_loop(url: str, prompts: list[str], clients: int, seconds: float, models: tuple[str, ...],
                      seed: int = 0, stream_share: float = 1.0) -> dict:
    """``clients`` clients sending back to back for ``seconds``: one request in five asks for 128 tokens; a share
    ``stream_share`` of them streams (TTFT and per-token latency are measured on those)."""
    import httpx

    rng = random.Random(seed)
    done: list[dict] = []
    failures = 0
    end = time.monotonic() + seconds
    started = time.monotonic()

    async def client(http):
        nonlocal failures
        while time.monotonic() < end:
            budget = 128 if rng.random() < 0.2 else 16
            stream = rng.random() < stream_share
            result = await one(http, url, rng.choice(models), rng.choice(prompts), budget, stream)
            if result["ok"]:
                done.append(result)
            else:
                failures += 1

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.monotonic() - started
    streamed = [r for r in done if r["streamed"]]
    return {"clients": clients, "requests": len(done), "failures": failures, "rps": len(done) / elapsed,
            "tps": sum(r["tokens"] for r in done) / elapsed,
            "ttft_p50": quantile([r["ttft"] for r in streamed], 0.5),
            "ttft_p99": quantile([r["ttft"] for r in streamed], 0.99),
            "tok_p50": quantile([r["per_token"] for r in streamed], 0.5),
            "tok_p99": quantile([r["per_token"] for r in streamed], 0.99)}


async def long_and_short(url: str, prompts: list[str], shorts: int = 6) -> dict:
    """4-token requests alone, then while two 256-token generations run."""
    import httpx

    async with httpx.AsyncClient() as http:
        alone = [(await one(http, url, "a", prompts[i], 4))["latency"] for i in range(shorts)]
        longs = [asyncio.ensure_future(one(http, url, "a", prompts[100 + i], 256)) for i in range(2)]
        await asyncio.sleep(0.5)
        beside = []
        for i in range(shorts):
            if all(task.done() for task in longs):
                break
            beside.append((await one(http, url, "a", prompts[i], 4))["latency"])
        long_results = await asyncio.gather(*longs)
    return {"alone": statistics.median(alone), "beside": statistics.median(beside) if beside else float("nan"),
            "long_seconds": max(r["latency"] for r in long_results), "long_tokens": [r["tokens"] for r in long_results]}


async def answers(url: str, prompts: list[str], concurrent: bool) -> list[str]:
    """Greedy 24-token answers of ``prompts`` (alternating adapters), one at a time or all at once."""
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=64)) as http:
        calls = [one(http, url, "ab"[i % 2], p, 24) for i, p in enumerate(prompts)]
        if concurrent:
            results = await asyncio.gather(*calls)
        else:
            results = [await call for call in calls]
    return [r.get("text") for r in results]


def run_arm(folder: Path, batching: str, prompts: list[str], seconds: float, stream_share: float = 1.0) -> dict:
    process, url = start_server(folder, batching)
    try:
        asyncio.run(closed_loop(url, prompts, 4, 3.0, ("a", "b")))  # warm-up
        out = {"long_short": asyncio.run(long_and_short(url, prompts))}
        out["load"] = [asyncio.run(closed_loop(url, prompts, c, seconds, ("a",), stream_share=stream_share))
                       for c in CLIENTS]
        out["mixed"] = asyncio.run(closed_loop(url, prompts, 32, seconds, ("a", "b"), seed=1,
                                               stream_share=stream_share))
        sample = prompts[200:216]
        out["greedy_identical"] = asyncio.run(answers(url, sample, True)) == asyncio.run(answers(url, sample, False))
    finally:
        process.terminate()
        process.wait(timeout=30)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="duration of each load point (bounded: <= 60)")
    parser.add_argument("--rounds", type=int, default=1, help="alternating rounds per arm (bounded: <= 3)")
    parser.add_argument("--stream-share", type=float, default=1.0,
                        help="share of the closed-loop requests that stream (the latency percentiles come from "
                        "them; the others are plain requests, cheaper for a client on the same machine)")
    args = parser.parse_args()
    seconds = min(args.seconds, 60.0)
    rounds: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        prompts = build_models(folder)
        for index in range(max(1, min(args.rounds, 3))):
            for arm in (ARMS if index % 2 == 0 else ARMS[::-1]):
                rounds[arm].append(run_arm(folder, arm, prompts, seconds, args.stream_share))
                print(f"round {index + 1} {arm}: {json.dumps(rounds[arm][-1])}", file=sys.stderr, flush=True)
    results = {arm: sorted(runs, key=lambda r: r["load"][1]["rps"])[(len(runs) - 1) // 2]
               for arm, runs in rounds.items()}
    print(f"\n`tuneforge serve`, {MODEL['hidden_size']}x{MODEL['num_layers']} Llama (vocab {MODEL['vocab_size']}) + "
          f"two LoRA adapters (r 8), --max-batch-size {MAX_BATCH}, streamed greedy /v1/completions, "
          f"{seconds:.0f} s per load point, {100 * args.stream_share:.0f}% of the closed-loop requests streamed, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}; "
          f"median of {len(rounds[ARMS[0]])} round(s)\n")
    print("| arm | workload | clients | requests | req/s | tokens/s | TTFT p50 / p99 s | per-token p50 / p99 ms |"
          " failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arm in ARMS:
        for name, point in [("mixed lengths, adapter a", p) for p in results[arm]["load"]] + [
                ("mixed lengths, adapters a+b", results[arm]["mixed"])]:
            print(f"| {arm} | {name} | {point['clients']} | {point['requests']} | {point['rps']:.2f} | "
                  f"{point['tps']:.0f} | {point['ttft_p50']:.2f} / {point['ttft_p99']:.2f} | "
                  f"{1000 * point['tok_p50']:.0f} / {1000 * point['tok_p99']:.0f} | {point['failures']} |")
    print("\n| arm | 4-token request alone s | beside two 256-token generations s | ratio (target <= 4) | "
          "rps 32 / rps 8 (target >= 3) | mixed / single adapter at 32 (target >= 0.8) | greedy under load = alone |")
    print("|---|---|---|---|---|---|---|")
    for arm in ARMS:
        r = results[arm]
        ls = r["long_short"]
        scale = r["load"][1]["rps"] / max(r["load"][0]["rps"], 1e-9)
        mixed = r["mixed"]["rps"] / max(r["load"][1]["rps"], 1e-9)
        print(f"| {arm} | {ls['alone']:.2f} | {ls['beside']:.2f} | {ls['beside'] / ls['alone']:.1f}x | {scale:.2f}x | "
              f"{mixed:.2f}x | {r['greedy_identical']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
