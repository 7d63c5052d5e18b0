"""Writing the course's outputs so that a kill or a full disk loses nothing (plumbing for helpers/finetune.py
and helpers/evaluation.py).

A folder (adapter, merged model) is written into ``.<name>.partial-<pid>`` and renamed into place. Over an
existing folder (``overwrite``) the old one is renamed to ``.<name>.old-<pid>`` first and deleted only once
the new one is in place; a writer killed in between leaves the old one aside, and the next writer of that
folder (or :func:`recover`) puts it back. A write that fails because the disk is full or a file-size limit
is reached becomes a :class:`DiskFullError` that names the folder and the free space left there.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import warnings
from pathlib import Path

from helpers._locks import acquire
from helpers.config import TutorialError, localized

# ENOSPC: no space left; EFBIG: over a file-size limit (ulimit -f, a FAT32 stick); EDQUOT: over quota.
FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# safetensors (Rust) reports "... (os error 28)"; torch.save's zip writer reports only that its write failed
# ("file write failed", or "unexpected pos" once a short write was ignored): those are read as a failed write.
_WRAPPED = re.compile(r"os error (%s)\b|PytorchStreamWriter failed writing|file write failed|unexpected pos \d+ vs"
                      % "|".join(str(n) for n in sorted(FULL_ERRNOS)))


class OutputExistsError(TutorialError, FileExistsError):
    """The folder to write already exists and overwriting was not asked for."""


class DiskFullError(TutorialError, OSError):
    """A write failed for lack of space (or over a file-size limit); says where, and how much is free."""


def is_disk_full(err: BaseException) -> bool:
    """Whether ``err`` (from Python, safetensors or torch) means the disk or a size limit stopped a write."""
    if isinstance(err, OSError) and err.errno in FULL_ERRNOS:
        return True
    return type(err).__name__ in ("SafetensorError", "RuntimeError") and bool(_WRAPPED.search(str(err)))


def _free_space(folder: Path) -> str:
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return f"{shutil.disk_usage(probe).free / 1024**3:.2f} GiB"
    except OSError:
        return "?"


@contextlib.contextmanager
def reporting_full_disk(folder: str | Path, what: tuple[str, str] = ("文件", "files")):
    """Turn a full-disk or file-size error raised inside the block into a :class:`DiskFullError` that names
    ``folder`` and its free space; any other error passes unchanged."""
    try:
        yield
    except Exception as err:
        if isinstance(err, TutorialError) or not is_disk_full(err):
            raise
        folder = Path(folder)
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0][:200]
        raise DiskFullError("output.disk_full",
            f"往 {folder} 写{what[0]}时失败：磁盘满了，或者超过了文件大小的上限（{reason}）。"
            f"那里现在还剩 {_free_space(folder)}。已有的结果没有改动。腾出空间后再运行这一格；或者把输出放到"
            "空间更大的磁盘上（设置环境变量 LLAMA_TUTORIAL_OUTPUT）。",
            f"Writing {what[1]} to {folder} failed: the disk is full or a file-size limit was reached ({reason}). "
            f"{_free_space(folder)} is free there now. Nothing you had was changed. Free some space and run the "
            "cell again, or put the outputs on a bigger disk (set LLAMA_TUTORIAL_OUTPUT).", folder=str(folder), reason=reason) from err


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover(target: str | Path) -> Path | None:
    """Finish or undo a save of ``target`` that a kill cut off; the caller holds ``target``'s write lock.
    Returns the folder put back, if any."""
    target = Path(target)
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime_ns)
    restored = None
    if aside and not target.exists() and not target.is_symlink():
        restored = aside.pop()  # killed after setting the old folder aside, before the new one was in place
        os.replace(restored, target)
        warnings.warn(localized(
            f"上一次保存到 {target} 时被中断了：新的结果没有写完，原来的内容已经放回原处。",
            f"The last save to {target} was interrupted before the new files were in place; the previous "
            "contents are back where they were."), stacklevel=3)
    for path in [*aside, *target.parent.glob(f".{target.name}.partial-*")]:  # left by killed writers
        _remove(path)
    return target if restored else None


def recover_all(folder: str | Path, prefix: str) -> None:
    """:func:`recover` every ``folder/<prefix>*`` that a killed overwrite left set aside, each under its lock."""
    for aside in Path(folder).glob(f".{prefix}*.old-*"):
        target = aside.with_name(aside.name[1:].rsplit(".old-", 1)[0])
        with acquire(target):
            recover(target)


def refuse_existing(target: str | Path, what: tuple[str, str]) -> None:
    """Raise :class:`OutputExistsError` when ``target`` holds something (an empty folder counts as free)."""
    target = Path(target)
    if target.exists() and (target.is_file() or any(target.iterdir())):
        raise OutputExistsError("output.exists",
            f"{what[0]}目录 {target} 已经存在，为了不覆盖你已有的结果，这里停下了。确实要覆盖请传 overwrite=True"
            "（笔记本里把 OVERWRITE 设为 True），或者换一个目录名。",
            f"The {what[1]} folder {target} already exists; stopping so it is not overwritten. Pass "
            "overwrite=True (OVERWRITE = True in the notebook) or choose another folder.", target=str(target))


def save_folder(target: str | Path, objects: list, *, overwrite: bool, what: tuple[str, str],
                info: tuple[str, dict] | None = None) -> Path:
    """``save_pretrained`` each object into a temporary folder and rename it into place, under the one lock
    every writer of ``target`` takes; refuses an existing folder unless ``overwrite`` (then the old folder is
    set aside until the new one is in place). ``target`` appears complete or not at all."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with acquire(target):
        recover(target)
        if not overwrite:
            refuse_existing(target, what)
        tmp = target.with_name(f".{target.name}.partial-{os.getpid()}")
        try:
            with reporting_full_disk(target.parent, what):
                for obj in objects:
                    obj.save_pretrained(tmp)
                if info is not None:  # (file name, record): e.g. the adapter's training_info.json
                    (tmp / info[0]).write_text(json.dumps(info[1], indent=1, ensure_ascii=False, default=str), "utf-8")
            if target.exists() or target.is_symlink():
                old = target.with_name(f".{target.name}.old-{os.getpid()}")
                os.replace(target, old)  # the old folder stays whole until the new one is in place
                os.replace(tmp, target)
                _remove(old)
            else:
                os.replace(tmp, target)
        finally:
            _remove(tmp)
    return target


# --------------------------------------------------------------------------- checkpoints a kill or a full disk cut off


def complete_checkpoint(folder: Path) -> bool:
    """A ``checkpoint-N`` the Trainer finished writing: it writes ``trainer_state.json`` last (after the
    adapter, optimizer, scheduler and RNG state), so a readable one with step N marks a complete save."""
    try:
        state = json.loads((folder / "trainer_state.json").read_text("utf-8"))
        return int(state.get("global_step", -1)) == int(folder.name.rsplit("-", 1)[1])
    except (OSError, ValueError, AttributeError, IndexError):
        return False


def set_incomplete_checkpoints_aside(ckpt_dir: str | Path) -> list[Path]:
    """Rename checkpoints a kill or a full disk cut off (``checkpoint-N`` without a complete trainer state)
    to ``incomplete-checkpoint-N[-k]`` with a notice, so the Trainer resumes from the newest complete one;
    nothing is deleted. Returns the new names."""
    import re
    import warnings

    moved = []
    for folder in sorted(Path(ckpt_dir).glob("checkpoint-*")):
        if not (folder.is_dir() and re.fullmatch(r"checkpoint-\d+", folder.name)) or complete_checkpoint(folder):
            continue
        target, k = folder.with_name(f"incomplete-{folder.name}"), 1
        while target.exists():
            target, k = folder.with_name(f"incomplete-{folder.name}-{k}"), k + 1
        folder.rename(target)
        moved.append(target)
        warnings.warn(localized(
            f"{folder.name} 没有写完（训练在保存时被中断，或磁盘满了），已改名为 {target.name} 放在一边；"
            "从最新的完整检查点继续。确认不需要它以后可以删除。",
            f"{folder.name} was not written completely (the save was interrupted or the disk was full); it is set "
            f"aside as {target.name} and training resumes from the newest complete checkpoint. Delete it once "
            "you are sure you do not need it."), stacklevel=3)
    return moved
