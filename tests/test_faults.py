"""Fault injection: writers killed at exact points and writes that hit a full disk or a file-size limit.

Each writer runs in a child process (a kill must be a real SIGKILL, not an exception that ``finally`` blocks
see); the file-size limit is ``RLIMIT_FSIZE`` with SIGXFSZ ignored, which makes every write past it fail
with EFBIG, as a FAT32 stick or ``ulimit -f`` does. After each fault, what the learner had must be whole.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from helpers import _files
from helpers.config import REPO_ROOT

# Every fault here is injected into a child process (killed mid-write, or under a file-size limit).
pytestmark = pytest.mark.server

_KILL_AFTER = """
import os, shutil, signal, sys
from pathlib import Path
from helpers import _files

after, target = int(sys.argv[1]), Path(sys.argv[2])
calls = [0]


def counted(real):
    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return call


class NewAdapter:
    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            (Path(folder) / name).write_text("new " + name)


os.replace, os.rename, shutil.rmtree, os.unlink = (counted(f) for f in (os.replace, os.rename, shutil.rmtree, os.unlink))
_files.save_folder(target, [NewAdapter()], overwrite=True, what=("适配器", "adapter"),
                   info=("training_info.json", {"run": "new"}))
print("finished", calls[0])
"""


def _child(code: str, *args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, env=env)


def _contents(folder: Path) -> dict:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_an_overwrite_killed_after_any_step_keeps_the_old_adapter_or_the_new_one_whole(tmp_path):
    """SIGKILL after each rename and removal of an ``overwrite=True`` save, then the next start: the folder
    holds the old adapter or the new one, complete, never a mix and never nothing. (The old code deleted the
    old folder before the new one was in place: a kill there left no adapter at all.)"""
    old = {"adapter_config.json": "old config", "adapter_model.safetensors": "old weights",
           "training_info.json": '{"run": "old"}'}
    new = None
    kills = 0
    for after in range(1, 20):
        target = tmp_path / f"run{after}" / "lora-adapter"
        target.mkdir(parents=True)
        for name, text in old.items():
            (target / name).write_text(text)
        done = _child(_KILL_AFTER, after, target)
        if done.returncode == 0:
            new = _contents(target)
            break
        assert done.returncode == -9, done.stderr
        kills += 1
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # recovery warns when it puts the old folder back
            _files.recover(target)
        assert target.is_dir(), f"killed after step {after}: no adapter left"
        got = _contents(target)
        assert got == old or set(got) == {"adapter_config.json", "adapter_model.safetensors", "training_info.json"} \
            and all(v.startswith("new") or '"new"' in v for v in got.values()), f"killed after step {after}: {got}"
        assert [p.name for p in target.parent.iterdir()] == ["lora-adapter"], "nothing set aside is left over"
    assert kills >= 2 and new is not None and json.loads(new["training_info.json"]) == {"run": "new"}


_FULL = """
import os, resource, signal, sys
from pathlib import Path
from helpers import _files
from helpers.config import TutorialError

writer, target, limit = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])


class Big:
    def save_pretrained(self, folder):
        Path(folder).mkdir(parents=True, exist_ok=True)
        if writer == "safetensors":
            import torch
            from safetensors.torch import save_file
            save_file({"w": torch.zeros(256 * 1024)}, str(Path(folder) / "adapter_model.safetensors"))
        elif writer == "torch":
            import torch
            torch.save({"w": torch.zeros(256 * 1024)}, Path(folder) / "adapter_model.bin")
        else:
            (Path(folder) / "adapter_model.safetensors").write_bytes(b"0" * 1024 * 1024)


import torch, safetensors.torch  # imported before the limit: nothing but the save writes under it
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
try:
    _files.save_folder(target, [Big()], overwrite=True, what=("适配器", "adapter"))
except _files.DiskFullError as err:
    print("DiskFullError", err)
"""


@pytest.mark.parametrize("writer", ["python", "safetensors", "torch"])
def test_a_file_size_limit_names_the_folder_and_its_free_space_and_keeps_the_old_adapter(tmp_path, writer):
    target = tmp_path / "lora-adapter"
    target.mkdir()
    (target / "adapter_model.safetensors").write_text("the learner's adapter")
    done = _child(_FULL, writer, target, 64 * 1024)
    assert done.returncode == 0, done.stderr
    assert "DiskFullError" in done.stdout and str(tmp_path) in done.stdout and "GiB" in done.stdout, done.stdout
    assert _contents(target) == {"adapter_model.safetensors": "the learner's adapter"}
    assert [p.name for p in tmp_path.iterdir()] == ["lora-adapter"], "the cut-off copy is removed"


def test_only_full_disk_errors_are_translated(tmp_path):
    import errno

    for err in (OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EFBIG, "File too large"),
                RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
                RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")):
        assert _files.is_disk_full(err), err
        with pytest.raises(_files.DiskFullError) as full:
            with _files.reporting_full_disk(tmp_path / "not-yet" / "adapter"):
                raise err
        assert full.value.code == "output.disk_full" and "GiB" in full.value.zh and "GiB" in full.value.en
    for err in (OSError(errno.EACCES, "Permission denied"), RuntimeError("shape mismatch"), ValueError("os error 28")):
        assert not _files.is_disk_full(err), err
        with pytest.raises(type(err)):
            with _files.reporting_full_disk(tmp_path):
                raise err


_ANSWERS = """
import json, resource, signal, sys, torch
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from helpers import _files
from helpers.models import resolve_model
from helpers.evaluation import generate_answers

path = Path(sys.argv[1])
choice = resolve_model("tiny")
model = AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32).eval()
tok = AutoTokenizer.from_pretrained(choice.path)
tok.padding_side, tok.pad_token = "left", tok.unk_token
questions = [{"qid": i, "question": q} for i, q in enumerate(["中国的首都是哪里？", "长城有多长？", "一年有几天？"])]
settings = {"chat_format": choice.chat_format, "system_prompt": None, "seed": 0,
            "generate": {"do_sample": False, "max_new_tokens": 24}}
generate_answers(model, tok, questions[:1], path, settings, batch_size=1, progress=False)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
limit = path.stat().st_size + 40  # the next record is cut after 40 bytes
hard = resource.getrlimit(resource.RLIMIT_FSIZE)[1]
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
try:
    generate_answers(model, tok, questions, path, settings, batch_size=1, progress=False)
except _files.DiskFullError as err:
    print("DiskFullError", err)
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
print(json.dumps([r["qid"] for r in generate_answers(model, tok, questions, path, settings, batch_size=1, progress=False)]))
"""


def test_an_answers_file_that_hits_the_size_limit_is_named_and_resumes_whole(tmp_path):
    path = tmp_path / "eval" / "answers.jsonl"
    done = _child(_ANSWERS, path)
    assert done.returncode == 0, done.stderr
    assert "DiskFullError" in done.stdout and str(path.parent) in done.stdout, done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[0, 1, 2]", "the run resumes once there is room"
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert sorted(r["qid"] for r in records) == [0, 1, 2], "the cut line was dropped and asked again"


def test_a_fault_injection_child_really_kills(tmp_path):
    """The harness itself: a kill after the first step leaves a process killed by SIGKILL."""
    target = tmp_path / "lora-adapter"
    target.mkdir()
    done = _child(_KILL_AFTER, 1, target)
    assert done.returncode == -9 and "finished" not in done.stdout


def test_lesson_06_finds_an_adapter_whose_overwrite_was_killed(tmp_path, monkeypatch, tiny_model):
    """A kill between setting the old adapter aside and putting the new one in place: the next look for an
    adapter (lesson 06's ensure_adapter) puts it back instead of training a new one."""
    from helpers import finetune as ft
    from helpers.models import resolve_model

    monkeypatch.setenv("LLAMA_TUTORIAL_OUTPUT", str(tmp_path))
    choice = resolve_model("tiny")
    aside = tmp_path / ".lora-adapter.old-4242"
    aside.mkdir()
    (aside / "adapter_config.json").write_text("{}")
    (aside / ft.INFO_FILE).write_text(json.dumps({"base_model": choice.path}))
    (tmp_path / ".lora-adapter.partial-4242").mkdir()  # the new copy, cut off
    with pytest.warns(UserWarning, match="被中断|interrupted"):
        assert ft.latest_adapter(choice) == tmp_path / "lora-adapter"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora-adapter"]


_TRAIN_KILLED = """
import dataclasses, os, signal, sys
import torch
import safetensors.torch
from helpers import finetune as ft
from helpers.models import resolve_model

kill_at, adapter_dir = int(sys.argv[1]), sys.argv[2]
writes = [0]


def counted(real):
    def call(*args, **kwargs):
        result = real(*args, **kwargs)
        writes[0] += 1
        if writes[0] == kill_at:  # after the save's n-th file, before the rest: a kill mid-checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        return result
    return call


torch.save, safetensors.torch.save_file = counted(torch.save), counted(safetensors.torch.save_file)
choice = resolve_model("tiny", verbose=False)
settings = dataclasses.replace(ft.settings_for(choice), **SMALL)
ft.train_adapter(choice, adapter_dir, settings=settings, max_steps=4, limit_rows=8, verbose=False)
print("finished", writes[0])
"""
SMALL = dict(per_device_train_batch_size=4, gradient_accumulation_steps=1, per_device_eval_batch_size=8,
             logging_steps=1, eval_steps=2, save_steps=2, warmup_steps=1)


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [6, 10])  # checkpoint-4's first file (its adapter) and last (RNG state)
def test_training_killed_while_saving_a_checkpoint_resumes_from_the_last_complete_one(tmp_path, kill_at, tiny_model):
    """A real SIGKILL in the middle of the Trainer's second checkpoint save. Each checkpoint writes five files
    through torch.save / safetensors (adapter, training_args.bin, optimizer, scheduler, RNG state), then
    trainer_state.json: files 1-5 are checkpoint-2's. The next run sets the cut-off checkpoint-4 aside with a
    notice, resumes from checkpoint-2 and finishes. (get_last_checkpoint alone picks checkpoint-4.)"""
    import dataclasses

    from transformers.trainer_utils import get_last_checkpoint

    from helpers import finetune as ft
    from helpers.models import resolve_model

    adapter_dir = tmp_path / "lora-adapter"
    code = _TRAIN_KILLED.replace("**SMALL", "**" + repr(SMALL))
    killed = _child(code, kill_at, adapter_dir, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    ckpt = ft.checkpoint_dir_for(adapter_dir)
    assert get_last_checkpoint(str(ckpt)).endswith("checkpoint-4"), "the cut-off save is the newest"
    assert not adapter_dir.exists()
    choice = resolve_model("tiny", verbose=False)
    settings = dataclasses.replace(ft.settings_for(choice), **SMALL)
    with pytest.warns(UserWarning, match="incomplete-checkpoint-4"):
        trainer = ft.train_adapter(choice, adapter_dir, settings=settings, max_steps=4, limit_rows=8, verbose=False)
    assert trainer.resumed_from.endswith("checkpoint-2") and trainer.state.global_step == 4
    assert (adapter_dir / "adapter_model.safetensors").is_file() and (ckpt / "incomplete-checkpoint-4").is_dir()
