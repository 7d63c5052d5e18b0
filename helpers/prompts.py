"""Prompt templates: one source of truth for chat (lesson 04), training (05) and evaluation (06).

Introduced in notebooks/03_prompt_templates.ipynb. Two formats:

* ``"llama2"``: Meta's Llama-2-chat format, the one in the tokenizer's ``chat_template``::

      <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]

* ``"human_assistant"``: FlagAlpha's format, used by their Chinese models and by the article's
  CSV files (a system prompt, if any, is written on the first ``Human:`` line)::

      <s>Human: {user}\\n</s><s>Assistant: {answer}\\n</s>

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``.
Everything here tokenizes the *whole* conversation string once (as ``apply_chat_template`` does)
and finds the answer tokens from character offsets, so the prompt mask can never be off by one.
The generation prompt ends right before the answer's leading space (``[/INST]``,
``Assistant:``): the model was trained to produce ``▁answer``, so that space belongs to the answer.
Literal special tokens (``<s>``, ``</s>``) inside a message are refused by :func:`encode`: the
tokenizer would read them as real control tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from helpers.config import TutorialError, bilingual

FORMATS = ("llama2", "human_assistant")
IGNORE_INDEX = -100

# The article's system prompt, verbatim (shared/NOTES.md): Meta's default Llama-2 system prompt
# with "The answer always been translate into Chinese language." added twice. It is written in
# English; note the double space after "safe." and the article's own grammar, both kept as sent.
SYSTEM_PROMPT_ARTICLE = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature. "
    "The answer always been translate into Chinese language.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.\n\n"
    "The answer always been translate into Chinese language."
)
# A stricter prompt of this course's own (not the article's): says what language to answer in,
# in both languages, first and plainly.
SYSTEM_PROMPT_CHINESE = (
    "Always answer in Simplified Chinese, whatever language the question is in.\n"
    "你是一个乐于助人的中文助手。无论用户用什么语言提问，都必须只用简体中文回答；"
    "代码、专有名词可以保留英文。回答要准确、简洁、有条理。"
)


def article_prompt(question: str, system_prompt: str = SYSTEM_PROMPT_ARTICLE) -> str:
    """The article's own prompt layout, character for character (notebooks/03_prompt_templates.ipynb).

    It differs from the standard Llama-2 template in whitespace: a space and a newline after
    ``[INST]``, the question on its own line, ``[/INST]`` on the next. No ``<s>``: the tokenizer
    adds BOS when this text is tokenized with ``add_special_tokens=True``.
    """
    return f"[INST] \n<<SYS>>\n{system_prompt}\n<</SYS>>\n\n{question}\n[/INST]"


CSV_ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
_CSV_ROLES = {name: role for role, name in CSV_ROLE_NAMES.items()}
# Where one CSV turn ends and the next begins: "</s>" right before "<s>Human:" (or Assistant/System).
_CSV_TURN_END = re.compile(r"\n?</s>(?=<s>(?:Human|Assistant|System):)")
_CSV_BOUNDARY_IN_TEXT = re.compile(r"</s><s>(?:Human|Assistant|System):")
_CSV_HEADER = re.compile(r"<s>(Human|Assistant|System):[ ]?")


class PromptFormatError(TutorialError, ValueError):
    """A conversation or CSV row that does not fit the template; the message names the row and the problem.

    Introduced in notebooks/03_prompt_templates.ipynb.
    """


@dataclass
class Encoded:
    """Token ids of a conversation, with training labels (prompt tokens masked with -100).

    Made by :func:`encode` (notebooks/03_prompt_templates.ipynb). ``text`` is the exact string
    that was tokenized, special tokens written out.
    """

    input_ids: list[int]
    labels: list[int]
    text: str

    @property
    def answer_token_count(self) -> int:
        """How many tokens carry a label (answer tokens and the EOS after each answer)."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)

    @property
    def prompt_length(self) -> int:
        """Tokens before the first labelled token (all of them when nothing is labelled)."""
        for i, x in enumerate(self.labels):
            if x != IGNORE_INDEX:
                return i
        return len(self.labels)


# --------------------------------------------------------------------------- messages


def check_messages(messages: list[dict], *, where: str = "", where_en: str | None = None) -> None:
    """Raise :class:`PromptFormatError` unless roles are [system] user (assistant user)* [assistant].

    Introduced in notebooks/03_prompt_templates.ipynb. ``where`` (Chinese) and ``where_en``
    (English, default: ``where``) name the place, for instance ``"第 3 行"`` / ``"row 3"``;
    messages are counted from 1, the system prompt included.
    """
    where_en = where if where_en is None else where_en
    prefix_zh = f"{where}：" if where else ""
    prefix_en = f"{where_en}: " if where_en else ""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptFormatError(bilingual(f"{prefix_zh}对话是空的。", f"{prefix_en}the conversation is empty."))
    for n, msg in enumerate(messages, 1):
        if not isinstance(msg, dict) or "role" not in msg:
            raise PromptFormatError(
                bilingual(
                    f"{prefix_zh}第 {n} 条消息不是 {{'role': ..., 'content': ...}} 形式的字典。",
                    f"{prefix_en}message {n} is not a dict {{'role': ..., 'content': ...}}.",
                )
            )
        if not isinstance(msg.get("content"), str):
            raise PromptFormatError(
                bilingual(
                    f"{prefix_zh}第 {n} 条消息（{msg['role']}）没有文本内容（content 必须是字符串）。",
                    f"{prefix_en}message {n} ({msg['role']}) has no text content (content must be a string).",
                )
            )
    offset = 1 if messages[0]["role"] == "system" else 0
    body = messages[offset:]
    if not body:
        raise PromptFormatError(
            bilingual(f"{prefix_zh}只有系统提示，没有用户问题。", f"{prefix_en}only a system prompt, no user message.")
        )
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        role = msg["role"]
        if role != expected:
            n = i + 1 + offset
            hint_zh = "系统提示只能是第 1 条消息。" if role == "system" else "角色必须按 user、assistant 交替出现。"
            hint_en = "a system prompt can only be message 1." if role == "system" else "roles must alternate user/assistant."
            raise PromptFormatError(
                bilingual(
                    f"{prefix_zh}第 {n} 条消息的角色是 {role!r}，这里应为 {expected!r}：{hint_zh}",
                    f"{prefix_en}message {n} has role {role!r}, expected {expected!r}: {hint_en}",
                )
            )


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], list(messages[1:])
    return None, list(messages)


def _turn_segments(messages: list[dict], fmt: str, add_generation_prompt: bool) -> list[tuple[str, int | None, bool]]:
    """The conversation as segments between special tokens.

    Each segment is ``(text, answer_start, ends_with_eos)``: the text that follows one BOS,
    the character offset in it where the answer starts (``None`` when it holds no answer), and
    whether an EOS closes it.
    """
    if fmt not in FORMATS:
        raise PromptFormatError(
            bilingual(f"未知的模板格式 {fmt!r}，可选：{', '.join(FORMATS)}。", f"Unknown format {fmt!r}; use one of {FORMATS}.")
        )
    check_messages(messages)
    system, body = _split_system(messages)
    segments: list[tuple[str, int | None, bool]] = []
    for i in range(0, len(body), 2):
        user = body[i]["content"]
        answer = body[i + 1]["content"] if i + 1 < len(body) else None
        if fmt == "llama2":
            # Exactly Meta's chat_template: the first user turn carries the system block, and
            # the template strips the user content and the answer.
            content = user
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            prompt = f"[INST] {content.strip()} [/INST]"
            if answer is None:
                segments.append((prompt, None, False))
            else:
                segments.append((f"{prompt} {answer.strip()} ", len(prompt), True))
        else:
            # FlagAlpha's format has no system slot: the system prompt opens the first Human turn.
            content = user if not (i == 0 and system) else f"{system}\n{user}"
            segments.append((f"Human: {content}\n", None, True))
            if answer is not None:
                head = "Assistant:"
                segments.append((f"{head} {answer}\n", len(head), True))
            elif add_generation_prompt:
                segments.append(("Assistant:", None, False))
    return segments


def build_prompt(messages: list[dict], fmt: str = "llama2", *, add_generation_prompt: bool = True,
                 bos: str = "<s>", eos: str = "</s>") -> str:
    """The conversation as the exact text the model sees (special tokens written out).

    Introduced in notebooks/03_prompt_templates.ipynb. For ``"llama2"`` it equals
    ``tokenizer.apply_chat_template(messages, tokenize=False)``.
    """
    return "".join(
        bos + text + (eos if ends else "") for text, _, ends in _turn_segments(messages, fmt, add_generation_prompt)
    )


# --------------------------------------------------------------------------- tokens


def _special_strings(tokenizer) -> list[str]:
    specials = {t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token, tokenizer.pad_token) if t}
    specials.update(t for t in getattr(tokenizer, "all_special_tokens", []) if t)
    return sorted(specials, key=len, reverse=True)


def _refuse_literal_specials(tokenizer, messages: list[dict]) -> None:
    specials = _special_strings(tokenizer)
    for n, msg in enumerate(messages, 1):
        for special in specials:
            if special in msg["content"]:
                raise PromptFormatError(
                    bilingual(
                        f"第 {n} 条消息（{msg['role']}）里含有字面的特殊标记 {special!r}，分词器会把它当成真正的"
                        f"控制标记（BOS/EOS），模型会以为对话在这里断开。请删掉或改写它"
                        f"（例如写成 “{special.replace('<', '< ')}”）。",
                        f"Message {n} ({msg['role']}) contains the literal special token {special!r}, which the "
                        "tokenizer would read as a real control token (BOS/EOS). Remove or rewrite it.",
                    )
                )


def _labels_from_offsets(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]] | None:
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError, KeyError):
        return None  # a tokenizer without offsets (pure-Python backend)
    ids = list(enc["input_ids"])
    labels = []
    for tok_id, (s, e) in zip(ids, offsets):
        inside = False
        for a, b in spans:
            if s < a < e or s < b < e:
                raise PromptFormatError(
                    bilingual(
                        f"有一个 token（{text[s:e]!r}）跨过了提示与回答的分界，无法只在回答上计算损失。"
                        "请检查模板或分词器。",
                        f"A token ({text[s:e]!r}) crosses the prompt/answer boundary, so the answer cannot be "
                        "labelled exactly. Check the template or the tokenizer.",
                    )
                )
            if a <= s and e <= b and e > s:
                inside = True
        labels.append(tok_id if inside else IGNORE_INDEX)
    return ids, labels


def _labels_from_prefixes(tokenizer, text: str, spans: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
    """Fallback without offsets: the tokens of ``text[:k]`` must be a prefix of the tokens of ``text``."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])

    def boundary(k: int) -> int:
        prefix = list(tokenizer(text[:k], add_special_tokens=False)["input_ids"]) if k else []
        if ids[: len(prefix)] != prefix:
            raise PromptFormatError(
                bilingual(
                    "提示部分单独分词的结果不是整段对话分词结果的前缀，提示与回答的分界落在一个 token 中间。",
                    "The prompt's tokens are not a prefix of the whole conversation's tokens: the prompt/answer "
                    "boundary falls inside a token.",
                )
            )
        return len(prefix)

    labels = [IGNORE_INDEX] * len(ids)
    for a, b in spans:
        for i in range(boundary(a), boundary(b)):
            labels[i] = ids[i]
    return ids, labels


def encode(tokenizer, messages: list[dict], fmt: str = "llama2", *, add_generation_prompt: bool = True) -> Encoded:
    """Token ids and labels of a conversation, from one tokenization of the whole text.

    Introduced in notebooks/03_prompt_templates.ipynb; lessons 04 and 06 generate from it,
    lesson 05 trains on it. Labels are ``-100`` everywhere except on the assistant answers
    (from the space that starts each answer) and the EOS that closes each of them. With
    ``add_generation_prompt`` and a last message from the user, the ids end where the model's
    answer should start. For ``"llama2"`` the ids equal ``tokenizer.apply_chat_template(messages,
    add_generation_prompt=True)``. Raises :class:`PromptFormatError` for roles out of order, an
    unknown ``fmt`` or a literal special token (``<s>``, ``</s>``) inside a message.
    """
    segments = _turn_segments(messages, fmt, add_generation_prompt)  # validates the messages first
    _refuse_literal_specials(tokenizer, messages)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    text = ""
    answer_spans: list[tuple[int, int]] = []  # character spans whose tokens are labels
    for seg_text, answer_start, ends in segments:
        text += bos
        start = len(text)
        text += seg_text
        if answer_start is not None:
            answer_spans.append((start + answer_start, len(text) + (len(eos) if ends else 0)))
        if ends:
            text += eos
    result = _labels_from_offsets(tokenizer, text, answer_spans)
    if result is None:
        result = _labels_from_prefixes(tokenizer, text, answer_spans)
    ids, labels = result
    return Encoded(ids, labels, text)


def encode_prompt(tokenizer, messages: list[dict], fmt: str = "llama2") -> list[int]:
    """Token ids to generate from: the conversation up to where the next answer starts.

    Introduced in notebooks/03_prompt_templates.ipynb; the chat (04) and evaluation (06)
    lessons build every prompt with it.
    """
    return encode(tokenizer, messages, fmt, add_generation_prompt=True).input_ids


def token_table(tokenizer, input_ids: list[int], labels: list[int] | None = None):
    """A pandas table of tokens: position, id, piece, BOS/EOS mark, and whether the loss sees it.

    Introduced in notebooks/03_prompt_templates.ipynb to show where BOS/EOS fall and which
    tokens are labels.
    """
    import pandas as pd

    marks = {tokenizer.bos_token_id: "BOS", tokenizer.eos_token_id: "EOS"}
    rows = {
        "id": list(input_ids),
        "piece": tokenizer.convert_ids_to_tokens(list(input_ids)),
        "特殊 special": [marks.get(i, "") for i in input_ids],
    }
    if labels is not None:
        rows["label"] = ["回答 answer" if x != IGNORE_INDEX else "-100（不算损失）" for x in labels]
    return pd.DataFrame(rows).rename_axis("位置 pos")


# --------------------------------------------------------------------------- history


def truncate_history(tokenizer, messages: list[dict], max_tokens: int, fmt: str = "llama2",
                     ) -> tuple[list[dict], list[dict]]:
    """Drop the oldest whole user/assistant turns until the prompt fits in ``max_tokens``.

    Introduced in notebooks/03_prompt_templates.ipynb, used by the chat lesson (04). Keeps the
    system prompt and the latest user message, never cuts inside a turn; the size counted is
    that of :func:`encode_prompt`, so leave room for the answer yourself (``max_tokens =
    context window - max_new_tokens``). Returns ``(kept_messages, dropped_messages)``. Raises
    :class:`PromptFormatError` when even the system prompt plus the latest turn do not fit.
    """
    check_messages(messages)
    system, body = _split_system(messages)
    head = [messages[0]] if system is not None else []
    # Pair up turns: (user, assistant) ... then the open last user message (if any).
    turns = [body[i : i + 2] for i in range(0, len(body), 2)]
    dropped: list[dict] = []
    while True:
        kept = head + [m for turn in turns for m in turn]
        size = len(encode_prompt(tokenizer, kept, fmt))
        if size <= max_tokens:
            return kept, dropped
        if len(turns) <= 1:
            raise PromptFormatError(
                bilingual(
                    f"系统提示加上最新的问题已有 {size} 个 token，超过上限 {max_tokens}，无法放进上下文窗口。"
                    "请缩短问题或系统提示，或者调大 max_tokens。",
                    f"The system prompt plus the latest question take {size} tokens, more than max_tokens="
                    f"{max_tokens}. Shorten one of them or raise max_tokens.",
                )
            )
        dropped += turns.pop(0)


# --------------------------------------------------------------------------- article CSV rows


def csv_text_to_messages(text: str, *, row: int | None = None) -> list[dict]:
    """Parse one row of the article's CSV (``<s>Human: ...\\n</s><s>Assistant: ...\\n</s>``).

    Introduced in notebooks/03_prompt_templates.ipynb. Multi-turn rows are accepted, and an
    optional ``<s>System: ...\\n</s>`` turn first. A message may itself contain ``Human:``,
    ``[INST]``, newlines or ``</s>``; only ``</s>`` directly followed by ``<s>Human:`` (or
    ``Assistant:``/``System:``) ends a turn. Raises :class:`PromptFormatError` naming the row
    (``row``, e.g. the line number in the file) and the problem: no ``Assistant:`` part, an
    empty answer or question, roles out of order, a missing final ``</s>``.
    """
    where_zh = f"第 {row} 行" if row is not None else "这一行"
    where_en = f"row {row}" if row is not None else "this row"
    expected = "<s>Human: 问题\\n</s><s>Assistant: 回答\\n</s>"
    if not isinstance(text, str) or not text.strip():
        raise PromptFormatError(bilingual(f"{where_zh}是空的。", f"{where_en} is empty."))
    body = text.strip("\r\n")
    if not _CSV_HEADER.match(body):
        raise PromptFormatError(
            bilingual(
                f"{where_zh}不是以 “<s>Human:” 开头，格式应为 {expected}。开头是：{body[:30]!r}",
                f"{where_en} does not start with '<s>Human:'; expected <s>Human: question\\n</s><s>Assistant: "
                f"answer\\n</s>. It starts with {body[:30]!r}",
            )
        )
    if not body.endswith("</s>"):
        raise PromptFormatError(
            bilingual(
                f"{where_zh}没有以 “</s>” 结尾（格式应为 {expected}）。结尾是：{body[-30:]!r}",
                f"{where_en} does not end with '</s>'. It ends with {body[-30:]!r}",
            )
        )
    body = body[: -len("</s>")]
    if body.endswith("\n"):
        body = body[:-1]
    messages = []
    for part in _CSV_TURN_END.split(body):
        header = _CSV_HEADER.match(part)
        messages.append({"role": _CSV_ROLES[header.group(1)], "content": part[header.end() :]})
    if not any(m["role"] == "assistant" for m in messages):
        raise PromptFormatError(
            bilingual(
                f"{where_zh}没有 “<s>Assistant:” 部分（缺少回答，或者回答前少了 “</s>”）。格式应为 {expected}。",
                f"{where_en} has no '<s>Assistant:' part (no answer, or no '</s>' before it).",
            )
        )
    check_messages(messages, where=where_zh if row is not None else "", where_en=where_en if row is not None else "")
    if messages[-1]["role"] != "assistant":
        raise PromptFormatError(
            bilingual(f"{where_zh}以问题结尾，最后一个问题没有回答。", f"{where_en} ends with a question and no answer.")
        )
    for n, m in enumerate(messages, 1):
        if m["role"] != "system" and not m["content"].strip():
            kind_zh, kind_en = ("回答", "answer") if m["role"] == "assistant" else ("问题", "question")
            raise PromptFormatError(
                bilingual(f"{where_zh}第 {n} 条消息的{kind_zh}是空的。", f"{where_en}: message {n} has an empty {kind_en}.")
            )
    return messages


def messages_to_csv_text(messages: list[dict]) -> str:
    """Write a conversation as one row of the article's CSV format (the inverse of :func:`csv_text_to_messages`).

    Introduced in notebooks/03_prompt_templates.ipynb. Raises :class:`PromptFormatError` for a
    conversation the reader could not read back the same: roles out of order, no final answer,
    an empty message, or a message holding a turn boundary (``</s><s>Human:``).
    """
    check_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise PromptFormatError(
            bilingual(
                "文章的 CSV 每一行都以回答结尾：最后一条消息必须来自 assistant。",
                "Every row of the article's CSV ends with an answer: the last message must be the assistant's.",
            )
        )
    for n, m in enumerate(messages, 1):
        if m["role"] != "system" and not m["content"].strip():
            raise PromptFormatError(bilingual(f"第 {n} 条消息是空的。", f"Message {n} is empty."))
        found = _CSV_BOUNDARY_IN_TEXT.search(m["content"])
        if found:
            raise PromptFormatError(
                bilingual(
                    f"第 {n} 条消息里含有轮次分界 {found.group(0)!r}，写进 CSV 后会被读成新的一轮。请改写它。",
                    f"Message {n} contains the turn boundary {found.group(0)!r}; in the CSV it would read as a new "
                    "turn. Rewrite it.",
                )
            )
    return "".join(f"<s>{CSV_ROLE_NAMES[m['role']]}: {m['content']}\n</s>" for m in messages)
