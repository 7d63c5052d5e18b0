"""Prompt templates: one source of truth for chat (lesson 04), training (05) and evaluation (06).

Introduced in notebooks/03_prompt_templates.ipynb. Two formats:

* ``"llama2"``: Meta's Llama-2-chat format, the one in the tokenizer's ``chat_template``::

      <s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s><s>[INST] {user} [/INST]

* ``"human_assistant"``: FlagAlpha's format, used by their Chinese models and by the article's
  CSV files::

      <s>Human: {user}\\n</s><s>Assistant: {answer}\\n</s>

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``.
Everything here tokenizes the *whole* conversation string once (as ``apply_chat_template`` does)
and finds the answer tokens from character offsets, so the prompt mask can never be off by one.
The generation prompt ends right before the answer's leading space (``[/INST]``,
``Assistant:``): the model was trained to produce ``▁answer``, so that space belongs to the answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from helpers.config import TutorialError, bilingual

FORMATS = ("llama2", "human_assistant")
IGNORE_INDEX = -100

# The article's system prompt (its gist: be a helpful assistant and answer in Chinese).
SYSTEM_PROMPT_ARTICLE = "You are a helpful assistant. 你是一个乐于助人的助手。请你提供专业、有逻辑、内容真实、有价值的详细回复。"
# A stricter one: says what language to answer in, in both languages, first and plainly.
SYSTEM_PROMPT_CHINESE = (
    "你是一个乐于助人的中文助手。无论用户用什么语言提问，都必须只用简体中文回答；"
    "代码、专有名词可以保留英文。回答要准确、简洁、有条理。\n"
    "Always answer in Simplified Chinese, whatever language the question is in."
)


class PromptFormatError(TutorialError, ValueError):
    """A conversation or CSV row that does not fit the template; the message names the row and the problem."""


@dataclass
class Encoded:
    """Token ids of a conversation, with training labels (prompt tokens masked with -100)."""

    input_ids: list[int]
    labels: list[int]
    text: str

    @property
    def answer_token_count(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


# --------------------------------------------------------------------------- messages


def check_messages(messages: list[dict], *, where: str = "") -> None:
    """Raise :class:`PromptFormatError` unless roles are [system] user (assistant user)* [assistant]."""
    prefix_zh = f"{where}：" if where else ""
    prefix_en = f"{where}: " if where else ""
    if not messages:
        raise PromptFormatError(bilingual(f"{prefix_zh}对话是空的。", f"{prefix_en}the conversation is empty."))
    body = messages[1:] if messages[0].get("role") == "system" else messages
    if not body:
        raise PromptFormatError(
            bilingual(f"{prefix_zh}只有系统提示，没有用户问题。", f"{prefix_en}only a system prompt, no user message.")
        )
    for i, msg in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        role = msg.get("role")
        if role != expected:
            raise PromptFormatError(
                bilingual(
                    f"{prefix_zh}第 {i + 1} 条消息的角色是 {role!r}，应为 {expected!r}：角色必须 user/assistant 交替。",
                    f"{prefix_en}message {i + 1} has role {role!r}, expected {expected!r}: roles must alternate "
                    "user/assistant.",
                )
            )
        if not isinstance(msg.get("content"), str):
            raise PromptFormatError(
                bilingual(f"{prefix_zh}第 {i + 1} 条消息没有文本内容。", f"{prefix_en}message {i + 1} has no text content.")
            )


def _split_system(messages: list[dict]) -> tuple[str | None, list[dict]]:
    if messages and messages[0]["role"] == "system":
        return messages[0]["content"], messages[1:]
    return None, messages


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
            content = user
            if i == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{user}"
            prompt = f"[INST] {content.strip()} [/INST]"
            if answer is None:
                segments.append((prompt, None, False))
            else:
                segments.append((f"{prompt} {answer.strip()} ", len(prompt), True))
        else:
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
    """The conversation as the exact text the model sees (special tokens written out)."""
    return "".join(
        bos + text + (eos if ends else "") for text, _, ends in _turn_segments(messages, fmt, add_generation_prompt)
    )


# --------------------------------------------------------------------------- tokens


def _refuse_literal_specials(tokenizer, messages: list[dict]) -> None:
    specials = [t for t in (tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) if t]
    for n, msg in enumerate(messages, 1):
        for special in specials:
            if special in msg["content"]:
                raise PromptFormatError(
                    bilingual(
                        f"第 {n} 条消息（{msg['role']}）里含有字面的特殊标记 {special!r}，分词器会把它当成真正的"
                        f"控制标记。请删掉或改写它（例如写成 “{special.replace('/', '/ ')}”）。",
                        f"Message {n} ({msg['role']}) contains the literal special token {special!r}, which the "
                        "tokenizer would read as a real control token. Remove or rewrite it.",
                    )
                )


def encode(tokenizer, messages: list[dict], fmt: str = "llama2", *, add_generation_prompt: bool = True) -> Encoded:
    """Token ids and labels of a conversation, from one tokenization of the whole text.

    Labels are ``-100`` everywhere except on the assistant answers and the EOS that closes each
    of them. With ``add_generation_prompt`` and a last message from the user, the ids end where
    the model's answer should start (that is what lessons 04 and 06 generate from).
    """
    _refuse_literal_specials(tokenizer, messages)
    segments = _turn_segments(messages, fmt, add_generation_prompt)
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
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = []
    for tok_id, (s, e) in zip(ids, enc["offset_mapping"]):
        inside = any(a <= s and e <= b and e > s for a, b in answer_spans)
        labels.append(tok_id if inside else IGNORE_INDEX)
    return Encoded(ids, labels, text)


def encode_prompt(tokenizer, messages: list[dict], fmt: str = "llama2") -> list[int]:
    """Token ids to generate from: the conversation up to where the next answer starts."""
    return encode(tokenizer, messages, fmt, add_generation_prompt=True).input_ids


# --------------------------------------------------------------------------- history


def truncate_history(tokenizer, messages: list[dict], max_tokens: int, fmt: str = "llama2",
                     ) -> tuple[list[dict], list[dict]]:
    """Drop the oldest whole user/assistant turns until the prompt fits in ``max_tokens``.

    Keeps the system prompt and the latest user message, never cuts inside a turn. Returns
    ``(kept_messages, dropped_messages)``. Raises :class:`PromptFormatError` when even the
    system prompt plus the latest question do not fit.
    """
    check_messages(messages)
    system, body = _split_system(messages)
    head = [messages[0]] if system is not None else []
    # Pair up turns: (user, assistant) ... then the open last user message (if any).
    turns = [body[i : i + 2] for i in range(0, len(body), 2)]
    dropped: list[dict] = []
    while True:
        kept = head + [m for turn in turns for m in turn]
        if len(encode_prompt(tokenizer, kept, fmt)) <= max_tokens:
            return kept, dropped
        if len(turns) <= 1:
            raise PromptFormatError(
                bilingual(
                    f"系统提示加上最新的问题已经超过 {max_tokens} 个 token，无法放进上下文窗口。请缩短问题或系统提示。",
                    f"The system prompt plus the latest question exceed {max_tokens} tokens. Shorten one of them.",
                )
            )
        dropped += turns.pop(0)


# --------------------------------------------------------------------------- article CSV rows

def csv_text_to_messages(text: str, *, row: int | None = None) -> list[dict]:
    """Parse one row of the article's CSV (``<s>Human: ...\\n</s><s>Assistant: ...\\n</s>``).

    Multi-turn rows are accepted. Raises :class:`PromptFormatError` naming the row and the
    problem for a row without an ``Assistant:`` part, an empty answer, or roles out of order.
    """
    where_zh = f"第 {row} 行" if row is not None else "这一行"
    where_en = f"row {row}" if row is not None else "this row"
    if not isinstance(text, str) or not text.strip():
        raise PromptFormatError(bilingual(f"{where_zh}是空的。", f"{where_en} is empty."))
    body = text.strip("\r\n")
    if not body.startswith("<s>Human: "):
        raise PromptFormatError(
            bilingual(
                f"{where_zh}不是以 “<s>Human: ” 开头，格式应为 <s>Human: 问题\\n</s><s>Assistant: 回答\\n</s>。",
                f"{where_en} does not start with '<s>Human: '; expected <s>Human: question\\n</s><s>Assistant: answer\\n</s>.",
            )
        )
    if "<s>Assistant: " not in body:
        raise PromptFormatError(
            bilingual(f"{where_zh}没有 “Assistant:” 部分（缺少回答）。", f"{where_en} has no 'Assistant:' part (no answer).")
        )
    # Split at turn headers that follow a turn end; the content of a turn may itself contain
    # "Human:", "[INST]", newlines or even "</s>" as long as it is not a "\n</s><s>Role: " boundary.
    parts = re.split(r"\n</s>(?=<s>(?:Human|Assistant|System): )", body[len("<s>") :])
    messages = []
    for n, part in enumerate(parts):
        if part.startswith("<s>"):
            part = part[3:]
        role_name, _, content = part.partition(": ")
        if n == len(parts) - 1:
            if not content.endswith("\n</s>"):
                if content.endswith("</s>"):
                    content = content[: -len("</s>")]
                else:
                    raise PromptFormatError(
                        bilingual(f"{where_zh}没有以 “\\n</s>” 结尾。", f"{where_en} does not end with '\\n</s>'.")
                    )
            else:
                content = content[: -len("\n</s>")]
        role = {"Human": "user", "Assistant": "assistant", "System": "system"}.get(role_name)
        if role is None:
            raise PromptFormatError(bilingual(f"{where_zh}有未知角色 {role_name!r}。", f"{where_en} has unknown role {role_name!r}."))
        messages.append({"role": role, "content": content})
    check_messages(messages, where=where_zh if row is not None else "")
    if messages[-1]["role"] != "assistant":
        raise PromptFormatError(
            bilingual(f"{where_zh}以问题结尾，没有回答。", f"{where_en} ends with a question and no answer.")
        )
    for m in messages:
        if m["role"] == "assistant" and not m["content"].strip():
            raise PromptFormatError(bilingual(f"{where_zh}的回答是空的。", f"{where_en} has an empty answer."))
    return messages


def messages_to_csv_text(messages: list[dict]) -> str:
    """Write a conversation as one row of the article's CSV format (the inverse of :func:`csv_text_to_messages`)."""
    check_messages(messages)
    names = {"user": "Human", "assistant": "Assistant", "system": "System"}
    return "".join(f"<s>{names[m['role']]}: {m['content']}\n</s>" for m in messages)
