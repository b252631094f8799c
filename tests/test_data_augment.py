"""``tuneforge data augment``: the ROUGE-L filter, provenance, resume and bad input, against a real HTTP teacher.

The teacher is a stdlib ``http.server`` in a thread answering ``/v1/chat/completions`` from a table keyed by the
request's ``seed`` (request *i* of the run has seed *i*: input position × n + variant), or, for ``backtranslate``,
by the exact prompt (a small translation table), so every reply and every ROUGE-L below is known in advance. Hand
computation (rouge-score tokens: lower-cased letter/digit runs, one per Han character; ROUGE-L F1 = 2·LCS / (len a +
len b)) is written next to each reply.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tuneforge.cli import main

INPUTS = [
    {"instruction": "What is the capital of France?", "output": "Paris."},
    {"instruction": "Name three primary colors.", "output": "Red, blue and yellow."},
    {
        "instruction": "Explain why the sky is blue in one sentence.",
        "output": "Air scatters blue light the most.",
    },
]
# rewrite, --n 2: seeds 0-1 for in.jsonl:1, 2-3 for :2, 4-5 for :3.
REPLIES = {
    # tell me which city serves as france s seat of government (11) vs "what is the capital of france" (6):
    # "france" and "of" come in opposite orders, LCS 1 → 2/17 = 0.1176; nothing shared with the others: KEPT.
    0: ("INSTRUCTION: Tell me which city serves as France's seat of government.\nANSWER: Paris.", "stop"),
    # 12 tokens; vs seed 0 (kept): LCS "tell me which city serves as seat of government" 9 → 18/23 = 0.783: DROPPED,
    # although vs every input it is below 0.7 (vs "what is the capital of france": the, of, france → 6/18).
    1: (
        "**Instruction:** Tell me which city serves as the seat of government of France.\n**Answer:** Paris.",
        "stop",
    ),
    2: ("Sure! Here is a rewritten version for you.", "stop"),  # no INSTRUCTION/ANSWER: unreadable
    # list the three primary colours of paint (7) vs "name three primary colors" (4): LCS 2 → 4/11 = 0.3636
    # (vs "what is the capital of france": the..of → 4/13; vs seed 0: of → 2/18): KEPT, rouge_l_max 0.3636.
    3: (
        "<think>\nEasy.\n</think>\nINSTRUCTION: List the three primary colours of paint.\nANSWER: Red, yellow, blue.",
        "stop",
    ),
    # 10 tokens vs "explain why the sky is blue in one sentence" (9): LCS 8 → 16/19 = 0.842: DROPPED.
    4: (
        "INSTRUCTION: Explain why the sky is blue in a single sentence.\nANSWER: Rayleigh scattering.",
        "stop",
    ),
    5: (
        "INSTRUCTION: Why does the daytime sky look blue?\nANSWER: Because shorter wavelen",
        "length",
    ),  # cut off
}
EXPECTED_COUNTS = {
    "inputs": 3,
    "requests": 6,
    "kept": 2,
    "near_duplicate": 2,
    "bad_reply": 1,
    "answer_changed": 0,
    "truncated": 1,
    "teacher_error": 0,
}


class FakeTeacher:
    """A real local HTTP server speaking the OpenAI chat-completions protocol, with switchable failures."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        self.down_from_seed: int | None = None  # 503 for every seeded request from this seed on
        self.fail_once: set[int] = set()  # seeds answered 500 the first time
        self.by_prompt: dict[str, str] | None = None  # reply by the prompt's text instead of by seed
        teacher = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                teacher.requests.append(body)
                if self.path != "/v1/chat/completions":
                    return self._send(404, {"error": {"message": f"no route {self.path}"}})
                seed = body.get("seed")
                if seed is None:  # the probe
                    return self._send(200, _completion("OK", "stop"))
                if teacher.down_from_seed is not None and seed >= teacher.down_from_seed:
                    return self._send(503, {"error": {"message": "overloaded"}})
                if seed in teacher.fail_once:
                    teacher.fail_once.discard(seed)
                    return self._send(500, {"error": {"message": "transient"}})
                if teacher.by_prompt is not None:
                    prompt = body["messages"][-1]["content"]
                    if prompt not in teacher.by_prompt:  # a prompt the test did not expect: fail loudly
                        return self._send(400, {"error": {"message": f"unexpected prompt {prompt!r}"}})
                    return self._send(200, _completion(teacher.by_prompt[prompt], "stop"))
                return self._send(200, _completion(*REPLIES[seed]))

            def _send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):  # keep the test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        # a short poll: shutdown() waits for it at every teardown
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _completion(text: str, finish_reason: str) -> dict:
    return {
        "id": "x",
        "object": "chat.completion",
        "model": "fake",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        ],
    }


@pytest.fixture()
def teacher(monkeypatch):
    from tuneforge.data import teacher as teacher_module

    monkeypatch.setattr(teacher_module, "BACKOFF_SECONDS", 0.01)
    fake = FakeTeacher()
    yield fake
    fake.close()


def write_inputs(folder: Path, rows=INPUTS) -> Path:
    path = folder / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def augment(src: Path, out: Path, url: str, *extra: str) -> int:
    return main(
        [
            "data",
            "augment",
            str(src),
            "--out",
            str(out),
            "--teacher",
            url,
            "--mode",
            "rewrite",
            "--n",
            "2",
            "--no-progress",
            *extra,
        ]
    )


def read_out(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]


def state_of(out: Path) -> dict:
    return json.loads(out.with_name(out.name + ".augment-state").read_text(encoding="utf-8"))


def test_rouge_filter_keeps_and_drops_the_hand_checked_records(tmp_path, teacher):
    src, out = write_inputs(tmp_path), tmp_path / "aug.jsonl"
    teacher.fail_once = {3}  # one 500: retried, then answered
    assert augment(src, out, teacher.url, "--concurrency", "1") == 0

    records = read_out(out)
    assert [r["messages"][0]["content"] for r in records] == [
        "Tell me which city serves as France's seat of government.",
        "List the three primary colours of paint.",
    ]
    assert [r["messages"][1] for r in records] == [
        {"role": "assistant", "content": "Paris."},
        {"role": "assistant", "content": "Red, yellow, blue."},
    ]
    assert [r["augment"] for r in records] == [
        {
            "mode": "rewrite",
            "teacher": teacher.url,
            "source": f"{src}:1",
            "n": 2,
            "variant": 1,
            "rouge_l_max": round(2 / 17, 4),
        },
        {
            "mode": "rewrite",
            "teacher": teacher.url,
            "source": f"{src}:2",
            "n": 2,
            "variant": 2,
            "rouge_l_max": round(4 / 11, 4),
        },
    ]
    assert state_of(out)["counts"] == EXPECTED_COUNTS
    # requests: the probe, then seeds 0..5 (3 twice: the retry), each carrying the input's instruction
    seeds = [r.get("seed") for r in teacher.requests]
    assert seeds == [None, 0, 1, 2, 3, 3, 4, 5]
    assert "What is the capital of France?" in teacher.requests[1]["messages"][0]["content"]
    assert teacher.requests[1]["max_tokens"] == 512 and teacher.requests[1]["temperature"] == 0.0
    assert "top_k" not in teacher.requests[1]  # not an OpenAI field: sent only when set


def test_concurrent_requests_give_the_same_output(tmp_path, teacher):
    src = write_inputs(tmp_path)
    one, many = tmp_path / "one.jsonl", tmp_path / "many.jsonl"
    assert augment(src, one, teacher.url, "--concurrency", "1") == 0
    assert augment(src, many, teacher.url, "--concurrency", "3") == 0
    assert one.read_bytes() == many.read_bytes()


def test_pruned_search_equals_brute_force():
    from rouge_score import rouge_scorer

    from tests.helpers import stdlib_texts
    from tuneforge.data.augment import RougePool
    from tuneforge.text import UnicodeTokenizer

    sentences = [
        s.strip() for t in stdlib_texts(400) for s in t.replace("\n", " ").split(". ") if len(s) > 20
    ]
    pooled, new = sentences[:300], sentences[300:330]
    pool, scorer = RougePool(pooled), rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeTokenizer())
    for text in new:
        brute = max(scorer.score(other, text)["rougeL"].fmeasure for other in pooled)
        assert pool.max_rouge_l(text) == pytest.approx(brute, rel=1e-12)


def test_filter_uses_the_rouge_of_tuneforge_eval():
    from tuneforge.data.augment import RougePool
    from tuneforge.evaluate.metrics import rouge

    pool = RougePool(["What is the capital of France?", "Name three primary colors."])
    text = "List the three primary colours of paint."
    assert pool.max_rouge_l(text) == pytest.approx(4 / 11)
    assert pool.max_rouge_l(text) * 100 == pytest.approx(
        rouge([text], ["Name three primary colors."])["rougeL"]
    )
    # non-ASCII: one token per Han character (the eval tokenizer), so near-duplicates in Chinese are caught too
    zh = RougePool(["我喜欢人工智能"])
    assert zh.max_rouge_l("我很喜欢人工智能") == pytest.approx(2 * 7 / (7 + 8))


def test_parse_reply_is_robust():
    from tuneforge.data.augment import parse_reply

    assert parse_reply("rewrite", "## Instruction：Say hi.\n\n**ANSWER**: Hi!") == {
        "instruction": "Say hi.",
        "answer": "Hi!",
    }
    assert parse_reply("rewrite", "INSTRUCTION: Say hi.") is None  # no answer
    assert parse_reply("rewrite", "<think>never closed INSTRUCTION: a ANSWER: b") is None
    assert parse_reply("reverse", '"Write a haiku about rain."') == {
        "instruction": "Write a haiku about rain."
    }
    assert parse_reply("cot", "REASONING:\n3 + 5: add the units.\nANSWER: 8") == {
        "reasoning": "3 + 5: add the units.",
        "answer": "8",
    }
    assert parse_reply("cot", "") is None


# backtranslate: the guide's round trip (chapter 003 §5.1: "我喜欢AI" → "I like AI" → "我对人工智能很感兴趣").
BT_INPUTS = [
    {"instruction": "我喜欢AI", "output": "我也是。"},  # 3 Han tokens of 4: pivot auto = English
    # Alpaca input: the readers fold it into the user turn, which is translated whole; all Latin: pivot Chinese
    {"instruction": "Summarize the text.", "input": "The cat sat on the mat.", "output": "A cat sat."},
    {"instruction": "What is the capital of France?", "output": "Paris."},
]
BT_USER = ["我喜欢AI", "Summarize the text.\n\nThe cat sat on the mat.", "What is the capital of France?"]
# (text, pivot, the reply naming the language) and (pivot text, the reply of the return leg), per input
BT_LEGS = [
    (
        ("我喜欢AI", "English", "LANGUAGE: Chinese\nTRANSLATION: I like AI"),
        ("I like AI", "Chinese", "TRANSLATION: 我对人工智能很感兴趣"),
    ),
    (
        (BT_USER[1], "Chinese", "LANGUAGE: English\nTRANSLATION: 总结这段文字。\n\n猫坐在垫子上。"),
        # a bare reply (no label) is taken as the translation
        (
            "总结这段文字。\n\n猫坐在垫子上。",
            "English",
            "Give a summary of this passage.\n\nThe cat was sitting on the mat.",
        ),
    ),
    (
        (BT_USER[2], "Chinese", "**Language:** English\n**Translation:** 法国的首都是哪里？"),
        (
            "法国的首都是哪里？",
            "English",
            "TRANSLATION: What is the capital of France?",
        ),  # came back unchanged
    ),
]
BT_COUNTS = {
    "inputs": 3,
    "requests": 3,
    "kept": 2,
    "near_duplicate": 1,
    "bad_reply": 0,
    "answer_changed": 0,
    "truncated": 0,
    "teacher_error": 0,
}


def _translation_table() -> dict[str, str]:
    from tuneforge.data.augment import pivot_prompt, return_prompt

    table = {}
    for (text, pivot, there), (pivot_text, language, back) in BT_LEGS:
        table[pivot_prompt(text, pivot)[0]["content"]] = there
        table[return_prompt(pivot_text, pivot, language)[0]["content"]] = back
    return table


def backtranslate(src: Path, out: Path, url: str, *extra: str) -> int:
    args = ["data", "augment", str(src), "--out", str(out), "--teacher", url, "--mode", "backtranslate"]
    return main([*args, "--no-progress", *extra])


def test_backtranslate_is_a_round_trip_through_a_pivot_language(tmp_path, teacher):
    from tuneforge.data.augment import pivot_prompt, return_prompt

    src, out = write_inputs(tmp_path, BT_INPUTS), tmp_path / "bt.jsonl"
    teacher.by_prompt = _translation_table()
    assert backtranslate(src, out, teacher.url, "--concurrency", "1") == 0

    # two calls per input, in order, both seeded by the round trip: there into the pivot, back into the language
    # the first reply named
    asked = [(r.get("seed"), r["messages"]) for r in teacher.requests[1:]]
    expected = []
    for seed, ((text, pivot, _), (pivot_text, language, _)) in enumerate(BT_LEGS):
        expected += [(seed, pivot_prompt(text, pivot)), (seed, return_prompt(pivot_text, pivot, language))]
    assert asked == expected
    assert "into English" in asked[0][1][0]["content"] and "我喜欢AI" in asked[0][1][0]["content"]
    assert "from English into Chinese" in asked[1][1][0]["content"]
    assert (
        "into Chinese" in asked[2][1][0]["content"] and "The cat sat on the mat." in asked[2][1][0]["content"]
    )

    records = read_out(out)
    # the round-tripped instruction with the ORIGINAL answer
    assert [r["messages"] for r in records] == [
        [{"role": "user", "content": "我对人工智能很感兴趣"}, {"role": "assistant", "content": "我也是。"}],
        [
            {"role": "user", "content": "Give a summary of this passage.\n\nThe cat was sitting on the mat."},
            {"role": "assistant", "content": "A cat sat."},
        ],
    ]
    assert [r["augment"] for r in records] == [
        {
            "mode": "backtranslate",
            "teacher": teacher.url,
            "source": f"{src}:1",
            "n": 1,
            "variant": 1,
            "pivot": "English",
            "source_language": "Chinese",
            "pivot_text": "I like AI",
            # 我对人工智能很感兴趣 (10 tokens) vs 我喜欢AI (我 喜 欢 ai): LCS 我 → 2/14
            "rouge_l_max": round(2 / 14, 4),
        },
        {
            "mode": "backtranslate",
            "teacher": teacher.url,
            "source": f"{src}:2",
            "n": 1,
            "variant": 1,
            "pivot": "Chinese",
            "source_language": "English",
            "pivot_text": "总结这段文字。\n\n猫坐在垫子上。",
            # give a summary of this passage the cat was sitting on the mat (13) vs summarize the text the cat sat
            # on the mat (9): LCS "the cat on the mat" 5 → 10/22
            "rouge_l_max": round(10 / 22, 4),
        },
    ]
    # the third round trip came back unchanged: ROUGE-L 1.0 to its own input, dropped
    assert state_of(out)["counts"] == BT_COUNTS


def test_backtranslate_resumes_byte_identical_and_keeps_its_pivot(tmp_path, teacher, capsys):
    src = write_inputs(tmp_path, BT_INPUTS)
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    teacher.by_prompt = _translation_table()
    assert backtranslate(src, whole, teacher.url) == 0

    teacher.down_from_seed = 2  # down for the third input's round trip
    assert backtranslate(src, parts, teacher.url, "--retries", "0") == 2
    assert state_of(parts)["done"] == 2
    with open(parts, "ab") as handle:
        handle.write(b'{"messages": [{"role": "user", "content": "Wh')
    teacher.down_from_seed = None
    teacher.requests.clear()
    assert backtranslate(src, parts, teacher.url) == 0
    assert [r.get("seed") for r in teacher.requests] == [
        None,
        2,
        2,
    ]  # the probe, then the unfinished round trip
    assert parts.read_bytes() == whole.read_bytes()
    assert state_of(parts)["counts"] == BT_COUNTS

    capsys.readouterr()
    assert backtranslate(src, parts, teacher.url, "--pivot", "Japanese") == 2
    assert "pivot: 'auto' → 'Japanese'" in capsys.readouterr().err
    assert parts.read_bytes() == whole.read_bytes()

    # --n 2, greedy, one pivot: the second round trip is the first one again, dropped (and the user is told)
    twice = tmp_path / "twice.jsonl"
    assert backtranslate(src, twice, teacher.url, "--n", "2") == 0
    assert "give 2 pivots, e.g. --pivot English,Japanese" in " ".join(capsys.readouterr().err.split())
    assert [r["augment"]["variant"] for r in read_out(twice)] == [1, 1]
    assert state_of(twice)["counts"] == {**BT_COUNTS, "requests": 6, "near_duplicate": 4}


def test_pivot_choice():
    from tuneforge.data.augment import Seed, auto_pivot, check_pivots, pivot_for
    from tuneforge.errors import UserError

    assert auto_pivot("我喜欢AI") == "English"  # 3 Han tokens, 1 Latin
    assert auto_pivot("What is the capital of France?") == "Chinese"
    assert auto_pivot("Résumez ce texte en une phrase.") == "Chinese"  # Latin script, not only English
    assert auto_pivot("Переведи это предложение.") == "English"
    # 12 Han tokens against 9 Latin words: a Chinese instruction quoting English text goes through English
    assert auto_pivot("把下面的句子翻译成中文：The quick brown fox jumps over the lazy dog.") == "English"

    assert check_pivots("backtranslate", None) == () == check_pivots("backtranslate", "auto")
    pivots = check_pivots("backtranslate", "English, Japanese")
    seed = Seed("x:1", "我喜欢AI", "我也是。")
    assert [pivot_for(seed, pivots, v) for v in (1, 2, 3)] == ["English", "Japanese", "English"]
    assert pivot_for(seed, (), 2) == "English"
    for spec in ("English,,French", "auto,English", "English,english"):
        with pytest.raises(UserError, match="language names separated by commas"):
            check_pivots("backtranslate", spec)
    with pytest.raises(UserError, match="--mode rewrite has none"):
        check_pivots("rewrite", "English")


def test_parse_translation_takes_the_whole_text():
    from tuneforge.data.augment import parse_translation

    # lines of the translated text that look like labels stay in it
    reply = "<think>ok</think>\nLANGUAGE: English\nTRANSLATION: 写一个函数。\nLanguage: Python\nAnswer: 无"
    assert parse_translation(reply, with_language=True) == {
        "language": "English",
        "translation": "写一个函数。\nLanguage: Python\nAnswer: 无",
    }
    assert parse_translation("TRANSLATION: I like AI", with_language=True) is None  # no language named
    assert parse_translation("LANGUAGE: Chinese", with_language=True) is None  # no translation
    assert parse_translation("LANGUAGE: " + "x" * 41 + "\nTRANSLATION: a", with_language=True) is None
    assert parse_translation("我对人工智能很感兴趣", with_language=False) == {
        "translation": "我对人工智能很感兴趣"
    }
    assert parse_translation("<think>unfinished", with_language=False) is None


def test_reverse_is_instruction_backtranslation():
    from tuneforge.data.augment import Seed, build_prompt, new_messages, parse_reply

    seed = Seed(
        "x:1", "What is the capital of France?", "Paris is the capital of France.", system="Be brief."
    )
    prompt = build_prompt("reverse", seed)[0]["content"]
    assert (
        "Paris is the capital of France." in prompt and "What is the capital" not in prompt
    )  # from the answer
    parsed = parse_reply("reverse", "INSTRUCTION: Which city is France's capital?")
    assert new_messages("reverse", seed, parsed) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Which city is France's capital?"},
        {"role": "assistant", "content": "Paris is the capital of France."},  # the original answer
    ]


def test_resume_after_interruption_gives_the_uninterrupted_output(tmp_path, teacher):
    src = write_inputs(tmp_path)
    whole, parts = tmp_path / "whole.jsonl", tmp_path / "parts.jsonl"
    assert augment(src, whole, teacher.url) == 0

    teacher.down_from_seed = 4  # the teacher goes down during the third input
    assert augment(src, parts, teacher.url, "--retries", "1") == 2
    assert state_of(parts)["done"] == 2 and len(read_out(parts)) == 2
    with open(parts, "ab") as handle:  # and a kill left half a record behind
        handle.write(b'{"messages": [{"role": "user", "content": "Expl')

    teacher.down_from_seed = None
    teacher.requests.clear()
    assert augment(src, parts, teacher.url, "--retries", "1") == 0
    assert [r.get("seed") for r in teacher.requests] == [
        None,
        4,
        5,
    ]  # only the unfinished input is asked again
    assert parts.read_bytes() == whole.read_bytes()
    assert state_of(parts)["counts"] == state_of(whole)["counts"] == EXPECTED_COUNTS

    teacher.requests.clear()  # a finished run: nothing more to ask
    assert augment(src, parts, teacher.url) == 0
    assert [r.get("seed") for r in teacher.requests] == [None]
    assert parts.read_bytes() == whole.read_bytes()


def test_other_arguments_or_a_foreign_out_need_overwrite(tmp_path, teacher, capsys):
    src, out = write_inputs(tmp_path), tmp_path / "aug.jsonl"
    assert augment(src, out, teacher.url) == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert augment(src, out, teacher.url, "--max-rouge", "0.9") == 2
    assert "max_rouge: 0.7 → 0.9" in capsys.readouterr().err
    assert out.read_bytes() == before
    assert augment(src, out, teacher.url, "--max-rouge", "0.9", "--overwrite") == 0
    assert len(read_out(out)) == 4  # seeds 1 (0.783) and 4 (0.842) now pass too

    import fcntl

    with open(out, "ab") as held:  # another augment run holds OUT
        fcntl.flock(held.fileno(), fcntl.LOCK_EX)
        assert augment(src, out, teacher.url, "--max-rouge", "0.9") == 2
        assert "being written by another tuneforge data augment" in capsys.readouterr().err

    foreign = tmp_path / "mine.jsonl"
    foreign.write_text('{"text": "my own notes"}\n', encoding="utf-8")
    assert augment(src, foreign, teacher.url) == 2
    assert "not an augmentation in progress" in capsys.readouterr().err
    assert foreign.read_text(encoding="utf-8") == '{"text": "my own notes"}\n'


def test_bad_input_exits_2_and_writes_nothing(tmp_path, teacher, capsys):
    src, out = write_inputs(tmp_path), tmp_path / "aug.jsonl"
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    cases = [
        (["--teacher", closed], "cannot connect"),
        (["--teacher", teacher.url.removesuffix("/v1")], "HTTP 404"),
        (["--mode", "paraphrase"], "--mode 'paraphrase' is not known"),
        (["--n", "0"], "--n 0 must be at least 1"),
        (["--n", "two"], "--n 'two' must be a positive whole number"),
        (["--max-rouge", "70"], "--max-rouge 70 must be in (0, 1]"),
        (["--pivot", "English"], "--mode rewrite has none"),
    ]
    for extra, message in cases:
        args = [
            "data",
            "augment",
            str(src),
            "--out",
            str(out),
            "--teacher",
            teacher.url,
            "--mode",
            "rewrite",
            "--no-progress",
        ]
        for flag, value in zip(extra[::2], extra[1::2], strict=True):
            if flag in args:
                args[args.index(flag) + 1] = value
            else:
                args += [flag, value]
        assert main(args) == 2, extra
        assert message in capsys.readouterr().err, extra
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(INPUTS[0]) + "\n{not json\n", encoding="utf-8")
    assert augment(broken, out, teacher.url) == 2
    assert f"{broken}:2: malformed JSON" in capsys.readouterr().err
    assert augment(tmp_path / "missing.jsonl", out, teacher.url) == 2
    assert augment(src, src, teacher.url) == 2
    assert "is the input" in capsys.readouterr().err
    text_only = tmp_path / "text.jsonl"
    text_only.write_text('{"text": "plain"}\n', encoding="utf-8")
    assert augment(text_only, out, teacher.url) == 2
    assert "no record to augment" in capsys.readouterr().err
    assert not out.exists() and not out.with_name(out.name + ".augment-state").exists()
    assert src.read_text(encoding="utf-8") == "".join(json.dumps(r) + "\n" for r in INPUTS)
    assert all(r.get("seed") is None for r in teacher.requests)  # only probes ever reached the teacher


def test_out_reads_and_renders_as_training_data(tmp_path, teacher, capsys):
    import yaml

    from tuneforge.data.readers import read_records

    src, out = write_inputs(tmp_path), tmp_path / "aug.jsonl"
    assert augment(src, out, teacher.url) == 0
    records = read_records(out)
    assert [r["messages"] for r in records] == [r["messages"] for r in read_out(out)]
    assert all("augment" not in r for r in records)  # provenance stays in the file; training ignores it
    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "run_name": "p",
                "data": {"train": [str(src), str(out)], "max_length": 64, "packing": False},
                "model": {
                    "from_config": {
                        "architecture": "llama",
                        "hidden_size": 64,
                        "num_layers": 2,
                        "num_heads": 4,
                        "vocab_size": 400,
                    }
                },
            }
        ),
        encoding="utf-8",
    )
    capsys.readouterr()
    assert main(["data", "preview", str(config), "-n", "5", "--json"]) == 0
    texts = [json.loads(line)["text"] for line in capsys.readouterr().out.strip().splitlines()]
    assert len(texts) == 5 and sum("List the three primary colours of paint." in t for t in texts) == 1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_tokenizer):
    import torch

    from tests.helpers import make_run, save_base, tiny_from_config
    from tuneforge.models import build_model

    root = tmp_path_factory.mktemp("augment")
    torch.manual_seed(0)
    base = save_base(build_model(tiny_from_config("llama"), tiny_tokenizer), tiny_tokenizer, root / "base")
    return make_run(root / "run", base, seed=1)


def _counts_add_up(counts: dict, inputs: int, n: int) -> None:
    assert counts["inputs"] == inputs and counts["requests"] == inputs * n
    assert counts["requests"] == sum(
        counts[k] for k in ("kept", "near_duplicate", "bad_reply", "answer_changed", "truncated", "teacher_error")
    )


def test_a_run_directory_as_teacher(tmp_path, tiny_run):
    src, out = write_inputs(tmp_path), tmp_path / "aug.jsonl"
    args = [
        "data",
        "augment",
        str(src),
        "--out",
        str(out),
        "--teacher",
        str(tiny_run),
        "--mode",
        "cot",
        "--n",
        "2",
        "--temperature",
        "1.0",
        "--max-new-tokens",
        "8",
        "--device",
        "cpu",
        "--no-progress",
    ]
    assert main(args) == 0
    _counts_add_up(state_of(out)["counts"], 3, 2)
    assert all(r["augment"]["teacher"] == str(tiny_run.resolve()) for r in read_out(out))


def test_tuneforge_serve_as_teacher(tmp_path, tiny_run, capsys, monkeypatch):
    import uvicorn

    from tuneforge.serve.app import create_app
    from tuneforge.serve.background import serve_in_thread
    from tuneforge.serve.engine import Engine

    # uvicorn's logging.config.dictConfig closes every existing handler, pytest's log capture included (which
    # then fails the test on "I/O operation on closed file"); the server's own logs are not under test here.
    monkeypatch.setattr(uvicorn.Config, "configure_logging", lambda self: None)
    key = tmp_path / "key"
    key.write_text("secret\n", encoding="utf-8")
    engine = Engine([str(tiny_run)], device="cpu")
    try:
        with serve_in_thread(create_app(engine, api_key="secret", max_tokens_limit=64)) as url:
            src, out = write_inputs(tmp_path), tmp_path / "aug.jsonl"
            base = [
                "data",
                "augment",
                str(src),
                "--out",
                str(out),
                "--teacher",
                f"{url}/v1",
                "--mode",
                "backtranslate",
                "--max-new-tokens",
                "8",
                "--no-progress",
            ]
            assert main(base) == 2  # no key: refused at the probe, nothing written
            assert "HTTP 401" in capsys.readouterr().err
            assert not out.exists()
            assert main([*base, "--api-key-file", str(key)]) == 0
    finally:
        engine.scheduler.close()
    _counts_add_up(state_of(out)["counts"], 3, 1)


def test_answer_agrees_rule():
    from tuneforge.data.augment import answer_agrees

    assert answer_agrees("The result is 8.", "8") and answer_agrees("paris", "Paris.")
    assert not answer_agrees("9", "8") and not answer_agrees("Lyon.", "Paris.") and not answer_agrees("", "8")
    assert not answer_agrees("Red, green and blue.", "Red, blue and yellow.")  # short: 3 of 4 words is another answer
    long = "Air scatters the short blue wavelengths of sunlight far more than the red ones."
    assert answer_agrees("The air scatters short blue wavelengths far more than red ones, so the sky is blue.", long)
    assert not answer_agrees("Because the ocean reflects its colour onto the sky above us.", long)


def test_cot_drops_a_reasoned_answer_that_changes_the_original(tmp_path, teacher):
    from tuneforge.data.augment import build_prompt, seed_of

    src = write_inputs(tmp_path, INPUTS[:2])
    prompts = [build_prompt("cot", seed_of({"source": "in.jsonl", "messages": [
        {"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]}))[-1]["content"]
        for r in INPUTS[:2]]
    teacher.by_prompt = {
        prompts[0]: "REASONING:\nFrance's government sits in its capital.\nANSWER: Paris",  # keeps the answer: kept
        prompts[1]: "REASONING:\nThe primaries of light.\nANSWER: Red, green and blue.",  # another answer: dropped
    }
    out = tmp_path / "aug.jsonl"
    assert augment(src, out, teacher.url, "--mode", "cot", "--n", "1") == 0
    (kept,) = read_out(out)
    assert kept["messages"][-1]["content"] == "France's government sits in its capital.\n\nParis"
    counts = state_of(out)["counts"]
    assert counts["kept"] == 1 and counts["answer_changed"] == 1
    _counts_add_up(counts, 2, 1)
