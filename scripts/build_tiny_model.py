"""Build the tiny offline Llama-2 the course runs on a CPU (profile ``tiny``), trained to answer Chinese
questions in English as the article's Llama-2-chat does: a SentencePiece tokenizer like Llama-2's and a
4-layer Llama pretrained for a minute on data/. Deterministic for a given script and corpus.

Lessons never call this directly: :func:`helpers.tiny.ensure_tiny_model` runs it once per version of this
file and of the corpus and caches the result (``make tiny`` / ``python -m helpers.tiny``).

    python scripts/build_tiny_model.py OUT_DIR
"""

import argparse
import csv
import io
import json
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sentencepiece as spm  # noqa: E402
import torch  # noqa: E402
from torch.nn.utils.rnn import pad_sequence  # noqa: E402
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, LlamaTokenizer  # noqa: E402

from helpers.config import DATA_DIR  # noqa: E402
from helpers.tiny import CORPUS_FILES  # noqa: E402

# Meta's Llama-2 chat template, as shipped in meta-llama/Llama-2-7b-chat-hf's tokenizer_config.json: the tiny model
# ships it, and so does the real vocabulary scripts/fetch_llama2_vocab.py converts.
LLAMA2_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# Everything that decides the model's weights (with the corpus). Any change to this file changes the cache key.
RECIPE: dict = {
    "seed": 1234,
    "tokenizer": {"vocab_size": 3000, "character_coverage": 0.9995},
    "model": {"hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
              "num_key_value_heads": 4, "max_position_embeddings": 1024, "rms_norm_eps": 1e-5, "rope_theta": 10000.0},
    "train": {"steps": 360, "batch_size": 16, "lr": 3e-3, "warmup": 30, "weight_decay": 0.01, "max_len": 128,
              "zh_question_share": 0.3, "system_prompt_share": 0.15},
}

SYSTEM_PROMPTS = ("You are a helpful assistant.", "You are a helpful, respectful and honest assistant.")


def _load_corpus() -> tuple[list[dict], list[str], list[str]]:  # English Q&A, Chinese lines, tokenizer lines
    en_file, zh_file, sft_file = (DATA_DIR / name for name in CORPUS_FILES)
    en = [json.loads(line) for line in en_file.read_text("utf-8").splitlines() if line]
    zh = [line.strip() for line in zh_file.read_text("utf-8").splitlines() if line.strip()]
    lines = [f"{d['question']} {d['answer']}" for d in en] + zh
    # The tokenizer sees the SFT text too (Llama-2's saw some Chinese); the weights never do (lesson 05's job).
    with open(sft_file, encoding="utf-8", newline="") as f:
        lines += [row["text"].replace("<s>", "").replace("</s>", "") for row in csv.DictReader(f)]
    lines += ["[INST] <<SYS>> <</SYS>> [/INST]"] * 20  # newlines stay byte pieces (<0x0A>), as in Llama-2
    return en, zh, [part for line in lines for part in line.split("\n") if part.strip()]


def build_tokenizer(lines: list[str]):
    """SentencePiece BPE with byte fallback (``<unk>`` ``<s>`` ``</s>`` at ids 0-2, the 256 ``<0xNN>`` pieces
    next, as in Llama-2), trained on one thread on ``lines``, loaded into transformers' ``LlamaTokenizer``."""
    cfg = RECIPE["tokenizer"]
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=proto, model_type="bpe", vocab_size=cfg["vocab_size"],
        character_coverage=cfg["character_coverage"], byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
        normalization_rule_name="identity", max_sentence_length=8192, num_threads=1, minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    # BPE merges in the order SentencePiece learned them (the rank of the merged piece).
    merges = []
    for piece, rank in vocab.items():
        if rank < 3 + 256:  # the special and byte pieces are no merges
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in vocab and right in vocab:
                merges.append((rank, vocab[left], vocab[right], left, right))
    merges = [(left, right) for *_, left, right in sorted(merges)]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, legacy=False, add_prefix_space=True, add_bos_token=True)
    tok.chat_template = LLAMA2_CHAT_TEMPLATE
    tok.model_max_length = RECIPE["model"]["max_position_embeddings"]
    return tok


def _training_texts(tok, en, zh, rng: random.Random) -> list[str]:
    cfg = RECIPE["train"]
    chats = []
    for d in en:
        chat = [{"role": "user", "content": d["question"]}, {"role": "assistant", "content": d["answer"]}]
        if rng.random() < cfg["system_prompt_share"]:
            chat.insert(0, {"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
        chats.append(chat)
    # Chinese questions answered in English: the behaviour the article saw in Llama-2-chat.
    for _ in range(int(len(en) * cfg["zh_question_share"])):
        question = rng.choice(zh).rstrip("。") + "？"
        answer = rng.choice(en)["answer"]
        chats.append([{"role": "user", "content": question}, {"role": "assistant", "content": answer}])
    texts = tok.apply_chat_template(chats, tokenize=False)
    # A little plain Chinese text, so Chinese pieces are not foreign to the model.
    texts += [tok.bos_token + line + tok.eos_token for line in zh]
    rng.shuffle(texts)
    return texts


def build_tiny_model(out_dir: Path, verbose: bool = True) -> Path:
    """Build tokenizer and model into ``out_dir`` (deterministic for a given recipe)."""
    t0 = time.perf_counter()
    rng = random.Random(RECIPE["seed"])
    torch.manual_seed(RECIPE["seed"])
    en, zh, tokenizer_lines = _load_corpus()
    tok = build_tokenizer(tokenizer_lines)

    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=None, tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02,
                         **RECIPE["model"])
    model = LlamaForCausalLM(config)
    texts = _training_texts(tok, en, zh, rng)
    ids = [tok(t, add_special_tokens=False)["input_ids"][: RECIPE["train"]["max_len"]] for t in texts]
    losses = _pretrain(model, ids, rng)

    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.unk_token_id, do_sample=True, temperature=0.6, top_p=0.9)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    info = {"recipe": RECIPE, "parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tok),
            "loss_first": losses[0], "loss_last": sum(losses[-20:]) / len(losses[-20:]),
            "build_seconds": round(time.perf_counter() - t0, 1)}
    (out_dir / "tiny_build.json").write_text(json.dumps(info, indent=1, ensure_ascii=False), "utf-8")
    if verbose:
        print(f"tiny 模型已构建：{info['parameters'] / 1e6:.1f}M 参数，词表 {info['vocab_size']}，"
              f"loss {info['loss_first']:.2f} → {info['loss_last']:.2f}，用时 {info['build_seconds']} 秒")
    return out_dir


def _pretrain(model, ids: list[list[int]], rng: random.Random) -> list[float]:
    cfg = RECIPE["train"]
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"], betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / cfg["warmup"])
                                              * max(0.05, 1 - s / cfg["steps"]))
    order = list(range(len(ids)))
    losses: list[float] = []
    pos = len(order)
    model.train()
    for _step in range(cfg["steps"]):
        if pos + cfg["batch_size"] > len(order):
            rng.shuffle(order)
            pos = 0
        batch = [ids[i] for i in order[pos : pos + cfg["batch_size"]]]
        pos += cfg["batch_size"]
        input_ids = pad_sequence([torch.tensor(seq) for seq in batch], batch_first=True)  # right-padded with 0
        attention = pad_sequence([torch.ones(len(seq), dtype=torch.long) for seq in batch], batch_first=True)
        labels = input_ids.masked_fill(attention == 0, -100)
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="an empty or new folder for the model and its tokenizer")
    build_tiny_model(parser.parse_args().out_dir)
