"""Model choice (helpers/models.py): profiles, repo ids, folders and clear errors; helpers/config.py is a leaf."""

from __future__ import annotations

import ast
import json
import pickle
import re
import os

from pathlib import Path

import pytest

from helpers import models
from helpers.config import REPO_ROOT, TutorialError
from helpers.download import DOWNLOAD_MARKER
from helpers.models import PROFILES, resolve_model
from tests.error_text import both


def _verified_download(folder, files=None):
    """A folder as lesson 01's download leaves it: its files plus the marker listing them with sizes."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in (files or {"config.json": "{}", "model.safetensors": "weights"}).items():
        (folder / name).write_text(text)
    listed = {f.name: {"size": f.stat().st_size} for f in folder.iterdir() if f.is_file()}
    (folder / DOWNLOAD_MARKER).parent.mkdir(parents=True, exist_ok=True)
    (folder / DOWNLOAD_MARKER).write_text(json.dumps({"repo_id": "x/y", "files": listed}))
    return folder


@pytest.mark.smollm2
def test_auto_without_cuda_picks_the_real_cpu_model_and_says_why(capsys):
    choice = resolve_model("auto")
    assert choice.name == "smollm2-135m" and choice.chat_format == "model" and not choice.is_tiny
    assert (Path(choice.path) / "config.json").is_file(), "the converted SmolLM2 folder"
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1
    assert "SmolLM2" in line and "CUDA" in line
    assert any("\u4e00" <= ch <= "\u9fff" for ch in line), "the line must be in Chinese"


def test_env_variable_is_read(monkeypatch, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    monkeypatch.setenv("LLAMA_TUTORIAL_MODEL", str(tmp_path))
    choice = resolve_model(verbose=False)
    assert choice.path == str(tmp_path)


def test_profiles_map_to_repo_ids(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path))  # no local copies there
    choice = resolve_model("chinese-7b-chat", verbose=False)
    assert choice.path == "FlagAlpha/Llama2-Chinese-7b-Chat"
    assert choice.chat_format == "human_assistant"
    assert resolve_model("llama2-13b-chat", verbose=False).path == "meta-llama/Llama-2-13b-chat-hf"


def test_profile_prefers_lesson01_download(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path))
    folder = _verified_download(tmp_path / "models" / "llama2-7b-chat")
    assert resolve_model("llama2-7b-chat", verbose=False).path == str(folder)


def test_unfinished_download_is_not_local_weights(monkeypatch, tmp_path, capsys):
    """A folder with only config.json (a download stopped half-way) is not taken as the model: the
    printed reason names what is missing (lesson 01 can still resume it), instead of a raw crash when
    the lesson loads the folder."""
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path))
    folder = tmp_path / "models" / "llama2-7b-chat"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    choice = resolve_model("llama2-7b-chat")
    assert choice.path == "meta-llama/Llama-2-7b-chat-hf" and choice.profile.name == "llama2-7b-chat"
    said = capsys.readouterr().out
    assert "model.safetensors" in said and str(folder) in said and "未完成" in said
    # With the marker, the files it lists decide: one of them gone is named.
    _verified_download(folder, {"config.json": "{}", "model-00001-of-00002.safetensors": "x",
                                "model-00002-of-00002.safetensors": "y"})
    assert resolve_model("llama2-7b-chat", verbose=False).path == str(folder)
    (folder / "model-00002-of-00002.safetensors").unlink()
    choice = resolve_model("llama2-7b-chat", verbose=False)
    assert choice.path != str(folder) and "model-00002-of-00002.safetensors" in choice.reason


@pytest.mark.smollm2
def test_auto_with_gpu_and_an_unfinished_download_says_so(monkeypatch, tmp_path):
    monkeypatch.setattr(models, "models_dir", lambda: tmp_path / "models")  # the tiny model stays cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "models" / "llama2-7b-chat"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(models, "_cuda_free_gb", lambda: ("Tesla T4", 14.5))
    choice = resolve_model("auto", verbose=False)
    assert choice.name == "smollm2-135m" and "model.safetensors" in choice.reason


def test_relative_folder_is_found_from_the_repository_root_and_the_cwd(monkeypatch, tmp_path):
    """`make lab` starts the kernel in notebooks/: a path written from the repository root must
    still be found, and one relative to where the learner is, too."""
    rel = f"outputs/test-model-{os.getpid()}"
    folder = REPO_ROOT / rel
    folder.mkdir(parents=True)
    try:
        (folder / "config.json").write_text("{}")
        monkeypatch.chdir(REPO_ROOT / "notebooks")
        assert resolve_model(rel, verbose=False).path == str(folder)
    finally:
        (folder / "config.json").unlink()
        folder.rmdir()
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert resolve_model("here", verbose=False).path == str(tmp_path / "here")


@pytest.mark.parametrize("spec", ["data/train_sft.csv", "outputs/no-such-merged-model", "./nothing", "~/nothing",
                                  "data", "a/b/c"])
def test_a_path_that_is_no_model_folder_is_refused_not_sent_to_the_hub(monkeypatch, spec):
    (REPO_ROOT / "outputs").mkdir(exist_ok=True)
    monkeypatch.chdir(REPO_ROOT / "notebooks")
    with pytest.raises(TutorialError) as err:
        resolve_model(spec, verbose=False)
    assert err.value.code == "model.no_folder" and err.value.fields["spec"] == spec
    msg = both(err.value)
    assert "路径" in msg and "path" in msg and "config.json" in msg
    assert str(REPO_ROOT) in msg or spec.startswith("~"), "the message names where it looked"


@pytest.mark.parametrize("spec", ["outputs/no-such-model", "models/llama2-7b-chat", "my-runs/merged-model"])
def test_a_path_under_a_course_folder_not_made_yet_is_still_a_path(monkeypatch, tmp_path, spec):
    """Before lesson 05 has made outputs/ (or LLAMA_TUTORIAL_OUTPUT's folder), "outputs/x" is still a path."""
    from helpers import models

    monkeypatch.setattr(models, "REPO_ROOT", tmp_path / "fresh-clone")
    monkeypatch.setenv("LLAMA_TUTORIAL_OUTPUT", str(tmp_path / "elsewhere" / "my-runs"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TutorialError) as err:
        resolve_model(spec, verbose=False)
    assert err.value.code == "model.no_folder"


def test_hub_repo_id_is_accepted():
    choice = resolve_model("someone/some-llama", verbose=False)
    assert choice.path == "someone/some-llama" and choice.profile is None


@pytest.mark.parametrize("spec", ["llama3", "not a model", "tiny-ish"])
def test_unknown_name_lists_profiles_in_both_languages(spec):
    with pytest.raises(TutorialError) as err:
        resolve_model(spec, verbose=False)
    assert err.value.code == "model.unknown"
    msg = both(err.value)
    assert "不认识" in msg and "Unknown" in msg
    for name in PROFILES:
        assert name in msg


def test_folder_without_config_json_says_so(tmp_path):
    with pytest.raises(TutorialError) as err:
        resolve_model(str(tmp_path), verbose=False)
    assert err.value.code == "model.no_folder"
    msg = both(err.value)
    assert "config.json" in msg and str(tmp_path) in msg
    assert "没有含 config.json" in msg and "no model folder with config.json" in msg


@pytest.mark.smollm2
def test_auto_with_small_gpu_falls_back_to_the_cpu_model(monkeypatch, capsys):
    monkeypatch.setattr(models, "_cuda_free_gb", lambda: ("Tesla T4", 3.0))
    choice = resolve_model("auto")
    assert choice.name == "smollm2-135m"
    assert "3.0 GB" in capsys.readouterr().out


def test_auto_with_gpu_and_local_weights_picks_llama2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path))
    folder = _verified_download(tmp_path / "models" / "llama2-7b-chat")
    monkeypatch.setattr(models, "_cuda_free_gb", lambda: ("Tesla T4", 14.5))
    choice = resolve_model("auto")
    assert choice.name == "llama2-7b-chat" and choice.path == str(folder)


@pytest.mark.smollm2
def test_auto_with_gpu_but_no_weights_offline_falls_back(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "_cuda_free_gb", lambda: ("Tesla T4", 14.5))
    monkeypatch.setattr(models, "_local_weights", lambda profile: (None, []))
    choice = resolve_model("auto", verbose=False)
    assert choice.name == "smollm2-135m" and "01" in choice.reason


def test_helpers_config_is_a_leaf():
    """Importing helpers.config loads no other helpers module (every module imports it, so it must import none)."""
    import subprocess
    import sys

    code = "import sys, helpers.config; print(sorted(m for m in sys.modules if m.startswith('helpers')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['helpers', 'helpers.config']"


# --- The course's errors: one structured error, a code, a Chinese and an English message -------------------------

_HAN = re.compile("[\u4e00-\u9fff]")
_CODE = re.compile(r"[a-z0-9_]+(\.[a-z0-9_]+)+")


def _raised_errors():
    """``(file, line, code, zh, en)`` for every error the helpers, scripts and bench raise with a literal code: a
    call ``SomethingError("code", zh, en, ...)``, ``_fail("code", zh, en, ...)`` or ``_Bad("problem", zh, en)``."""
    for path in sorted([*REPO_ROOT.glob("helpers/*.py"), *REPO_ROOT.glob("scripts/*.py"), *REPO_ROOT.glob("bench/*.py")]):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if not isinstance(node, ast.Call) or len(node.args) < 3:
                continue
            name = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
            if not (name.endswith("Error") or name in ("_fail", "_Bad")) or not isinstance(node.args[0], ast.Constant):
                continue
            code = node.args[0].value if name != "_Bad" else f"data.{node.args[0].value}"
            yield path.name, node.lineno, code, node.args[1], node.args[2]


def _literal_text(node) -> str:
    """The literal parts of a string, f-string or concatenation (what a reader of the message always sees)."""
    return "".join(n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str))


def test_every_error_raised_has_a_code_and_both_messages():
    found = list(_raised_errors())
    assert len(found) > 80, "the scan should find the course's errors"
    for name, line, code, zh, en in found:
        where = f"{name}:{line} {code}"
        assert isinstance(code, str) and _CODE.fullmatch(code), f"{where}: codes are dotted, lower case"
        zh_text, en_text = _literal_text(zh), _literal_text(en)
        if not (zh_text or en_text):  # passed through from another error (err.zh, err.en): checked where it was made
            continue
        assert _HAN.search(zh_text), f"{where}: the Chinese message should be Chinese"
        assert en_text.strip() and not _HAN.search(en_text), f"{where}: the English message should be English"


def test_download_messages_are_complete():
    from helpers.download import MESSAGES, DownloadError

    for kind, (zh, zh_next, en, en_next) in MESSAGES.items():
        assert _HAN.search(zh) and _HAN.search(zh_next) and en and en_next and not _HAN.search(en + en_next), kind
        err = DownloadError(kind, repo="o/r", endpoint="https://example.org", target="/t", detail="d")
        assert err.code == f"download.{kind}" and err.kind == kind
        assert "下一步" in err.zh and "Next step" in err.en
    err = DownloadError("existing", target="/t", detail=("不是下载工具建的文件夹", "not made by a download"))
    assert "不是下载工具建的文件夹" in err.zh and "not made by a download" in err.en and "不是" not in err.en


def test_the_message_is_chinese_by_default_and_english_on_request(monkeypatch):
    from helpers._files import DiskFullError, OutputExistsError

    err = TutorialError("demo.problem", "出错了：请这样修。", "It failed: fix it like this.", path="/x")
    assert (err.code, err.zh, err.en, err.fields) == ("demo.problem", "出错了：请这样修。", "It failed: fix it like this.", {"path": "/x"})
    monkeypatch.delenv("LLAMA_TUTORIAL_LANG", raising=False)
    assert str(err) == err.zh and err.message("en") == err.en
    monkeypatch.setenv("LLAMA_TUTORIAL_LANG", "en")
    assert str(err) == err.en and err.message("zh") == err.zh
    monkeypatch.setenv("LLAMA_TUTORIAL_LANG", "fr")  # anything else: Chinese
    assert str(err) == err.zh
    # Subclasses that are also built-in errors keep working, OSError's picky constructor included; pickling (worker
    # processes) gives back the same error.
    for cls, builtin in ((OutputExistsError, FileExistsError), (DiskFullError, OSError), (TutorialError, RuntimeError)):
        sub = cls("demo.problem", "中文", "English", folder="/y")
        assert isinstance(sub, builtin) and str(sub) == "中文"
        with pytest.raises(builtin):
            raise sub
        again = pickle.loads(pickle.dumps(sub))
        assert type(again) is cls and (again.code, again.zh, again.en, again.fields) == (sub.code, sub.zh, sub.en, sub.fields)


def test_nothing_reads_an_error_message_to_sort_it():
    """Code sorts errors by ``.code``: no helper, script or test looks for words of the Chinese text."""
    for path in [*REPO_ROOT.glob("helpers/*.py"), *REPO_ROOT.glob("scripts/*.py")]:
        text = path.read_text("utf-8")
        assert "bilingual(" not in text, path
        assert not re.search(r"""["'][^"'\n]*[\u4e00-\u9fff][^"'\n]*["'] in (zh|str\(err)""", text), path
