"""Lesson 01 (helpers/download.py, helpers/demo_hub.py): the real snapshot_download against a loopback Hub.

The demo hub speaks the part of the Hub protocol huggingface_hub uses and serves the tiny model; it
injects faults (dropped connection, outage, corrupted bytes) and counts the bytes it serves, so the
tests can check resume and verification by what actually went over the wire.
"""

from __future__ import annotations

import hashlib
import os
import re
import sys
import types
from pathlib import Path

import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download

from helpers import download as dl
from helpers.config import TutorialError, resolve_model
from helpers.demo_hub import DemoHub, HubFile, git_blob_id, tiny_demo_repos
from helpers.download import (
    CATALOGUE,
    DEMO_GATED_REPO,
    DEMO_REPO,
    DEMO_TOKEN,
    DEMO_TOKEN_NO_ACCESS,
    CorruptDownloadError,
    DownloadError,
    EndpointUnreachableError,
    ExistingDownloadError,
    GatedRepoNoAccessError,
    GatedRepoNoTokenError,
    InvalidTokenError,
    ModelScopeMissingError,
    NotAHubError,
    NotEnoughDiskError,
    OfflineModeError,
    RepoNotFoundError,
    ServerError,
    check_disk_space,
    choose_patterns,
    download_model,
    estimate_memory,
    plan_download,
    unused_local_url,
    verify_download,
)
from helpers.tiny import ensure_tiny_model

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def hub():
    with DemoHub() as server:
        yield server


@pytest.fixture(autouse=True)
def clean_hub(request):
    if "hub" in request.fixturenames:
        server = request.getfixturevalue("hub")
        server.heal()
        server.reset_stats()
    yield


def fetch(hub, target, repo=DEMO_REPO, **kwargs):
    kwargs.setdefault("cache_dir", target.parent / "hf-cache")
    kwargs.setdefault("attempts", 1)
    return download_model(repo, target, endpoint=hub.url, **kwargs)


def file_size(hub, name, repo=DEMO_REPO):
    return hub.repos[repo].files[name].size


# ---------------------------------------------------------------------------- catalogue


def test_catalogue_lists_the_article_models():
    repos = {e.repo_id for e in CATALOGUE}
    for size in ("7b", "13b", "70b"):
        assert f"meta-llama/Llama-2-{size}-hf" in repos
        assert f"meta-llama/Llama-2-{size}-chat-hf" in repos
    for size in ("7b", "13b"):
        assert f"FlagAlpha/Llama2-Chinese-{size}-Chat" in repos
        assert f"FlagAlpha/Llama2-Chinese-{size}-Chat-LoRA" in repos
    assert all(e.gated == e.repo_id.startswith("meta-llama/") for e in CATALOGUE)


def test_memory_estimate_follows_params_times_bytes():
    seven = dl.find_entry("meta-llama/Llama-2-7b-chat-hf")
    fp16 = estimate_memory(seven, 16)
    assert fp16["weights"] == pytest.approx(seven.params * 2 / 1024**3)
    # KV cache of 2048 tokens: 2 (k, v) x 32 layers x 4096 x 2 bytes x 2048 = exactly 1 GiB.
    assert fp16["kv_cache"] == pytest.approx(1.0)
    for entry in CATALOGUE:
        totals = [estimate_memory(entry, bits)["total"] for bits in (16, 8, 4)]
        assert totals[0] > totals[1] > totals[2] > 0, entry.name
    # 8-bit halves the quantized layers; the 16-bit embedding and lm_head keep it above half.
    eight = estimate_memory(seven, 8)["weights"]
    assert fp16["weights"] / 2 < eight < fp16["weights"] * 0.55
    lora = dl.find_entry("FlagAlpha/Llama2-Chinese-7b-Chat-LoRA")
    assert estimate_memory(lora, 8)["total"] > estimate_memory(seven, 8)["total"]
    with pytest.raises(TutorialError, match="16、8 或 4"):
        estimate_memory(seven, 3)


def test_catalogue_table_has_every_model_and_marks_estimates():
    table = dl.catalogue_table()
    assert len(table) == len(CATALOGUE)
    assert all("*" in col for col in table.columns if col.startswith("显存"))
    assert table.loc["Llama-2-70B-Chat", "显存 fp16 GiB*"] > 100


# ---------------------------------------------------------------------------- choosing files

LLAMA2_7B_CHAT_FILES = [
    ".gitattributes", "LICENSE.txt", "README.md", "Responsible-Use-Guide.pdf", "USE_POLICY.md", "config.json",
    "generation_config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
    "pytorch_model.bin.index.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "tokenizer_config.json",
]


def _selected(files):
    plan = dl.make_plan("x/y", "http://e", "0" * 40, [dl.RemoteFile(f, 1, None, None) for f in files])
    return {f.path for f in plan.selected}


def test_safetensors_only_when_the_repo_has_both_formats():
    chosen = _selected(LLAMA2_7B_CHAT_FILES)
    assert not any(".bin" in f for f in chosen)
    assert {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "tokenizer.model", "config.json", "LICENSE.txt"} <= chosen
    assert ".gitattributes" not in chosen and "Responsible-Use-Guide.pdf" not in chosen


def test_bin_weights_when_there_is_no_safetensors():
    files = ["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
             "pytorch_model.bin.index.json", "tokenizer.model", "consolidated.00.pth"]
    chosen = _selected(files)
    assert chosen == {"config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin",
                      "pytorch_model.bin.index.json", "tokenizer.model"}
    assert _selected(["adapter_config.json", "adapter_model.bin", "README.md"]) == {
        "adapter_config.json", "adapter_model.bin", "README.md"}
    allow, ignore = choose_patterns(["a.safetensors"])
    assert "*.safetensors" in allow and "*.bin" in ignore


# ---------------------------------------------------------------------------- the demo hub speaks the protocol


@pytest.fixture
def loopback_online(monkeypatch):
    """Plain huggingface_hub calls (outside helpers.download) need offline mode lifted for 127.0.0.1."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_demo_hub_metadata_matches_the_files(hub, loopback_online):
    info = HfApi(endpoint=hub.url).model_info(DEMO_REPO, files_metadata=True)
    tiny = ensure_tiny_model(verbose=False)
    weights = next(s for s in info.siblings if s.rfilename == WEIGHTS)
    assert weights.lfs.sha256 == hashlib.sha256((tiny / WEIGHTS).read_bytes()).hexdigest()
    config = next(s for s in info.siblings if s.rfilename == "config.json")
    assert config.lfs is None and config.blob_id == git_blob_id((tiny / "config.json").read_bytes())
    tree = {f.path for f in HfApi(endpoint=hub.url).list_repo_tree(DEMO_REPO, revision=info.sha)}
    assert tree == {s.rfilename for s in info.siblings}


def test_hf_hub_download_follows_the_cdn_redirect(hub, tmp_path, loopback_online):
    path = hf_hub_download(DEMO_REPO, WEIGHTS, endpoint=hub.url, local_dir=tmp_path, cache_dir=tmp_path / "c")
    assert Path(path).read_bytes() == (ensure_tiny_model(verbose=False) / WEIGHTS).read_bytes()
    served = hub.gets(WEIGHTS)
    assert [r.origin for r in served] == ["cdn"] and not served[0].token


def test_plain_snapshot_download_with_the_plan_patterns(hub, tmp_path):
    """The notebook's inline call: plan, snapshot_download inside hub_errors, then finish_download."""
    plan = plan_download(DEMO_REPO, endpoint=hub.url)
    with dl.hub_errors(plan.repo_id, endpoint=plan.endpoint, target=tmp_path):
        folder = snapshot_download(plan.repo_id, revision=plan.commit, local_dir=tmp_path,
                                   allow_patterns=plan.allow_patterns, ignore_patterns=plan.ignore_patterns,
                                   endpoint=plan.endpoint, cache_dir=tmp_path / "c")
    report = dl.finish_download(plan, folder)
    assert report.ok and dl.read_marker(folder)["commit"] == plan.commit
    assert constants.HF_HUB_OFFLINE, "offline mode must be restored after the loopback call"


# ---------------------------------------------------------------------------- full download, reuse, resume


def test_full_download_fetches_only_safetensors_and_verifies(hub, tmp_path):
    target = tmp_path / "model"
    report = fetch(hub, target)
    plan = plan_download(DEMO_REPO, endpoint=hub.url)
    assert report.verification.ok and len(report.verification.checks) == len(plan.selected)
    assert sorted(report.fetched) == sorted(f.path for f in plan.selected)
    assert not hub.gets("pytorch_model.bin"), "the .bin duplicate must never be requested"
    file_bytes = sum(r.bytes for r in hub.gets())
    assert file_bytes == plan.bytes_selected == report.bytes_fetched
    # The folder is what lessons 02-06 use through LLAMA_TUTORIAL_MODEL.
    choice = resolve_model(str(target), verbose=False)
    from transformers import AutoConfig, AutoTokenizer

    assert AutoConfig.from_pretrained(choice.path).model_type == "llama"
    assert AutoTokenizer.from_pretrained(choice.path).bos_token_id == 1


def test_complete_verified_download_is_not_fetched_again(hub, tmp_path):
    target = tmp_path / "model"
    fetch(hub, target)
    hub.reset_stats()
    again = fetch(hub, target)
    assert hub.gets() == [] and again.fetched == [] and again.bytes_fetched == 0
    assert "没有重新下载" in again.note


def test_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    size = file_size(hub, WEIGHTS)
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    assert size > chunk, "the tiny weights must be larger than one download chunk for this test"
    cut = chunk + (size - chunk) // 2
    hub.drop_connection(WEIGHTS, after_bytes=cut)
    report = fetch(hub, tmp_path / "model")
    assert report.verification.ok
    first, second = hub.gets(WEIGHTS)
    assert first.bytes == cut and first.range is None
    resumed_at = int(re.fullmatch(r"bytes=(\d+)-", second.range).group(1))
    assert 0 < resumed_at <= cut and second.status == 206
    assert second.bytes == size - resumed_at, "only the missing tail is fetched again"
    assert hub.bytes_served(WEIGHTS) < size + (cut - resumed_at) + 1


def test_interrupted_download_keeps_finished_files_and_resumes(hub, tmp_path):
    target = tmp_path / "model"
    size = file_size(hub, WEIGHTS)
    hub.drop_connection(WEIGHTS, after_bytes=size // 3)
    hub.fail(WEIGHTS, 503)  # the mirror goes down after cutting the connection
    with pytest.raises(ServerError) as err:
        fetch(hub, target)
    assert "503" in str(err.value) and str(target) in str(err.value)
    plan = plan_download(DEMO_REPO, endpoint=hub.url)
    finished = [f.path for f in plan.selected if f.path != WEIGHTS]
    assert all((target / name).is_file() for name in finished) and not (target / WEIGHTS).exists()

    hub.heal()
    hub.reset_stats()
    report = fetch(hub, target)
    assert report.fetched == [WEIGHTS] and sorted(report.reused) == sorted(finished)
    assert {r.file for r in hub.gets()} == {WEIGHTS}, "finished files must not be fetched again"
    assert hub.bytes_served(WEIGHTS) == sum(r.bytes for r in hub.gets()) == size
    assert report.verification.ok


def test_download_retries_a_transient_outage(hub, tmp_path, capsys):
    hub.fail(WEIGHTS, 503)
    calls = []

    def heal_then_wait(seconds):
        calls.append(seconds)
        hub.heal()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dl, "_sleep", heal_then_wait)
        report = fetch(hub, tmp_path / "model", attempts=2, retry_wait=7)
    assert calls == [7] and report.verification.ok
    assert "第 1 次下载没有完成" in capsys.readouterr().out


# ---------------------------------------------------------------------------- verification


def test_corrupted_file_is_caught_and_repaired(hub, tmp_path):
    target = tmp_path / "model"
    hub.corrupt("tokenizer.json")
    with pytest.raises(CorruptDownloadError) as err:
        fetch(hub, target)
    assert "tokenizer.json" in str(err.value) and "repair=True" in str(err.value)
    assert dl.read_marker(target) is None, "a failed verification must not mark the folder complete"
    hub.heal()
    hub.reset_stats()
    with pytest.raises(CorruptDownloadError):  # without repair the bad file stays and is caught again
        fetch(hub, target)
    assert hub.gets() == []
    report = fetch(hub, target, repair=True)
    assert report.verification.ok and report.fetched == ["tokenizer.json"]
    assert [r.file for r in hub.gets()] == ["tokenizer.json"]


def test_verify_reports_missing_truncated_and_changed_files(hub, tmp_path):
    target = tmp_path / "model"
    fetch(hub, target)
    plan = plan_download(DEMO_REPO, endpoint=hub.url)
    (target / "config.json").unlink()
    data = (target / WEIGHTS).read_bytes()
    (target / WEIGHTS).write_bytes(data[:-10])
    text = (target / "tokenizer_config.json").read_text()
    (target / "tokenizer_config.json").write_text(text.replace("<s>", "<S>"))
    report = verify_download(plan, target)
    problems = {c.path: c.problem for c in report.bad}
    assert set(problems) == {"config.json", WEIGHTS, "tokenizer_config.json"}
    assert problems["config.json"] == "文件不存在"
    assert problems[WEIGHTS].startswith("大小不符")
    assert "git blob sha1" in problems["tokenizer_config.json"]
    assert "❌" in report.table().to_string()


# ---------------------------------------------------------------------------- the error cases


def _error(hub, tmp_path, **kwargs) -> DownloadError:
    kwargs.setdefault("repo", DEMO_REPO)
    with pytest.raises(DownloadError) as err:
        fetch(hub, tmp_path / "model", **kwargs)
    assert hub.gets() == [], "no file content may be served in an error case"
    assert not (tmp_path / "model").exists() or not any((tmp_path / "model").glob("*.safetensors"))
    return err.value


def test_gated_repo_without_token(hub, tmp_path):
    err = _error(hub, tmp_path, repo=DEMO_GATED_REPO, token=False)
    assert type(err) is GatedRepoNoTokenError
    assert "hf auth login" in str(err) and "HF_TOKEN" in str(err) and DEMO_GATED_REPO in str(err)


def test_gated_repo_with_a_token_without_access(hub, tmp_path):
    err = _error(hub, tmp_path, repo=DEMO_GATED_REPO, token=DEMO_TOKEN_NO_ACCESS)
    assert type(err) is GatedRepoNoAccessError
    assert f"{hub.url}/{DEMO_GATED_REPO}" in str(err) and "403" in str(err)


def test_gated_repo_with_an_approved_token_downloads(hub, tmp_path):
    report = fetch(hub, tmp_path / "model", repo=DEMO_GATED_REPO, token=DEMO_TOKEN)
    assert report.verification.ok
    assert all(not r.token for r in hub.gets(WEIGHTS)), "the token must not be sent to the CDN"


def test_invalid_token(hub, tmp_path):
    err = _error(hub, tmp_path, token="not-a-token")
    assert type(err) is InvalidTokenError and "settings/tokens" in str(err)


def test_unknown_repo_suggests_the_right_name(hub, tmp_path):
    err = _error(hub, tmp_path, repo="demo/tiny-lama2-chat")
    assert type(err) is RepoNotFoundError
    assert "demo/tiny-lama2-chat" in str(err) and f"{DEMO_REPO}？" in str(err)


def test_unreachable_endpoint(tmp_path):
    with pytest.raises(EndpointUnreachableError) as err:
        download_model(DEMO_REPO, tmp_path / "model", endpoint=unused_local_url(), attempts=1)
    assert "HF_ENDPOINT=https://hf-mirror.com" in str(err.value) and "ModelScope" in str(err.value)
    assert not (tmp_path / "model").exists()


def test_endpoint_that_is_not_a_hub(tmp_path):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(NotAHubError) as err:
            plan_download(DEMO_REPO, endpoint=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert "HF_ENDPOINT" in str(err.value)


def test_offline_mode_blocks_other_endpoints_before_any_request(tmp_path):
    assert constants.HF_HUB_OFFLINE, "tests/nbenv.py sets HF_HUB_OFFLINE=1"
    with pytest.raises(OfflineModeError) as err:
        plan_download(DEMO_REPO, endpoint="https://mirror.invalid")
    assert "HF_HUB_OFFLINE" in str(err.value)


def test_disk_too_small_refuses_before_downloading(hub, tmp_path, monkeypatch):
    real = dl.shutil.disk_usage

    def small_disk(path):
        usage = real(path)
        return type(usage)(usage.total, usage.used, 5 * 1024**2)

    monkeypatch.setattr(dl.shutil, "disk_usage", small_disk)
    err = _error(hub, tmp_path)
    assert type(err) is NotEnoughDiskError
    assert "5.0 MiB" in str(err) and "LLAMA_TUTORIAL_HOME" in str(err)


def test_disk_check_counts_only_missing_files(hub, tmp_path):
    target = tmp_path / "model"
    fetch(hub, target)
    plan = plan_download(DEMO_REPO, endpoint=hub.url)
    assert check_disk_space(plan, target, free_bytes=0, reserve_bytes=0).needed == 0
    (target / WEIGHTS).unlink()
    check = check_disk_space(plan, target, free_bytes=10**12)
    assert check.needed == file_size(hub, WEIGHTS) and check.ok
    with pytest.raises(NotEnoughDiskError):
        check_disk_space(plan, target, free_bytes=check.needed)  # the reserve is missing
    assert dl.free_disk_bytes(tmp_path / "not" / "yet" / "made") > 0


def test_every_error_names_the_next_step(hub, tmp_path):
    errors = [
        _error(hub, tmp_path / "a", repo=DEMO_GATED_REPO, token=False),
        _error(hub, tmp_path / "b", repo=DEMO_GATED_REPO, token=DEMO_TOKEN_NO_ACCESS),
        _error(hub, tmp_path / "c", token="bad"),
        _error(hub, tmp_path / "d", repo="demo/missing"),
        _error(hub, tmp_path / "e", free_bytes=1),
    ]
    with pytest.raises(DownloadError) as unreachable:
        plan_download(DEMO_REPO, endpoint=unused_local_url())
    errors.append(unreachable.value)
    assert len({type(e) for e in errors}) == len(errors), "each case has its own error class"
    for err in errors:
        zh, _, en = str(err).partition("\n下一步：")[2].partition("\n")
        assert len(zh) > 20 and re.search(r"[\u4e00-\u9fff]", zh), str(err)
        assert "\nNext step: " in str(err)
        assert "Traceback" not in str(err)


# ---------------------------------------------------------------------------- never overwrite


def test_a_foreign_folder_is_not_overwritten(hub, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "config.json").write_text('{"mine": true}')
    with pytest.raises(ExistingDownloadError):
        fetch(hub, target)
    assert (target / "config.json").read_text() == '{"mine": true}'


def test_a_verified_download_of_another_commit_is_kept_unless_asked(tmp_path):
    with DemoHub(tiny_demo_repos()) as hub:
        target = tmp_path / "model"
        fetch(hub, target)
        old = dl.read_marker(target)["commit"]
        new = hub.put_file(DEMO_REPO, "README.md", b"# updated model card\n")
        hub.reset_stats()
        with pytest.raises(ExistingDownloadError) as err:
            fetch(hub, target)
        assert old[:10] in str(err.value) and new[:10] in str(err.value) and "overwrite=True" in str(err.value)
        assert hub.gets() == [] and dl.read_marker(target)["commit"] == old
        report = fetch(hub, target, overwrite=True)
        assert report.commit == new and [r.file for r in hub.gets()] == ["README.md"]
        assert (target / "README.md").read_bytes() == b"# updated model card\n"


def test_offline_with_a_verified_download_reuses_it(hub, tmp_path):
    target = tmp_path / "model"
    fetch(hub, target)
    report = download_model(DEMO_REPO, target, endpoint=unused_local_url())
    assert report.fetched == [] and "连不上" in report.note


# ---------------------------------------------------------------------------- sources


def test_pick_source_starts_the_demo_hub_for_the_tiny_model(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    source = dl.pick_source(resolve_model("tiny", verbose=False), verbose=False)
    try:
        assert source.kind == "demo" and source.repo_id == DEMO_REPO
        assert os.environ["HF_ENDPOINT"] == source.endpoint == source.hub.url
        assert dl.endpoint_reachable(source.endpoint)
        assert dl.default_target(DEMO_REPO).is_relative_to(dl.output_dir())
    finally:
        source.close()
    assert "HF_ENDPOINT" not in os.environ and not source.hub.running


def test_pick_source_offline_with_a_mirror_falls_back_to_the_demo(monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", "https://mirror.invalid")
    source = dl.pick_source(resolve_model("llama2-7b-chat", verbose=False), verbose=False)
    try:
        assert source.kind == "demo" and "HF_HUB_OFFLINE" in source.reason
    finally:
        source.close()
    assert os.environ["HF_ENDPOINT"] == "https://mirror.invalid"
    assert not dl.endpoint_reachable(unused_local_url(), timeout=1)


def test_pick_source_uses_a_mirror_that_answers(monkeypatch):
    import http.server
    import threading

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    mirror = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("HF_ENDPOINT", mirror)
    try:
        source = dl.pick_source(resolve_model("chinese-7b-chat", verbose=False), verbose=False)
    finally:
        server.shutdown()
        server.server_close()
    assert (source.kind, source.endpoint, source.repo_id) == ("mirror", mirror, "FlagAlpha/Llama2-Chinese-7b-Chat")
    assert source.hub is None and os.environ["HF_ENDPOINT"] == mirror


def test_default_target_of_a_profile_is_where_resolve_model_looks(monkeypatch, tmp_path):
    monkeypatch.setenv("LLAMA_TUTORIAL_HOME", str(tmp_path))
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    assert dl.default_target("meta-llama/Llama-2-7b-chat-hf") == tmp_path / "models" / "llama2-7b-chat"
    assert dl.default_target("FlagAlpha/Llama2-Chinese-7b-Chat-LoRA") == (
        tmp_path / "models" / "FlagAlpha--Llama2-Chinese-7b-Chat-LoRA")


# ---------------------------------------------------------------------------- ModelScope


def test_modelscope_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelscope", None)  # import fails as if not installed
    with pytest.raises(ModelScopeMissingError) as err:
        dl.download_from_modelscope("modelscope/Llama-2-7b-chat-ms", tmp_path)
    assert "pip install" in str(err.value) and "modelscope" in str(err.value)
    assert "重启内核" in str(err.value)


def test_modelscope_path_plans_checks_and_verifies(monkeypatch, tmp_path):
    """The glue around modelscope's API, with a stand-in module serving the demo repo's files."""
    repo = tiny_demo_repos()[0]
    calls = {}

    class HubApi:
        def get_model_files(self, model_id, recursive=True, revision=None):
            return [{"Name": f.path, "Path": f.path, "Size": f.size, "Sha256": f.sha256, "Type": "blob"}
                    for f in repo.files.values()]

    def snapshot_download(model_id, revision=None, local_dir=None, allow_patterns=None, ignore_patterns=None):
        calls.update(allow=allow_patterns, ignore=ignore_patterns)
        from huggingface_hub.utils import filter_repo_objects

        Path(local_dir).mkdir(parents=True, exist_ok=True)
        for name in filter_repo_objects(list(repo.files), allow_patterns=allow_patterns,
                                        ignore_patterns=ignore_patterns):
            data = repo.files[name].data
            if name == "config.json" and calls.get("corrupt"):
                data = data.replace(b"llama", b"LLAMA")
            Path(local_dir, name).write_bytes(data)
        return local_dir

    fake = types.ModuleType("modelscope")
    fake.snapshot_download = snapshot_download
    hub_mod = types.ModuleType("modelscope.hub")
    api_mod = types.ModuleType("modelscope.hub.api")
    api_mod.HubApi = HubApi
    for name, module in {"modelscope": fake, "modelscope.hub": hub_mod, "modelscope.hub.api": api_mod}.items():
        monkeypatch.setitem(sys.modules, name, module)

    report = dl.download_from_modelscope("modelscope/tiny", tmp_path / "ms")
    assert report.verification.ok and "*.bin" in calls["ignore"]
    assert not (tmp_path / "ms" / "pytorch_model.bin").exists()
    calls["corrupt"] = True
    with pytest.raises(CorruptDownloadError):
        dl.download_from_modelscope("modelscope/tiny", tmp_path / "ms2")
    with pytest.raises(NotEnoughDiskError):
        dl.download_from_modelscope("modelscope/tiny", tmp_path / "ms3", free_bytes=1)


# ---------------------------------------------------------------------------- notebook display


def test_short_errors_hides_the_traceback(capsys):
    from IPython.core.interactiveshell import InteractiveShell

    assert dl.short_errors() is False  # not inside IPython
    shell = InteractiveShell.instance()
    try:
        assert dl.short_errors() is True
        result = shell.run_cell("from helpers.config import TutorialError\nraise TutorialError('问题\\n下一步：做点什么')")
        out = capsys.readouterr()
        text = out.out + out.err
        assert isinstance(result.error_in_exec, TutorialError), "the cell must still count as failed"
        assert "下一步：做点什么" in text and "Traceback" not in text and "File " not in text
    finally:
        InteractiveShell.clear_instance()


def test_hub_file_marks_weights_as_lfs():
    assert HubFile("model.safetensors", b"x").lfs and not HubFile("config.json", b"{}").lfs
    assert HubFile("big.json", b"0" * (11 * 1024**2)).lfs
