"""``make vocab`` (part of ``make setup``): the real Llama-2 vocabulary (32000 tokens) offline, for
notebooks/03_prompt_templates.ipynb and the token-exact tests. Converts the ``ggml-vocab-llama-spm.gguf``
of the llama-cpp-python source package (about 77 MB, no gated download) into a tokenizer beside the tiny
model, where :func:`helpers.prompts.load_llama2_tokenizer` finds it.

    python scripts/fetch_llama2_vocab.py
"""

import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from transformers import AutoTokenizer, LlamaTokenizer  # noqa: E402

from helpers.config import TutorialError, home_dir  # noqa: E402
from scripts.build_tiny_model import LLAMA2_CHAT_TEMPLATE  # noqa: E402

GGUF_NAME = "ggml-vocab-llama-spm.gguf"
SOURCE_PACKAGE = "llama-cpp-python==0.3.36"


def fetch_llama2_vocab() -> Path:
    """Fetch and convert the vocabulary unless it is cached; return the tokenizer folder."""
    target = home_dir() / "llama2-vocab"
    if (target / "tokenizer.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # only this package from source, build tools as wheels
        pip = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", "llama-cpp-python"]
        if subprocess.run([*pip, SOURCE_PACKAGE, "-d", tmp]).returncode != 0:
            raise TutorialError("prompt.vocab_download_failed", f"下载 {SOURCE_PACKAGE} 失败（见上面 pip 的输出）。请检查网络或 pip 的镜像设置后重试。",
                                          f"Downloading {SOURCE_PACKAGE} failed (see pip's output above). "
                                          "Check the network or pip's index settings and retry.", package=SOURCE_PACKAGE)
        with tarfile.open(next(Path(tmp).glob("*.tar.gz"))) as archive:
            member = next(m for m in archive.getmembers() if m.name.endswith("/models/" + GGUF_NAME))
            (Path(tmp) / GGUF_NAME).write_bytes(archive.extractfile(member).read())
        converted = AutoTokenizer.from_pretrained(tmp, gguf_file=GGUF_NAME)
        # As Meta's tokenizer_config.json: a LlamaTokenizer that adds BOS, with Llama-2-chat's template.
        tok = LlamaTokenizer(tokenizer_object=converted.backend_tokenizer, legacy=False, add_bos_token=True,
                             chat_template=LLAMA2_CHAT_TEMPLATE)
        tok.save_pretrained(Path(tmp) / "tokenizer")
        (Path(tmp) / "tokenizer").replace(target)  # all or nothing: an interrupted fetch leaves no half folder
    return target


if __name__ == "__main__":
    print("Llama-2 vocabulary:", fetch_llama2_vocab())
