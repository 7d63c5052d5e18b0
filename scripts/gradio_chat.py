"""The lesson-04 Gradio page from a terminal, like the article's ``examples/chat_gradio.py``.

Run from the repository root (``helpers`` comes from the course's editable install)::

    python scripts/gradio_chat.py --model tiny --port 7860

notebooks/04_streaming_chat.ipynb writes the same ``gr.ChatInterface`` page out in a dozen lines;
:func:`build_gradio_app` adds error messages and serves any backend of the ``helpers.chat`` contract.
"""

import argparse
import inspect
import ipaddress
import threading
from dataclasses import replace

from helpers.chat import GenerationParams, explain_error, history_to_messages, local_backend
from helpers.config import localized
from helpers.prompts import SYSTEM_PROMPT_ARTICLE


def build_gradio_app(backend, *, params: GenerationParams | None = None, show_error: bool = True,
                     system_prompt: str = SYSTEM_PROMPT_ARTICLE):
    """Lesson 04's ``gr.ChatInterface`` page over ``backend``, gradio 5 or 6.

    Endpoint ``/chat``: message, system prompt, max_new_tokens (other parameters from ``params``).
    ``show_error=False`` (a page others reach) reports errors without the exception's text.
    """
    import gradio as gr

    def respond(message, history, system, max_new_tokens, request: gr.Request = None):
        messages = history_to_messages(history, message, system)
        chosen = replace(params or GenerationParams(), max_new_tokens=int(max_new_tokens))
        answer, stop = "", threading.Event()
        try:
            for chunk in backend(messages, chosen, stop):
                answer += chunk
                yield answer  # ChatInterface shows the whole answer so far
        except Exception as err:
            # gradio 6.24 (Colab's) keys a stream's diff state by id(generator) and keeps it when the stream
            # fails; a later answer in this session whose generator reuses the address then reaches the
            # browser as a broken diff ("can only concatenate list"). Newer gradio drops it; do the same.
            getattr(page, "pending_diff_streams", {}).pop(getattr(request, "session_hash", None), None)
            raise gr.Error(explain_error(err, detail=show_error)) from err
        finally:
            stop.set()  # Gradio's Stop closes this generator: end the generation too

    extra = {"type": "messages"} if "type" in inspect.signature(gr.ChatInterface).parameters else {}
    inputs = [gr.Textbox(system_prompt, label="系统提示"),
              gr.Slider(1, 2048, value=(params or GenerationParams()).max_new_tokens, step=1, label="max_new_tokens")]
    page = gr.ChatInterface(respond, additional_inputs=inputs, title="Llama-2 中文问答", api_name="chat",
                            analytics_enabled=False, **extra)
    return page


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python scripts/gradio_chat.py", description="流式中文问答页 / streaming Q&A page")
    parser.add_argument("--model", "--model_name_or_path", dest="model", default=None,
                        help="profile name, Hub repo id or local folder (default: $LLAMA_TUTORIAL_MODEL or auto)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--auth", default=None, help="user:password, required when --host is not a loopback address; "
                        "use a long random password (gradio's /login does not limit attempts), or better, keep the "
                        "default host and reach the page through `ssh -L 7860:127.0.0.1:7860 user@server`")
    parser.add_argument("--quantization", choices=("8bit", "4bit"), default=None)
    args = parser.parse_args(argv)
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False  # a host name other than localhost
    user, _, password = (args.auth or "").partition(":")
    if not (user and password) and (args.auth is not None or not loopback):
        parser.error(localized(
            f"需要 --auth 用户名:密码：监听 {args.host} 时，能连上这台机器的人都能使用你的模型（或者去掉 --host）。",
            f"--auth user:password is required: on {args.host} anyone who reaches this machine can use your model."))

    from helpers.models import resolve_model
    from helpers.loading import load_model_and_tokenizer

    choice = resolve_model(args.model)
    model, tokenizer = load_model_and_tokenizer(choice, quantization=args.quantization)
    app = build_gradio_app(local_backend(model, tokenizer, choice.chat_format), show_error=loopback)
    app.queue(default_concurrency_limit=1)  # one model: one answer at a time
    print(f"问答页 / Q&A page: http://{args.host}:{args.port}  （Ctrl+C 退出 / to quit）", flush=True)
    # share=False always: gradio turns a public *.gradio.live link on by itself in Colab, Kaggle, SageMaker
    # or with GRADIO_SHARE=true (Blocks.launch), which would expose the model with no password.
    app.launch(server_name=args.host, server_port=args.port, auth=(user, password) if args.auth else None,
               show_error=loopback, share=False)


if __name__ == "__main__":
    main()
