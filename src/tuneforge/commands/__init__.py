"""Commands that sit above several packages: the ``data`` commands that load a model or tokenizer on data's behalf
(``data preview``, ``data augment`` with a run as teacher) and ``inspect`` (models and the method registry).

Each module is light at import (no torch) and has ``add_commands(subparsers)`` like every package's ``cli`` module;
``tuneforge.cli`` lists them. The layering (pyproject's import-linter contract) puts this package above
search/train/evaluate/merge/serve/estimate/methods/models/data and below ``ui`` and ``cli``.
"""
