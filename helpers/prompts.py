"""Prompt templates: one source of truth for chat (lesson 04), training (05) and evaluation (06).

Two builders, both taking a conversation and its ``chat_format``: :func:`build_prompt`, the text the model
sees; :func:`encode`, its token ids and answer-only labels (``encode(...).input_ids`` is the prompt to
generate from). :func:`article_prompt` is the article's own string for one question, kept verbatim.

notebooks/03_prompt_templates.ipynb writes out by hand what these helpers do. A format is a Jinja chat
template for ``apply_chat_template``: the course's own in :data:`TEMPLATES` (``"llama2"``, Meta's;
``"article"``, :func:`article_prompt`; ``"human_assistant"``, FlagAlpha's, whose system prompt opens the first
``Human:`` line), or ``"model"``: the tokenizer's own ``chat_template`` (ChatML for SmolLM2, Llama-3's...).
The answer mask works for any template: each answer is the text a conversation gains when that answer is
added to it (:func:`render_with_answers`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from helpers._compat import render_chat_template
from helpers.config import REPO_ROOT, TutorialError, home_dir

IGNORE_INDEX = -100

# The article's system prompt, verbatim, in English: Meta's default Llama-2 system prompt with one
# sentence added twice; the double space after "safe." and the article's grammar are kept as sent.
SYSTEM_PROMPT_ARTICLE = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being safe.  "
    "Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal content. "
    "Please ensure that your responses are socially unbiased and positive in nature. "
    "The answer always been translate into Chinese language.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information.\n\n"
    "The answer always been translate into Chinese language."
)
# The course's own stricter prompt (not the article's): the answer language first, in both languages.
SYSTEM_PROMPT_CHINESE = (
    "Always answer in Simplified Chinese, whatever language the question is in.\n"
    "你是一个乐于助人的中文助手。无论用户用什么语言提问，都必须只用简体中文回答；"
    "代码、专有名词可以保留英文。回答要准确、简洁、有条理。"
)


def article_prompt(question: str, system_prompt: str = SYSTEM_PROMPT_ARTICLE) -> str:
    """The article's prompt layout, character for character, without ``<s>`` (notebooks/03_prompt_templates.ipynb)."""
    return f"[INST] \n<<SYS>>\n{system_prompt}\n<</SYS>>\n\n{question}\n[/INST]"


_SPLIT_SYSTEM = (  # all three templates take the system message apart first, as Meta's does
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]"
    "['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
)


def _llama_template(first_bos: str, open_user: str, close_user: str, strip: str) -> str:
    return _SPLIT_SYSTEM + (
        "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
        "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
        "{% else %}{% set content = message['content'] %}{% endif %}"
        f"{{% if message['role'] == 'user' %}}{{{{ ({first_bos} if loop.first else bos_token) + '{open_user}' + content{strip} + '{close_user}' }}}}"
        "{% else %}{% generation %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endgeneration %}"
        "{% endif %}{% endfor %}"
    )


TEMPLATES = {
    "llama2": _llama_template("bos_token", "[INST] ", " [/INST]", ".strip()"),
    "article": _llama_template("''", "[INST] \\n", "\\n[/INST]", ""),
    "human_assistant": _SPLIT_SYSTEM + (
        "{% for message in loop_messages %}"
        "{% if message['role'] == 'user' %}{% set content = message['content'] %}"
        "{% if loop.index0 == 0 and system_message %}{% set content = system_message + '\\n' + content %}{% endif %}"
        "{{ bos_token + 'Human: ' + content + '\\n' + eos_token }}"
        "{% else %}{{ bos_token + 'Assistant:' }}"
        "{% generation %}{{ ' ' + message['content'] + '\\n' + eos_token }}{% endgeneration %}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and loop_messages[-1]['role'] == 'user' %}{{ bos_token + 'Assistant:' }}{% endif %}"
    ),
}
MODEL_FORMAT = "model"  # the tokenizer's own chat_template
FORMATS = (*TEMPLATES, MODEL_FORMAT)


class PromptFormatError(TutorialError, ValueError):
    """A conversation or CSV row that does not fit the template (notebooks/03_prompt_templates.ipynb)."""


@dataclass
class Encoded:
    """Token ids, labels (-100 outside the answers) and the exact text of a conversation; see :func:`encode`."""

    input_ids: list[int]
    labels: list[int]
    text: str

    @property
    def answer_token_count(self) -> int:
        """How many tokens carry a label (answer tokens and the EOS after each answer)."""
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def check_messages(messages: list[dict], *, where: str = "", where_en: str | None = None) -> None:
    """Raise :class:`PromptFormatError` unless roles are [system] user (assistant user)* [assistant]; ``where``
    and ``where_en`` name the place (``"第 3 行"``) (notebooks/03_prompt_templates.ipynb)."""
    zh, en = (f"{where}：" if where else ""), (f"{where_en or where}: " if (where_en or where) else "")
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PromptFormatError("prompt.empty_conversation", f"{zh}对话是空的。", f"{en}the conversation is empty.")
    for n, msg in enumerate(messages, 1):
        if not isinstance(msg, dict) or "role" not in msg or not isinstance(msg.get("content"), str):
            raise PromptFormatError("prompt.bad_message",
                f"{zh}第 {n} 条消息应为 {{'role': ..., 'content': 字符串}} 形式的字典。",
                f"{en}message {n} must be a dict {{'role': ..., 'content': str}} (content must be a string).", message=n)
    offset = 1 if messages[0]["role"] == "system" else 0
    if len(messages) == offset:
        raise PromptFormatError("prompt.system_only", f"{zh}只有系统提示，没有用户问题。", f"{en}only a system prompt, no user message.")
    for i, msg in enumerate(messages[offset:]):
        expected, role = ("user" if i % 2 == 0 else "assistant"), msg["role"]
        if role != expected:
            hint_zh = "系统提示只能是第 1 条消息。" if role == "system" else "角色必须按 user、assistant 交替出现。"
            hint_en = "a system prompt can only be message 1." if role == "system" else "roles must alternate user/assistant."
            raise PromptFormatError("prompt.role_order",
                f"{zh}第 {i + 1 + offset} 条消息的角色是 {role!r}，这里应为 {expected!r}：{hint_zh}",
                f"{en}message {i + 1 + offset} has role {role!r}, expected {expected!r}: {hint_en}", message=i + 1 + offset, role=role, expected=expected)


def chat_template_for(chat_format: str, tokenizer=None) -> str:
    """The Jinja template of ``chat_format``: one of :data:`TEMPLATES`, or for ``"model"`` the tokenizer's own
    ``chat_template`` (Llama-2's when the tokenizer has none, as FlagAlpha's) (notebooks/03_prompt_templates.ipynb)."""
    if chat_format == MODEL_FORMAT:
        if tokenizer is None:
            raise PromptFormatError("prompt.needs_tokenizer", "格式 \"model\" 用分词器自己的 chat_template：请传入 tokenizer=。",
                                              'Format "model" uses the tokenizer\'s own chat_template: pass tokenizer=.')
        return tokenizer.chat_template or TEMPLATES["llama2"]
    if chat_format not in TEMPLATES:
        raise PromptFormatError("prompt.unknown_format", f"未知的模板格式 {chat_format!r}，可选：{', '.join(FORMATS)}。",
                                          f"Unknown format {chat_format!r}; use one of {FORMATS}.", chat_format=chat_format, formats=list(FORMATS))
    return TEMPLATES[chat_format]


def render_with_answers(messages: list[dict], chat_format: str = "llama2", *, tokenizer=None, add_generation_prompt: bool = True,
                        bos: str = "<s>", eos: str = "</s>") -> tuple[str, list[tuple[int, int]]]:
    """The text of the conversation and the character span of each answer (with the end-of-turn token the
    template puts after it, trailing whitespace left out), for any chat template.

    An answer's span is what the text gains when that answer is added: the conversation up to the question,
    rendered with the generation prompt, must be the start of the conversation with the answer. Templates
    that rewrite earlier turns break that rule and are refused (notebooks/03_prompt_templates.ipynb)."""
    check_messages(messages)
    template = chat_template_for(chat_format, tokenizer)
    tokens = dict(tokenizer.special_tokens_map) if tokenizer is not None else {}
    tokens.update(bos_token=tokenizer.bos_token if tokenizer is not None else bos,
                  eos_token=tokenizer.eos_token if tokenizer is not None else eos)
    text = render_chat_template(messages, template, add_generation_prompt, **tokens)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat_template(messages[:i], template, True, **tokens)
        upto = render_chat_template(messages[: i + 1], template, False, **tokens)
        if not (upto.startswith(before) and text.startswith(upto)):
            raise PromptFormatError("prompt.template_rewrites",
                f"这个对话模板在加上第 {i + 1} 条消息（回答）时改写了前面的文本，无法确定回答从哪里开始，"
                "不能只在回答上计算损失。请换用 chat_format=\"llama2\" 等课程模板，或给模板加上 {% generation %} 标记。",
                f"This chat template rewrites earlier text when message {i + 1} (an answer) is added, so where the "
                "answer starts is unknown and answer-only labels cannot be built. Use a course template "
                "(chat_format=\"llama2\"...) instead.", message=i + 1)
        answer = upto[len(before):]
        spans.append((len(before), len(before) + len(answer.rstrip())))
    return text, spans


def build_prompt(messages: list[dict], chat_format: str = "llama2", *, add_generation_prompt: bool = True,
                 bos: str = "<s>", eos: str = "</s>", tokenizer=None) -> str:
    """The exact text the model sees, special tokens written out (notebooks/03_prompt_templates.ipynb).
    ``chat_format="model"`` needs the ``tokenizer`` whose template it uses."""
    text, _ = render_with_answers(messages, chat_format, tokenizer=tokenizer, add_generation_prompt=add_generation_prompt,
                                  bos=bos, eos=eos)
    return ((tokenizer.bos_token if tokenizer is not None else bos) if chat_format == "article" else "") + text


def encode(tokenizer, messages: list[dict], chat_format: str = "llama2", *, add_generation_prompt: bool = True) -> Encoded:
    """Token ids and labels (-100 outside each answer and its end-of-turn token), from one tokenization of
    the whole text: a token is labelled when its characters overlap an answer's span.

    notebooks/03_prompt_templates.ipynb writes this answer mask out from ``return_offsets_mapping``. Raises
    :class:`PromptFormatError` for roles out of order, an unknown ``chat_format`` or a literal special token in a message."""
    text, spans = render_with_answers(messages, chat_format, tokenizer=tokenizer, add_generation_prompt=add_generation_prompt)
    specials = sorted({t for t in tokenizer.all_special_tokens if t}, key=len, reverse=True)
    for n, msg in enumerate(messages, 1):
        for special in (s for s in specials if s in msg["content"]):
            raise PromptFormatError("prompt.special_token",
                f"第 {n} 条消息（{msg['role']}）里含有字面的特殊标记 {special!r}，分词器会把它当成真正的控制标记"
                f"（BOS/EOS），模型会以为对话在这里断开。请删掉或改写它（例如写成 “{special.replace('<', '< ')}”）。",
                f"Message {n} ({msg['role']}) contains the literal special token {special!r}, which the "
                "tokenizer would read as a real control token (BOS/EOS). Remove or rewrite it.", message=n, token=special)
    out = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)  # as apply_chat_template tokenizes
    ids = list(out["input_ids"])
    labels = [t if any(start < end_ and stop > start_ for start_, end_ in spans) else IGNORE_INDEX
              for t, (start, stop) in zip(ids, out["offset_mapping"])]
    if chat_format == "article":  # the article let the tokenizer add BOS: tokenizer(article_prompt(q)) gives these ids
        ids, labels, text = [tokenizer.bos_token_id] + ids, [IGNORE_INDEX] + labels, tokenizer.bos_token + text
    return Encoded(ids, labels, text)


def load_llama2_tokenizer(**kwargs):
    """The real Llama-2 tokenizer (32000 tokens) that ``make setup`` caches (scripts/fetch_llama2_vocab.py);
    if it is missing, an error that says how to get it (notebooks/03_prompt_templates.ipynb)."""
    from transformers import AutoTokenizer

    folder = home_dir() / "llama2-vocab"
    if not (folder / "tokenizer.json").exists():
        script = REPO_ROOT / "scripts" / "fetch_llama2_vocab.py"  # runs from any folder, Colab included
        raise TutorialError("prompt.vocab_missing", f"还没有下载 Llama-2 的真实词表。请运行 make setup，或者（在任何目录、Colab 里也行）：python {script}",
                                      f"The real Llama-2 vocabulary is not fetched yet. Run make setup, or (from any "
                                      f"folder, Colab too): python {script}", script=str(script))
    return AutoTokenizer.from_pretrained(folder, **kwargs)


def token_table(tokenizer, input_ids: list[int], labels: list[int] | None = None):
    """A pandas table of tokens: id, piece, BOS/EOS mark, label (notebooks/03_prompt_templates.ipynb)."""
    import pandas as pd

    marks = {tokenizer.bos_token_id: "BOS", tokenizer.eos_token_id: "EOS"}
    rows = {"id": list(input_ids), "piece": tokenizer.convert_ids_to_tokens(list(input_ids)),
            "特殊标记": [marks.get(i, "") for i in input_ids]}
    if labels is not None:
        rows["label"] = ["回答" if x != IGNORE_INDEX else "-100" for x in labels]
    return pd.DataFrame(rows).rename_axis("位置")


def truncate_history(tokenizer, messages: list[dict], max_tokens: int, chat_format: str = "llama2") -> tuple[list, list]:
    """Drop the oldest whole turns until the prompt fits in ``max_tokens`` (context window - max_new_tokens);
    returns ``(kept, dropped)`` (notebooks/03_prompt_templates.ipynb)."""
    check_messages(messages)
    head = list(messages[:1]) if messages[0]["role"] == "system" else []
    body = list(messages[len(head):])
    turns = [body[i : i + 2] for i in range(0, len(body), 2)]  # (user, assistant) pairs, then the open question
    dropped: list[dict] = []
    while True:
        kept = head + [m for turn in turns for m in turn]
        size = len(encode(tokenizer, kept, chat_format).input_ids)
        if size <= max_tokens:
            return kept, dropped
        if len(turns) == 1:
            raise PromptFormatError("prompt.too_long",
                f"系统提示加上最新的问题已有 {size} 个 token，超过上限 {max_tokens}。请缩短问题或系统提示，或者调大 max_tokens。",
                f"The system prompt plus the latest question take {size} tokens, more than max_tokens={max_tokens}. "
                "Shorten one of them or raise max_tokens.", tokens=size, max_tokens=max_tokens)
        dropped += turns.pop(0)


CSV_ROLE_NAMES = {"user": "Human", "assistant": "Assistant", "system": "System"}
_CSV_ROLES = {name: role for role, name in CSV_ROLE_NAMES.items()}
# Where one CSV turn ends and the next begins: "</s>" right before "<s>Human:" (or Assistant/System).
_CSV_TURN_END = re.compile(r"\n?</s>(?=<s>(?:Human|Assistant|System):)")
_CSV_HEADER = re.compile(r"<s>(Human|Assistant|System):[ ]?")


def csv_text_to_messages(text: str, *, row: int | None = None) -> list[dict]:
    """Parse one row of the article's CSV (``<s>Human: ...\\n</s><s>Assistant: ...\\n</s>``), multi-turn and
    a first ``<s>System:`` turn included (notebooks/03_prompt_templates.ipynb); errors name the ``row``."""
    zh, en = (f"第 {row} 行", f"row {row}") if row is not None else ("这一行", "this row")
    expected = "<s>Human: 问题\\n</s><s>Assistant: 回答\\n</s>"
    if not isinstance(text, str) or not text.strip():
        raise PromptFormatError("prompt.empty_text", f"{zh}是空的。", f"{en} is empty.")
    body = text.strip("\r\n")
    if not _CSV_HEADER.match(body) or not body.endswith("</s>"):
        raise PromptFormatError("prompt.bad_csv_text",
            f"{zh}应以 “<s>Human:” 开头、以 “</s>” 结尾，格式为 {expected}。开头是 {body[:30]!r}，结尾是 {body[-30:]!r}",
            f"{en} must start with '<s>Human:' and end with '</s>'. It starts with {body[:30]!r} and ends with "
            f"{body[-30:]!r}")
    body = body[: -len("</s>")].removesuffix("\n")
    messages = []
    for part in _CSV_TURN_END.split(body):
        header = _CSV_HEADER.match(part)
        messages.append({"role": _CSV_ROLES[header.group(1)], "content": part[header.end() :]})
    check_messages(messages, where=zh if row is not None else "", where_en=en if row is not None else "")
    if messages[-1]["role"] != "assistant":
        raise PromptFormatError("prompt.no_answer",
            f"{zh}没有以回答结尾：最后一条不是 “<s>Assistant:”（缺少回答，或者回答前少了 “</s>”）。格式应为 {expected}。",
            f"{en} does not end with an answer: no final '<s>Assistant:' part (or no '</s>' before it).")
    for n, m in enumerate(messages, 1):
        if m["role"] != "system" and not m["content"].strip():
            kind_zh, kind_en = ("回答", "answer") if m["role"] == "assistant" else ("问题", "question")
            raise PromptFormatError("prompt.empty_message", f"{zh}第 {n} 条消息的{kind_zh}是空的。", f"{en}: message {n} has an empty {kind_en}.",
                                    message=n, role=m["role"])
    return messages
