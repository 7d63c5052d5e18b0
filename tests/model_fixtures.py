"""Small random-weight Llama model folders, for running lessons on "some other model".

A lesson must reach its end with any Llama-2-style model, not only the tiny one it was tuned on.
:func:`random_llama_folder` writes a folder that ``resolve_model`` and
``from_pretrained`` accept like a downloaded model: a ``LlamaForCausalLM`` of tiny size with random
weights (so its answers are noise: no outcome of the tiny model holds), the tiny model's tokenizer,
and, with ``chat_template=False``, no chat template at all (as FlagAlpha's Llama2-Chinese models
ship). Run a lesson on it with ``LLAMA_TUTORIAL_MODEL=<folder>``; see tests/test_lessons_any_model.py.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# Every in_features a multiple of 64, as in Llama-2 (4096, 11008): bitsandbytes 0.50's CPU 4-bit path
# (AVX512-BF16 packing) fails on layers whose input is not a whole number of 64-blocks.
# Head size 32: vLLM's CPU attention rejects 16 ("Unsupported CPU attention configuration: head_dim=16"),
# which made lesson 07's server answer 500 on this model.
SHAPE = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=1024)


def random_llama_folder(tmp_path: Path, chat_template: bool, *, seed: int = 0) -> Path:
    """Write a random-weight Llama model folder under ``tmp_path`` and return it.

    ``chat_template=False`` leaves the tokenizer without any chat template (``apply_chat_template``
    raises on it). The shape differs from the tiny model's (grouped-query attention, 2 layers), so
    code that silently assumes the tiny model's numbers fails here.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    from helpers.tiny import ensure_tiny_model

    tiny = ensure_tiny_model(verbose=False)
    folder = Path(tmp_path) / ("random-llama-with-template" if chat_template else "random-llama-no-template")
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if (tiny / name).is_file() and (chat_template or name != "chat_template.jinja"):
            shutil.copy(tiny / name, folder / name)
    if not chat_template:
        config_file = folder / "tokenizer_config.json"
        tok_config = json.loads(config_file.read_text("utf-8"))
        tok_config.pop("chat_template", None)
        config_file.write_text(json.dumps(tok_config, indent=1, ensure_ascii=False), "utf-8")
    tok = AutoTokenizer.from_pretrained(folder)
    assert (tok.chat_template is not None) == chat_template
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         tie_word_embeddings=False, **SHAPE)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.unk_token_id)
    model.save_pretrained(folder)
    return folder
