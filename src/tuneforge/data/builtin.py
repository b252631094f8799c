"""Built-in data for the offline quickstart: text every Python install carries.

* Instruction set with checkable answers: "Which standard-library module defines ``Decimal.sqrt``?", asked about
  a sentence of that object's docstring; the answer is the module's name (``decimal``). Docstrings are collected
  with ``inspect`` from eight modules present in every CPython 3.10+ whose vocabulary is distinctive (event loops,
  decimal contexts, loggers, radians, sockets, tar archives, locks, test cases). The items are split by object,
  with the same number of held-out objects per module, so the majority class is 1/8 of the held-out set and a
  held-out object's docstring is never trained on — not in SFT, not in pretraining.
* Pretraining corpus: the language reference shipped in ``pydoc_data`` plus the docstrings of the training objects
  (text only: no object or module names), so the base has seen the vocabulary but not the answers.

A second, smaller set serves the tests as generic instruction data: ``classification_items`` ("which kind of
documentation is this sentence from: statement, expression or type?", sentences of the language reference labelled
by their topic).

Docstrings differ a little between Python versions, so the items (and the quickstart's figures) do too; on one
interpreter everything is deterministic.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections import Counter
from dataclasses import dataclass, field

MODULES = ("asyncio", "decimal", "logging", "math", "socket", "tarfile", "threading", "unittest")
QUESTION = "Which standard-library module defines {name}?"
SENTENCES_PER_OBJECT = 3  # training items taken from one docstring (its first sentences)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@dataclass
class ModuleTask:
    """The instruction set and the pretraining documents that belong with it."""

    train: list[dict] = field(default_factory=list)
    eval: list[dict] = field(default_factory=list)
    test: list[dict] = field(default_factory=list)
    pretrain_docstrings: list[str] = field(default_factory=list)


def pydoc_topics() -> dict[str, str]:
    """The stdlib's documentation topics (name → text)."""
    from pydoc_data.topics import topics

    return dict(topics)


def documented_objects(module_name: str) -> list[tuple[str, str]]:
    """``(name, docstring)`` of a module's public classes, functions and their public methods, in name order.

    Names are relative to the module (``Decimal.sqrt``, ``getaddrinfo``); objects re-exported from another package
    and docstrings already seen (inherited or aliased) are skipped.
    """
    module = importlib.import_module(module_name)
    found: list[tuple[str, str]] = []
    seen: set[str] = set()

    def add(name: str, obj) -> None:
        doc = inspect.getdoc(obj)
        if doc and doc.strip() and doc not in seen:
            seen.add(doc)
            found.append((name, doc))

    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or inspect.ismodule(obj) or not callable(obj):
            continue
        # C accelerators report their private twin (_decimal, _socket, _asyncio); other owners are re-exports.
        owner = (getattr(obj, "__module__", None) or "").lstrip("_")
        if not owner.startswith(module_name):
            continue
        add(name, obj)
        if inspect.isclass(obj):
            for member_name, member in sorted(vars(obj).items()):
                if not member_name.startswith("_"):
                    add(f"{name}.{member_name}", member)
    return found


def sentences(text: str) -> list[str]:
    """The sentences of a docstring that read as prose: 25–200 characters, no doctest, not shouted."""
    flat = re.sub(r"\s+", " ", text)
    parts = (s.strip() for s in _SENTENCE_END.split(flat))
    return [s for s in parts if 25 <= len(s) <= 200 and ">>>" not in s and not s.isupper()]


def module_task(heldout_per_module: int, eval_per_module: int, train_per_module: int, seed: int = 0,
                modules: tuple[str, ...] = MODULES) -> ModuleTask:
    """Build the module-classification set, split by object.

    Per module, objects are shuffled with ``seed``; the first ``heldout_per_module`` give one test item each (their
    first sentence), the next ``eval_per_module`` one eval item each, the rest up to ``SENTENCES_PER_OBJECT``
    training items each (at most ``train_per_module`` per module). Only objects whose name no other of the
    modules defines are held out; sentences found in two docstrings are dropped.

    Returns:
        A :class:`ModuleTask`; its records are ``{"messages": [user, assistant], "label": module, "name": name}``
        with the module name as the whole answer, shuffled with ``seed``.
    """
    rng = random.Random(seed)
    objects = {m: [(name, doc, sentences(doc)) for name, doc in documented_objects(m)] for m in modules}
    # A sentence found in two docstrings (Decimal.compare and Context.compare) would put a held-out sentence in
    # training: dropped everywhere. A name found in two modules (Event.wait: asyncio and threading) would give
    # its question two answers: never held out, only trained on (its sentences tell the modules apart).
    sentence_objects = Counter(s for items in objects.values() for _, _, found in items for s in set(found))
    name_modules = Counter(name for items in objects.values() for name in {name for name, _, _ in items})
    task = ModuleTask()
    for module in modules:
        usable = [(name, doc, [s for s in found if sentence_objects[s] == 1][:SENTENCES_PER_OBJECT])
                  for name, doc, found in objects[module]]
        usable = [entry for entry in usable if entry[2]]
        rng.shuffle(usable)
        unique = [entry for entry in usable if name_modules[entry[0]] == 1]
        test, evaluation = unique[:heldout_per_module], unique[heldout_per_module:heldout_per_module + eval_per_module]
        held = {name for name, _, _ in test + evaluation}
        train = [entry for entry in usable if entry[0] not in held]
        task.test += [_record(name, found[0], module) for name, _, found in test]
        task.eval += [_record(name, found[0], module) for name, _, found in evaluation]
        train_items = [_record(name, sentence, module) for name, _, found in train for sentence in found]
        rng.shuffle(train_items)
        task.train += train_items[:train_per_module]
        task.pretrain_docstrings += [doc for _, doc, _ in train]
    for records in (task.train, task.eval, task.test, task.pretrain_docstrings):
        rng.shuffle(records)
    return task


def _record(name: str, sentence: str, module: str) -> dict:
    question = QUESTION.format(name=name)
    return {
        "messages": [{"role": "user", "content": f"{sentence}\n\n{question}"},
                     {"role": "assistant", "content": module}],
        "label": module,
        "name": name,
    }


def pretrain_documents(task: ModuleTask | None = None) -> list[str]:
    """The language reference (one document per pydoc topic), then ``task``'s training docstrings if given."""
    topics = [text.strip() for _, text in sorted(pydoc_topics().items()) if text.strip()]
    return topics + (task.pretrain_docstrings if task else [])


LABELS = ("statement", "expression", "type")

# pydoc topic → kind of documentation it belongs to (topics not listed are not used for the task).
TOPIC_KIND = {
    **dict.fromkeys(
        ["assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del", "for",
         "function", "global", "if", "import", "nonlocal", "pass", "raise", "return", "try", "while", "with"],
        "statement",
    ),
    **dict.fromkeys(
        ["atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise", "booleans",
         "calls", "comparisons", "conversions", "exprlists", "lambda", "operator-summary", "power", "shifting",
         "slicings", "subscriptions", "unary", "yield"],
        "expression",
    ),
    **dict.fromkeys(
        ["bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
         "callable-types", "dict", "floating", "imaginary", "integers", "lists", "numbers", "numeric-types",
         "sequence-types", "string-methods", "strings", "types", "typesfunctions", "typesmapping", "typesmethods",
         "typesmodules", "typesseq", "typesseq-mutable"],
        "type",
    ),
}

KIND_QUESTION = "Which kind of Python documentation is this sentence from: statement, expression or type?"


def _sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in _SENTENCE_END.split(flat) if 40 <= len(s.strip()) <= 220 and "::" not in s]


def classification_items(seed: int = 0) -> list[dict]:
    """The documentation-kind set: every usable (sentence, kind) item as a chat record, shuffled with ``seed``.

    Returns:
        Records ``{"messages": [user, assistant], "label": kind, "topic": topic}``; the assistant answer is the
        single word ``statement``, ``expression`` or ``type``.
    """
    items = []
    seen = set()
    for topic, text in sorted(pydoc_topics().items()):
        kind = TOPIC_KIND.get(topic)
        if kind is None:
            continue
        for sentence in _sentences(text):
            if sentence in seen:
                continue
            seen.add(sentence)
            items.append({
                "messages": [
                    {"role": "user", "content": f"{KIND_QUESTION}\n\n{sentence}"},
                    {"role": "assistant", "content": kind},
                ],
                "label": kind,
                "topic": topic,
            })
    random.Random(seed).shuffle(items)
    return items

