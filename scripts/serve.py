"""``make serve``: serve LLAMA_TUTORIAL_MODEL with vLLM on the port given (default 8000) until Ctrl-C (lesson 07)."""

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from helpers.serve import start_server  # noqa: E402

if __name__ == "__main__":
    server = start_server(port=int(sys.argv[1]) if len(sys.argv) > 1 else 8000)
    print(f"vLLM 服务器已就绪 / ready: {server.base_url} models={server.models} api_key={server.api_key}")
    with contextlib.suppress(KeyboardInterrupt):
        server.process.wait()
    server.stop()
