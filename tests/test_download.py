"""Lesson 01 (helpers/download.py, helpers/_local_hub.py): the real snapshot_download against a loopback Hub.

tests/hub_fixture.py injects what a real Hub and a bad network do (gated repos, outages, cut
connections, corrupted bytes) and logs every request, so resume, verification and the error cases
are checked by what went over the wire.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from huggingface_hub import constants

from helpers import download as dl
from helpers import _local_hub as local_hub
from helpers.config import REPO_ROOT
from helpers.download import DOWNLOAD_MARKER
from helpers.download import DownloadError, download_model
from helpers._local_hub import LOCAL_REPO, HubFile
from tests.error_text import both
from tests.hub_fixture import GATED_REPO, TOKEN, TOKEN_NO_ACCESS, FaultyHub

WEIGHTS = "model.safetensors"


def _tiny_folder():
    # Imported here, not at the top: test_download_on_huggingface_hub_1_27 imports this module beside
    # huggingface_hub 1.27, which the installed transformers (that helpers.tiny imports) does not load with.
    from helpers.tiny import ensure_tiny_model

    return ensure_tiny_model(verbose=False)


@pytest.fixture(scope="module")
def files(tiny_model):
    return local_hub.tiny_repo_files(_tiny_folder())


@pytest.fixture
def hub(files):
    server = FaultyHub({LOCAL_REPO: dict(files), GATED_REPO: dict(files)})
    yield server
    server.stop()


def fetch(hub, target, repo=LOCAL_REPO, **kwargs):
    return download_model(repo, target, endpoint=hub.url, **kwargs)


def kind_of(hub, tmp_path, **kwargs) -> DownloadError:
    with pytest.raises(DownloadError) as err:
        fetch(hub, tmp_path / "model", **kwargs)
    assert hub.gets() == [], "no file content may be served in an error case"
    assert err.value.code == f"download.{err.value.kind}"
    assert "\n下一步：" in err.value.zh and "\nNext step: " in err.value.en
    return err.value


# ---------------------------------------------------------------------------- catalogue


def test_lesson_01_catalogue_uses_the_course_memory_estimator():
    """One memory estimator: lesson 01 calls helpers.loading.estimate_memory; download.py has none."""
    import nbformat

    nb = nbformat.read(REPO_ROOT / "notebooks" / "01_download_weights.ipynb", 4)
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    assert "from helpers.loading import" in source and "estimate_memory(config" in source
    assert not hasattr(dl, "estimate_memory") and not hasattr(dl, "BYTES_PER_WEIGHT")


# ---------------------------------------------------------------------------- download, reuse, resume


def test_download_fetches_only_safetensors_verifies_and_writes_the_marker(hub, tmp_path):
    record = fetch(hub, tmp_path / "model")
    assert not hub.gets("pytorch_model.bin"), "the .bin duplicate must never be requested"
    assert "model.safetensors" in record["files"] and "pytorch_model.bin" not in record["files"]
    marker = json.loads((tmp_path / "model" / DOWNLOAD_MARKER).read_text())
    assert marker["files"][WEIGHTS]["sha256"] == hub.repos[LOCAL_REPO][WEIGHTS].sha256
    assert marker["files"]["config.json"]["git_blob_id"] == hub.repos[LOCAL_REPO]["config.json"].blob_id
    hub.heal()
    again = fetch(hub, tmp_path / "model")
    assert hub.gets() == [] and again["fetched"] == 0, "a verified download is not fetched again"
    (tmp_path / "model" / WEIGHTS).unlink()  # a file lost after verification is fetched again
    assert fetch(hub, tmp_path / "model")["fetched"] == hub.repos[LOCAL_REPO][WEIGHTS].size


def test_dropped_connection_resumes_with_a_range_request(hub, tmp_path):
    size = hub.repos[LOCAL_REPO][WEIGHTS].size
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    assert size > chunk, "the tiny weights must be larger than one download chunk"
    hub.drop_connection(WEIGHTS, after_bytes=chunk + (size - chunk) // 2)
    fetch(hub, tmp_path / "model")
    first, second = hub.gets(WEIGHTS)
    assert first["range"] is None and second["range"].startswith("bytes=")
    resumed_at = int(second["range"][6:-1])
    assert resumed_at > 0 and second["sent"] == size - resumed_at, "only the missing tail is fetched again"


def test_outage_keeps_finished_files_and_a_rerun_fetches_only_the_rest(hub, tmp_path):
    target = tmp_path / "model"
    hub.fail(WEIGHTS, 503)
    with pytest.raises(DownloadError) as err:
        fetch(hub, target)
    assert err.value.kind == "server_error" and "503" in both(err.value) and str(target) in both(err.value)
    assert (target / "config.json").is_file() and not (target / WEIGHTS).exists()
    assert not (target / DOWNLOAD_MARKER).exists()
    hub.heal()
    fetch(hub, target)
    assert {r["file"] for r in hub.gets()} == {WEIGHTS}, "finished files must not be fetched again"


def test_corrupted_file_is_caught_and_repaired(hub, tmp_path):
    target = tmp_path / "model"
    hub.corrupt("tokenizer.json")
    with pytest.raises(DownloadError) as err:
        fetch(hub, target)
    assert err.value.kind == "corrupt" and "tokenizer.json" in both(err.value) and "repair=True" in both(err.value)
    assert not (target / DOWNLOAD_MARKER).exists(), "a failed verification must not mark the folder complete"
    hub.heal()
    fetch(hub, target, repair=True)
    assert [r["file"] for r in hub.gets()] == ["tokenizer.json"]
    assert (target / DOWNLOAD_MARKER).exists()



# ---------------------------------------------------------------------------- repos with .bin weights only


@pytest.mark.parametrize("names, weights", [
    (["config.json", "model.safetensors", "pytorch_model.bin"], "*.safetensors"),  # Meta's: both copies
    (["config.json", "pytorch_model-00001-of-00002.bin", "pytorch_model.bin.index.json"], "*.bin"),
    (["adapter_config.json", "adapter_model.bin"], "*.bin"),  # FlagAlpha's LoRA adapters
    (["config.json", "tokenizer.json"], "*.safetensors"),  # no weights at all: the default
])
def test_allow_patterns_for_picks_one_weight_format(names, weights):
    allow = dl.allow_patterns_for(names)
    assert weights in allow and ({"*.safetensors", "*.bin"} - {weights}).isdisjoint(allow)
    assert [p for p in allow if p not in ("*.safetensors", "*.bin")] == [p for p in dl.ALLOW_PATTERNS if p != "*.safetensors"]


@pytest.fixture
def bin_hub(files):
    server = FaultyHub({local_hub.LOCAL_BIN_REPO: local_hub.bin_only(files)})
    yield server
    server.stop()


def test_a_bin_only_repo_downloads_its_bin_weights_and_loads(bin_hub, tmp_path):
    """Without allow_patterns, download_model reads the repo's file list and takes the .bin weights."""
    from transformers import AutoModelForCausalLM

    from helpers.download import missing_weights

    target = tmp_path / "model"
    record = fetch(bin_hub, target, repo=local_hub.LOCAL_BIN_REPO)
    assert "pytorch_model.bin" in record["files"] and [r["file"] for r in bin_hub.gets()].count("pytorch_model.bin") == 1
    assert not list(target.glob("*.safetensors")) and missing_weights(target) == []
    assert AutoModelForCausalLM.from_pretrained(target).num_parameters() > 0


def test_a_filter_that_skips_every_weight_file_is_refused(bin_hub, tmp_path):
    """The old failure: safetensors-only patterns on a .bin-only repo downloaded a folder without weights that verified."""
    err = kind_of(bin_hub, tmp_path, repo=local_hub.LOCAL_BIN_REPO, allow_patterns=dl.ALLOW_PATTERNS)
    assert err.kind == "no_weights" and "*.bin" in both(err)
    assert not (tmp_path / "model" / DOWNLOAD_MARKER).exists()


def test_the_local_hub_serves_a_bin_only_repo_for_lesson_01():
    from huggingface_hub import HfApi

    from helpers.download import hub_errors

    url = local_hub.start_local_hub().url
    try:
        with hub_errors(local_hub.LOCAL_BIN_REPO, url):
            names = HfApi(endpoint=url, token=False).list_repo_files(local_hub.LOCAL_BIN_REPO)
    finally:
        local_hub.stop_local_hub()
    assert "pytorch_model.bin" in names and not [n for n in names if n.endswith(".safetensors")]
    assert "*.bin" in dl.allow_patterns_for(names)


# ---------------------------------------------------------------------------- the error cases


def test_gated_no_token_no_access_invalid_token_and_unknown_repo(hub, tmp_path):
    assert kind_of(hub, tmp_path, repo=GATED_REPO).kind == "gated_no_token"
    err = kind_of(hub, tmp_path, repo=GATED_REPO, token=TOKEN_NO_ACCESS)
    assert err.kind == "gated_no_access" and "403" in both(err) and f"{hub.url}/{GATED_REPO}" in both(err)
    assert kind_of(hub, tmp_path, token="not-a-token").kind == "invalid_token"
    err = kind_of(hub, tmp_path, repo="local/tiny-lama2-chat")
    assert err.kind == "repo_not_found" and "local/tiny-lama2-chat" in both(err)
    fetch(hub, tmp_path / "granted", repo=GATED_REPO, token=TOKEN)
    assert (tmp_path / "granted" / DOWNLOAD_MARKER).exists()


def test_no_stored_token_goes_to_an_endpoint_other_than_huggingface(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_stored_secret")
    fetch(hub, tmp_path / "model")
    assert hub.server.requests and all(r["auth"] is None for r in hub.server.requests)
    assert dl.safe_token("https://huggingface.co") is None and dl.safe_token("https://hf-mirror.com") is False
    fetch(hub, tmp_path / "gated", repo=GATED_REPO, token=TOKEN)  # given explicitly: sent
    assert any(r["auth"] == f"Bearer {TOKEN}" for r in hub.server.requests)


@pytest.mark.server
@pytest.mark.parametrize("import_hub_first", [False, True])
def test_every_loading_path_keeps_the_stored_token_from_a_mirror(hub, tmp_path, import_hub_first):
    """With HF_ENDPOINT on another server, the token stored for huggingface.co goes nowhere: not with
    transformers' from_pretrained, not with huggingface_hub's own calls, not in a process started from here
    (it inherits HF_HUB_DISABLE_IMPLICIT_TOKEN); a token passed explicitly still goes. A fresh interpreter,
    as a learner's kernel: huggingface_hub reads its settings when first imported."""
    script = (
        ("import huggingface_hub\n" if import_hub_first else "")
        + "import os, subprocess, sys\n"
        "import helpers.loading\n"
        "from huggingface_hub import HfApi, hf_hub_download\n"
        "from transformers import AutoConfig, AutoTokenizer\n"
        "repo = sys.argv[1]\n"
        "AutoConfig.from_pretrained(repo)\n"
        "AutoTokenizer.from_pretrained(repo)\n"
        "HfApi().model_info(repo)\n"
        "subprocess.run([sys.executable, '-c', 'from huggingface_hub import hf_hub_download as h; import sys; "
        "h(sys.argv[1], \"config.json\", force_download=True)', repo], check=True)\n"
        "hf_hub_download(repo, 'config.json', token='hf_explicit', force_download=True)\n"
    )
    env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_TOKEN": "hf_stored_secret", "HF_HUB_OFFLINE": "0",
           "TRANSFORMERS_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf-home")}
    env.pop("HF_HUB_DISABLE_IMPLICIT_TOKEN", None)
    proc = subprocess.run([sys.executable, "-c", script, LOCAL_REPO], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sent = [r["auth"] for r in hub.server.requests]
    assert len(sent) >= 5 and "Bearer hf_stored_secret" not in sent, sent
    assert sent.count("Bearer hf_explicit") >= 1, "a token given explicitly is still sent"


def test_the_stored_token_stays_on_for_huggingface_co(monkeypatch):
    from helpers.config import keep_token_from_mirrors

    for endpoint in ("", "https://huggingface.co", "https://huggingface.co/"):
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        monkeypatch.delenv("HF_HUB_DISABLE_IMPLICIT_TOKEN", raising=False)
        assert keep_token_from_mirrors() is False and "HF_HUB_DISABLE_IMPLICIT_TOKEN" not in os.environ


def test_unreachable_endpoint_and_not_a_hub(tmp_path):
    import http.server
    import socket
    import threading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free_port = s.getsockname()[1]
    with pytest.raises(DownloadError) as err:
        download_model(LOCAL_REPO, tmp_path / "a", endpoint=f"http://127.0.0.1:{free_port}")
    assert err.value.kind == "unreachable" and "hf-mirror.com" in both(err.value)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DownloadError) as err:
            download_model(LOCAL_REPO, tmp_path / "b", endpoint=f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()
    assert err.value.kind == "not_a_hub"


def test_offline_mode_blocks_other_hosts_and_stays_on(hub, tmp_path):
    assert constants.HF_HUB_OFFLINE, "tests/nbenv.py sets HF_HUB_OFFLINE=1"
    with pytest.raises(DownloadError) as err:
        download_model(LOCAL_REPO, tmp_path / "a", endpoint="https://mirror.invalid")
    assert err.value.kind == "offline"
    seen = []
    with dl.hub_errors(LOCAL_REPO, hub.url):
        from huggingface_hub import get_session

        seen.append(constants.HF_HUB_OFFLINE)
        with pytest.raises(Exception, match="offline mode"):
            get_session().get("http://192.0.2.1/")  # another host, during the loopback call
    assert seen == [True] and constants.HF_HUB_OFFLINE


def test_loopback_check_is_exact():
    assert dl.is_loopback("http://127.0.0.1:8000") and dl.is_loopback("http://localhost:1")
    assert dl.is_loopback("http://[::1]:9") and dl.is_loopback("http://127.5.6.7")
    assert not dl.is_loopback("http://127.attacker.example") and not dl.is_loopback("http://localhost.evil.com")


def test_disk_too_small_refuses_before_downloading(hub, tmp_path):
    err = kind_of(hub, tmp_path, free_bytes=5 * 2**20)
    assert err.kind == "disk" and "5.0 MiB" in both(err) and "LLAMA_TUTORIAL_HOME" in both(err)


def test_a_listing_that_escapes_the_target_is_refused(hub, tmp_path, files):
    for name in ["../../evil.json", "/etc/evil.json", "a\\..\\evil.json", "sub/../../evil.json"]:
        hub.repos[LOCAL_REPO] = {**files, name: HubFile(name, b"{}")}
        err = kind_of(hub, tmp_path / "t")
        assert err.kind == "unsafe_name" and repr(name) in both(err)
    assert not (tmp_path / "evil.json").exists() and not (tmp_path / "t" / "model").exists()


def test_a_name_only_in_the_tree_listing_is_checked_too(hub, tmp_path):
    """snapshot_download fetches what list_repo_tree names; model_info's siblings may differ."""
    for name in ["../../evil.json", "sub/../../evil.json"]:
        hub.heal()
        hub.list_in_tree_only(name)
        err = kind_of(hub, tmp_path / "t")
        assert err.kind == "unsafe_name" and repr(name) in both(err)
    assert not (tmp_path / "evil.json").exists()


def test_an_over_long_file_name_is_refused_by_name(hub, tmp_path, files):
    name = "a" * 300 + ".json"
    hub.repos[LOCAL_REPO] = {**files, name: HubFile(name, b"{}")}
    err = kind_of(hub, tmp_path)
    assert err.kind == "long_name" and "255" in both(err) and len(err.zh) < 1500 and len(err.en) < 1500, "named, and quoted capped"
    hub.repos[LOCAL_REPO] = dict(files)
    hub.heal()
    hub.list_in_tree_only("b" * 300)
    assert kind_of(hub, tmp_path).kind == "long_name"


def test_a_server_that_sends_fewer_bytes_than_it_lists_is_corrupt_not_unexpected(hub, tmp_path):
    target = tmp_path / "model"
    hub.shorten(WEIGHTS, 100)
    with pytest.raises(DownloadError) as err:
        fetch(hub, target)
    assert err.value.kind == "corrupt" and "repair=True" in both(err.value)
    assert not (target / DOWNLOAD_MARKER).exists()
    hub.heal()
    assert fetch(hub, target, repair=True)["fetched"] > 0


def test_existing_folders_are_never_overwritten(hub, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.json").write_text('{"mine": true}')
    with pytest.raises(DownloadError) as err:
        fetch(hub, mine)
    assert err.value.kind == "existing" and (mine / "config.json").read_text() == '{"mine": true}'
    target = tmp_path / "model"
    fetch(hub, target)
    hub.repos[LOCAL_REPO] = {**hub.repos[LOCAL_REPO], "README.md": HubFile("README.md", b"# new card\n")}
    hub.heal()
    with pytest.raises(DownloadError) as err:
        fetch(hub, target)
    assert err.value.kind == "existing" and "overwrite=True" in both(err.value) and hub.gets() == []
    hub.fail("README.md", 503)
    with pytest.raises(DownloadError):
        fetch(hub, target, overwrite=True, allow_patterns=["*.json", "*.safetensors", "*.md"])
    assert not (target / DOWNLOAD_MARKER).exists(), "a half-updated folder must not keep the old marker"
    hub.heal()
    fetch(hub, target, overwrite=True, allow_patterns=["*.json", "*.safetensors", "*.md"])
    assert [r["file"] for r in hub.gets()] == ["README.md"]


def test_modelscope_missing_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(DownloadError) as err:
        dl.download_from_modelscope("modelscope/Llama-2-7b-chat-ms", tmp_path)
    assert err.value.kind == "modelscope_missing" and "pip install" in both(err.value) and "重启内核" in both(err.value)


# ---------------------------------------------------------------------------- huggingface_hub 1.x (Colab)


def test_errors_translate_with_plain_httpx_as_hub_1x_uses(monkeypatch):
    import httpx

    from huggingface_hub.utils import _http

    monkeypatch.delattr(_http, "httpx2", raising=False)
    monkeypatch.setattr(_http, "httpx", httpx, raising=False)
    monkeypatch.setitem(sys.modules, "httpx2", None)  # importing it would fail, as on hub 1.x
    err = dl.translate_error(httpx.ConnectError("refused"), repo="x/y", endpoint="http://e")
    assert err.kind == "unreachable" and "refused" in both(err)


@pytest.mark.slow
@pytest.mark.server
def test_download_on_huggingface_hub_1_27(tmp_path):
    """A real run on Colab's huggingface_hub 1.27 (its wheel, fetched once into the tutorial cache)."""
    from helpers.config import home_dir

    site = home_dir() / "hub-1.27.0"
    if not (site / "huggingface_hub").is_dir():
        wheel = tmp_path / "wheel"
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "huggingface_hub==1.27.0",
                        "-d", wheel], check=True)
        subprocess.run([sys.executable, "-m", "zipfile", "-e", next(wheel.glob("*.whl")), site], check=True)
    script = (
        "import huggingface_hub, sys, tests.test_download as t\n"
        "assert huggingface_hub.__version__ == '1.27.0', huggingface_hub.__version__\n"
        "from tests.hub_fixture import FaultyHub\n"
        "from helpers import _local_hub as local_hub\n"
        "from pathlib import Path\n"
        "files = local_hub.tiny_repo_files(sys.argv[1])\n"
        "hub = FaultyHub({t.LOCAL_REPO: files, t.GATED_REPO: files})\n"
        "tmp = Path(sys.argv[2])\n"
        "t.test_download_fetches_only_safetensors_verifies_and_writes_the_marker(hub, tmp / 'a')\n"
        "hub.heal()\n"
        "t.test_gated_no_token_no_access_invalid_token_and_unknown_repo(hub, tmp / 'b')\n"
        "hub.heal()\n"
        "t.test_corrupted_file_is_caught_and_repaired(hub, tmp / 'c')\n"
        "t.test_unreachable_endpoint_and_not_a_hub(tmp / 'd')\n"
        "t.test_no_stored_token_goes_to_an_endpoint_other_than_huggingface(hub, tmp / 'e', __import__('pytest').MonkeyPatch())\n"
        "bin_hub = FaultyHub({local_hub.LOCAL_BIN_REPO: local_hub.bin_only(files)})\n"
        "t.test_a_filter_that_skips_every_weight_file_is_refused(bin_hub, tmp / 'f')\n"
        "t.fetch(bin_hub, tmp / 'g', repo=local_hub.LOCAL_BIN_REPO)\n"
        "assert (tmp / 'g' / 'pytorch_model.bin').is_file() and not list((tmp / 'g').glob('*.safetensors'))\n"
        "print('hub', huggingface_hub.__version__, 'ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{REPO_ROOT}"}
    run = subprocess.run([sys.executable, "-c", script, str(_tiny_folder()), str(tmp_path)],
                         env=env, capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert run.returncode == 0 and "hub 1.27.0 ok" in run.stdout, run.stdout[-2000:] + run.stderr[-3000:]


# ---------------------------------------------------------------------------- the lesson's server


def test_one_local_hub_per_process_never_touching_hf_endpoint(monkeypatch):
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    first = local_hub.start_local_hub()
    try:
        assert local_hub.start_local_hub() is first and "HF_ENDPOINT" not in os.environ
    finally:
        local_hub.stop_local_hub()
    assert local_hub._HUB is None


def test_bad_range_gets_416(files):
    import urllib.error
    import urllib.request

    server = FaultyHub({LOCAL_REPO: files})
    try:
        for bad in ["bytes=abc-", f"bytes={10**12}-", "bytes=9-3"]:
            request = urllib.request.Request(f"{server.url}/{LOCAL_REPO}/resolve/main/config.json", headers={"Range": bad})
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(request, timeout=5)
            assert err.value.code == 416
    finally:
        server.stop()


@pytest.mark.slow
@pytest.mark.server
def test_lesson_01_leaves_no_server_listening(monkeypatch):
    """Run lesson 01 in a kernel, then check from inside it that its loopback Hub is gone."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(REPO_ROOT / "notebooks" / "01_download_weights.ipynb", 4)
    nb.cells.append(nbformat.v4.new_code_cell(
        "import socket, threading\n"
        "from helpers import _local_hub as _lh\n"
        "from urllib.parse import urlsplit\n"
        "assert _lh._HUB is None and not [t for t in threading.enumerate() if t.name == 'local-hub']\n"
        "_u = urlsplit(ENDPOINT)\n"
        "with socket.socket() as _s:\n"
        "    assert _u.hostname == '127.0.0.1' and _s.connect_ex((_u.hostname, _u.port)) != 0\n"
        "print('NOTHING-LISTENING')"))
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(REPO_ROOT / "notebooks")}}).execute()
    assert "NOTHING-LISTENING" in nb.cells[-1].outputs[0]["text"]
