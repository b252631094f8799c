"""Load test of ``tuneforge serve``: N concurrent clients for T seconds, batched serving vs one request at a time.

Both arms serve the same model directory with the real command (``tuneforge serve``, a subprocess bound to
127.0.0.1 only) and face the same closed-loop load: each of ``--clients`` clients sends ``/v1/completions``
requests back to back (a prompt drawn from the Python docs, ``max_tokens`` new tokens, greedy) for ``--seconds``
seconds. The arms differ only in ``--max-batch-size``: 16 (dynamic batching of the waiting requests) vs 1 (serial,
what the server did before). Other processes share the machine, so the arms run interleaved over ``--rounds``
(the order alternates) and the table shows each arm's median round. Reported per arm: requests/s, generated
tokens/s (from ``usage``), p50/p99 latency and failed requests (summed over rounds); then batched/serial
throughput per round.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_load.py [--clients 16] [--seconds 20] [--max-tokens 32]
        [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# A small Llama (≈6M parameters): big enough that a forward pass is real work, small enough for 2 shared cores.
MODEL = {"architecture": "llama", "hidden_size": 256, "num_layers": 4, "num_heads": 4, "vocab_size": 2048,
         "max_position_embeddings": 512}
ARMS = (("batched", 16), ("serial", 1))


def build_model(folder: Path) -> list[str]:
    """Save a from-config model, its tokenizer and template in ``folder``; return prompts to send."""
    import torch

    from tuneforge.config.schema import FromConfig
    from tuneforge.data.builtin import pydoc_topics
    from tuneforge.data.templates import get_template
    from tuneforge.models import build_model as build
    from tuneforge.models import train_tokenizer

    texts = [p.strip() for text in pydoc_topics().values() for p in text.split("\n\n") if len(p.strip()) > 40]
    tokenizer = train_tokenizer(texts[:2000], vocab_size=MODEL["vocab_size"])
    torch.manual_seed(0)
    model = build(FromConfig(**MODEL), tokenizer)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    get_template("chatml").save(folder)
    sentences = [s.strip() for text in texts for s in text.replace("\n", " ").split(". ") if 20 < len(s) < 160]
    return sentences[:500]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_dir: Path, max_batch_size: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    process = subprocess.Popen(
        [sys.executable, "-m", "tuneforge.cli", "serve", f"tiny={model_dir}", "--host", "127.0.0.1", "--port",
         str(port), "--device", "cpu", "--max-batch-size", str(max_batch_size), "--max-queue", "256"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 120
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
    raise RuntimeError("the server did not start within 120 s")


async def load(url: str, prompts: list[str], clients: int, seconds: float, max_tokens: int) -> dict:
    """Closed-loop load; returns counts and latencies of the requests started before the deadline."""
    import httpx

    latencies: list[float] = []
    tokens = failures = 0
    rng = random.Random(0)
    started = time.monotonic()
    end = started + seconds

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal tokens, failures
        while time.monotonic() < end:
            body = {"model": "tiny", "prompt": rng.choice(prompts), "max_tokens": max_tokens, "temperature": 0}
            sent = time.monotonic()
            try:
                response = await http.post(url + "/v1/completions", json=body, timeout=120)
            except httpx.HTTPError:
                failures += 1
                continue
            if response.status_code != 200:
                failures += 1
                continue
            latencies.append(time.monotonic() - sent)
            tokens += response.json()["usage"]["completion_tokens"]

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    elapsed = time.monotonic() - started
    ordered = sorted(latencies)

    def quantile(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")

    return {"requests": len(latencies), "failures": failures, "seconds": elapsed,
            "rps": len(latencies) / elapsed, "tps": tokens / elapsed, "p50": quantile(0.5), "p99": quantile(0.99),
            "mean_tokens": tokens / max(1, len(latencies))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration per arm (bounded: ≤ 120)")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per arm (bounded: ≤ 5)")
    args = parser.parse_args()
    seconds = min(args.seconds, 120.0)
    rounds: dict[str, list[dict]] = {name: [] for name, _ in ARMS}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny"
        prompts = build_model(model_dir)
        for round_index in range(max(1, min(args.rounds, 5))):
            order = ARMS if round_index % 2 == 0 else ARMS[::-1]
            for name, batch in order:
                process, url = start_server(model_dir, batch)
                try:
                    asyncio.run(load(url, prompts, min(args.clients, 4), 3.0, args.max_tokens))  # warm-up
                    rounds[name].append(asyncio.run(load(url, prompts, args.clients, seconds, args.max_tokens)))
                finally:
                    process.terminate()
                    process.wait(timeout=30)
                print(f"round {round_index + 1} {name}: {rounds[name][-1]['tps']:.1f} tokens/s", file=sys.stderr)
    results = {name: sorted(runs, key=lambda r: r["tps"])[(len(runs) - 1) // 2] for name, runs in rounds.items()}
    for name in results:
        results[name] = {**results[name], "failures": sum(r["failures"] for r in rounds[name])}
    per_round = [b["tps"] / max(s["tps"], 1e-9) for b, s in zip(rounds["batched"], rounds["serial"], strict=True)]
    print(f"\n{args.clients} clients × {seconds:.0f} s × {len(per_round)} rounds, /v1/completions, max_tokens "
          f"{args.max_tokens}, greedy; model {MODEL['hidden_size']}×{MODEL['num_layers']} Llama, vocab "
          f"{MODEL['vocab_size']}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}; median round per arm\n")
    print("| arm | --max-batch-size | requests | req/s | tokens/s | p50 latency s | p99 latency s | failed |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch in ARMS:
        r = results[name]
        print(f"| {name} | {batch} | {r['requests']} | {r['rps']:.2f} | {r['tps']:.1f} | {r['p50']:.2f} | "
              f"{r['p99']:.2f} | {r['failures']} |")
    print(f"\nbatched / serial throughput (tokens/s) per round: {', '.join(f'{r:.2f}×' for r in per_round)}")
    print(f"mean generated tokens per request: batched {results['batched']['mean_tokens']:.1f}, "
          f"serial {results['serial']['mean_tokens']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
