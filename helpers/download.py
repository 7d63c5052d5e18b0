"""Plumbing around the download notebooks/01_download_weights.ipynb writes out (``snapshot_download``, then
``verify_repo_checksums``), and what huggingface_hub does not do: no stored token to a third-party endpoint,
unsafe file names refused, disk checked first, a learner's folder never overwritten, errors in Chinese and English.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import NamedTuple
from urllib.parse import urlsplit

from safetensors import SafetensorError, safe_open

from helpers._compat import hub_client_factory, hub_httpx
from helpers._text import quote
from helpers.config import HUGGINGFACE_CO, TutorialError, models_dir
# Lesson 01 practises on a Hub on this machine (infrastructure, in a private module): it imports these from here.
from helpers._local_hub import LOCAL_BIN_REPO, LOCAL_REPO, start_local_hub, stop_local_hub  # noqa: F401

# What lesson 01 writes into a folder once every file is verified; the later lessons trust only a folder with it.
DOWNLOAD_MARKER = Path(".cache") / "llama2-tutorial" / "verified.json"

HUB_ENDPOINT = HUGGINGFACE_CO
MIRROR_EXAMPLE = "https://hf-mirror.com"
# One weight format: safetensors plus config, tokenizer, chat template, generation settings (lesson 01).
ALLOW_PATTERNS = ["*.json", "*.jinja", "*.safetensors", "tokenizer.model"]
NAME_MAX = 255  # bytes in one path component: ext4, XFS, APFS, NTFS (in UTF-16 units) alike
DISK_RESERVE_BYTES = 512 * 1024**2  # keep this much free after a download
WEIGHT_SUFFIXES = (".safetensors", ".bin")  # weight files a Transformers or PEFT repo holds

# kind (the error's code is download.<kind>): what happened and the next step in Chinese, the same two in English;
# filled from the fields {repo} {endpoint} {target} {detail}.
MESSAGES = {
    "gated_no_token": ("{repo} 是受限（gated）仓库：要用获批的账号登录才能下载，而这次请求没有带 token。",
                       "在 {endpoint}/{repo} 同意许可并申请访问；获批后在 https://huggingface.co/settings/tokens 创建一个只读、只限这几个仓库的细粒度 token，运行 `hf auth login` 或传 token=\"hf_...\"，再运行这个单元格。",
                       "{repo} is gated: you must log in with an account that was granted access, and this request carried no token.",
                       "accept the licence and request access at {endpoint}/{repo}; once granted, create a fine-grained read-only token for these repos at https://huggingface.co/settings/tokens, run `hf auth login` or pass token=\"hf_...\", then run this cell again."),
    "gated_no_access": ("{repo} 是受限仓库。请求带了 token，但这个账号还没有获得访问权限（HTTP 403）。",
                        "用同一个账号在 {endpoint}/{repo} 申请访问，等显示已获批准后再运行；`hf auth whoami` 可以确认 token 属于哪个账号。",
                        "{repo} is gated. The request carried a token, but its account has not been granted access (HTTP 403).",
                        "request access at {endpoint}/{repo} with the same account and run again once granted; `hf auth whoami` shows whose token it is."),
    "invalid_token": ("服务器不认这个 token（HTTP 401 Invalid credentials）：拼错、多了空格，或已经被删除。",
                      "在 https://huggingface.co/settings/tokens 重新复制或新建 token，运行 `hf auth login` 后重新运行。",
                      "The server rejected the token (HTTP 401 Invalid credentials): mistyped, extra spaces, or deleted.",
                      "copy or create a token at https://huggingface.co/settings/tokens, run `hf auth login` and run again."),
    "repo_not_found": ("{endpoint} 上没有仓库 {repo}（或它是私有的）。{detail}",
                       "对照课程的模型目录检查 repo id 的拼写和大小写（例如 meta-llama/Llama-2-7b-chat-hf，别漏了 -hf），再运行。",
                       "There is no repo {repo} on {endpoint} (or it is private). {detail}",
                       "check the spelling and case of the repo id against the course's catalogue (e.g. meta-llama/Llama-2-7b-chat-hf) and run again."),
    "unreachable": ("连不上下载服务器 {endpoint}（{detail}）。在中国大陆直连 huggingface.co 经常失败。",
                    "换镜像：endpoint=\"" + MIRROR_EXAMPLE + "\"（镜像由第三方运营，只在确有需要时传 token）；或改用 ModelScope；用代理时检查 HTTPS_PROXY / NO_PROXY。然后重新运行。",
                    "Cannot reach the download server {endpoint} ({detail}). From mainland China huggingface.co often fails.",
                    "use a mirror, endpoint=\"" + MIRROR_EXAMPLE + "\" (run by a third party: pass a token only when needed), or ModelScope; behind a proxy check HTTPS_PROXY / NO_PROXY. Then run again."),
    "not_a_hub": ("{endpoint} 有回应，但不像 Hugging Face Hub（{detail}）：常见原因是地址写成了网页或多了路径。",
                  "把 endpoint 设为镜像的根地址，例如 " + MIRROR_EXAMPLE + "，再运行。",
                  "{endpoint} answers, but not like a Hugging Face Hub ({detail}): usually a web page address or an extra path.",
                  "set endpoint to the mirror's root, for instance " + MIRROR_EXAMPLE + ", and run again."),
    "offline": ("现在是离线模式（HF_HUB_OFFLINE=1），不能从 {endpoint} 下载。",
                "启动 Jupyter 之前取消 HF_HUB_OFFLINE 再运行；权重已在本地的话，把 LLAMA_TUTORIAL_MODEL 设为那个文件夹。",
                "Offline mode is on (HF_HUB_OFFLINE=1): nothing can be downloaded from {endpoint}.",
                "unset HF_HUB_OFFLINE before starting Jupyter and run again; if the weights are on disk, set LLAMA_TUTORIAL_MODEL to that folder."),
    "server_error": ("服务器 {endpoint} 出错或限流（{detail}）。已经下载完的文件都保留在 {target}。",
                     "等几分钟重新运行这个单元格，只会补下缺的文件；反复出现就换镜像或改用 ModelScope。",
                     "The server {endpoint} failed or rate-limited the request ({detail}). Finished files stay in {target}.",
                     "wait a few minutes and run this cell again: only missing files are fetched; if it keeps happening, switch mirror or use ModelScope."),
    "unsafe_name": ("{endpoint} 列出的文件名 {detail} 会写到 {target} 外面（绝对路径、.. 或反斜杠）。什么也没有下载。",
                    "不要使用这个镜像：换回 " + HUB_ENDPOINT + " 或可信的镜像。",
                    "{endpoint} lists a file name, {detail}, that would be written outside {target} (absolute, .. or backslash). Nothing was downloaded.",
                    "do not use this mirror: go back to " + HUB_ENDPOINT + " or a mirror you trust."),
    "long_name": ("{endpoint} 列出的文件名 {detail} 太长：有一段超过 255 字节，本机的文件系统存不下。正常的模型仓库没有这样的文件。什么也没有下载。",
                  "不要使用这个镜像：换回 " + HUB_ENDPOINT + " 或可信的镜像。",
                  "{endpoint} lists a file name, {detail}, that is too long: one part is over 255 bytes, more than the file system takes. No model repo has such a file. Nothing was downloaded.",
                  "do not use this mirror: go back to " + HUB_ENDPOINT + " or a mirror you trust."),
    "disk": ("磁盘空间不够：还需下载 {detail}，{target} 所在磁盘不够（还要留 512 MiB 余量）。没有开始下载。",
             "清理出空间后重新运行；或传 target='/大磁盘/文件夹'，或在启动 Jupyter 前设置 LLAMA_TUTORIAL_HOME。",
             "Not enough disk space: {detail} still to download, not enough free on the disk of {target} (plus 512 MiB to keep free). Nothing was downloaded.",
             "free some space and run again, or pass target='/big/disk/folder', or set LLAMA_TUTORIAL_HOME before starting Jupyter."),
    "corrupt": ("下载到的文件和仓库记录的哈希或大小不一致（服务器少发了字节，或文件在传输中损坏）：{detail}。",
                "运行 download_model(..., repair=True)：只删除并重新下载这些文件；反复失败就换镜像或检查磁盘。",
                "The files downloaded differ from the repo's hash or size (the server sent fewer bytes, or they were damaged on the way): {detail}.",
                "run download_model(..., repair=True): it deletes and fetches again only these files; if it keeps failing, switch mirror or check the disk."),
    "existing": ("{target} 里已经有别的东西（{detail}）。为了不覆盖它，什么也没有下载。",
                 "给 target 换一个新文件夹；确定要覆盖的话传 overwrite=True（只下载有变化的文件）。",
                 "{target} already holds something else ({detail}). To keep it, nothing was downloaded.",
                 "pass another target folder, or overwrite=True if you mean it (only changed files are fetched)."),
    "no_weights": ("按过滤条件 {detail}，{repo} 的权重文件一个也不会下载：下载完的文件夹里只有配置和分词器，却照样能通过校验。",
                   "不传 allow_patterns，让 download_model 按仓库的文件列表选格式（只有 .bin 时下载 .bin，见 allow_patterns_for）；或在 allow_patterns 里加上 \"*.bin\"。",
                   "With the filter {detail}, not one weight file of {repo} would be downloaded: the folder would hold only config and tokenizer, and still pass verification.",
                   "leave allow_patterns out, so download_model picks the format from the repo's file list (.bin when it has only .bin, see allow_patterns_for), or add \"*.bin\" to allow_patterns."),
    "modelscope_missing": ("没有安装可选依赖 modelscope，不能从 ModelScope（魔搭社区）下载。",
                           "运行 pip install \"modelscope>=1.20\"，重启内核后再运行。",
                           "The optional modelscope package is not installed, so nothing can be downloaded from ModelScope.",
                           "run pip install \"modelscope>=1.20\", restart the kernel and run again."),
    "unexpected": ("下载 {repo}（{endpoint}）时出现了本课没有预料到的错误：{detail}",
                   "再运行一次；仍然失败的话，把这条信息贴到课程仓库的 issue 里。",
                   "An error this lesson did not expect while downloading {repo} ({endpoint}): {detail}",
                   "run it once more; if it fails again, post this message in an issue of the course repository."),
}


class DownloadError(TutorialError):
    """A download problem the learner can fix (notebooks/01_download_weights.ipynb); ``kind`` is a key of
    :data:`MESSAGES` and the code is ``download.<kind>``. ``detail`` is one text, or a (Chinese, English) pair."""

    def __init__(self, kind: str, *, original: BaseException | None = None, **fields):
        fields = {"repo": "", "endpoint": "", "target": "", "detail": "", **fields}
        detail = fields["detail"] if isinstance(fields["detail"], tuple) else (fields["detail"],) * 2
        zh, zh_next = (text.format(**{**fields, "detail": detail[0]}) for text in MESSAGES[kind][:2])
        en, en_next = (text.format(**{**fields, "detail": detail[1]}) for text in MESSAGES[kind][2:])
        super().__init__(f"download.{kind}", f"{zh}\n下一步：{zh_next}", f"{en}\nNext step: {en_next}", **fields)
        self.kind, self.original = kind, original


def translate_error(err: BaseException, **fields) -> DownloadError:
    """The :class:`DownloadError` for what huggingface_hub or its HTTP library raised (notebooks/01_download_weights.ipynb)."""
    from huggingface_hub import errors as hf

    httpx, kind = hub_httpx(), "unexpected"
    response = getattr(err, "response", None)
    status = response.status_code if response is not None else None
    detail = f"{type(err).__name__}: {err}".splitlines()[0][:200]
    if isinstance(err, DownloadError):
        return err
    if isinstance(err, hf.GatedRepoError):
        kind = "gated_no_access" if status == 403 else "gated_no_token"
    elif isinstance(err, hf.RepositoryNotFoundError):
        kind, detail = "repo_not_found", ""
    elif isinstance(err, hf.OfflineModeIsEnabled):
        kind = "offline"
    elif isinstance(err, hf.HfHubHTTPError) and status == 401 and "Invalid credentials" in str(err):
        kind = "invalid_token"
    elif isinstance(err, hf.HfHubHTTPError) and status is not None and (status == 429 or status >= 500):
        kind, detail = "server_error", f"HTTP {status}"
    elif isinstance(err, (hf.HfHubHTTPError, json.JSONDecodeError, hf.FileMetadataError)):
        kind = "not_a_hub"
    elif isinstance(err, OSError) and "Consistency check failed" in str(err):  # a file shorter than listed
        kind = "corrupt"
    elif isinstance(err, OSError) and err.errno == errno.ENAMETOOLONG:
        kind = "long_name"
    elif isinstance(err, (httpx.TransportError, ConnectionError)):
        kind = "unreachable"
    elif isinstance(err, hf.LocalEntryNotFoundError) and (err.__cause__ or err.__context__) is not None:
        return translate_error(err.__cause__ or err.__context__, **fields)
    return DownloadError(kind, original=err, **{"detail": detail, **fields})


def is_loopback(endpoint: str) -> bool:
    """Whether ``endpoint`` is this machine: a loopback IP address or exactly ``localhost`` (notebooks/01_download_weights.ipynb)."""
    host = (urlsplit(endpoint).hostname or "").lower()
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def safe_token(endpoint: str, token=None):
    """``token`` if given; else the stored token only for huggingface.co, ``False`` (send none) elsewhere (notebooks/01_download_weights.ipynb)."""
    if token is not None:
        return token
    return None if endpoint.rstrip("/") == HUB_ENDPOINT else False


@contextmanager
def hub_errors(repo_id: str, endpoint: str, target=None):
    """Turn what huggingface_hub raises inside into a :class:`DownloadError` (notebooks/01_download_weights.ipynb).

    In offline mode only requests to a loopback address pass, for the duration of the block."""
    import huggingface_hub as hub
    from huggingface_hub import constants
    from huggingface_hub.errors import OfflineModeIsEnabled
    fields = {"repo": repo_id, "endpoint": endpoint.rstrip("/"), "target": target or "—"}
    lift = constants.HF_HUB_OFFLINE and is_loopback(endpoint)
    if constants.HF_HUB_OFFLINE and not lift:
        raise DownloadError("offline", **fields)

    def loopback_only(request):
        if not is_loopback(str(request.url)):
            raise OfflineModeIsEnabled(f"Cannot reach {request.url}: offline mode is enabled.")

    def factory():
        return hub_httpx().Client(event_hooks={"request": [loopback_only]}, follow_redirects=True, timeout=None)

    previous = hub_client_factory()
    if lift:
        hub.set_client_factory(factory)
    try:
        yield
    except Exception as err:  # translated; nothing reaches the learner as a raw traceback
        raise translate_error(err, **fields) from None
    finally:
        if lift:
            hub.set_client_factory(previous)


def check_names(names, target) -> None:
    """Refuse a file listing with a name that would land outside ``target`` (notebooks/01_download_weights.ipynb)."""
    root = Path(target).resolve()
    for name in names:
        parts = PurePosixPath(name).parts
        outside = not (root / name).resolve().is_relative_to(root)
        if not name or name.startswith("/") or "\\" in name or ".." in parts or outside:
            raise DownloadError("unsafe_name", target=target, detail=quote(repr(name)))
        if any(len(part.encode()) > NAME_MAX for part in parts):
            raise DownloadError("long_name", target=target, detail=quote(repr(name)))


def write_marker(folder, repo_id: str, commit: str, siblings) -> dict:
    """Record the verified files (path -> size and sha256 or git blob id) in ``folder`` (notebooks/01_download_weights.ipynb)."""
    files = {}
    for s in siblings:
        if (Path(folder) / s.rfilename).is_file():
            files[s.rfilename] = {"size": s.size, "sha256": s.lfs.sha256} if s.lfs else {"size": s.size, "git_blob_id": s.blob_id}
    record = {"repo_id": repo_id, "commit": commit, "verified_at": time.strftime("%Y-%m-%d %H:%M:%S"), "files": files}
    path = Path(folder) / DOWNLOAD_MARKER
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1, ensure_ascii=False))
    return record


def check_target(target, repo_id: str, commit: str, overwrite: bool = False) -> dict | None:
    """Refuse a folder the download did not make, or one holding a verified download of another repo or
    commit; return the folder's :data:`DOWNLOAD_MARKER` record, if any (notebooks/01_download_weights.ipynb)."""
    target = Path(target)
    try:
        marker = json.loads((target / DOWNLOAD_MARKER).read_text())
    except (OSError, ValueError):
        marker = None
    if overwrite or not target.is_dir() or not any(target.iterdir()):
        return marker
    if marker is None and not (target / ".cache" / "huggingface").is_dir():
        raise DownloadError("existing", target=target, detail=("不是下载工具建的文件夹", "not made by a download"))
    if marker is not None and (marker["repo_id"], marker["commit"]) != (repo_id, commit):
        was, now = f"{marker['repo_id']} @ {marker['commit'][:10]}", f"{repo_id} @ {commit[:10]}"
        raise DownloadError("existing", target=target, detail=(f"{was}，现在是 {now}", f"{was}, now {now}"))
    return marker


def check_disk(needed: int, target, free: int | None = None) -> None:
    """Refuse a download of ``needed`` bytes that would leave less than 512 MiB free (notebooks/01_download_weights.ipynb)."""
    path = Path(target).resolve()
    while not path.exists():
        path = path.parent
    free = shutil.disk_usage(path).free if free is None else free
    if free < needed + DISK_RESERVE_BYTES:
        raise DownloadError("disk", target=target, needed=needed, free=free,
                            detail=(f"{needed / 2**20:.1f} MiB（空闲 {free / 2**20:.1f} MiB）", f"{needed / 2**20:.1f} MiB ({free / 2**20:.1f} MiB free)"))


# A file a model folder lacks or has damaged: its name, what is wrong with it, and the detail (data, not text).
class MissingFile(NamedTuple):
    name: str
    problem: str  # "absent", "wrong_size" (detail: the size the marker lists) or "damaged" (detail: the error)
    detail: object = None


def missing_weights(folder: str | os.PathLike) -> list[MissingFile]:
    """What a local model folder lacks (``[]``: complete): ``config.json``, then the files lesson 01's
    ``DOWNLOAD_MARKER`` lists at their sizes, or else every shard readable by safetensors (lessons 00 and 02 check a folder with it)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        return [MissingFile("config.json", "absent")]
    try:
        listed = json.loads((folder / DOWNLOAD_MARKER).read_text("utf-8"))["files"]
        return [MissingFile(name, "absent" if not (folder / name).is_file() else "wrong_size", info.get("size"))
                for name, info in listed.items()
                if not (folder / name).is_file() or info.get("size") not in (None, (folder / name).stat().st_size)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass  # no verified download: check the weight files themselves
    index = folder / "model.safetensors.index.json"
    shards = ["model.safetensors"]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text("utf-8"))["weight_map"].values()))
        except (ValueError, KeyError) as err:
            return [MissingFile(index.name, "damaged", str(err))]
    problems = []
    for shard in shards:
        try:
            with safe_open(folder / shard, "pt"):
                pass
        except (SafetensorError, OSError) as err:
            absent = not (folder / shard).exists()
            problems.append(MissingFile(shard, "absent") if absent else MissingFile(shard, "damaged", str(err)))
    return problems


def allow_patterns_for(files) -> list[str]:
    """The download filter for a repo with these files (notebooks/01_download_weights.ipynb): :data:`ALLOW_PATTERNS`
    (safetensors) when the repo has safetensors weights or no weights at all; the same with ``"*.bin"`` in place of
    ``"*.safetensors"`` when its weights are PyTorch ``.bin`` files only (FlagAlpha's LoRA adapters hold only
    ``adapter_model.bin``). One weight format either way: never both copies."""
    names = list(files)
    if any(n.endswith(".safetensors") for n in names) or not any(n.endswith(".bin") for n in names):
        return list(ALLOW_PATTERNS)
    return ["*.bin" if p == "*.safetensors" else p for p in ALLOW_PATTERNS]


def check_weights_allowed(repo_id: str, files, allow_patterns) -> None:
    """Refuse a filter that lets none of a repo's weight files through (notebooks/01_download_weights.ipynb):
    the download would end in a folder without weights that still verifies."""
    from huggingface_hub.utils import filter_repo_objects

    weights = [n for n in files if n.endswith(WEIGHT_SUFFIXES)]
    if weights and not list(filter_repo_objects(weights, allow_patterns=allow_patterns)):
        raise DownloadError("no_weights", repo=repo_id, detail=str(list(allow_patterns)))


def download_model(repo_id: str, target, *, endpoint: str | None = None, token=None, allow_patterns=None,
                   repair: bool = False, overwrite: bool = False, free_bytes: int | None = None) -> dict:
    """notebooks/01_download_weights.ipynb's steps in one call: check, ``snapshot_download``, verify, write the marker.

    ``endpoint`` defaults to ``HF_ENDPOINT``; a stored token goes only to huggingface.co (:func:`safe_token`).
    ``allow_patterns`` defaults to :func:`allow_patterns_for` the repo's file list (safetensors, or ``.bin`` where
    that is all the repo has); a filter that would skip every weight file is refused (:func:`check_weights_allowed`).
    A verified download of the same commit is reused; ``repair=True`` first deletes the files that fail
    verification. Returns the marker record plus ``fetched`` (bytes downloaded now).
    """
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.utils import filter_repo_objects

    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or HUB_ENDPOINT).rstrip("/")
    target, token = Path(target).expanduser(), safe_token(endpoint, token)
    api = HfApi(endpoint=endpoint, token=token)
    with hub_errors(repo_id, endpoint, target):
        info = api.model_info(repo_id, files_metadata=True)
        if info.gated:
            api.auth_check(repo_id)
        names = [s.rfilename for s in info.siblings]
        # snapshot_download fetches what the tree listing names, which a hostile server can make differ
        # from model_info's: check both.
        tree = [entry.path for entry in api.list_repo_tree(repo_id, revision=info.sha, recursive=True)]
        check_names(dict.fromkeys([*names, *tree]), target)
        allow = allow_patterns or allow_patterns_for(names)
        check_weights_allowed(repo_id, names, allow)
        marker = check_target(target, repo_id, info.sha, overwrite)
        sizes_ok = marker and all((target / p).is_file() and (target / p).stat().st_size == v["size"]
                                  for p, v in marker["files"].items())
        if sizes_ok and marker["commit"] == info.sha and not repair:
            return {**marker, "fetched": 0}
        (target / DOWNLOAD_MARKER).unlink(missing_ok=True)  # complete again only once verified
        if repair and target.is_dir():
            for bad in api.verify_repo_checksums(repo_id, revision=info.sha, local_dir=target).mismatches:
                (target / bad["path"]).unlink()
        plan = snapshot_download(repo_id, revision=info.sha, local_dir=target, allow_patterns=allow,
                                 endpoint=endpoint, token=token, dry_run=True)
        needed = sum(f.file_size or 0 for f in plan if f.will_download)
        check_disk(needed, target, free_bytes)
        snapshot_download(repo_id, revision=info.sha, local_dir=target, allow_patterns=allow,
                          endpoint=endpoint, token=token)
        result = api.verify_repo_checksums(repo_id, revision=info.sha, local_dir=target)
    missing = list(filter_repo_objects(result.missing_paths, allow_patterns=allow))
    if result.mismatches or missing:
        raise DownloadError("corrupt", target=target, detail=", ".join([m["path"] for m in result.mismatches] + missing))
    return {**write_marker(target, repo_id, info.sha, info.siblings), "fetched": needed}


def download_from_modelscope(model_id: str, target=None, *, allow_patterns=None) -> Path:
    """Download ``model_id`` from ModelScope with the same filters (optional ``modelscope`` package) (notebooks/01_download_weights.ipynb)."""
    try:
        from modelscope import snapshot_download
    except ImportError as err:
        raise DownloadError("modelscope_missing", original=err) from None
    target = Path(target or models_dir() / model_id.replace("/", "--"))
    return Path(snapshot_download(model_id, local_dir=str(target), allow_patterns=allow_patterns or ALLOW_PATTERNS))
