"""Lesson 08: the memory accounting of DDP / FSDP / ZeRO, the accelerate configs, and real
two-process LoRA training on the CPU (gloo)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import LlamaConfig

from helpers.config import REPO_ROOT
from tests.lesson_code import lesson_definitions

# Lesson 08 writes its memory accounting out (section 1, and smallest_gpu_count in section 2): test that code.
LESSON = lesson_definitions("08_multi_gpu_lora.ipynb", "per_gpu_memory", "smallest_gpu_count")
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


def test_lesson_reads_the_lora_settings_of_lesson_05():
    """Lesson 08's rank, alpha and targets are lesson 05's GPU settings (r=16, alpha=32, seven projections), not
    a copy: the lesson once said "r = 8 ... as in lesson 05" while lesson 05 trains r=16."""
    from helpers.finetune import SETTINGS

    gpu = SETTINGS["colab_t4"]
    assert (LESSON["LORA_R"], LESSON["LORA_ALPHA"], LESSON["LORA_TARGETS"]) == (
        gpu.lora_r, gpu.lora_alpha, gpu.target_modules) == (16, 32, ("q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"))
    config = llama_config("llama2-7b")
    assert lora_trainable(config) == lora_trainable(config, 16) == 2 * 19_988_480
    assert per_gpu_memory(config, "lora", "ddp", 1).optimizer == 8 * lora_trainable(config, 16)


def test_qlora_and_lora_shapes_of_the_bill():
    config = llama_config("llama2-7b")
    lora, qlora = per_gpu_memory(config, "lora", "ddp", 1), per_gpu_memory(config, "qlora", "ddp", 1)
    assert qlora.weights < lora.weights / 3  # 4-bit frozen weights vs 16-bit
    assert lora.optimizer == qlora.optimizer == 8 * lora_trainable(config)  # Adam state only for the adapters
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
import importlib.util  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

ROWS, STEPS = 64, 6
COMMON = ["--model", "tiny", "--limit-rows", str(ROWS), "--max-steps", str(STEPS), "--grad-accum", "2",
          "--sequential", "--no-eval", "--logging-steps", "1"]
TIMEOUT = 600  # seconds per launch: a hang fails the test instead of stalling CI


def _launch(cmd, *, threads: int = 1, **extra_env):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": "", "TQDM_DISABLE": "1", **extra_env}
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
def runs(tmp_path_factory, tiny_model):
    """One process (batch 8) for the whole run; two processes (batch 4 each, same global batch)
    interrupted at step 3 and resumed to the end, as lesson 08 launches them."""
    root = tmp_path_factory.mktemp("lesson08")
    _launch([sys.executable, "scripts/train_lora.py", *COMMON, "--batch-size", "8", "--output", root / "one",
             "--metrics", root / "one-m"], threads=2)
    _two_processes("--output", root / "two", "--save-steps", "3", "--stop-after", "3", "--metrics", root / "first-m")
    resumed = _two_processes("--output", root / "two", "--save-steps", "3", "--metrics", root / "second-m")
    return {"root": root, "one": _metrics(root / "one-m"), "first": _metrics(root / "first-m"),
            "second": _metrics(root / "second-m"), "resumed_log": resumed.stdout + resumed.stderr}


@pytest.mark.slow
@pytest.mark.server
def test_both_ranks_train_on_different_rows_that_add_up_to_the_one_process_run(runs):
    first, second = runs["first"], runs["second"]
    assert [m["rank"] for m in first] == [0, 1] and all(m["world_size"] == 2 for m in first + second)
    per_rank = [[tuple(r) for r in a["rows"] + b["rows"]] for a, b in zip(first, second)]
    assert all(len(rows) == len(per_rank[0]) > 0 for rows in per_rank)
    assert not set(per_rank[0]) & set(per_rank[1]), "the global batch was duplicated, not split"
    one = sorted(tuple(r) for r in runs["one"][0]["rows"])
    assert sorted(per_rank[0] + per_rank[1]) == one


@pytest.mark.slow
@pytest.mark.server
def test_loss_curve_matches_one_process_with_the_same_global_batch(runs):
    one = dict(map(tuple, runs["one"][0]["losses"]))
    two = dict(map(tuple, runs["first"][0]["losses"])) | dict(map(tuple, runs["second"][0]["losses"]))
    assert sorted(two) == sorted(one) == list(range(1, STEPS + 1))
    # fp32 on the CPU: only the order of floating-point sums differs (all-reduce vs one batch).
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4, abs=1e-4), step
    assert one[STEPS] < one[1], "the loss falls"


@pytest.mark.slow
@pytest.mark.server
def test_interrupted_two_process_run_resumes_from_its_checkpoint(runs):
    assert all(m["global_step"] == 3 for m in runs["first"])
    assert all(m["global_step"] == STEPS for m in runs["second"])
    assert "checkpoint-3" in runs["resumed_log"]


@pytest.mark.slow
@pytest.mark.server
def test_only_rank_zero_writes_one_adapter_that_loads_and_answers(runs):
    import torch

    from helpers.models import resolve_model
    from helpers.finetune import load_with_adapter, read_training_info
    from helpers.prompts import encode

    adapter = runs["root"] / "two"
    assert (adapter / "adapter_config.json").exists() and (adapter / "adapter_model.safetensors").exists()
    siblings = sorted(p.name for p in adapter.parent.iterdir() if p.name.startswith("two"))
    assert siblings == ["two", "two-checkpoints"], siblings  # no second adapter, no leftover temp folder
    info = read_training_info(adapter)
    assert info["global_step"] == STEPS and info["resumed_from"].endswith("checkpoint-3")
    choice = resolve_model("tiny", verbose=False)
    model, tokenizer = load_with_adapter(choice, adapter)
    ids = encode(tokenizer, [{"role": "user", "content": "请介绍一下长城。"}], choice.chat_format).input_ids
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert out.shape[1] > len(ids)


def _adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(Path(folder) / "adapter_model.safetensors")


@pytest.mark.slow
@pytest.mark.server
def test_fsdp_shards_the_parameters_across_two_gloo_processes(tmp_path, tiny_model):
    """FSDP2 (fully_shard) on two CPU processes: each rank holds half of the elements, same loss; with lesson 05's
    LoRA, rank 0 holds half of each LoRA matrix, and the adapter gathered from both ranks equals the one-process one."""
    _launch([sys.executable, "scripts/fsdp_shard_demo.py", "--model", "tiny", "--json", tmp_path / "one.json",
             "--lora", tmp_path / "one-lora"])
    _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "scripts/fsdp_shard_demo.py",
             "--model", "tiny", "--json", tmp_path / "two.json", "--lora", tmp_path / "two-lora"])
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["world_size"] == 2 and sum(two["held"]) == one["full"] == two["full"]
    assert max(two["held"]) < one["full"] * 0.6
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert two["lora"]["rank0_holds"] < two["lora"]["trained"] * 0.6
    assert one["lora"]["rank0_holds"] == one["lora"]["trained"]
    a, b = _adapter_tensors(tmp_path / "one-lora"), _adapter_tensors(tmp_path / "two-lora")
    assert sorted(a) == sorted(b) and sum(t.numel() for t in b.values()) == two["lora"]["trained"]
    for name in a:
        assert torch_allclose(a[name], b[name]), name


def torch_allclose(x, y, atol=1e-5):
    import torch

    return x.shape == y.shape and torch.allclose(x, y, atol=atol)


ZERO3_CONFIG = {
    # stage3_param_persistence_threshold 0: every parameter is partitioned, as a 7B's large LoRA matrices are
    # under DeepSpeed's default threshold of 1e5 elements (the tiny model's are all smaller than that).
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto", "gradient_clipping": "auto",
}


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_zero3_saves_the_whole_adapter(runs, tmp_path):
    """ZeRO-3 on two CPU processes (DeepSpeed without offload needs no CPU Adam build): the adapter must hold every
    LoRA tensor whole and equal the one-process run's (same global batch). Saved from rank 0 alone it held 56
    empty tensors in 6 KB (DeepSpeed #4295) before the ranks gathered it (helpers.multigpu.adapter_state_dict)."""
    from helpers.models import resolve_model
    from helpers.finetune import load_with_adapter

    config = tmp_path / "zero3.json"
    config.write_text(json.dumps(ZERO3_CONFIG))
    _launch([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file", config,
             "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "scripts/train_lora.py",
             *COMMON, "--batch-size", "4", "--ddp-backend", "gloo", "--output", tmp_path / "zero3"],
            DS_ACCELERATOR="cpu")
    zero3, one = _adapter_tensors(tmp_path / "zero3"), _adapter_tensors(runs["root"] / "one")
    empty = [name for name, t in zero3.items() if t.numel() == 0]
    assert not empty, f"{len(empty)} of {len(zero3)} LoRA tensors are empty: the shards were not gathered"
    assert sorted(zero3) == sorted(one)
    for name in one:
        assert torch_allclose(zero3[name], one[name], atol=1e-3), name
    model, _ = load_with_adapter(resolve_model("tiny", verbose=False), tmp_path / "zero3")
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n), "B was trained"


class _FakeBase:
    def __init__(self):
        self.input_grads = False

    def enable_input_require_grads(self):
        self.input_grads = True


@pytest.fixture
def fake_gpu_loading(monkeypatch):
    """load_base as on a CUDA GPU with bf16, from_pretrained recorded instead of run."""
    import torch
    from transformers import AutoModelForCausalLM

    from helpers import loading

    seen = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(loading, "pick_dtype", lambda device=None: seen.get("compute", torch.bfloat16))
    monkeypatch.setattr(loading, "pick_attn_implementation", lambda device=None: "sdpa")

    def from_pretrained(path, **kwargs):
        seen["kwargs"] = kwargs
        seen["model"] = _FakeBase()
        return seen["model"]

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", from_pretrained)
    for name in ("ACCELERATE_USE_FSDP", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    return seen


def test_qlora_under_fsdp_stores_4bit_weights_in_a_float_dtype_without_a_device_map(fake_gpu_loading, monkeypatch, tiny_model):
    """bitsandbytes' FSDP-QLoRA guide: bnb_4bit_quant_storage a float dtype, the model's dtype the same; no
    device_map under FSDP (DDP keeps one copy per rank on its own GPU); lesson 08 writes the same config out."""
    import torch

    from helpers.models import resolve_model
    from helpers.finetune import SETTINGS, load_base
    from tests.lesson_code import lesson_calls

    import peft
    monkeypatch.setattr(peft, "prepare_model_for_kbit_training", lambda model, **kw: model)
    choice, qlora = resolve_model("tiny", verbose=False), SETTINGS["colab_t4"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    load_base(choice, qlora)  # DDP
    ddp = fake_gpu_loading["kwargs"]
    assert ddp["device_map"] == {"": 1} and ddp["quantization_config"].bnb_4bit_quant_storage == torch.uint8
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    for compute, storage in ((torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)):
        fake_gpu_loading["compute"] = compute
        load_base(choice, qlora)
        fsdp = fake_gpu_loading["kwargs"]
        assert "device_map" not in fsdp, "no device_map under FSDP"
        assert fsdp["quantization_config"].bnb_4bit_quant_storage == storage == fsdp["dtype"]
        assert fsdp["quantization_config"].bnb_4bit_compute_dtype == compute
        assert fake_gpu_loading["model"].input_grads == qlora.gradient_checkpointing
        given = {"torch": torch, "BitsAndBytesConfig": __import__("transformers").BitsAndBytesConfig,
                 "compute_dtype": compute, "storage_dtype": storage}
        lesson = lesson_calls("08_multi_gpu_lora.ipynb", "fsdp_qlora_config", "BitsAndBytesConfig", given)
        assert lesson[0].to_dict() == fsdp["quantization_config"].to_dict(), "lesson 08's FSDP-QLoRA config drifted"


def test_fsdp_save_switches_to_a_full_state_dict_first():
    """peft's FSDP guide: FULL_STATE_DICT before the state dict is taken (with SHARDED_STATE_DICT, Trainer.save_model
    writes no model); every rank gathers, only rank 0 keeps it."""
    from types import SimpleNamespace

    from helpers.multigpu import adapter_state_dict

    for rank0 in (True, False):
        calls = []
        plugin = SimpleNamespace(set_state_dict_type=lambda kind: calls.append(("type", kind)))
        accelerator = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=plugin),
                                      get_state_dict=lambda model: calls.append(("gather", model)) or {"w": 1})
        trainer = SimpleNamespace(is_fsdp_enabled=True, is_deepspeed_enabled=False, model="peft-model",
                                  accelerator=accelerator, is_world_process_zero=lambda: rank0)
        assert adapter_state_dict(trainer) == ({"w": 1} if rank0 else None)
        assert calls == [("type", "FULL_STATE_DICT"), ("gather", "peft-model")]
    plain = SimpleNamespace(is_fsdp_enabled=False, is_deepspeed_enabled=False, is_world_process_zero=lambda: True)
    assert adapter_state_dict(plain) is None, "DDP and one process: the model's own weights are whole"
