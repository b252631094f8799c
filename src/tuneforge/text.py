"""Word tokens of any script: the one tokenization of ROUGE in tuneforge.

Used by the text metrics of ``tuneforge eval`` (:mod:`tuneforge.evaluate.metrics`) and by the near-duplicate
filter of ``tuneforge data augment`` (:mod:`tuneforge.data.augment`), so that a ROUGE-L of 0.7 means the same thing
in both. It lives here, outside both packages, because ``data`` may not import ``evaluate``. The ROUGE scores
themselves are always the ``rouge-score`` library's; only its tokenizer is replaced, for non-ASCII text.
"""

from __future__ import annotations

import re
import unicodedata

# Han (CJK unified ideographs + extension A + compatibility), and scripts written without spaces.
HAN = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
OTHER_UNSEGMENTED = (
    r"\u3040-\u309f\u30a0-\u30ff\u31f0-\u31ff"  # hiragana, katakana
    r"\u0e00-\u0e7f\u0e80-\u0eff\u1000-\u109f\u1780-\u17ff"  # thai, lao, myanmar, khmer
)
# One unsegmented character, or a run of letters/digits of any other script.
_TOKEN_RE = re.compile(f"[{HAN}{OTHER_UNSEGMENTED}]|[^\\W_{HAN}{OTHER_UNSEGMENTED}]+")


class UnicodeTokenizer:
    """A rouge-score tokenizer that keeps every script.

    Lower-cases, then yields each unsegmented character (Han, kana, Thai...) as a token and every other run of
    letters/digits as a token. On ASCII text it yields exactly rouge-score's default tokens (no stemming).
    """

    def tokenize(self, text: str) -> list[str]:
        return _TOKEN_RE.findall(unicodedata.normalize("NFKC", text).lower())
