"""Shared helpers for the Llama-2 Chinese notebook series.

Each public module belongs to the lesson that introduces it; lesson 00 shows this table (a test keeps the two
in step). Modules whose names start with ``_`` are infrastructure a learner need not read."""

from helpers.config import keep_token_from_mirrors

LESSON_MODULES = {
    "config": ("00", "目录和报错的写法：不依赖其他模块，其他模块都依赖它"),
    "models": ("00", "选择模型：LLAMA_TUTORIAL_MODEL 与 resolve_model"),
    "tiny": ("00", "本机准备的模型：CPU 上的 SmolLM2-135M-Instruct 和测试用的 tiny 模型"),
    "download": ("01", "下载权重（离线时从本机上的小 Hub 练习下载 tiny 模型）"),
    "loading": ("02", "量化加载与显存"),
    "prompts": ("03", "提示词模板；Llama-2 的真实词表"),
    "chat": ("04", "流式对话"),
    "training_data": ("05", "检查训练数据"),
    "finetune": ("05", "LoRA 微调"),
    "evaluation": ("06", "中文评测"),
    "knowledge": ("06", "选择题知识检查（C-Eval 格式）"),
    "serve": ("07", "用 vLLM 提供 OpenAI 兼容的服务"),
    "multigpu": ("08", "多 GPU 训练：分片训练的入口、适配器的收集"),
    "gguf": ("09", "GGUF 与 llama.cpp：编译、转换脚本、文件检查、服务器"),
}

keep_token_from_mirrors()  # a token stored for huggingface.co never goes to an HF_ENDPOINT mirror
