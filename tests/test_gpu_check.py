"""bench/gpu_check.py runs on the CPU with the tiny shape (the same code as on a GPU), and the
README/lesson-02 table is rendered from its JSON (helpers.loading.gpu_results_markdown)."""

from __future__ import annotations

import json

import pytest
import torch

from bench import gpu_check, report
from helpers.loading import gpu_results_markdown


@pytest.fixture(scope="module")
def results(tiny_model):
    return gpu_check.run("tiny", new_tokens=8, lora_seq=64, log=lambda *_: None)


def test_every_mode_is_measured(results):
    assert results["machine"]["copy_bandwidth_gb_s"] > 0
    (shape,) = results["shapes"]
    assert [r["mode"] for r in shape["modes"]] == ["full", "8bit", "4bit"]
    for row in shape["modes"]:
        assert row["load_s"] > 0 and row["footprint_gib"] > 0
        paths = {(d["path"], d["batch"]) for d in row["decode"]}
        assert paths == {("generate", 1), ("generate", 8), ("streaming", 1)}
        for d in row["decode"]:
            assert d["tokens_per_s"] > 0
            assert d["share_of_ceiling"] == pytest.approx(d["tokens_per_s"] / d["ceiling_tokens_per_s"], rel=0.02, abs=1e-3)


def test_footprints_are_ordered(results):
    rows = {r["mode"]: r for r in results["shapes"][0]["modes"]}
    assert rows["4bit"]["footprint_gib"] < rows["8bit"]["footprint_gib"] < rows["full"]["footprint_gib"]
    assert rows["4bit"]["weight_bytes_per_step"] < rows["full"]["weight_bytes_per_step"]


def test_lora_step_on_a_4bit_base(results):
    step = results["shapes"][0]["lora_step"]
    assert step["step_s"] > 0 and step["trainable_params"] > 0 and step["seq_len"] == 64
    assert step["training_mode"] and step["gradient_checkpointing"]


def test_lora_step_really_checkpoints(monkeypatch, tmp_path, tiny_model):
    """transformers 5 checkpoints activations only in training mode: with checkpointing active, the
    backward pass recomputes every decoder layer, so each layer's MLP runs twice per step."""
    from transformers import AutoTokenizer
    from transformers.models.llama import modeling_llama

    calls = []
    forward = modeling_llama.LlamaMLP.forward
    monkeypatch.setattr(modeling_llama.LlamaMLP, "forward", lambda self, x: calls.append(self.training) or forward(self, x))
    shape = {**gpu_check.tiny_shape(), "num_hidden_layers": 2}
    gpu_check.save_random_checkpoint(shape, tmp_path, torch.float32, "cpu")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    calls.clear()  # saving ran no forward; count only the two LoRA steps (warm-up and timed)
    row = gpu_check.lora_step(tmp_path, tok, "cpu", torch.float32, seq_len=16)
    assert row["gradient_checkpointing"] and row["training_mode"]
    assert len(calls) == 2 * 2 * 2, f"2 steps x 2 layers x (forward + recompute), got {len(calls)}"
    assert all(calls), "every layer ran in training mode"


def test_table_and_markdown_render_from_json(results, tmp_path):
    text = gpu_check.format_table(results)
    assert "4bit" in text and "LoRA step" in text
    (tmp_path / "gpu-check-cpu.json").write_text(json.dumps(results))
    md = gpu_results_markdown(tmp_path)
    assert md.count("| tiny |") == 6  # three measured rows, three derived T4 rows
    assert "derived" in md and results["machine"]["date"] in md


def test_no_results_says_so(tmp_path):
    assert "No GPU measurement" in gpu_results_markdown(tmp_path)


def test_readme_table_is_generated():
    assert report.main(["--check"]) == 0, "run `python -m bench.report` to regenerate README.md's GPU table"
