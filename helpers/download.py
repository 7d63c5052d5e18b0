"""Getting Llama-2 weights onto the disk reliably: catalogue, plan, disk check, download, verify.

Introduced in notebooks/01_download_weights.ipynb. The lesson shows the
``huggingface_hub.snapshot_download(...)`` call inline; this module holds the plumbing around it:

* :data:`CATALOGUE` / :func:`catalogue_table`: the models the source article lists, their size on
  disk and an estimate of the GPU memory each needs in fp16 / 8-bit / 4-bit;
* :func:`pick_source`: the Hub, a mirror through ``HF_ENDPOINT``, or (offline, in the tests) the
  local demo hub of :mod:`helpers.demo_hub`;
* :func:`plan_download`: which files to fetch (safetensors only when the repo has them), read from
  the repo's metadata, with sizes and sha256;
* :func:`check_disk_space`, :func:`verify_download` (sizes, sha256 of LFS files, git blob ids of the
  rest) and :func:`download_model`, which chains them around the same ``snapshot_download`` call;
* :func:`hub_errors`: turns what huggingface_hub raises into a :class:`DownloadError` whose message,
  in Chinese and English, says what happened and what to do next;
* :func:`download_from_modelscope`: the same plan / check / verify steps with ModelScope, when the
  optional ``modelscope`` package is installed.

``HF_ENDPOINT`` is read by huggingface_hub once, when it is imported. Every function here reads it
again at call time (:func:`current_endpoint`) and passes ``endpoint=`` explicitly, so setting it in
a running notebook works for these helpers.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import shutil
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from helpers import demo_hub
from helpers.config import PROFILES, TutorialError, bilingual, models_dir, output_dir
from helpers.demo_hub import (  # noqa: F401 - re-exported for the lesson
    DEMO_GATED_REPO,
    DEMO_REPO,
    DEMO_TOKEN,
    DEMO_TOKEN_NO_ACCESS,
    DemoHub,
    start_demo_hub,
    unused_local_url,
)

DEFAULT_ENDPOINT = "https://huggingface.co"
MIRROR_EXAMPLE = "https://hf-mirror.com"
MODELSCOPE_ENDPOINT = "https://modelscope.cn"
GIB = 1024**3
# Keep this much free after a download: the OS, pip caches and the notebook need room too.
DISK_RESERVE_BYTES = 512 * 1024**2
HASH_CHUNK = 8 * 1024**2

# ============================================================================ catalogue

# Waiting between download attempts (a seam the tests replace without touching time.sleep).
_sleep = time.sleep


@dataclass(frozen=True)
class CatalogueEntry:
    """A model the article lists, with the architecture numbers the memory estimate needs (notebooks/01_download_weights.ipynb)."""

    name: str
    repo_id: str
    kind: str  # "base", "chat", "chinese-chat" (merged fine-tune) or "lora" (adapter only)
    params: int  # parameters of the weights in this repo (for a LoRA repo: the adapter's)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int = 32000
    gated: bool = False
    base_repo: str | None = None  # LoRA: the model the adapter is applied to
    modelscope_id: str | None = None
    lora_rank: int | None = None

    @property
    def is_lora(self) -> bool:
        return self.kind == "lora"


_ARCH = {  # Llama-2 configs: layers, hidden, intermediate, heads, kv heads, parameters
    "7b": (32, 4096, 11008, 32, 32, 6_738_415_616),
    "13b": (40, 5120, 13824, 40, 40, 13_015_864_320),
    "70b": (80, 8192, 28672, 64, 8, 68_976_648_192),
}


def _llama(name, repo_id, kind, size, *, gated=False, modelscope_id=None):
    layers, hidden, inter, heads, kv, params = _ARCH[size]
    return CatalogueEntry(name, repo_id, kind, params, layers, hidden, inter, heads, kv, gated=gated,
                          modelscope_id=modelscope_id)


def lora_parameters(layers: int, hidden: int, intermediate: int, kv_dim: int, rank: int) -> int:
    """Parameters of a LoRA adapter of rank ``rank`` on all seven linear layers of each block (notebooks/01_download_weights.ipynb)."""
    attention = 2 * (hidden + hidden) + 2 * (hidden + kv_dim)  # q, o: hidden->hidden; k, v: hidden->kv
    mlp = 3 * (hidden + intermediate)  # gate, up: hidden->intermediate; down: back
    return layers * rank * (attention + mlp)


def _lora(name, repo_id, size, base_repo, rank=8):
    layers, hidden, inter, heads, kv, _ = _ARCH[size]
    params = lora_parameters(layers, hidden, inter, hidden // heads * kv, rank)
    return CatalogueEntry(name, repo_id, "lora", params, layers, hidden, inter, heads, kv, base_repo=base_repo,
                          lora_rank=rank)


CATALOGUE: tuple[CatalogueEntry, ...] = (
    _llama("Llama-2-7B", "meta-llama/Llama-2-7b-hf", "base", "7b", gated=True),
    _llama("Llama-2-13B", "meta-llama/Llama-2-13b-hf", "base", "13b", gated=True),
    _llama("Llama-2-70B", "meta-llama/Llama-2-70b-hf", "base", "70b", gated=True),
    _llama("Llama-2-7B-Chat", "meta-llama/Llama-2-7b-chat-hf", "chat", "7b", gated=True,
           modelscope_id=PROFILES["llama2-7b-chat"].modelscope_id),
    _llama("Llama-2-13B-Chat", "meta-llama/Llama-2-13b-chat-hf", "chat", "13b", gated=True,
           modelscope_id=PROFILES["llama2-13b-chat"].modelscope_id),
    _llama("Llama-2-70B-Chat", "meta-llama/Llama-2-70b-chat-hf", "chat", "70b", gated=True),
    _llama("Llama2-Chinese-7b-Chat", "FlagAlpha/Llama2-Chinese-7b-Chat", "chinese-chat", "7b"),
    _llama("Llama2-Chinese-13b-Chat", "FlagAlpha/Llama2-Chinese-13b-Chat", "chinese-chat", "13b"),
    _lora("Llama2-Chinese-7b-Chat-LoRA", "FlagAlpha/Llama2-Chinese-7b-Chat-LoRA", "7b",
          "meta-llama/Llama-2-7b-chat-hf"),
    _lora("Llama2-Chinese-13b-Chat-LoRA", "FlagAlpha/Llama2-Chinese-13b-Chat-LoRA", "13b",
          "meta-llama/Llama-2-13b-chat-hf"),
)

KIND_LABELS = {"base": "预训练基座", "chat": "对话", "chinese-chat": "中文对话（合并参数）", "lora": "中文 LoRA 适配器"}

# Bytes per weight of the layers bitsandbytes quantizes. nf4 stores 4 bits plus one fp32 scale per
# block of 64 weights (without double quantization): 0.5 + 4/64 bytes.
BYTES_PER_WEIGHT = {16: 2.0, 8: 1.0, 4: 0.5 + 4 / 64}
RUNTIME_OVERHEAD_GIB = 1.0  # CUDA context, activations of one forward pass, allocator slack


def find_entry(repo_id: str) -> CatalogueEntry | None:
    """The catalogue entry of ``repo_id`` (see notebooks/01_download_weights.ipynb), or None."""
    return next((e for e in CATALOGUE if e.repo_id == repo_id), None)


def disk_bytes(entry: CatalogueEntry) -> int:
    """Bytes on disk of the repo's weights: fp16 safetensors; a LoRA adapter is saved in fp32 (notebooks/01_download_weights.ipynb)."""
    return entry.params * (4 if entry.is_lora else 2)


def estimate_memory(entry: CatalogueEntry, bits: int = 16, context_tokens: int = 2048) -> dict[str, float]:
    """Estimated GPU memory (GiB) to run ``entry`` with ``bits``-bit weights (16, 8 or 4).

    weights: the linear layers at ``BYTES_PER_WEIGHT[bits]``, the embedding and ``lm_head`` kept in
    16-bit as bitsandbytes does; kv_cache: keys and values in fp16 for ``context_tokens`` tokens;
    runtime: a fixed allowance. A LoRA entry adds its fp16 adapter to its base model. An estimate:
    lesson 02 measures the real figures (see notebooks/01_download_weights.ipynb).
    """
    if bits not in BYTES_PER_WEIGHT:
        raise TutorialError(bilingual(f"bits 只能是 16、8 或 4，收到 {bits}。", f"bits must be 16, 8 or 4, got {bits}."))
    base = find_entry(entry.base_repo) if entry.is_lora else entry
    embed = 2 * base.vocab * base.hidden  # embed_tokens + lm_head
    weights = (base.params - embed) * BYTES_PER_WEIGHT[bits] + embed * 2
    if entry.is_lora:
        weights += entry.params * 2
    head_dim = base.hidden // base.heads
    kv_cache = 2 * base.layers * base.kv_heads * head_dim * 2 * context_tokens
    parts = {"weights": weights / GIB, "kv_cache": kv_cache / GIB, "runtime": RUNTIME_OVERHEAD_GIB}
    parts["total"] = sum(parts.values())
    return parts


def catalogue_table(context_tokens: int = 2048):
    """The catalogue as a pandas DataFrame, rendered in notebooks/01_download_weights.ipynb."""
    import pandas as pd

    rows = []
    for e in CATALOGUE:
        rows.append(
            {
                "模型": e.name,
                "repo id": e.repo_id,
                "类型": KIND_LABELS[e.kind],
                "参数量": f"{e.params / 1e9:.2f}B" if not e.is_lora else f"{e.params / 1e6:.0f}M（r={e.lora_rank}）",
                "磁盘 GiB": round(disk_bytes(e) / GIB, 2 if e.is_lora else 1),
                "显存 fp16 GiB*": round(estimate_memory(e, 16, context_tokens)["total"], 1),
                "显存 8-bit GiB*": round(estimate_memory(e, 8, context_tokens)["total"], 1),
                "显存 4-bit GiB*": round(estimate_memory(e, 4, context_tokens)["total"], 1),
                "需申请访问": "是" if e.gated else "否",
                "ModelScope": e.modelscope_id or "—",
            }
        )
    return pd.DataFrame(rows).set_index("模型")


# ============================================================================ errors


class DownloadError(TutorialError):
    """A download problem the learner can fix; the message says what happened and the next step (notebooks/01_download_weights.ipynb)."""

    def __init__(self, message: str, *, original: BaseException | None = None):
        super().__init__(message)
        self.original = original


class GatedRepoNoTokenError(DownloadError):
    """A gated repo (Llama-2) was asked for without a token (notebooks/01_download_weights.ipynb)."""


class GatedRepoNoAccessError(DownloadError):
    """A token was sent, but its account has not been granted access to the gated repo (notebooks/01_download_weights.ipynb)."""


class InvalidTokenError(DownloadError):
    """The server rejected the token itself (notebooks/01_download_weights.ipynb)."""


class RepoNotFoundError(DownloadError):
    """No such repo on this endpoint (or a private one) (notebooks/01_download_weights.ipynb)."""


class RevisionNotFoundError(DownloadError):
    """The repo exists but not the branch, tag or commit asked for (notebooks/01_download_weights.ipynb)."""


class EndpointUnreachableError(DownloadError):
    """Nothing answers at the endpoint (blocked, offline, wrong address) (notebooks/01_download_weights.ipynb)."""


class NotAHubError(DownloadError):
    """Something answers at the endpoint, but it does not speak the Hub protocol (notebooks/01_download_weights.ipynb)."""


class OfflineModeError(DownloadError):
    """HF_HUB_OFFLINE is set, so huggingface_hub refuses to use the network (notebooks/01_download_weights.ipynb)."""


class ServerError(DownloadError):
    """The server answered 5xx or 429 (notebooks/01_download_weights.ipynb)."""


class DownloadInterruptedError(DownloadError):
    """The connection broke mid-file more often than huggingface_hub retries (notebooks/01_download_weights.ipynb)."""


class NotEnoughDiskError(DownloadError):
    """The disk preflight refused: less free space than the download needs (notebooks/01_download_weights.ipynb)."""


class CorruptDownloadError(DownloadError):
    """Files on disk differ from the repo's metadata (size or hash) (notebooks/01_download_weights.ipynb)."""


class ExistingDownloadError(DownloadError):
    """The target folder holds something this call will not overwrite without a flag (notebooks/01_download_weights.ipynb)."""


class ModelScopeMissingError(DownloadError):
    """The optional ``modelscope`` package is not installed (notebooks/01_download_weights.ipynb)."""


def _message(problem_zh: str, next_zh: str, problem_en: str, next_en: str) -> str:
    return bilingual(f"{problem_zh}\n下一步：{next_zh}", f"{problem_en}\nNext step: {next_en}")


def _repo_page(endpoint: str, repo_id: str) -> str:
    return f"{endpoint.rstrip('/')}/{repo_id}"


@dataclass
class _Context:
    repo_id: str
    endpoint: str
    revision: str = "main"
    target: Path | None = None
    phase: str = "download"  # "plan" or "download"


def _gated_no_token(ctx: _Context, err=None) -> DownloadError:
    page = _repo_page(ctx.endpoint, ctx.repo_id)
    return GatedRepoNoTokenError(
        _message(
            f"{ctx.repo_id} 是受限（gated）仓库：要先登录、并且账号已获批准才能下载，而这次请求没有带 token。",
            f"① 用你的账号打开 {page}，同意许可并申请访问（Meta 一般几小时内批准；不想等可以先下不受限的 "
            "FlagAlpha/Llama2-Chinese-7b-Chat）；② 在 https://huggingface.co/settings/tokens 创建一个 Read 权限的 token；"
            "③ 在终端运行 `hf auth login`，或在启动 Jupyter 前设置环境变量 HF_TOKEN，或把 token=\"hf_...\" 传给下载函数；"
            "然后重新运行这个单元格。用镜像（HF_ENDPOINT）时同样需要 token。",
            f"{ctx.repo_id} is a gated repo: you must be logged in with an account that has been granted access, "
            "and this request carried no token.",
            f"(1) open {page} with your account, accept the licence and request access (Meta usually approves "
            "within hours; FlagAlpha/Llama2-Chinese-7b-Chat is not gated if you cannot wait); (2) create a Read token "
            "at https://huggingface.co/settings/tokens; (3) run `hf auth login`, or set HF_TOKEN before starting "
            "Jupyter, or pass token=\"hf_...\"; then run this cell again. Mirrors need the token too.",
        ),
        original=err,
    )


def _gated_no_access(ctx: _Context, err=None) -> DownloadError:
    page = _repo_page(ctx.endpoint, ctx.repo_id)
    return GatedRepoNoAccessError(
        _message(
            f"{ctx.repo_id} 是受限（gated）仓库。你的请求带了 token，但这个账号还没有获得访问权限（HTTP 403）。",
            f"用同一个账号打开 {page} 申请访问，等页面显示已获批准（granted）后再运行这个单元格；"
            "如果你有多个账号，用 `hf auth whoami` 确认 token 属于获批的那个账号。",
            f"{ctx.repo_id} is a gated repo. Your request carried a token, but its account has not been granted "
            "access (HTTP 403).",
            f"with the same account, open {page} and request access; run this cell again once the page says access "
            "was granted. With several accounts, check with `hf auth whoami` that the token belongs to the approved one.",
        ),
        original=err,
    )


def _invalid_token(ctx: _Context, err=None) -> DownloadError:
    return InvalidTokenError(
        _message(
            f"{ctx.endpoint} 拒绝了你的 token（Invalid credentials）：token 拼错了、复制时多了空格或引号、已被删除或过期。",
            "到 https://huggingface.co/settings/tokens 重新复制或新建一个 Read token，运行 `hf auth login` 重新登录"
            "（或更新环境变量 HF_TOKEN），然后重新运行这个单元格。下载公开仓库时也可以传 token=False，不带 token。",
            f"{ctx.endpoint} rejected your token (invalid credentials): mistyped, copied with a space or quotes, "
            "deleted or expired.",
            "copy or create a Read token at https://huggingface.co/settings/tokens, log in again with "
            "`hf auth login` (or update HF_TOKEN) and run this cell again. For public repos token=False sends none.",
        ),
        original=err,
    )


def _repo_not_found(ctx: _Context, err=None) -> DownloadError:
    close = difflib.get_close_matches(ctx.repo_id, [e.repo_id for e in CATALOGUE] + [DEMO_REPO], n=1, cutoff=0.6)
    hint_zh = f"你是不是想要 {close[0]}？" if close else ""
    hint_en = f"Did you mean {close[0]}? " if close else ""
    return RepoNotFoundError(
        _message(
            f"{ctx.endpoint} 上找不到仓库 {ctx.repo_id!r}：名字可能拼错了（区分大小写），或者它是私有仓库而你没有权限。",
            f"{hint_zh}对照本课的模型目录表检查 repo id（形如 组织/名称，例如 meta-llama/Llama-2-7b-chat-hf，"
            "注意 -hf 后缀和大小写），改正后重新运行；确认没拼错的话，检查 token 是否属于有权限的账号。",
            f"There is no repo {ctx.repo_id!r} on {ctx.endpoint}: the name may be misspelt (it is case-sensitive) "
            "or the repo is private and you have no access.",
            f"{hint_en}check the repo id against this lesson's catalogue (owner/name, for instance "
            "meta-llama/Llama-2-7b-chat-hf, mind the -hf suffix and the case) and run again; if it is right, check "
            "that your token belongs to an account with access.",
        ),
        original=err,
    )


def _revision_not_found(ctx: _Context, err=None) -> DownloadError:
    return RevisionNotFoundError(
        _message(
            f"仓库 {ctx.repo_id} 存在，但没有版本 {ctx.revision!r}（分支、标签或提交）。",
            f"去掉 revision 参数，使用默认分支 main；或在 {_repo_page(ctx.endpoint, ctx.repo_id)} 的 Files 页确认版本名。",
            f"The repo {ctx.repo_id} exists but has no revision {ctx.revision!r} (branch, tag or commit).",
            "drop the revision argument to use the default branch main, or check the name on the repo's Files page.",
        ),
        original=err,
    )


def _unreachable(ctx: _Context, err=None) -> DownloadError:
    detail = f"{type(err).__name__}: {err}" if err is not None else "no answer"
    detail = detail.splitlines()[0][:160]
    demo_zh = "（这是本地演示服务器的地址：重新运行启动它的单元格即可。）" if demo_hub.is_demo_url(ctx.endpoint) else ""
    return EndpointUnreachableError(
        _message(
            f"连不上下载服务器 {ctx.endpoint}（{detail}）。在中国大陆直连 huggingface.co 经常失败或极慢。{demo_zh}",
            f"① 换镜像：在启动 Jupyter 之前设置 HF_ENDPOINT={MIRROR_EXAMPLE}（内核已启动时改这个环境变量对 "
            "huggingface_hub 无效，要重启内核，或给下载函数传 endpoint=...）；② 或改用 ModelScope："
            "download_from_modelscope(...)；③ 用代理的话检查 HTTPS_PROXY / NO_PROXY。然后重新运行这个单元格。",
            f"Cannot reach the download server {ctx.endpoint} ({detail}). From mainland China huggingface.co is "
            "often blocked or very slow.",
            f"(1) use a mirror: set HF_ENDPOINT={MIRROR_EXAMPLE} before starting Jupyter (changing it in a running "
            "kernel does not reach huggingface_hub: restart, or pass endpoint=...); (2) or use ModelScope with "
            "download_from_modelscope(...); (3) behind a proxy, check HTTPS_PROXY / NO_PROXY. Then run this cell again.",
        ),
        original=err,
    )


def _not_a_hub(ctx: _Context, err=None) -> DownloadError:
    return NotAHubError(
        _message(
            f"{ctx.endpoint} 有回应，但它不像 Hugging Face Hub（没有 Hub 的 JSON 或 X-Repo-Commit 响应头）。"
            "常见原因：HF_ENDPOINT 写成了某个网页地址、多了路径，或代理返回了登录页。",
            f"把 HF_ENDPOINT 设为镜像的根地址，例如 {MIRROR_EXAMPLE}（不要带 /models 之类的路径），重启内核后重新运行。",
            f"{ctx.endpoint} answers, but not like a Hugging Face Hub (no Hub JSON, no X-Repo-Commit header). "
            "Usually HF_ENDPOINT points at a web page or has an extra path, or a proxy returned a login page.",
            f"set HF_ENDPOINT to the mirror's root, for instance {MIRROR_EXAMPLE} (no /models path), restart the "
            "kernel and run again.",
        ),
        original=err,
    )


def _offline(ctx: _Context, err=None) -> DownloadError:
    return OfflineModeError(
        _message(
            f"现在是离线模式（HF_HUB_OFFLINE=1），huggingface_hub 不会联网，所以不能从 {ctx.endpoint} 下载。",
            "要下载：在启动 Jupyter 之前取消这个环境变量（或设为 0），重启内核后重新运行；"
            "权重已经在本地的话，不必下载，直接把 LLAMA_TUTORIAL_MODEL 设为那个文件夹。",
            f"Offline mode is on (HF_HUB_OFFLINE=1): huggingface_hub will not use the network, so nothing can be "
            f"downloaded from {ctx.endpoint}.",
            "to download, unset it (or set it to 0) before starting Jupyter, restart the kernel and run again; if "
            "the weights are already on disk, set LLAMA_TUTORIAL_MODEL to that folder instead.",
        ),
        original=err,
    )


def _server_error(ctx: _Context, status: int | None, err=None) -> DownloadError:
    where = f"已经下载完的文件都保留在 {ctx.target}" if ctx.target else "还没有下载任何文件"
    where_en = f"finished files stay in {ctx.target}" if ctx.target else "nothing was downloaded yet"
    what = "请求太频繁，被限流" if status == 429 else "暂时出错"
    return ServerError(
        _message(
            f"服务器 {ctx.endpoint} {what}（HTTP {status}）。",
            f"{where}；等几分钟重新运行这个单元格，只会补下缺的文件。反复出现时换一个镜像（HF_ENDPOINT）或改用 ModelScope。",
            f"The server {ctx.endpoint} {'rate-limited the request' if status == 429 else 'failed'} (HTTP {status}).",
            f"{where_en}; wait a few minutes and run this cell again: only missing files are fetched. If it keeps "
            "happening, switch mirror (HF_ENDPOINT) or use ModelScope.",
        ),
        original=err,
    )


def _interrupted(ctx: _Context, err=None) -> DownloadError:
    return DownloadInterruptedError(
        _message(
            f"下载连接多次中断（{type(err).__name__ if err else '连接断开'}），huggingface_hub 自动续传几次后放弃了。",
            f"已经下载完的文件都保留在 {ctx.target}；重新运行这个单元格，它会跳过已完成的文件、只重下未完成的。"
            "网络不稳时把 max_workers 调小（例如 2）。",
            f"The connection broke mid-file several times ({type(err).__name__ if err else 'disconnected'}); "
            "huggingface_hub resumed a few times, then gave up.",
            f"finished files stay in {ctx.target}; run this cell again: it skips them and fetches only the "
            "unfinished ones. On a shaky network use a smaller max_workers (for instance 2).",
        ),
        original=err,
    )


def _unexpected(ctx: _Context, err: BaseException) -> DownloadError:
    text = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return DownloadError(
        _message(
            f"下载 {ctx.repo_id}（{ctx.endpoint}）时出现了本课没有预料到的错误：{text}",
            "重新运行一次这个单元格；仍然失败的话，把这条信息连同 HF_ENDPOINT 的值贴到课程仓库的 issue 里。",
            f"An error this lesson did not expect while downloading {ctx.repo_id} ({ctx.endpoint}): {text}",
            "run this cell once more; if it fails again, post this message and your HF_ENDPOINT in an issue of the "
            "course repository.",
        ),
        original=err,
    )


def translate_error(err: BaseException, ctx: _Context) -> DownloadError:
    """Map an exception from huggingface_hub / httpx to the matching :class:`DownloadError` (notebooks/01_download_weights.ipynb)."""
    import httpx2
    from huggingface_hub import errors as hf

    if isinstance(err, DownloadError):
        return err
    if isinstance(err, hf.GatedRepoError):
        status = err.response.status_code if err.response is not None else None
        return _gated_no_access(ctx, err) if status == 403 else _gated_no_token(ctx, err)
    if isinstance(err, hf.RevisionNotFoundError):
        return _revision_not_found(ctx, err)
    if isinstance(err, hf.RepositoryNotFoundError):
        return _repo_not_found(ctx, err)
    if isinstance(err, hf.OfflineModeIsEnabled):
        return _offline(ctx, err)
    if isinstance(err, hf.LocalEntryNotFoundError):  # huggingface_hub's wrapper around a network failure
        cause = err.__cause__ or err.__context__
        return translate_error(cause, ctx) if cause is not None else _unreachable(ctx, err)
    if isinstance(err, hf.HfHubHTTPError):
        status = err.response.status_code if err.response is not None else None
        server_message = (err.response.headers.get("X-Error-Message", "") if err.response is not None else "") or ""
        if status == 401 and "Invalid credentials" in server_message + str(err):
            return _invalid_token(ctx, err)
        if status is not None and (status == 429 or status >= 500):
            return _server_error(ctx, status, err)
        if status == 404:
            return _not_a_hub(ctx, err)
        return _unexpected(ctx, err)
    if isinstance(err, hf.FileMetadataError) or isinstance(err, json.JSONDecodeError):
        return _not_a_hub(ctx, err)
    if isinstance(err, (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError)):
        return _interrupted(ctx, err) if ctx.phase == "download" else _unreachable(ctx, err)
    if isinstance(err, httpx2.TimeoutException) and not isinstance(err, httpx2.ConnectTimeout):
        return _interrupted(ctx, err) if ctx.phase == "download" else _unreachable(ctx, err)
    if isinstance(err, (httpx2.TransportError, ConnectionError)):
        return _unreachable(ctx, err)
    if isinstance(err, OSError) and "Consistency check failed" in str(err):
        return _interrupted(ctx, err)
    return _unexpected(ctx, err)


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` is on this machine (127.0.0.1, localhost, ::1) (notebooks/01_download_weights.ipynb)."""
    host = (urlsplit(endpoint).hostname or "").lower()
    return host in {"localhost", "::1"} or host.startswith("127.")


@contextmanager
def _network_allowed(ctx: _Context):
    """huggingface_hub refuses all HTTP in offline mode; a server on this machine is not the network.

    ``HF_HUB_OFFLINE`` is read once, at import, into ``huggingface_hub.constants``. For a loopback
    endpoint (the demo hub, a local mirror) offline mode is lifted for the duration of the call;
    any other endpoint gets :class:`OfflineModeError` before a request is made.
    """
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        yield
        return
    if not is_loopback(ctx.endpoint):
        raise _offline(ctx)
    constants.HF_HUB_OFFLINE = False
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = True


@contextmanager
def hub_errors(repo_id: str, *, endpoint: str | None = None, revision: str = "main", target=None,
               phase: str = "download"):
    """Run huggingface_hub calls for ``repo_id``; what they raise becomes a :class:`DownloadError`.

    Used around the ``snapshot_download`` call in notebooks/01_download_weights.ipynb. Its message
    says, in Chinese and English, what happened and what to do next; the original exception is kept
    as ``.original``. Also lets a loopback endpoint through offline mode (see ``_network_allowed``).
    """
    ctx = _Context(repo_id, (endpoint or current_endpoint()).rstrip("/"), revision,
                   Path(target) if target else None, phase)
    with _network_allowed(ctx):
        try:
            yield ctx
        except DownloadError:
            raise
        except Exception as err:  # translated below; nothing reaches the learner as a raw traceback
            raise translate_error(err, ctx) from None


def short_errors() -> bool:
    """In Jupyter, show a :class:`TutorialError` as its message only, without a traceback.

    Called at the top of notebooks/01_download_weights.ipynb. The cell still counts as failed (so
    "Run all" stops there); only the display changes. Returns False outside IPython.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    if shell is None:
        return False

    def handler(shell, etype, value, tb, tb_offset=None):
        lines = [f"{etype.__name__}:", str(value)]
        if hasattr(shell, "_showtraceback"):
            shell._showtraceback(etype, value, lines)
        else:  # pragma: no cover - very old IPython
            print("\n".join(lines), file=sys.stderr)
        return lines

    shell.set_custom_exc((TutorialError,), handler)
    return True


# ============================================================================ sources


def current_endpoint() -> str:
    """``HF_ENDPOINT`` as it is now (huggingface_hub itself only read it at import), or the Hub (notebooks/01_download_weights.ipynb)."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


@dataclass
class Source:
    """Where lesson 01 downloads from (see :func:`pick_source`) (notebooks/01_download_weights.ipynb)."""

    kind: str  # "hub", "mirror" or "demo"
    endpoint: str
    repo_id: str
    reason: str
    hub: DemoHub | None = None
    previous_endpoint: str | None = field(default=None, repr=False)

    def close(self) -> None:
        """Stop the demo hub (if one was started) and give ``HF_ENDPOINT`` its old value back."""
        if self.hub is not None and self.hub.running:
            self.hub.stop()
            if os.environ.get("HF_ENDPOINT") == self.endpoint:
                if self.previous_endpoint is None:
                    os.environ.pop("HF_ENDPOINT", None)
                else:
                    os.environ["HF_ENDPOINT"] = self.previous_endpoint

    def __str__(self) -> str:
        names = {"hub": "Hugging Face Hub", "mirror": "镜像", "demo": "本地演示服务器"}
        return f"下载源：{names[self.kind]} {self.endpoint}，仓库 {self.repo_id}（{self.reason}）"


def endpoint_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether an HTTP server answers at ``endpoint`` (any status counts: 401 is an answer) (notebooks/01_download_weights.ipynb)."""
    try:
        with urllib.request.urlopen(f"{endpoint.rstrip('/')}/api/models/{DEMO_REPO}", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _repo_of(choice) -> str | None:
    if choice is None:
        return PROFILES["llama2-7b-chat"].repo_id
    if choice.profile is not None:
        return choice.profile.repo_id
    if not Path(choice.path).exists() and choice.path.count("/") == 1:
        return choice.path
    return None


def pick_source(choice=None, *, repo_id: str | None = None, probe_timeout: float = 3.0, verbose: bool = True) -> Source:
    """Decide where to download from, and say why in one Chinese line.

    The repo is ``repo_id``, else the Hub repo of ``choice`` (a :class:`helpers.config.ModelChoice`).
    ``HF_ENDPOINT`` (a mirror) is used when set, else the Hub. When the model has no Hub repo (the
    tiny model is built locally), when offline mode is on, or when the endpoint does not answer, a
    local demo hub is started on 127.0.0.1, serving the tiny model as :data:`DEMO_REPO`, and
    ``HF_ENDPOINT`` points at it. See notebooks/01_download_weights.ipynb.
    """
    from huggingface_hub import constants

    repo_id = repo_id or _repo_of(choice)
    env = (os.environ.get("HF_ENDPOINT") or "").rstrip("/")
    if env and demo_hub.is_demo_url(env):
        env = ""  # left over from an earlier run of the lesson
    endpoint = env or DEFAULT_ENDPOINT
    if repo_id is None:
        name = choice.name if choice is not None else "?"
        source = _demo_source(f"所选模型 {name} 不在 Hub 上（本地构建的模型或本地文件夹）")
    elif constants.HF_HUB_OFFLINE and not is_loopback(endpoint):
        source = _demo_source("离线模式（HF_HUB_OFFLINE=1）不允许联网")
    elif not endpoint_reachable(endpoint, probe_timeout):
        source = _demo_source(f"连不上 {endpoint}")
    else:
        kind = "mirror" if env and env != DEFAULT_ENDPOINT else "hub"
        how = f"HF_ENDPOINT={env}" if kind == "mirror" else "没有设置 HF_ENDPOINT，直连 Hub"
        source = Source(kind, endpoint, repo_id, f"{how}，服务器有响应")
    if verbose:
        print(source)
    return source


def _demo_source(why: str) -> Source:
    hub = start_demo_hub()
    previous = os.environ.get("HF_ENDPOINT")
    os.environ["HF_ENDPOINT"] = hub.url
    reason = f"{why}，所以在本机 127.0.0.1 上启动了演示服务器，下载同一个 tiny 模型来练习完整流程，并把 HF_ENDPOINT 指向它"
    return Source("demo", hub.url, DEMO_REPO, reason, hub, previous)


def default_target(repo_id: str, endpoint: str | None = None) -> Path:
    """Where a download of ``repo_id`` goes by default (see notebooks/01_download_weights.ipynb).

    A profile's repo goes to ``models_dir()/<profile>`` (where :func:`helpers.config.resolve_model`
    looks), any other repo to ``models_dir()/<owner>--<name>``. What the demo hub serves is practice,
    not weights to keep: it goes to ``output_dir()/downloads/<owner>--<name>``.
    """
    slug = repo_id.replace("/", "--")
    if demo_hub.is_demo_url(endpoint or current_endpoint()):
        return output_dir() / "downloads" / slug
    for profile in PROFILES.values():
        if profile.repo_id == repo_id:
            return models_dir() / profile.name
    return models_dir() / slug


# ============================================================================ plan

SAFETENSORS_PATTERNS = ["*.safetensors", "*.safetensors.index.json"]
PYTORCH_PATTERNS = ["*.bin", "*.bin.index.json"]
# Configuration, tokenizer, chat template, licence and model card.
SUPPORT_PATTERNS = ["*.json", "*.model", "*.jinja", "*.txt", "*.md", "LICENSE*"]
# Never needed by transformers: Meta's original checkpoints, other frameworks, git's own file.
NEVER_PATTERNS = ["*.pth", "*.pt", "*.ckpt", "*.h5", "*.msgpack", "*.ot", "*.gguf", "*.onnx", "original/*",
                  ".gitattributes"]


def choose_patterns(filenames) -> tuple[list[str], list[str]]:
    """``(allow_patterns, ignore_patterns)`` for ``snapshot_download``: one weight format only.

    safetensors when the repo has any (fast, safe to load, no pickle), else PyTorch ``.bin``.
    See notebooks/01_download_weights.ipynb.
    """
    names = list(filenames)
    if any(n.endswith(".safetensors") for n in names):
        return SUPPORT_PATTERNS + SAFETENSORS_PATTERNS, NEVER_PATTERNS + PYTORCH_PATTERNS
    if any(n.endswith(".bin") for n in names):
        return SUPPORT_PATTERNS + PYTORCH_PATTERNS, list(NEVER_PATTERNS)
    return list(SUPPORT_PATTERNS), list(NEVER_PATTERNS)


@dataclass
class RemoteFile:
    """A file of the repo as its metadata describes it (notebooks/01_download_weights.ipynb)."""

    path: str
    size: int
    sha256: str | None  # LFS files (weights): the sha256 of the content
    blob_id: str | None  # git blob id (for a non-LFS file: sha1 of "blob <size>\\0" + content)
    selected: bool = True
    reason: str = ""


@dataclass
class DownloadPlan:
    """What :func:`plan_download` found: the commit, every file, and the ones to fetch (notebooks/01_download_weights.ipynb)."""

    repo_id: str
    endpoint: str
    commit: str
    gated: str | bool
    files: list[RemoteFile]
    allow_patterns: list[str]
    ignore_patterns: list[str]

    @property
    def selected(self) -> list[RemoteFile]:
        return [f for f in self.files if f.selected]

    @property
    def skipped(self) -> list[RemoteFile]:
        return [f for f in self.files if not f.selected]

    @property
    def bytes_selected(self) -> int:
        return sum(f.size for f in self.selected)

    @property
    def bytes_skipped(self) -> int:
        return sum(f.size for f in self.skipped)

    def table(self):
        """One row a file: size, storage, and whether it is downloaded (and why not)."""
        import pandas as pd

        rows = [
            {
                "文件": f.path,
                "大小": human_bytes(f.size),
                "存储": "LFS（sha256）" if f.sha256 else "git",
                "下载？": "下载" if f.selected else f"跳过：{f.reason}",
            }
            for f in self.files
        ]
        return pd.DataFrame(rows).set_index("文件")

    def __str__(self) -> str:
        return (
            f"{self.repo_id} @ {self.commit[:10]}：下载 {len(self.selected)} 个文件共 {human_bytes(self.bytes_selected)}，"
            f"跳过 {len(self.skipped)} 个共 {human_bytes(self.bytes_skipped)}"
        )


def _skip_reason(path: str, allow: list[str]) -> str:
    from fnmatch import fnmatchcase

    if path.endswith((".bin", ".bin.index.json")) and "*.safetensors" in allow:
        return "与 safetensors 重复的 PyTorch 旧格式"
    if path == ".gitattributes":
        return "git 的配置文件"
    if path.startswith("original/") or path.endswith((".pth", ".pt")):
        return "Meta 原始格式，transformers 用不到"
    if any(fnmatchcase(path, p) for p in NEVER_PATTERNS):
        return "其他框架的格式"
    return "加载模型用不到"


def make_plan(repo_id: str, endpoint: str, commit: str, files: list[RemoteFile], gated=False) -> DownloadPlan:
    """Choose the files of ``files`` to download (with :func:`choose_patterns`) into a plan (notebooks/01_download_weights.ipynb)."""
    from huggingface_hub.utils import filter_repo_objects

    allow, ignore = choose_patterns(f.path for f in files)
    keep = set(filter_repo_objects([f.path for f in files], allow_patterns=allow, ignore_patterns=ignore))
    for f in files:
        f.selected = f.path in keep
        f.reason = "" if f.selected else _skip_reason(f.path, allow)
    return DownloadPlan(repo_id, endpoint, commit, gated, files, allow, ignore)


def plan_download(repo_id: str, *, endpoint: str | None = None, token=None, revision: str = "main") -> DownloadPlan:
    """Read the repo's metadata (``HfApi.model_info(files_metadata=True)``) and plan the download.

    Checks access to a gated repo up front (``auth_check``), so a missing token is reported before
    anything is written. See notebooks/01_download_weights.ipynb.
    """
    from huggingface_hub import HfApi

    endpoint = (endpoint or current_endpoint()).rstrip("/")
    with hub_errors(repo_id, endpoint=endpoint, revision=revision, phase="plan"):
        api = HfApi(endpoint=endpoint, token=token)
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
        if info.gated:
            api.auth_check(repo_id)
    files = [
        RemoteFile(s.rfilename, s.size or 0, s.lfs.sha256 if s.lfs else None, s.blob_id)
        for s in info.siblings or []
    ]
    return make_plan(repo_id, endpoint, info.sha, files, info.gated or False)


# ============================================================================ disk


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (notebooks/01_download_weights.ipynb)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def free_disk_bytes(folder) -> int:
    """Free bytes on the disk that holds ``folder`` (or its nearest existing parent) (notebooks/01_download_weights.ipynb)."""
    path = Path(folder).expanduser().resolve()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def missing_files(plan: DownloadPlan, target) -> list[RemoteFile]:
    """The planned files not yet in ``target`` with their full size (notebooks/01_download_weights.ipynb)."""
    target = Path(target)
    return [f for f in plan.selected if not ((target / f.path).is_file() and (target / f.path).stat().st_size == f.size)]


@dataclass
class DiskCheck:
    """Needed vs free bytes for a download (see :func:`check_disk_space`) (notebooks/01_download_weights.ipynb)."""

    target: Path
    needed: int
    free: int
    reserve: int

    @property
    def ok(self) -> bool:
        return self.free >= self.needed + self.reserve

    def __str__(self) -> str:
        verdict = "够用" if self.ok else "不够"
        return (
            f"还需下载 {human_bytes(self.needed)}，{self.target} 所在磁盘空闲 {human_bytes(self.free)}"
            f"（另留 {human_bytes(self.reserve)} 余量）：{verdict}"
        )


def check_disk_space(plan: DownloadPlan, target, *, free_bytes: int | None = None,
                     reserve_bytes: int = DISK_RESERVE_BYTES) -> DiskCheck:
    """Compare the bytes still to download with the free space; raise :class:`NotEnoughDiskError`.

    ``free_bytes`` replaces the measured free space (the lesson uses it to show a refusal).
    See notebooks/01_download_weights.ipynb.
    """
    target = Path(target).expanduser()
    needed = sum(f.size for f in missing_files(plan, target))
    free = free_disk_bytes(target) if free_bytes is None else free_bytes
    check = DiskCheck(target, needed, free, reserve_bytes)
    if not check.ok:
        raise NotEnoughDiskError(
            _message(
                f"磁盘空间不够：{plan.repo_id} 还需下载 {human_bytes(needed)}，{target} 所在磁盘只剩 "
                f"{human_bytes(free)}（还要留 {human_bytes(reserve_bytes)} 余量）。没有开始下载。",
                "清理出空间后重新运行；或者换到更大的磁盘：给下载函数传 target='/大磁盘/文件夹'，"
                "或在启动 Jupyter 之前设置 LLAMA_TUTORIAL_HOME=/大磁盘/路径。",
                f"Not enough disk space: {plan.repo_id} still needs {human_bytes(needed)}, the disk of {target} has "
                f"{human_bytes(free)} free (plus {human_bytes(reserve_bytes)} to keep free). Nothing was downloaded.",
                "free some space and run again, or use a bigger disk: pass target='/big/disk/folder', or set "
                "LLAMA_TUTORIAL_HOME=/big/disk/path before starting Jupyter.",
            )
        )
    return check


# ============================================================================ verify


def file_sha256(path) -> str:
    """sha256 of a file, read in 8 MiB chunks (notebooks/01_download_weights.ipynb)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def git_blob_sha1(path) -> str:
    """The git blob id of a file: sha1 of ``b"blob <size>\\0"`` followed by the content (notebooks/01_download_weights.ipynb)."""
    h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class FileCheck:
    """The verification of one file (notebooks/01_download_weights.ipynb)."""

    path: str
    expected_size: int
    actual_size: int | None
    method: str
    expected_hash: str | None
    actual_hash: str | None

    @property
    def ok(self) -> bool:
        if self.actual_size != self.expected_size:
            return False
        return self.expected_hash is None or self.actual_hash == self.expected_hash

    @property
    def problem(self) -> str:
        if self.actual_size is None:
            return "文件不存在"
        if self.actual_size != self.expected_size:
            return f"大小不符：{self.actual_size} ≠ {self.expected_size}"
        if self.expected_hash is not None and self.actual_hash != self.expected_hash:
            return f"{self.method} 不符"
        return ""


@dataclass
class VerifyReport:
    """What :func:`verify_download` found; ``table()`` renders it (notebooks/01_download_weights.ipynb)."""

    folder: Path
    checks: list[FileCheck]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def bad(self) -> list[FileCheck]:
        return [c for c in self.checks if not c.ok]

    def table(self):
        import pandas as pd

        rows = [
            {
                "文件": c.path,
                "大小": human_bytes(c.expected_size),
                "校验方式": c.method,
                "期望": (c.expected_hash or "—")[:12],
                "实际": (c.actual_hash or "—")[:12],
                "结果": "✅" if c.ok else f"❌ {c.problem}",
            }
            for c in self.checks
        ]
        return pd.DataFrame(rows).set_index("文件")

    def __str__(self) -> str:
        if self.ok:
            return f"校验通过：{len(self.checks)} 个文件的大小和哈希都与仓库记录一致"
        return f"校验失败：{', '.join(c.path for c in self.bad)}"


def _check_one(folder: Path, f: RemoteFile) -> FileCheck:
    path = folder / f.path
    size = path.stat().st_size if path.is_file() else None
    if f.sha256:
        method, expected = "sha256", f.sha256
    elif f.blob_id:
        method, expected = "git blob sha1", f.blob_id
    else:
        method, expected = "仅大小", None
    actual = None
    if expected is not None and size == f.size:  # no point hashing a file of the wrong size
        actual = file_sha256(path) if method == "sha256" else git_blob_sha1(path)
    return FileCheck(f.path, f.size, size, method, expected, actual)


def verify_download(plan: DownloadPlan, folder) -> VerifyReport:
    """Check every planned file in ``folder`` against the repo metadata: size, then hash.

    LFS files (the weights) by sha256, the others by their git blob id. Hashing 13 GB takes about
    a minute; files are hashed in parallel. See notebooks/01_download_weights.ipynb.
    """
    folder = Path(folder)
    with ThreadPoolExecutor(max_workers=min(4, max(1, len(plan.selected)))) as pool:
        checks = list(pool.map(lambda f: _check_one(folder, f), plan.selected))
    return VerifyReport(folder, checks)


def _corrupt_error(plan: DownloadPlan, report: VerifyReport) -> CorruptDownloadError:
    listing = "；".join(f"{c.path}（{c.problem}）" for c in report.bad)
    listing_en = "; ".join(c.path for c in report.bad)
    return CorruptDownloadError(
        _message(
            f"下载完成，但这些文件没有通过校验：{listing}。它们和仓库记录的大小/哈希不一致（传输出错、磁盘问题或文件被改动）。",
            "运行 download_model(..., repair=True)：只删除并重新下载校验失败的文件，其余保留。反复失败时换一个镜像或检查磁盘。",
            f"The download finished but these files failed verification: {listing_en}. They differ from the size or "
            "hash the repo records (transfer error, disk problem, or the file was changed).",
            "run download_model(..., repair=True): it deletes and fetches again only the failed files. If it keeps "
            "failing, switch mirror or check the disk.",
        )
    )


# ============================================================================ download

MARKER = Path(".cache") / "llama2-tutorial" / "verified.json"


def read_marker(folder) -> dict | None:
    """The record a verified download leaves in its folder, or None (notebooks/01_download_weights.ipynb)."""
    path = Path(folder) / MARKER
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_marker(plan: DownloadPlan, folder: Path, report: VerifyReport) -> None:
    path = folder / MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "repo_id": plan.repo_id,
        "commit": plan.commit,
        "endpoint": plan.endpoint,
        "verified_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        "files": {c.path: {"size": c.expected_size, "hash": c.actual_hash, "method": c.method} for c in report.checks},
    }
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False))


def _marker_complete(marker: dict | None, folder: Path) -> bool:
    if not marker:
        return False
    return all((folder / p).is_file() and (folder / p).stat().st_size == v["size"] for p, v in marker["files"].items())


@dataclass
class DownloadReport:
    """What :func:`download_model` did: files fetched now, files already there, the verification (notebooks/01_download_weights.ipynb)."""

    repo_id: str
    commit: str
    folder: Path
    fetched: list[str]
    reused: list[str]
    bytes_fetched: int
    seconds: float
    verification: VerifyReport | None
    note: str = ""

    def __str__(self) -> str:
        text = (
            f"{self.repo_id} → {self.folder}：本次下载 {len(self.fetched)} 个文件（{human_bytes(self.bytes_fetched)}），"
            f"本地已有 {len(self.reused)} 个，用时 {self.seconds:.1f} 秒"
        )
        if self.verification is not None:
            text += f"；{self.verification}"
        return text + (f"。{self.note}" if self.note else "")


def check_target(plan: DownloadPlan, target, *, overwrite: bool = False) -> str:
    """Make sure downloading ``plan`` into ``target`` overwrites nothing the learner has; say what it is.

    Refuses (:class:`ExistingDownloadError`) a non-empty folder not made by a download, and a folder
    holding a verified download of another repo or another commit, unless ``overwrite=True``.
    Returns one Chinese line: a new folder, an unfinished download to resume, or a complete one.
    See notebooks/01_download_weights.ipynb.
    """
    target = Path(target).expanduser()
    if not target.exists() or not any(target.iterdir()):
        return f"{target} 是新文件夹"
    marker = read_marker(target)
    if overwrite:
        return f"{target} 已有内容，overwrite=True：有变化的文件会被替换"
    if not ((target / ".cache" / "huggingface").is_dir() or (target / MARKER.parent).is_dir()):
        raise ExistingDownloadError(
            _message(
                f"{target} 不是空文件夹，也不是下载工具建的（没有 .cache/huggingface）。为了不覆盖里面的文件，没有下载。",
                "给 target 换一个新的文件夹；确定要下载到这里的话，传 overwrite=True。",
                f"{target} is not empty and was not made by a download (no .cache/huggingface). To keep its files "
                "safe, nothing was downloaded.",
                "pass another target folder; if you really mean this one, pass overwrite=True.",
            )
        )
    if marker is None:
        return f"{target} 里有上次没下完的文件：已完成的会跳过，只下载缺的"
    if marker["repo_id"] != plan.repo_id:
        raise ExistingDownloadError(
            _message(
                f"{target} 里是另一个模型 {marker['repo_id']} 的完整下载。为了不覆盖它，这次没有下载。",
                "给 target 换一个新文件夹；确定要覆盖的话传 overwrite=True。",
                f"{target} holds a complete download of another model, {marker['repo_id']}. Nothing was downloaded.",
                "pass another target folder, or overwrite=True if you mean it.",
            )
        )
    if marker["commit"] != plan.commit:
        old, new = marker["commit"][:10], plan.commit[:10]
        raise ExistingDownloadError(
            _message(
                f"{target} 里已经有 {plan.repo_id} 的完整下载，并且校验过（提交 {old}），而服务器上现在是提交 {new}。"
                "为了不覆盖你已有的文件，这次没有下载。",
                "要更新到新版本：download_model(..., overwrite=True)（只下载有变化的文件）；要保留旧版本：给 target 换一个新文件夹。",
                f"{target} holds a complete, verified download of {plan.repo_id} (commit {old}); the server now has "
                f"commit {new}. To keep your files, nothing was downloaded.",
                "to update, call download_model(..., overwrite=True) (only changed files are fetched); to keep the "
                "old version, pass another target folder.",
            )
        )
    return f"{target} 里已有同一提交的完整下载（{marker['verified_at']} 校验过）"


def download_model(
    repo_id: str,
    target=None,
    *,
    endpoint: str | None = None,
    token=None,
    revision: str = "main",
    max_workers: int = 8,
    attempts: int = 3,
    retry_wait: float = 5.0,
    repair: bool = False,
    overwrite: bool = False,
    cache_dir=None,
    free_bytes: int | None = None,
) -> DownloadReport:
    """Plan, check the disk, download with ``snapshot_download``, verify; resume what is missing.

    The steps of notebooks/01_download_weights.ipynb in one call. ``target`` defaults to
    :func:`default_target`. A complete, verified download of the same commit is reused without a
    request for its files; one of another commit, or a folder not made by a download, is left
    untouched unless ``overwrite=True``. A transient failure (server error, broken connection) is
    retried ``attempts`` times; files that finished are never fetched again. ``repair=True`` deletes
    and fetches again the files that fail verification. Every failure is a :class:`DownloadError`.
    """
    from huggingface_hub import snapshot_download

    endpoint = (endpoint or current_endpoint()).rstrip("/")
    target = Path(target).expanduser() if target else default_target(repo_id, endpoint)
    start = time.perf_counter()
    marker = read_marker(target)
    try:
        plan = plan_download(repo_id, endpoint=endpoint, token=token, revision=revision)
    except (EndpointUnreachableError, OfflineModeError):
        if marker and marker["repo_id"] == repo_id and _marker_complete(marker, target):
            note = f"连不上 {endpoint}，但本地已有校验过的完整下载（{marker['verified_at']}），直接使用"
            return DownloadReport(repo_id, marker["commit"], target, [], sorted(marker["files"]), 0,
                                  time.perf_counter() - start, None, note)
        raise
    check_target(plan, target, overwrite=overwrite)
    if marker and marker["repo_id"] == repo_id and marker["commit"] == plan.commit and _marker_complete(marker, target):
        note = f"已有校验过的完整下载（{marker['verified_at']}），没有重新下载"
        return DownloadReport(repo_id, plan.commit, target, [], [f.path for f in plan.selected], 0,
                              time.perf_counter() - start, None, note)

    if repair:
        for check in verify_download(plan, target).bad:
            (target / check.path).unlink(missing_ok=True)
    check_disk_space(plan, target, free_bytes=free_bytes)
    todo = missing_files(plan, target)

    for attempt in range(1, attempts + 1):
        try:
            with hub_errors(repo_id, endpoint=endpoint, revision=revision, target=target):
                snapshot_download(
                    repo_id,
                    revision=plan.commit,  # the commit the plan (sizes, hashes) describes
                    local_dir=target,
                    allow_patterns=plan.allow_patterns,
                    ignore_patterns=plan.ignore_patterns,
                    endpoint=endpoint,
                    token=token,
                    max_workers=max_workers,
                    cache_dir=cache_dir,
                )
            break
        except (ServerError, DownloadInterruptedError, EndpointUnreachableError) as err:
            if attempt == attempts:
                raise err
            wait = retry_wait * attempt
            print(f"第 {attempt} 次下载没有完成（{type(err).__name__}），{wait:.0f} 秒后重试；已完成的文件不会重新下载。")
            _sleep(wait)

    report = verify_download(plan, target)
    if not report.ok:
        raise _corrupt_error(plan, report)
    _write_marker(plan, target, report)
    fetched = [f.path for f in todo]
    reused = [f.path for f in plan.selected if f.path not in fetched]
    return DownloadReport(repo_id, plan.commit, target, fetched, reused, sum(f.size for f in todo),
                          time.perf_counter() - start, report)


def finish_download(plan: DownloadPlan, folder) -> VerifyReport:
    """Verify ``folder`` against ``plan`` and record it as complete; :class:`CorruptDownloadError` if not.

    What :func:`download_model` does after ``snapshot_download``, for the inline call of
    notebooks/01_download_weights.ipynb.
    """
    folder = Path(folder)
    report = verify_download(plan, folder)
    if not report.ok:
        raise _corrupt_error(plan, report)
    _write_marker(plan, folder, report)
    return report


# ============================================================================ ModelScope


def modelscope_installed() -> bool:
    """Whether the optional ``modelscope`` package can be imported (notebooks/01_download_weights.ipynb)."""
    import importlib.util

    try:
        return importlib.util.find_spec("modelscope") is not None
    except (ImportError, ValueError):
        return False


def _import_modelscope():
    try:
        import modelscope  # noqa: F401
        from modelscope import snapshot_download as ms_snapshot_download
    except ImportError as err:
        raise ModelScopeMissingError(
            _message(
                "没有安装 modelscope 包，所以不能从 ModelScope（魔搭社区）下载。它是本课程的可选依赖。",
                "在终端运行 pip install \"modelscope>=1.20\"（或在课程目录运行 pip install -e \".[modelscope]\"），"
                "然后重启内核，再运行这个单元格。",
                "The modelscope package is not installed, so nothing can be downloaded from ModelScope. It is an "
                "optional dependency of this course.",
                "run pip install \"modelscope>=1.20\" (or pip install -e \".[modelscope]\" in the course folder), "
                "restart the kernel and run this cell again.",
            ),
            original=err,
        ) from None
    return ms_snapshot_download


def _modelscope_plan(model_id: str, revision: str | None) -> DownloadPlan:
    from modelscope.hub.api import HubApi

    kwargs = {"recursive": True}
    if revision:
        kwargs["revision"] = revision
    listing = HubApi().get_model_files(model_id, **kwargs)
    files = [
        RemoteFile(item.get("Path") or item["Name"], int(item.get("Size") or 0), item.get("Sha256") or None, None)
        for item in listing
        if item.get("Type", "blob") != "tree"
    ]
    return make_plan(model_id, MODELSCOPE_ENDPOINT, revision or "master", files)


def download_from_modelscope(model_id: str, target=None, *, revision: str | None = None,
                             free_bytes: int | None = None) -> DownloadReport:
    """Download ``model_id`` from ModelScope with the same plan, disk check and sha256 verification.

    Needs the optional ``modelscope`` package (``pip install -e ".[modelscope]"``); without it,
    :class:`ModelScopeMissingError` says how to install it. See notebooks/01_download_weights.ipynb.
    """
    import inspect

    ms_snapshot_download = _import_modelscope()
    target = Path(target).expanduser() if target else models_dir() / model_id.replace("/", "--")
    ctx = _Context(model_id, MODELSCOPE_ENDPOINT, revision or "master", target, "plan")
    start = time.perf_counter()
    try:
        plan = _modelscope_plan(model_id, revision)
    except Exception as err:
        raise _modelscope_error(ctx, err) from None
    check_target(plan, target)
    check_disk_space(plan, target, free_bytes=free_bytes)
    todo = missing_files(plan, target)
    (target / MARKER.parent).mkdir(parents=True, exist_ok=True)  # marks the folder as a download in progress
    params = inspect.signature(ms_snapshot_download).parameters
    kwargs: dict = {"revision": revision} if revision else {}
    if "allow_patterns" in params:
        kwargs.update(allow_patterns=plan.allow_patterns, ignore_patterns=plan.ignore_patterns)
    else:  # modelscope before 1.15 named them differently
        kwargs.update(allow_file_pattern=plan.allow_patterns, ignore_file_pattern=plan.ignore_patterns)
    if "local_dir" in params:
        kwargs["local_dir"] = str(target)
    else:
        kwargs["cache_dir"] = str(target)
    try:
        folder = Path(ms_snapshot_download(model_id, **kwargs))
    except Exception as err:
        ctx.phase = "download"
        raise _modelscope_error(ctx, err) from None
    report = verify_download(plan, folder)
    if not report.ok:
        raise _corrupt_error(plan, report)
    _write_marker(plan, folder, report)
    return DownloadReport(model_id, plan.commit, folder, [f.path for f in todo],
                          [f.path for f in plan.selected if f not in todo], sum(f.size for f in todo),
                          time.perf_counter() - start, report)


def _modelscope_error(ctx: _Context, err: BaseException) -> DownloadError:
    text = f"{type(err).__name__}: {err}".splitlines()[0][:300]
    return DownloadError(
        _message(
            f"从 ModelScope 下载 {ctx.repo_id} 失败：{text}",
            f"在浏览器打开 {MODELSCOPE_ENDPOINT}/models/{ctx.repo_id} 确认模型 id 拼写无误、需要登录的模型先运行 "
            "`modelscope login`；检查网络后重新运行这个单元格（已下载完的文件会保留）。",
            f"Downloading {ctx.repo_id} from ModelScope failed: {text}",
            f"open {MODELSCOPE_ENDPOINT}/models/{ctx.repo_id} to check the model id, run `modelscope login` for "
            "models that need it, check the network and run this cell again (finished files are kept).",
        ),
        original=err,
    )
