"""GGUF files and llama.cpp (notebooks/09_gguf_llama_cpp.ipynb). The lesson writes conversion, quantization,
loading and chat out inline; this module holds the plumbing: building llama-cpp-python once (``make gguf-env``),
where llama.cpp's converter scripts are, checks on a GGUF file, and the llama.cpp server process."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

from helpers import _process
from helpers.config import REPO_ROOT, TutorialError, home_dir

LLAMA_CPP_PYTHON = "0.3.36"  # pinned, with the sdist's hash, in scripts/llama-cpp-requirements.txt
REQUIREMENTS = REPO_ROOT / "scripts" / "llama-cpp-requirements.txt"
# What the lesson takes from the sdist's vendor/llama.cpp/: the two converters, the model classes they import,
# the gguf-py they put first on sys.path (the same version as PyPI's gguf), and llama.cpp's licence (MIT).
TOOLS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py", "LICENSE")
# The lesson converts, loads and serves Llama-family models; llama.cpp's own build targets it does not use
# (multimodal, examples, tests, the C++ server and tools) are left out of the build: about half of it.
CMAKE_ARGS = ("-DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF "
              "-DLLAMA_BUILD_SERVER=OFF")
GGUF_MAGIC = b"GGUF"


class GGUFError(TutorialError, ValueError):
    """A GGUF file or a conversion the lesson cannot use, with what to do (notebooks/09_gguf_llama_cpp.ipynb)."""


def cache_dir() -> Path:
    """Where the sdist, the built wheel and the extracted converter scripts live (the course's cache)."""
    return home_dir() / f"llama.cpp-{LLAMA_CPP_PYTHON}"


def tools_dir() -> Path:
    return cache_dir() / "tools"


def wheel_dir() -> Path:
    return cache_dir() / "wheels"


def converter(name: str = "convert_hf_to_gguf.py") -> Path:
    """The path of one of llama.cpp's converter scripts (``make gguf-env`` or :func:`ensure_tools` puts them there)."""
    path = tools_dir() / name
    if not path.is_file():
        raise GGUFError("gguf.converter_missing",
            f"找不到 llama.cpp 的转换脚本 {path}：在仓库根目录运行 `make gguf-env`（Colab 上运行本课的安装单元格）。",
            f"llama.cpp's converter {path} is missing: run `make gguf-env` at the repository root (on Colab, this "
            "lesson's install cell).", path=str(path))
    return path


def require_llama_cpp():
    """``import llama_cpp``, or a clear message on how to get it; checks the pinned version."""
    try:
        import llama_cpp
    except ImportError as err:
        raise GGUFError("gguf.not_installed",
            "没有安装 llama-cpp-python：在仓库根目录运行 `make gguf-env`（第一次会从源码编译 llama.cpp，2 核约 4–5 分钟），"
            "Colab 上运行本课的安装单元格。",
            "llama-cpp-python is not installed: run `make gguf-env` at the repository root (the first time it builds "
            "llama.cpp from source, about 4-5 minutes on 2 cores); on Colab, run this lesson's install cell.") from err
    if llama_cpp.__version__ != LLAMA_CPP_PYTHON:
        import warnings

        warnings.warn(f"llama-cpp-python {llama_cpp.__version__} is installed; the lesson was checked with "
                      f"{LLAMA_CPP_PYTHON} (`make gguf-env` installs it).", stacklevel=2)
    return llama_cpp


# --------------------------------------------------------------------------- what a quantization type costs


def bits_per_weight(type_name: str) -> float:
    """Bits per weight of a GGML tensor type, from its block layout (``gguf.GGML_QUANT_SIZES``: weights per
    block, bytes per block): Q8_0 stores 32 weights in 34 bytes (one fp16 scale + 32 int8), 8.5 bits."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    return nbytes * 8 / block


def _use_more_bits(i_layer: int, n_layers: int) -> bool:  # llama.cpp src/llama-quant.cpp, use_more_bits
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


def tensor_types(config, kind: str) -> list[tuple[str, int, str]]:
    """(tensor, parameters, GGML type) of every tensor a Llama ``config`` gets in a GGUF file of ``kind``
    (F16, Q8_0, Q4_0, Q4_K_M, Q5_K_M), by llama.cpp's choice rules in src/llama-quant.cpp for a dense model
    whose rows divide by 256: the *_K_M kinds give attn_v and ffn_down Q6_K in the first and last eighth of
    the layers and every third layer between; output.weight gets Q6_K except in F16/Q8_0; norms stay F32.
    An ESTIMATE for shapes llama.cpp must fall back on (rows not divisible by 256): lesson 09 reads real files."""
    base = {"F16": "F16", "Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K_M": "Q4_K", "Q5_K_M": "Q5_K"}[kind]
    h, n, inter = config.hidden_size, config.num_hidden_layers, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    out = [("token_embd.weight", config.vocab_size * h, base), ("output_norm.weight", h, "F32")]
    if not getattr(config, "tie_word_embeddings", False):
        out.append(("output.weight", config.vocab_size * h, base if base in ("F16", "Q8_0") else "Q6_K"))
    for i in range(n):
        more = kind.endswith("_K_M") and _use_more_bits(i, n)
        out += [(f"blk.{i}.attn_norm.weight", h, "F32"), (f"blk.{i}.ffn_norm.weight", h, "F32"),
                (f"blk.{i}.attn_q.weight", h * h, base), (f"blk.{i}.attn_k.weight", h * kv, base),
                (f"blk.{i}.attn_v.weight", h * kv, "Q6_K" if more else base),
                (f"blk.{i}.attn_output.weight", h * h, base),
                (f"blk.{i}.ffn_gate.weight", h * inter, base), (f"blk.{i}.ffn_up.weight", h * inter, base),
                (f"blk.{i}.ffn_down.weight", h * inter, "Q6_K" if more else base)]
    return out


def gguf_weight_bytes(config, kind: str) -> int:
    """Bytes of a Llama ``config``'s tensors in a GGUF file of ``kind`` (:func:`tensor_types`); the file adds
    its metadata and vocabulary (a few MB). Lesson 09 passes it to ``estimate_memory(weight_bytes=...)``."""
    return int(sum(count * bits_per_weight(t) / 8 for _, count, t in tensor_types(config, kind)))


# --------------------------------------------------------------------------- set-up: sdist, tools, wheel


def _pip(*args: str, env: dict | None = None) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True, env=env)


def fetch_sdist(verbose: bool = True) -> Path:
    """llama-cpp-python's source package (76.6 MB), downloaded once with pip and checked against the pinned hash."""
    found = sorted(cache_dir().glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"))
    if found:
        return found[0]
    cache_dir().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        if verbose:
            print(f"downloading llama-cpp-python {LLAMA_CPP_PYTHON} (source, 77 MB) / 下载源码包", flush=True)
        _pip("download", "-q", "--no-deps", "--no-binary", ":all:", "--require-hashes", "-r", str(REQUIREMENTS), "-d", tmp)
        (sdist,) = Path(tmp).glob("*.tar.gz")
        return Path(shutil.move(sdist, cache_dir() / sdist.name))


def ensure_tools(verbose: bool = True) -> Path:
    """Extract :data:`TOOLS` from the sdist's ``vendor/llama.cpp/`` into :func:`tools_dir` (once; whole or not at all)."""
    target = tools_dir()
    if target.is_dir():
        return target
    sdist = fetch_sdist(verbose)
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".tools-"))
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)
                       and m.name[len(prefix):].split("/")[0] in TOOLS and (m.isfile() or m.isdir())]
            for member in members:
                member.name = member.name[len(prefix):]
            tar.extractall(tmp, members=members, filter="data")
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def build_wheel(verbose: bool = True) -> Path:
    """Build llama-cpp-python's wheel from the sdist (llama.cpp compiled with cmake for this CPU), once; the
    wheel stays in :func:`wheel_dir` for the next install (the course env, the Colab check)."""
    found = sorted(wheel_dir().glob(f"llama_cpp_python-{LLAMA_CPP_PYTHON}-*.whl"))
    if found:
        return found[0]
    sdist = fetch_sdist(verbose)
    wheel_dir().mkdir(parents=True, exist_ok=True)
    jobs = str(len(os.sched_getaffinity(0)))
    env = {**os.environ, "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", CMAKE_ARGS),
           "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", jobs)}
    if verbose:
        print(f"building llama.cpp from source on {jobs} cores (a few minutes, once) / 从源码编译 llama.cpp（只需一次）", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        _pip("wheel", "-q", "--no-deps", str(sdist), "-w", tmp, env=env)
        (wheel,) = Path(tmp).glob("*.whl")
        wheel = Path(shutil.move(wheel, wheel_dir() / wheel.name))
    if verbose:
        print(f"llama-cpp-python {LLAMA_CPP_PYTHON} built in {time.perf_counter() - start:.0f} s: {wheel}", flush=True)
    return wheel


def install() -> None:
    """Build (once) and install llama-cpp-python with its server into this Python: what lesson 09's Colab cell
    runs (locally ``make gguf-env`` does the same with uv)."""
    wheel = build_wheel()
    ensure_tools()
    _pip("install", "-q", f"{wheel}[server]")


# --------------------------------------------------------------------------- conversion and checks


def read_gguf(path: str | Path) -> dict:
    """What a GGUF file holds, read with the ``gguf`` package: architecture, name, file type, chat template,
    tensor count and the count of each tensor type. A missing, foreign or cut-off file gets a :class:`GGUFError`."""
    path = Path(path)
    if not path.is_file():
        raise GGUFError("gguf.not_found", f"找不到 GGUF 文件 {path}：先运行本课的转换单元格，或检查路径。",
                                  f"No GGUF file at {path}: run this lesson's conversion cell first, or check the path.", path=str(path))
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != GGUF_MAGIC:
        raise GGUFError("gguf.not_gguf",
            f"{path} 不是 GGUF 文件（开头是 {magic!r}，应为 b'GGUF'）。safetensors/bin 权重要先用 convert_hf_to_gguf.py 转换。",
            f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'). Convert safetensors/bin weights "
            "with convert_hf_to_gguf.py first.", path=str(path))
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except (ValueError, IndexError, OSError) as err:
        raise GGUFError("gguf.damaged",
            f"{path} 不完整或已损坏（{path.stat().st_size:,} 字节，读取时出错：{err}）。多半是转换或下载被打断：删掉它，重新生成。",
            f"{path} is incomplete or damaged ({path.stat().st_size:,} bytes; reading failed: {err}). Most likely an "
            "interrupted conversion or download: delete it and make it again.", path=str(path)) from err
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > path.stat().st_size:
        raise GGUFError("gguf.truncated",
            f"{path} 被截断了：张量数据应到第 {end:,} 字节，文件只有 {path.stat().st_size:,} 字节。删掉它，重新生成。",
            f"{path} is truncated: its tensors end at byte {end:,} but the file has {path.stat().st_size:,}. Delete it "
            "and make it again.", path=str(path))

    def field(name):
        f = reader.get_field(name)
        return None if f is None else f.contents()

    return {"architecture": field("general.architecture"), "name": field("general.name"),
            "file_type": field("general.file_type"), "chat_template": field("tokenizer.chat_template"),
            "tensors": len(reader.tensors), "size": path.stat().st_size,
            "tensor_types": Counter(t.tensor_type.name for t in reader.tensors)}


def convert_command(model_dir: str | Path, outfile: str | Path, outtype: str = "f16") -> list[str]:
    """The command line that converts a transformers model folder into one GGUF file (lesson 09 prints it)."""
    return [sys.executable, str(converter()), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]


def run_converter(args: list[str], outfile: str | Path, *, overwrite: bool = False) -> Path:
    """Run a converter command (``args`` names ``outfile`` as its output) into a temporary name beside ``outfile``,
    then rename it into place: a failed or interrupted run leaves no file that looks complete. An existing
    ``outfile`` is kept unless ``overwrite``. On failure the error shows the converter's last lines."""
    outfile = Path(outfile)
    if outfile.exists() and not overwrite:
        return outfile
    outfile.parent.mkdir(parents=True, exist_ok=True)
    tmp = outfile.with_name(f".{outfile.name}.partial-{os.getpid()}")
    args = [str(tmp) if str(a) == str(outfile) else str(a) for a in args]
    try:
        result = subprocess.run(args, capture_output=True, text=True, errors="replace")
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-12:])
            unsupported = "not supported" in tail
            hint = "这个架构 llama.cpp 的转换脚本不支持（见 conversion/ 里的模型类）。" if unsupported else ""
            hint_en = " llama.cpp's converter does not support this architecture (see the model classes in conversion/)." if unsupported else ""
            raise GGUFError("gguf.conversion_failed", f"转换失败（退出码 {result.returncode}），没有写出 {outfile}。{hint}\n{tail}",
                            f"The conversion failed (exit code {result.returncode}); {outfile} was not written.{hint_en}\n{tail}",
                            returncode=result.returncode, outfile=str(outfile), unsupported=unsupported, log=tail)
        read_gguf(tmp)  # a whole, readable file before it takes the name
        os.replace(tmp, outfile)
    finally:
        tmp.unlink(missing_ok=True)
    return outfile


# --------------------------------------------------------------------------- the server


def server_command(gguf_path: str | Path, *, port: int, n_threads: int, n_ctx: int = 2048, alias: str | None = None,
                   lora_path: str | Path | None = None) -> list[str]:
    """llama-cpp-python's OpenAI-compatible server on loopback for one GGUF file (lesson 09 prints it)."""
    args = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf_path), "--host", _process.HOST,
            "--port", str(port), "--n_ctx", str(n_ctx), "--n_threads", str(n_threads)]
    if alias:
        args += ["--model_alias", alias]
    if lora_path:
        args += ["--lora_path", str(lora_path)]
    return args


def start_server(gguf_path: str | Path, *, alias: str = "gguf", n_threads: int = 1, n_ctx: int = 2048,
                 port: int | None = None, timeout: float = 120.0):
    """Start (or reuse) ``python -m llama_cpp.server`` for ``gguf_path`` on 127.0.0.1 with a random API key,
    and wait until it answers (notebooks/09_gguf_llama_cpp.ipynb). Returns a :class:`helpers.serve.Server`:
    ``server.client()`` is an ``openai.OpenAI`` client for it, ``server.stop()`` ends it. Starting, waiting
    and stopping are the plumbing lesson 07's server uses too (helpers/_process.py)."""
    from helpers.serve import Server

    require_llama_cpp()
    read_gguf(gguf_path)  # a clear message for a missing or cut file, before a process starts
    key = ("llama.cpp", str(Path(gguf_path).resolve()), alias, n_threads, n_ctx)
    if (server := _process.running(key)) is not None:
        return server
    port = _process.claim_port(port)
    api_key = secrets.token_urlsafe(16)
    workdir = _process.new_workdir(f"llama-cpp-{port}-")
    # The key goes in the environment (pydantic-settings reads API_KEY), not on the command line `ps` shows.
    forced = {"API_KEY": api_key, "TMPDIR": str(workdir)}
    env = {**os.environ, **forced}
    for name in ("HOST", "PORT"):  # the server would let these override --host and --port
        env.pop(name, None)
    args = server_command(gguf_path, port=port, n_threads=n_threads, n_ctx=n_ctx, alias=alias)
    return _process.launch(key, args, env, list(forced), workdir, port, api_key, [alias], engine="llama.cpp",
                           ready_path="/v1/models", timeout=timeout, server_class=Server)


if __name__ == "__main__":  # `make gguf-env`: the wheel and the converter scripts, once
    print(f"wheel: {build_wheel()}")
    print(f"converter scripts: {ensure_tools()}")
