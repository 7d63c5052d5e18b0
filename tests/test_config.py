"""Model choice (helpers/config.py): profiles, repo ids, folders and clear errors."""

from __future__ import annotations

import pytest

from helpers import config
from helpers.config import PROFILES, TutorialError, resolve_model


def test_auto_without_cuda_picks_tiny_and_says_why(capsys):
    choice = resolve_model("auto")
    assert choice.is_tiny
    line = capsys.readouterr().out.strip()
    assert len(line.splitlines()) == 1
    assert "tiny" in line and "CUDA" in line
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
    folder = tmp_path / "models" / "llama2-7b-chat"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    assert resolve_model("llama2-7b-chat", verbose=False).path == str(folder)


def test_hub_repo_id_is_accepted():
    choice = resolve_model("someone/some-llama", verbose=False)
    assert choice.path == "someone/some-llama" and choice.profile is None


@pytest.mark.parametrize("spec", ["llama3", "not a model", "a/b/c", "tiny-ish"])
def test_unknown_name_lists_profiles_in_both_languages(spec):
    with pytest.raises(TutorialError) as err:
        resolve_model(spec, verbose=False)
    msg = str(err.value)
    assert "不认识" in msg and "Unknown" in msg
    for name in PROFILES:
        assert name in msg


def test_folder_without_config_json_says_so(tmp_path):
    with pytest.raises(TutorialError) as err:
        resolve_model(str(tmp_path), verbose=False)
    msg = str(err.value)
    assert "config.json" in msg and str(tmp_path) in msg
    assert "没有 config.json" in msg and "has no config.json" in msg


def test_auto_with_small_gpu_falls_back_to_tiny(monkeypatch, capsys):
    monkeypatch.setattr(config, "_cuda_free_gb", lambda: ("Tesla T4", 3.0))
    choice = resolve_model("auto")
    assert choice.is_tiny
    assert "3.0 GB" in capsys.readouterr().out


def test_auto_with_gpu_and_local_weights_picks_llama2(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path))
    folder = tmp_path / "models" / "llama2-7b-chat"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    monkeypatch.setattr(config, "_cuda_free_gb", lambda: ("Tesla T4", 14.5))
    choice = resolve_model("auto")
    assert choice.name == "llama2-7b-chat" and choice.path == str(folder)


def test_auto_with_gpu_but_no_weights_offline_falls_back(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(config, "_cuda_free_gb", lambda: ("Tesla T4", 14.5))
    monkeypatch.setattr(config, "_local_weights", lambda profile: None)
    choice = resolve_model("auto", verbose=False)
    assert choice.is_tiny and "01" in choice.reason
