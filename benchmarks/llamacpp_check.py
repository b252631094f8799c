"""Run exported GGUF files in llama.cpp itself (through llama-cpp-python) and report what it does with them.

This script runs under a *separate* python that has ``llama_cpp`` installed (it imports nothing from tuneforge, and
tuneforge does not depend on llama-cpp-python), e.g.::

    python3 -m venv /work/llamacpp-venv && CMAKE_BUILD_PARALLEL_LEVEL=1 /work/llamacpp-venv/bin/pip install llama-cpp-python
    /work/llamacpp-venv/bin/python benchmarks/llamacpp_check.py JOB.json OUT.json

(A build that is stopped once ``libllama.so`` has linked also works: point the sdist's ``llama_cpp`` package at the
libraries with ``PYTHONPATH=… LLAMA_CPP_LIB_PATH=…``, as docs/gguf.md's figures were taken.)
``benchmarks/real_model.py --llama-cpp-python /work/llamacpp-venv/bin/python`` writes JOB.json (from the merged
model, with transformers) and compares OUT.json with it. JOB.json::

    {"files": {"q8_0": "/path/model-q8_0.gguf", ...}, "cap": 24, "threads": 1,
     "texts": [{"text": "...", "ids": [HF token ids]}, ...],              # tokenization check
     "items": [{"messages": [...], "prompt": "rendered text", "ids": [...], "answer": [merged model's greedy ids]}]}

For each file, llama.cpp (its own GGUF reader, tokenizer and CPU kernels):

- loads the file (load seconds, the metadata it reads: architecture, ``tokenizer.ggml.pre``, EOS / EOT ids);
- tokenizes every text and rendered prompt (``special=True``: the template's markers are single tokens) — compared
  with the Hugging Face tokenizer's ids;
- renders every item's messages with the chat template stored in the file (llama-cpp-python's Jinja2 chat
  formatter: Python's jinja2, not llama.cpp's C++ template engine) — compared with tuneforge's rendering;
- teacher-forces prompt + the merged model's answer and takes its argmax at every answer position;
- generates its own greedy answer from the prompt ids (at most ``cap`` tokens), stopping at the first token llama.cpp
  itself classes as end-of-generation (``llama_token_is_eog``), and records which token that was.
"""

from __future__ import annotations

import json
import sys
import time


def _is_eog(llm, token: int) -> bool:
    import llama_cpp

    vocab = llama_cpp.llama_model_get_vocab(llm.model)
    return bool(llama_cpp.llama_vocab_is_eog(vocab, token))


def _argmax(row) -> int:
    return int(row.argmax())


def check_file(path: str, job: dict) -> dict:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    threads = int(job.get("threads", 1))
    cap = int(job["cap"])
    longest = max(len(item["ids"]) + len(item["answer"]) for item in job["items"]) + cap + 8
    started = time.perf_counter()
    llm = llama_cpp.Llama(model_path=path, n_ctx=max(256, longest), n_threads=threads, n_threads_batch=threads,
                          n_batch=512, logits_all=True, verbose=False, seed=0)
    meta = dict(llm.metadata)
    out: dict = {"load_s": round(time.perf_counter() - started, 2),
                 "architecture": meta.get("general.architecture"), "pre": meta.get("tokenizer.ggml.pre"),
                 "eos_id": llm.token_eos(), "eot_id": meta.get("tokenizer.ggml.eot_token_id")}

    mismatched = []
    for entry in job["texts"] + [{"text": item["prompt"], "ids": item["ids"]} for item in job["items"]]:
        ids = llm.tokenize(entry["text"].encode("utf-8"), add_bos=False, special=True)
        if list(ids) != list(entry["ids"]):
            mismatched.append({"text": entry["text"][:80], "hf": entry["ids"][:40], "llama_cpp": list(ids)[:40]})
    out["tokenization"] = {"checked": len(job["texts"]) + len(job["items"]), "differ": len(mismatched),
                           "examples": mismatched[:3]}

    template = meta.get("tokenizer.chat_template")
    rendered_same = 0
    if template:
        vocab = {i: llm.detokenize([i], special=True).decode("utf-8", "replace") for i in (llm.token_bos(),
                                                                                          llm.token_eos()) if i >= 0}
        formatter = Jinja2ChatFormatter(template=template, eos_token=vocab.get(llm.token_eos(), ""),
                                        bos_token=vocab.get(llm.token_bos(), ""), add_generation_prompt=True)
        for item in job["items"]:
            rendered_same += int(formatter(messages=item["messages"]).prompt == item["prompt"])
    out["template"] = {"stored": bool(template), "rendered_same": rendered_same, "items": len(job["items"])}

    agree = positions = identical = stopped = 0
    stop_tokens: dict[str, int] = {}
    answers = []
    gen_started = time.perf_counter()
    generated = 0
    for item in job["items"]:
        prompt, answer = list(item["ids"]), list(item["answer"])
        llm.reset()
        llm.eval(prompt + answer)
        scores = llm.scores
        for k, token in enumerate(answer):
            agree += int(_argmax(scores[len(prompt) - 1 + k]) == token)
        positions += len(answer)
        llm.reset()
        llm.eval(prompt)
        mine: list[int] = []
        while len(mine) < cap:
            token = _argmax(llm.scores[llm.n_tokens - 1])
            mine.append(token)
            if _is_eog(llm, token):
                stopped += 1
                stop_tokens[str(token)] = stop_tokens.get(str(token), 0) + 1
                break
            llm.eval([token])
        generated += len(mine)
        identical += int(mine == answer)
        answers.append(mine)
    gen_s = time.perf_counter() - gen_started
    out.update(agree=agree, positions=positions, agreement=agree / max(positions, 1), identical=identical,
               stopped=stopped, items=len(job["items"]), stop_tokens=stop_tokens, answers=answers,
               generated_tokens=generated, generate_s=round(gen_s, 1))
    del llm
    return out


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit("usage: llamacpp_check.py JOB.json OUT.json (run with a python that has llama_cpp installed)")
    try:
        import llama_cpp
    except ImportError:
        sys.exit(f"{sys.executable}: no llama_cpp here; pip install llama-cpp-python into this python's venv")
    job = json.loads(open(sys.argv[1], encoding="utf-8").read())
    result = {"llama_cpp_python": llama_cpp.__version__, "files": {}}
    for name, path in job["files"].items():
        print(f"[llama.cpp] {name}: {path}", flush=True)
        result["files"][name] = check_file(path, job)
        with open(sys.argv[2], "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
