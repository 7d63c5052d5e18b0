"""``make serve``: serve LLAMA_TUTORIAL_MODEL with vLLM on the port given (default 8000) until Ctrl-C (lesson 07).

    python scripts/serve.py [PORT] [--quantization awq] [any other vLLM option, e.g. --max-model-len 2048]

PORT, if given, comes first. Options this script does not know go to vLLM unchanged (helpers.serve.start_server's
``extra_args``); it prints the command it runs.
"""

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.config import home_dir  # noqa: E402
from helpers.serve import start_server  # noqa: E402


def parse(argv=None):
    """(port, quantization, extra vLLM arguments); the port, if given, comes first."""
    argv = list(sys.argv[1:] if argv is None else argv)
    port = int(argv.pop(0)) if argv and argv[0].isdigit() else 8000
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", help="vLLM's --quantization, e.g. awq or gptq for such weights")
    args, extra = parser.parse_known_args(argv)
    return port, args.quantization, extra


def show_key(api_key: str, *, terminal: bool | None = None) -> str:
    """The line that gives the API key: the key itself on a terminal; redirected into a file or a CI log, the
    path of a file only this user can read (``<course home>/serve-api-key``, mode 0600)."""
    if sys.stdout.isatty() if terminal is None else terminal:
        return f"API key: {api_key}"
    path = home_dir() / "serve-api-key"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(api_key + "\n")
    return f"API key 写在 / written to {path}（只有你能读 / readable by you only）"


if __name__ == "__main__":
    port, quantization, extra = parse()
    server = start_server(port=port, quantization=quantization, extra_args=extra)
    print(server.command())
    print(f"vLLM 服务器已就绪 / ready: {server.base_url} models={server.models}")
    print(show_key(server.api_key))
    with contextlib.suppress(KeyboardInterrupt):
        server.process.wait()
    server.stop()
