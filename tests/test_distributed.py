"""Lesson 08: the memory accounting of DDP / FSDP / ZeRO, the accelerate configs, and real
two-process LoRA training on the CPU (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from helpers.config import REPO_ROOT
from tests.lesson_code import lesson_definitions

# Lesson 08 writes its memory accounting out (section 1, and smallest_gpu_count in section 2): test that code.
LESSON = lesson_definitions("08_multi_gpu_lora.ipynb", "f821ae6c", "011e877c")
SHARDS, STRATEGIES, llama_config = LESSON["SHARDS"], LESSON["STRATEGIES"], LESSON["llama_config"]
lora_trainable, per_gpu_memory, smallest_gpu_count = (LESSON[name] for name in (
    "lora_trainable", "per_gpu_memory", "smallest_gpu_count"))

CONFIGS = REPO_ROOT / "scripts" / "accelerate"
GB = 1e9


def test_zero_paper_figure_1():
    """ZeRO paper, figure 1: 7.5B parameters, 64 GPUs, mixed-precision Adam (K = 12):
    120 GB per GPU for the baseline, 31.4 with P_os, 16.6 with P_os+g, 1.9 with P_os+g+p."""
    config = llama_config("llama2-7b")
    published = {"ddp": 120.0, "zero1": 31.4, "zero2": 16.6, "zero3": 1.9}
    for strategy, gb in published.items():
        m = per_gpu_memory(config, "full", strategy, 64, trainable=7.5e9)
        assert round((m.weights + m.gradients + m.optimizer) / GB, 1) == gb, strategy


def test_lora_count_matches_peft():
    """The arithmetic count equals peft's own, also with grouped-query attention."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=3, num_attention_heads=8,
                         num_key_value_heads=2, vocab_size=1000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(model, LoraConfig(r=8, target_modules=targets))
    assert lora_trainable(config, 8) == model.get_nb_trainable_parameters()[0]
    # The count peft prints for Llama-2-7B with r=8 on all seven projections.
    assert lora_trainable(llama_config("llama2-7b"), 8) == 19_988_480


@pytest.mark.parametrize("method", ["full", "lora", "qlora"])
def test_more_sharding_never_costs_more(method):
    config = llama_config("llama2-13b")
    totals = {s: per_gpu_memory(config, method, s, 8).total for s in STRATEGIES}
    assert totals["ddp"] >= totals["zero1"] >= totals["zero2"] >= totals["zero3"]
    assert totals["zero2"] == totals["fsdp_grad_op"] and totals["zero3"] == totals["fsdp_full"]
    one = per_gpu_memory(config, method, "zero3", 1)
    eight = per_gpu_memory(config, method, "zero3", 8)
    assert eight.weights == pytest.approx(one.weights / 8) and eight.activations == one.activations
    # DDP replicates everything: the GPU count changes nothing.
    assert per_gpu_memory(config, method, "ddp", 8) == per_gpu_memory(config, method, "ddp", 1)


def test_qlora_and_lora_shapes_of_the_bill():
    config = llama_config("llama2-7b")
    lora, qlora = per_gpu_memory(config, "lora", "ddp", 1), per_gpu_memory(config, "qlora", "ddp", 1)
    assert qlora.weights < lora.weights / 3  # 4-bit frozen weights vs 16-bit
    assert lora.optimizer == qlora.optimizer == 8 * 19_988_480  # Adam state only for the adapters
    assert per_gpu_memory(config, "lora", "ddp", 1, checkpointing=False).activations > lora.activations


def test_70b_qlora_fits_two_24gb_gpus_with_fsdp():
    """answer.ai (2024, "You can now train a 70b language model at home") trained Llama-2-70B with
    QLoRA + FSDP on two 24 GB GPUs; the estimate must agree that it fits, and that DDP does not."""
    config = llama_config("llama2-70b")
    assert per_gpu_memory(config, "qlora", "fsdp_full", 2, seq_len=512).total < 24 * GB
    assert per_gpu_memory(config, "qlora", "ddp", 2, seq_len=512).total > 24 * GB
    assert smallest_gpu_count(config, "qlora", "fsdp_full", 24 * GB, seq_len=512) == 2
    assert smallest_gpu_count(config, "full", "ddp", 80 * GB) is None


def test_unknown_strategy_or_method_is_refused():
    config = llama_config("llama2-7b")
    with pytest.raises(ValueError, match="strategy"):
        per_gpu_memory(config, "lora", "zero4", 2)
    with pytest.raises(ValueError, match="method"):
        per_gpu_memory(config, "prefix", "ddp", 2)


EXPECTED = {
    "single_gpu.yaml": "NO",
    "ddp.yaml": "MULTI_GPU",
    "fsdp.yaml": "FSDP",
    "deepspeed_zero2.yaml": "DEEPSPEED",
    "deepspeed_zero3_offload.yaml": "DEEPSPEED",
}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_accelerate_config_parses_and_names_a_valid_strategy(name):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    path = CONFIGS / name
    text = path.read_text(encoding="utf-8")
    assert text.lstrip().startswith("#"), "each config starts with a comment saying what it is for"
    config = load_config_from_file(str(path))
    assert config.distributed_type == DistributedType(EXPECTED[name])
    if name == "fsdp.yaml":
        import transformers.models.llama.modeling_llama as llama

        assert config.fsdp_config["fsdp_version"] == 2
        assert hasattr(llama, config.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])
    if name.startswith("deepspeed"):
        stage = config.deepspeed_config["zero_stage"]
        assert stage == (2 if "zero2" in name else 3)
        assert (config.deepspeed_config["offload_optimizer_device"] == "cpu") == ("offload" in name)


def test_every_config_is_in_the_lesson_table():
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    assert set(SHARDS) == set(STRATEGIES)


# --------------------------------------------------------------------------- real two-process training
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROWS, STEPS = 64, 6
COMMON = ["--model", "tiny", "--limit-rows", str(ROWS), "--max-steps", str(STEPS), "--grad-accum", "2",
          "--sequential", "--no-eval", "--logging-steps", "1"]
TIMEOUT = 600  # seconds per launch: a hang fails the test instead of stalling CI


def _launch(cmd, *, threads: int = 1):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1"}
    proc = subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _two_processes(*args):
    return _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIGS / "ddp.yaml",
                    "--num_processes", "2", "scripts/train_lora.py", *COMMON, "--batch-size", "4",
                    "--ddp-backend", "gloo", *args])


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(p.read_text(encoding="utf-8")) for p in sorted(folder.glob("rank*.json"))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (batch 8) for the whole run; two processes (batch 4 each, same global batch)
    interrupted at step 3 and resumed to the end, as lesson 08 launches them."""
    root = tmp_path_factory.mktemp("lesson08")
    _launch([sys.executable, "scripts/train_lora.py", *COMMON, "--batch-size", "8", "--output", root / "one",
             "--metrics", root / "one-m"], threads=2)
    _two_processes("--output", root / "two", "--save-steps", "3", "--stop-after", "3", "--metrics", root / "first-m")
    resumed = _two_processes("--output", root / "two", "--save-steps", "3", "--metrics", root / "second-m")
    return {"root": root, "one": _metrics(root / "one-m"), "first": _metrics(root / "first-m"),
            "second": _metrics(root / "second-m"), "resumed_log": resumed.stdout + resumed.stderr}


def test_both_ranks_train_on_different_rows_that_add_up_to_the_one_process_run(runs):
    first, second = runs["first"], runs["second"]
    assert [m["rank"] for m in first] == [0, 1] and all(m["world_size"] == 2 for m in first + second)
    per_rank = [[tuple(r) for r in a["rows"] + b["rows"]] for a, b in zip(first, second)]
    assert all(len(rows) == len(per_rank[0]) > 0 for rows in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1]), "the global batch was duplicated, not split"
    one = sorted(tuple(r) for r in runs["one"][0]["rows"])
    assert sorted(per_rank[0] + per_rank[1]) == one


def test_loss_curve_matches_one_process_with_the_same_global_batch(runs):
    one = dict(map(tuple, runs["one"][0]["losses"]))
    two = dict(map(tuple, runs["first"][0]["losses"])) | dict(map(tuple, runs["second"][0]["losses"]))
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    # fp32 on the CPU: only the order of floating-point sums differs (all-reduce vs one batch).
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4), step
    assert one[STEPS] < one[1], "the loss falls"


def test_interrupted_two_process_run_resumes_from_its_checkpoint(runs):
    assert all(m["global_step"] == 3 for m in runs["first"])
    assert all(m["global_step"] == STEPS for m in runs["second"])
    assert "checkpoint-3" in runs["resumed_log"]


def test_only_rank_zero_writes_one_adapter_that_loads_and_answers(runs):
    import torch

    from helpers.config import resolve_model
    from helpers.finetune import load_with_adapter, read_training_info
    from helpers.prompts import encode_prompt

    adapter = runs["root"] / "two"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    siblings = sorted(p.name for p in adapter.parent.iterdir() if p.name.startswith("two"))
    assert siblings == ["two", "two-checkpoints"], siblings  # no second adapter, no leftover temp folder
    info = read_training_info(adapter)
    assert info["global_step"] == STEPS and info["resumed_from"].endswith("checkpoint-3")
    choice = resolve_model("tiny", verbose=False)
    model, tokenizer = load_with_adapter(choice, adapter)
    ids = encode_prompt(tokenizer, [{"role": "user", "content": "请介绍一下长城。"}], choice.chat_format)
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > len(ids)


def test_fsdp_shards_the_parameters_across_two_gloo_processes(tmp_path):
    """FSDP2 (fully_shard) on two CPU processes: each rank holds half of the elements, same loss."""
    _launch([sys.executable, "scripts/fsdp_shard_demo.py", "--model", "tiny", "--json", tmp_path / "one.json"])
    _launch([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "scripts/fsdp_shard_demo.py",
             "--model", "tiny", "--json", tmp_path / "two.json"])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world_size"] == 2 and sum(two["held"]) == one["full"] == two["full"]
    assert max(two["held"]) < one["full"] * 0.6
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
