"""LoRA fine-tuning: the plumbing around notebooks/05_lora_finetune.ipynb, which writes the recipe out.

Here: the settings per machine, where adapters live, resuming only the same run, saving without
overwriting, and :func:`train_adapter` (the recipe as a function for lessons 06, 08). Training files are
read and checked by :mod:`helpers.training_data`.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from helpers._compat import allow_indexed_cpu_locations, checkpointing_argument
from helpers._files import OutputExistsError  # noqa: F401 (lesson 05 imports it from here, with save_adapter)
from helpers._files import recover_all, refuse_existing, reporting_full_disk, save_folder, set_incomplete_checkpoints_aside
from helpers._locks import claim
from helpers.config import DATA_DIR, TutorialError, localized, output_dir
from helpers.multigpu import adapter_state_dict, sharded_training
from helpers.prompts import IGNORE_INDEX
from helpers.training_data import SFTRows, validate_sft_file

ADAPTER_DIR_NAME = "lora-adapter"
INFO_FILE, FINGERPRINT_FILE = "training_info.json", "run_fingerprint.json"
LLAMA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainSettings:
    """Everything that decides one LoRA run (notebooks/05_lora_finetune.ipynb, section 1)."""

    name: str
    description: str
    quantization: str | None  # None: plain load (fp32 on the CPU); "4bit"/"8bit": QLoRA on a GPU
    gradient_checkpointing: bool
    max_length: int  # longer rows are reported, never cut (a cut row loses its final </s>)
    lora_dropout: float
    learning_rate: float
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    per_device_eval_batch_size: int
    eval_steps: int
    save_steps: int
    torch_threads: int | None  # None: leave torch's default
    merge_dtype: str  # dtype of the base the adapter is merged into
    generation: dict
    generation_batch_size: int
    lora_r: int = 16
    lora_alpha: int = 32
    target_modules: tuple[str, ...] = LLAMA_PROJECTIONS
    num_train_epochs: float = 3
    max_steps: int = -1  # > 0: stop after this many optimizer steps, whatever num_train_epochs says
    warmup_steps: int = 4
    lr_scheduler_type: str = "cosine"
    logging_steps: int = 4
    save_total_limit: int = 2
    seed: int = 42


SETTINGS: dict[str, TrainSettings] = {
    # Llama-2-7b-chat on a Colab T4 (15 GB, no bf16): QLoRA in 4-bit, fp16 compute.
    "colab_t4": TrainSettings(
        name="colab_t4", description="Colab T4：Llama-2-7B 4-bit QLoRA", quantization="4bit",
        gradient_checkpointing=True, max_length=512, lora_dropout=0.05, learning_rate=2e-4,
        per_device_train_batch_size=4, gradient_accumulation_steps=4, per_device_eval_batch_size=8,
        eval_steps=12, save_steps=24, torch_threads=None, merge_dtype="float16", generation_batch_size=8,
        generation={"max_new_tokens": 128, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
                    "repetition_penalty": 1.1}),
    # The tiny model on a CPU: fp32, a much higher learning rate, no dropout, one thread (a model this small
    # learns only with a large step; its matrices are too small to gain from a second thread: bench/threads.py
    # --model tiny compares one and two).
    "cpu_tiny": TrainSettings(
        name="cpu_tiny", description="tiny 模型 fp32 LoRA（CPU 或 GPU）", quantization=None,
        gradient_checkpointing=False, max_length=256, lora_dropout=0.0, learning_rate=5e-3,
        per_device_train_batch_size=8, gradient_accumulation_steps=2, per_device_eval_batch_size=36,
        eval_steps=24, save_steps=24, torch_threads=1, merge_dtype="float32", generation_batch_size=36,
        generation={"max_new_tokens": 64, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
                    "repetition_penalty": 1.2}),
    # SmolLM2-135M-Instruct on a 2-core CPU: fp32, 40 steps of 4 rows (160 of the 377 rows) keep the lesson short
    # and already turn most answers Chinese; the dev set is evaluated at the start and the end only, in batches of 4
    # (less padding than larger batches). bench/experiment.py prints what this recipe does to the answers.
    "cpu_smollm2": TrainSettings(
        name="cpu_smollm2", description="SmolLM2-135M fp32 LoRA（CPU 或 GPU）", quantization=None,
        gradient_checkpointing=False, max_length=320, lora_dropout=0.05, learning_rate=1e-3,
        per_device_train_batch_size=4, gradient_accumulation_steps=1, per_device_eval_batch_size=4,
        eval_steps=40, save_steps=20, torch_threads=None, merge_dtype="float32", generation_batch_size=24,
        max_steps=40, generation={"max_new_tokens": 48, "do_sample": True, "temperature": 0.6, "top_p": 0.9,
                                  "repetition_penalty": 1.2}),
}
# The models the course builds on this machine train with their own settings, on a CPU or a GPU.
LOCAL_SETTINGS = {"tiny": "cpu_tiny", "smollm2-135m": "cpu_smollm2"}


def settings_for(choice=None, *, device: str | None = None) -> TrainSettings:
    """The settings of a model the course builds (``cpu_tiny``, ``cpu_smollm2``: CPU or GPU); ``colab_t4``
    for any other model on a CUDA GPU, else ``cpu_tiny`` (a big model on a CPU, with a warning).
    Introduced in notebooks/05_lora_finetune.ipynb."""
    from helpers.loading import pick_device

    local = LOCAL_SETTINGS.get(choice.name) if choice is not None and choice.is_local_build else None
    if local:
        return SETTINGS[local]
    if (device or pick_device()) == "cuda":
        return SETTINGS["colab_t4"]
    if choice is not None:
        import warnings

        warnings.warn(localized(f"{choice.name} 在 CPU 上微调会非常慢。", f"Fine-tuning {choice.name} on a CPU is very slow."),
                      stacklevel=2)
    return SETTINGS["cpu_tiny"]


# --------------------------------------------------------------------------- where outputs go, and never overwriting


def checkpoint_dir_for(adapter_dir: str | Path) -> Path:
    """The Trainer's checkpoint folder next to ``adapter_dir`` (``...-checkpoints``)."""
    adapter_dir = Path(adapter_dir)
    return adapter_dir.with_name(adapter_dir.name + "-checkpoints")


def _free_dir(name: str, overwrite: bool, take) -> Path:
    """``outputs/<name>``, or if it exists and ``overwrite`` is false, ``<name>-2``, ``-3`` ...: the first that
    ``take(path)`` accepts."""
    for n in range(1, 10_000):
        path = output_dir() / (name if n == 1 else f"{name}-{n}")
        if (overwrite and n == 1 or not path.exists()) and take(path):
            return path
    raise TutorialError("output.no_free_name", f"{name} 的编号已用完。", f"No free name next to {name}.", name=str(name))


def new_adapter_dir(overwrite: bool = False, *, fingerprint: dict | None = None) -> Path:
    """``outputs/lora-adapter``, or if it exists and ``overwrite`` is false, ``lora-adapter-2``, ``-3`` ...;
    a name whose checkpoints another running training holds is skipped too, and with ``fingerprint`` a name
    whose checkpoints belong to another run (they stay as they are). :func:`plan_run` picks the adapter folder
    with it."""
    def free(path: Path) -> bool:
        ckpt_dir = checkpoint_dir_for(path)
        return not (fingerprint is not None and _holds_another_run(ckpt_dir, fingerprint)) and claim(ckpt_dir)

    return _free_dir(ADAPTER_DIR_NAME, overwrite, free)


def merged_model_dir(overwrite: bool = False) -> Path:
    """Where lesson 05 saves its merged model: ``outputs/merged-model``, or if it exists and ``overwrite`` is
    false, ``merged-model-2``, ``-3`` ...; a name another running process is saving into is skipped.
    Introduced in notebooks/05_lora_finetune.ipynb."""
    return _free_dir("merged-model", overwrite, claim)


def save_adapter(model, path: str | Path, *, overwrite: bool = False, info: dict | None = None,
                 state_dict: dict | None = None) -> Path:
    """Save the LoRA adapter (+ ``training_info.json``); never over an existing folder unless ``overwrite``,
    and the folder appears complete or not at all. ``state_dict``: the weights to save instead of the model's
    own (gathered from FSDP / ZeRO-3 shards: :func:`adapter_state_dict`, lesson 08).
    Introduced in notebooks/05_lora_finetune.ipynb."""
    if state_dict is not None:
        from types import SimpleNamespace

        peft_model = model
        model = SimpleNamespace(save_pretrained=lambda to: peft_model.save_pretrained(to, state_dict=state_dict))
    return save_folder(path, [model], overwrite=overwrite, what=("适配器", "adapter"), info=None if info is None else (INFO_FILE, info))


def save_merged(model, tokenizer, path: str | Path, *, overwrite: bool = False) -> Path:
    """Save a merged model and its tokenizer, with :func:`save_adapter`'s rules.
    Introduced in notebooks/05_lora_finetune.ipynb."""
    return save_folder(path, [model, tokenizer], overwrite=overwrite, what=("合并模型", "merged model"))


def read_training_info(adapter_dir: str | Path) -> dict:
    """The ``training_info.json`` saved next to an adapter ({} when there is none)."""
    p = Path(adapter_dir) / INFO_FILE
    return json.loads(p.read_text("utf-8")) if p.exists() else {}


def latest_adapter(choice) -> Path | None:
    """The most recently saved ``outputs/lora-adapter*`` whose ``training_info.json`` names this base model
    (None if none). Introduced in notebooks/05_lora_finetune.ipynb; lesson 06 finds its adapter with it."""

    def made_for_choice(info: dict) -> bool:
        return info.get("base_model") == choice.path or (not choice.is_tiny and info.get("model_name") == choice.name)

    recover_all(output_dir(), ADAPTER_DIR_NAME)  # an overwrite a kill cut off: the old adapter goes back first
    found = [p for p in output_dir().glob(f"{ADAPTER_DIR_NAME}*") if (p / INFO_FILE).is_file()
             and (p / "adapter_config.json").is_file() and made_for_choice(read_training_info(p))]
    return max(found, key=lambda p: (p / INFO_FILE).stat().st_mtime_ns, default=None)


# --------------------------------------------------------------------------- resuming one run only


def run_fingerprint(choice, settings: TrainSettings, rows: SFTRows) -> dict:
    """What makes a run the same run: base model, settings and a hash of the tokenized data."""
    data = hashlib.sha256(json.dumps([rows.input_ids, rows.labels]).encode()).hexdigest()[:16]
    return {"base_model": choice.path, "settings": asdict(settings), "data_sha256": data}


def _as_stored(fingerprint: dict) -> dict:
    return json.loads(json.dumps(fingerprint))  # as stored: tuples become lists


def _stored_fingerprint(ckpt_dir: Path) -> dict:
    stored = ckpt_dir / FINGERPRINT_FILE
    return json.loads(stored.read_text("utf-8")) if stored.exists() else {}


def _holds_another_run(ckpt_dir: str | Path, fingerprint: dict) -> bool:
    """Whether ``ckpt_dir`` holds checkpoints of a run other than ``fingerprint``'s (:func:`resume_point` refuses
    to resume those)."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir = Path(ckpt_dir)
    return (ckpt_dir.is_dir() and get_last_checkpoint(str(ckpt_dir)) is not None
            and _stored_fingerprint(ckpt_dir) != _as_stored(fingerprint))


def resume_point(ckpt_dir: str | Path, fingerprint: dict) -> str | None:
    """The newest complete checkpoint of an interrupted run *of this same run* (None: a fresh start);
    incomplete ones are set aside (:func:`set_incomplete_checkpoints_aside`). Stores ``fingerprint`` in
    ``ckpt_dir`` and refuses another run's checkpoints with an error (``train.other_run``) that names a free folder.
    Introduced in notebooks/05_lora_finetune.ipynb."""
    from transformers.trainer_utils import get_last_checkpoint

    ckpt_dir, fingerprint = Path(ckpt_dir), _as_stored(fingerprint)
    stored = ckpt_dir / FINGERPRINT_FILE
    old = _stored_fingerprint(ckpt_dir)
    if ckpt_dir.is_dir() and old == fingerprint:
        set_incomplete_checkpoints_aside(ckpt_dir)
    last = get_last_checkpoint(str(ckpt_dir)) if ckpt_dir.is_dir() else None
    if last and old != fingerprint:
        what = ", ".join(k for k in fingerprint if old.get(k) != fingerprint[k])
        base = ckpt_dir.name.removesuffix("-checkpoints")
        free = next(ckpt_dir.with_name(f"{base}-{n}") for n in range(2, 10_000)
                    if not ckpt_dir.with_name(f"{base}-{n}").exists()
                    and not checkpoint_dir_for(ckpt_dir.with_name(f"{base}-{n}")).exists())
        raise TutorialError("train.other_run",
            f"{ckpt_dir} 里的检查点属于另一次训练（不同的：{what}），这次不能接着它训练；那次训练仍可以用原来的设置继续，"
            f"所以这里什么都没有改动。要用新设置训练，换一个适配器目录，例如 {free.name}"
            f"（第 05 课：plan_run(..., adapter_dir=\"{free}\")；train_adapter 也接受 adapter_dir=...）。",
            f"The checkpoints in {ckpt_dir} belong to another run (different {what}); that run can still be resumed "
            f"with its own settings, so nothing was changed. To train with the new settings use another adapter "
            f"folder, for instance {free.name} (lesson 05: plan_run(..., adapter_dir=\"{free}\"); train_adapter takes "
            "adapter_dir=... too).",
            checkpoints=str(ckpt_dir), differs=[k for k in fingerprint if old.get(k) != fingerprint[k]], free=free.name)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    if old != fingerprint:  # all ranks of a torchrun get here at once: a reader sees the whole file or none
        tmp = stored.with_name(f".{stored.name}.{os.getpid()}")
        tmp.write_text(json.dumps(fingerprint, indent=1), "utf-8")
        os.replace(tmp, stored)
    return last


@dataclass(frozen=True)
class RunPlan:
    """Where one LoRA run saves and whether it resumes: what :func:`plan_run` decided."""

    adapter_dir: Path  # the adapter is saved here at the end
    checkpoint_dir: Path  # the Trainer's output_dir: checkpoints while it trains
    fingerprint: dict  # what makes it the same run (:func:`run_fingerprint`)
    resume_from: str | None  # the newest complete checkpoint of this same run; None: a fresh start

    @property
    def resume_step(self) -> int | None:
        """The optimizer step training continues after (None: a fresh start)."""
        return int(Path(self.resume_from).name.rsplit("-", 1)[1]) if self.resume_from else None

    def describe(self) -> str:
        start = f"从第 {self.resume_step} 步继续（{Path(self.resume_from).name}）" if self.resume_from else "从头开始"
        return f"适配器保存到 {self.adapter_dir}，检查点在 {self.checkpoint_dir}；{start}"

    __str__ = describe


def plan_run(choice, settings: TrainSettings, rows: SFTRows, *, adapter_dir: str | Path | None = None,
             overwrite: bool = False, extra: dict | None = None) -> RunPlan:
    """Where this run saves, and whether it resumes. Refuses an ``adapter_dir`` that holds an adapter unless
    ``overwrite`` (:class:`OutputExistsError`); without ``adapter_dir``, picks ``outputs/lora-adapter`` or the next
    free name (:func:`new_adapter_dir`), skipping a name whose checkpoints belong to another run (they are kept).
    Reserves the checkpoint folder for this process, sets incomplete checkpoints aside and resumes only the same
    run (base model, settings, data and ``extra``: :func:`resume_point`). Introduced in
    notebooks/05_lora_finetune.ipynb; :func:`train_adapter` plans with it too."""
    fingerprint = run_fingerprint(choice, settings, rows) | (extra or {})
    if adapter_dir is None:
        adapter_dir = new_adapter_dir(overwrite, fingerprint=fingerprint)
    adapter_dir = Path(adapter_dir)
    if not overwrite:
        refuse_existing(adapter_dir, ("适配器", "adapter"))  # before any training
    ckpt_dir = checkpoint_dir_for(adapter_dir)
    if not claim(ckpt_dir):  # save_total_limit would prune the other run's checkpoints, and both would save here
        raise TutorialError("train.folder_busy",
            f"另一个正在运行的训练在往 {ckpt_dir} 写检查点，两次训练不能共用一个目录。等它结束，或者换一个适配器目录："
            "plan_run(..., adapter_dir=...)，或不传 adapter_dir 自动挑选。",
            f"Another running training is writing checkpoints to {ckpt_dir}; two trainings cannot share one folder. "
            "Wait for it to end, or use another adapter folder: plan_run(..., adapter_dir=...), or pass none to get a "
            "free one.", checkpoints=str(ckpt_dir))
    return RunPlan(adapter_dir, ckpt_dir, fingerprint, resume_point(ckpt_dir, fingerprint))


# --------------------------------------------------------------------------- the recipe as a function (lessons 06, 08)


def lora_config(settings: TrainSettings):
    """The ``LoraConfig`` notebooks/05_lora_finetune.ipynb writes out, from ``settings``."""
    from peft import LoraConfig

    return LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=settings.lora_dropout,
                      target_modules=list(settings.target_modules), bias="none", task_type="CAUSAL_LM")


def mixed_precision(settings: TrainSettings) -> dict:
    """``fp16``/``bf16`` flags: only for QLoRA on a GPU, in the dtype ``helpers.loading.pick_dtype`` gives."""
    import torch

    from helpers.loading import pick_dtype

    amp = torch.cuda.is_available() and settings.quantization is not None
    dtype = pick_dtype("cuda") if amp else torch.float32
    return {"fp16": dtype == torch.float16, "bf16": dtype == torch.bfloat16}


def training_arguments(settings: TrainSettings, checkpoint_dir: str | Path, *, max_steps: int | None = None,
                       args_class=None, **overrides):
    """The ``TrainingArguments`` notebooks/05_lora_finetune.ipynb writes out; ``overrides`` replace single
    arguments, ``args_class`` a subclass (bench/finetune.py: TRL's ``SFTConfig``)."""
    import torch
    from transformers import TrainingArguments

    s, gpu = settings, torch.cuda.is_available()
    kwargs = dict(
        output_dir=str(checkpoint_dir), num_train_epochs=s.num_train_epochs, max_steps=max_steps or s.max_steps,
        per_device_train_batch_size=s.per_device_train_batch_size,
        gradient_accumulation_steps=s.gradient_accumulation_steps,
        per_device_eval_batch_size=s.per_device_eval_batch_size, learning_rate=s.learning_rate,
        lr_scheduler_type=s.lr_scheduler_type, warmup_steps=s.warmup_steps, train_sampling_strategy="group_by_length",
        eval_strategy="steps", eval_steps=s.eval_steps, eval_on_start=True, logging_steps=s.logging_steps,
        save_strategy="steps", save_steps=s.save_steps, save_total_limit=s.save_total_limit,
        dataloader_pin_memory=gpu, report_to="none", seed=s.seed, disable_tqdm=True, **mixed_precision(s))
    kwargs[checkpointing_argument()] = gpu and s.gradient_checkpointing
    return (args_class or TrainingArguments)(**(kwargs | overrides))


def load_base(choice, settings: TrainSettings, *, for_training: bool = True):
    """The base as lesson 05 loads it: QLoRA (``BitsAndBytesConfig`` + ``prepare_model_for_kbit_training``)
    on a GPU, fp32 otherwise. Under FSDP / ZeRO-3 (lesson 08) the 4-bit weights are stored in a float dtype
    and no ``device_map`` is given: see :func:`sharded_training`."""
    import torch
    from transformers import AutoModelForCausalLM

    from helpers.loading import load_model, pick_dtype

    gpu, sharded = torch.cuda.is_available(), sharded_training()
    rank = int(os.environ.get("LOCAL_RANK", 0))
    # Where the weights go. FSDP / ZeRO-3: nowhere in particular, they shard them (ZeRO-3 refuses a device_map);
    # several processes (DDP): one whole copy on each rank's own GPU (device_map="auto" would spread every rank's
    # copy over all GPUs); one process: "auto".
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if not (gpu and settings.quantization):
        place = {} if sharded or not gpu else {"device_map": {"": rank} if several else "auto"}
        return AutoModelForCausalLM.from_pretrained(choice.path, dtype=torch.float32, **place)
    dtype = pick_dtype("cuda")
    storage, place = None, {"device_map": {"": rank}}
    if sharded:
        if settings.quantization != "4bit":
            raise TutorialError("train.fsdp_needs_4bit", "FSDP / ZeRO-3 只能配合 4-bit QLoRA（bnb_4bit_quant_storage），不能配合 8-bit。",
                                          "FSDP / ZeRO-3 work with 4-bit QLoRA (bnb_4bit_quant_storage), not 8-bit.")
        # bitsandbytes' FSDP-QLoRA guide: FSDP shards only float storage, so the packed 4-bit weights are stored in
        # a float dtype, the same as the model's other weights; with fp16 mixed precision, peft's guide says float32.
        storage = torch.float32 if dtype == torch.float16 else dtype
        place = {}  # each rank's GPU is already the current device: TrainingArguments set it (train_adapter)
    model = load_model(choice.path, settings.quantization, dtype, device="cuda", double_quant=True, storage=storage, **place)
    if for_training and sharded:
        # Not prepare_model_for_kbit_training: it casts every weight that is not 4-bit to float32, and FSDP wants
        # one dtype per wrapped layer. What it does for gradient checkpointing is all that is needed here.
        if settings.gradient_checkpointing:
            model.enable_input_require_grads()
    elif for_training:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=settings.gradient_checkpointing)
    return model


def prepare_tokenizer(tokenizer):
    """Pad with ``<unk>``, never with EOS (transformers #23530), on the right for training."""
    tokenizer.pad_token = tokenizer.unk_token
    tokenizer.padding_side = "right"
    return tokenizer


def train_adapter(choice, adapter_dir: str | Path | None = None, *, settings: TrainSettings | None = None,
                  train_file: str | Path = DATA_DIR / "train_sft.csv", dev_file: str | Path = DATA_DIR / "dev_sft.csv",
                  on_bad: str = "stop", overwrite: bool = False, max_steps: int | None = None,
                  limit_rows: int | None = None, callbacks: tuple = (), save: bool = True, verbose: bool = True,
                  args_overrides: dict | None = None):
    """Lesson 05's recipe end to end; returns the ``Trainer`` (``.adapter_dir``, ``.resumed_from``).

    Every bad row is reported before anything is written; an interrupted run of the same run resumes;
    only rank 0 saves (``torchrun``/``accelerate launch``: scripts/train_lora.py). Where it saves and whether it
    resumes: :func:`plan_run` (``adapter_dir`` None: the next free ``outputs/lora-adapter*``).
    Introduced in notebooks/05_lora_finetune.ipynb.
    """
    import torch
    from peft import get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, set_seed

    s = settings or settings_for(choice)
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    start = time.perf_counter()
    tokenizer = prepare_tokenizer(AutoTokenizer.from_pretrained(choice.path))
    train_rows, dev_rows = (validate_sft_file(f, tokenizer, chat_format=choice.chat_format, max_length=s.max_length)
                            for f in (train_file, dev_file))
    train_ds, dev_ds = train_rows.dataset(on_bad=on_bad), dev_rows.dataset(on_bad=on_bad)
    if limit_rows:
        train_ds, dev_ds = (d.select(range(min(limit_rows, len(d)))) for d in (train_ds, dev_ds))
    plan = plan_run(choice, s, train_rows, adapter_dir=adapter_dir, overwrite=overwrite, extra={"limit_rows": limit_rows})
    adapter_dir, ckpt_dir, resumed_from = plan.adapter_dir, plan.checkpoint_dir, plan.resume_from
    set_seed(s.seed)
    overrides = {"eval_on_start": resumed_from is None} | (args_overrides or {})  # a resumed run was evaluated
    # The arguments before the model, as peft's multi-GPU examples do: they set up the processes (each rank's own
    # GPU becomes the current device) and, under ZeRO-3 with zero3_init_flag, let from_pretrained build the model
    # already sharded.
    args = training_arguments(s, ckpt_dir, max_steps=max_steps, **overrides)
    model = get_peft_model(load_base(choice, s), lora_config(s))
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, pad_to_multiple_of=8)
    trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=dev_ds, callbacks=list(callbacks),
                      data_collator=collator)
    if resumed_from and args.world_size > 1 and args.device.type == "cpu":
        allow_indexed_cpu_locations()  # transformers < 5.18 (Colab's 5.15) would fail to load optimizer.pt
    if verbose and resumed_from:
        print(localized(f"从检查点继续训练：{resumed_from}", f"resuming from {resumed_from}"))
    with reporting_full_disk(ckpt_dir, ("检查点", "checkpoints")):
        trainer.train(resume_from_checkpoint=resumed_from)
    dev = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h] or [None]
    info = {"lesson": "notebooks/05_lora_finetune.ipynb", "base_model": choice.path, "model_name": choice.name,
            "chat_format": choice.chat_format, "settings": asdict(s), "train_file": str(train_file),
            "train_rows": len(train_ds), "global_step": trainer.state.global_step, "dev_loss_first": dev[0],
            "dev_loss_last": dev[-1], "log_history": trainer.state.log_history, "resumed_from": resumed_from,
            "seconds": round(time.perf_counter() - start, 1), "created": time.strftime("%Y-%m-%d %H:%M:%S")}
    gathered = adapter_state_dict(trainer) if save else None  # every rank: FSDP / ZeRO-3 shards are gathered
    if save and trainer.is_world_process_zero():
        save_adapter(model, adapter_dir, overwrite=overwrite, info=info, state_dict=gathered)
        if verbose:
            print(localized(f"LoRA 适配器已保存：{adapter_dir}（{info['seconds']} 秒）", f"adapter saved: {adapter_dir} ({info['seconds']} s)"))
    trainer.adapter_dir, trainer.resumed_from, trainer.info = adapter_dir, resumed_from, info
    return trainer


def ensure_adapter(choice) -> Path:
    """The newest adapter lesson 05 made for this base model (:func:`latest_adapter`), or one trained now
    into the next free ``outputs/lora-adapter*`` (:func:`plan_run`).
    Introduced in notebooks/05_lora_finetune.ipynb; used by lesson 06."""
    found = latest_adapter(choice)
    if found:
        return found
    print(localized("还没有第 05 课为这个模型训练的 LoRA 适配器，现在训练一个", "training lesson 05's adapter now"))
    return train_adapter(choice).adapter_dir


def load_with_adapter(choice, adapter_dir: str | Path, *, as_trained: bool = False):
    """Base (loaded as lesson 05 trained it) + adapter, in eval mode, and its tokenizer; ``as_trained`` also
    applies ``prepare_model_for_kbit_training``, so logits compare like with like with the trained model.
    Introduced in notebooks/05_lora_finetune.ipynb; used by lessons 06 and 08."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    if not (Path(adapter_dir) / "adapter_config.json").exists():
        raise TutorialError("adapter.missing",
            f"{adapter_dir} 里没有 adapter_config.json：先运行第 05 课，或调用 ensure_adapter()。",
            f"{adapter_dir} holds no adapter_config.json: run lesson 05 or call ensure_adapter().", adapter_dir=str(adapter_dir))
    base = load_base(choice, settings_for(choice), for_training=as_trained)
    model = PeftModel.from_pretrained(base, str(adapter_dir))
    return model.eval(), prepare_tokenizer(AutoTokenizer.from_pretrained(choice.path))
