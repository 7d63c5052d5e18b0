"""Chinese evaluation: how much of an answer is Chinese, and how good it is.

Introduced in notebooks/06_evaluation.ipynb (the metric is also used by the tiny model's tests
and by lesson 05 to show the shift LoRA makes).
"""

from __future__ import annotations

import re

# Han ideographs: CJK Unified Ideographs, Extensions A-F and compatibility ideographs.
HAN_RE = re.compile(
    "[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df\U0002a700-\U0002ebef\U0002f800-\U0002fa1f]"
)
LATIN_WORD_RE = re.compile(r"[A-Za-z\u00c0-\u024f]+(?:['’][A-Za-z]+)?")
CODE_BLOCK_RE = re.compile(r"```.*?(?:```|$)", re.S)
INLINE_CODE_RE = re.compile(r"`[^`\n]*`")

CHINESE_THRESHOLD = 0.8
ENGLISH_THRESHOLD = 0.2


def strip_code(text: str) -> str:
    """Remove fenced code blocks (closed or not) and inline code."""
    return INLINE_CODE_RE.sub(" ", CODE_BLOCK_RE.sub(" ", text))


def chinese_share(text: str) -> float | None:
    """Han characters / (Han characters + Latin words), after removing code.

    Returns ``None`` when the answer has neither (empty, only digits, emoji or punctuation).
    """
    clean = strip_code(text or "")
    han = len(HAN_RE.findall(clean))
    latin = len(LATIN_WORD_RE.findall(clean))
    if han + latin == 0:
        return None
    return han / (han + latin)
