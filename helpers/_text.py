"""Reading a learner's text files safely (plumbing for helpers/training_data.py, evaluation.py, knowledge.py).

- :func:`decode`: UTF-8, or GB18030 (what Excel/WPS save on Simplified-Chinese Windows) with a notice; a file
  in another East-Asian encoding (Big5, Shift-JIS, EUC-KR), which GB18030 would turn into plausible-looking
  nonsense, is refused with the encoding charset-normalizer recognises.
- :func:`bad_character`: NUL and other control characters, and lone surrogates (``"\\ud800"`` in JSON), which
  no tokenizer can encode.
- :func:`json_loads`: JSON nested too deeply for Python's parser becomes a clear error, not ``RecursionError``.
- :func:`quote`: what a message quotes from a file is capped, so a 1 MB column name is not printed whole.
"""

from __future__ import annotations

import json
import re

from helpers.config import localized

QUOTE_LIMIT = 120
# C0 controls but tab, newline and carriage return; DEL; C1 controls; lone (unpaired) surrogates.
_BAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")
_GB = {"gb18030", "gbk", "gb2312", "hz"}
_NAMES = {"big5": "Big5（繁体中文）", "cp950": "Big5（繁体中文）", "big5hkscs": "Big5-HKSCS（繁体中文）",
          "shift_jis": "Shift-JIS（日文）", "cp932": "Shift-JIS（日文）", "euc_jp": "EUC-JP（日文）",
          "euc_jis_2004": "EUC-JP（日文）", "iso2022_jp": "ISO-2022-JP（日文）",
          "euc_kr": "EUC-KR（韩文）", "cp949": "EUC-KR / CP949（韩文）", "johab": "Johab（韩文）"}
_ICONV = {"cp950": "big5", "cp932": "shift-jis", "cp949": "cp949", "euc_jis_2004": "euc-jp", "euc_jp": "euc-jp"}


def quote(value, limit: int = QUOTE_LIMIT) -> str:
    """``value`` as text, cut to ``limit`` characters with the full length said."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}…（共 {len(text)} 个字符 / {len(text)} characters）"


def _kind(char: str) -> tuple[str, str]:
    code = f"U+{ord(char):04X}"
    if 0xD800 <= ord(char) <= 0xDFFF:
        return f"单独的代理码位 {code}（不成对的 \\ud800-\\udfff，任何分词器都编不了码）", f"a lone surrogate {code} (no tokenizer can encode it)"
    return f"控制字符 {code}", f"a control character {code}"


def bad_character(text: str) -> tuple[str, str] | None:
    """``(zh, en)`` naming the first character no tokenizer should see (a control character other than tab and
    line breaks, or a lone surrogate) with its line and column, or None."""
    found = _BAD.search(text)
    if not found:
        return None
    line = text.count("\n", 0, found.start()) + 1
    column = found.start() - (text.rfind("\n", 0, found.start()) + 1) + 1
    zh, en = _kind(found.group())
    return f"第 {line} 行第 {column} 列有{zh}", f"line {line}, column {column} holds {en}"


def bad_character_in(value) -> tuple[str, str] | None:
    """``(zh, en)`` for the first string inside a parsed JSON value that holds such a character (written as an
    escape like ``\\u0000`` in the file), quoting what precedes it; walked without recursion."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found = _BAD.search(item)
            if found:
                zh, en = _kind(found.group())
                before = quote(item[:found.start()], 40)
                return f"“{before}”之后有{zh}", f"{en} after \"{before}\""
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return None


class DecodeProblem(ValueError):
    """Raised by :func:`decode`; ``.zh`` and ``.en`` say what the file is and what to do."""

    def __init__(self, zh: str, en: str):
        super().__init__(zh)
        self.zh, self.en = zh, en

    def __str__(self) -> str:
        return localized(self.zh, self.en)


def decode(raw: bytes, name: str, *, allow_gb18030: bool = True) -> tuple[str, str | None]:
    """``(text, encoding read)`` of a file's bytes: ``"utf-8"`` or, when allowed, ``"gb18030"``; any other
    encoding raises :class:`DecodeProblem` naming the one recognised."""
    try:
        return raw.decode("utf-8-sig"), "utf-8"
    except UnicodeDecodeError as err:
        first_bad = err.start
    from charset_normalizer import from_bytes

    matches = list(from_bytes(raw))
    best = min((m.chaos for m in matches), default=1.0)
    gb_fits = any(m.encoding in _GB and m.chaos <= best + 0.02 for m in matches)
    if allow_gb18030 and gb_fits:
        try:
            return raw.decode("gb18030"), "gb18030"
        except UnicodeDecodeError:
            pass
    other = next((m.encoding for m in sorted(matches, key=lambda m: m.chaos) if m.encoding not in _GB), None)
    if other in _NAMES:
        label, iconv = _NAMES[other], _ICONV.get(other, other.replace("_", "-"))
        raise DecodeProblem(
            f"{name} 看起来是 {label} 编码，不是 UTF-8{'，也不是 GBK/GB18030' if allow_gb18030 else ''}。按 GB18030 读会得到一堆乱码，"
            f"所以没有读取。请另存为 UTF-8，或运行 iconv -f {iconv} -t utf-8 {name} > utf8-{name}",
            f"{name} looks like {label.split('（')[0]}, not UTF-8{' nor GBK/GB18030' if allow_gb18030 else ''}; read as "
            f"GB18030 it would be garbage, so it was not read. Save it as UTF-8, or run "
            f"iconv -f {iconv} -t utf-8 {name} > utf8-{name}")
    if gb_fits:  # GB18030 was recognised but is not allowed here
        raise DecodeProblem(
            f"{name} 不是 UTF-8 编码（第 {first_bad} 个字节），看起来是 GBK/GB18030。请另存为 UTF-8，或运行 iconv -f gb18030 -t utf-8。",
            f"{name} is not UTF-8 (byte {first_bad}); it looks like GBK/GB18030. Save it as UTF-8, or run "
            "iconv -f gb18030 -t utf-8.")
    raise DecodeProblem(
        f"{name} 不是 UTF-8 编码（第 {first_bad} 个字节），也认不出是哪种中文编码。请用 UTF-8 重新保存。",
        f"{name} is not UTF-8 (byte {first_bad}) and its encoding was not recognised. Save it again as UTF-8.")


def json_loads(text: str):
    """``json.loads``; JSON nested deeper than Python's parser can follow raises ``ValueError`` instead of
    ``RecursionError`` (a question or training file is never nested more than a few levels)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply / 嵌套层数太多") from None
