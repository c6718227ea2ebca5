"""LoRA runs of the worker (peft), as the train task runs them: one LoRA+ run, and a copy of it resumed mid-way.

The run trains rank-8 adapters on every linear layer of the tiny model, the B matrices at 4x the learning
rate, with eval data and a prompt; it checkpoints at steps 3 and 6. The resumed run starts from a copy of
the step-3 checkpoint on 2 processes (the deepspeed launcher, one row per rank instead of two accumulated)
and must reproduce steps 4-6.
"""

import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from tasks.training.checkpoints import LATEST, check_same_architecture, load_weights, point_latest
from test_worker import make_spec, write_rows
from test_worker_runs import Worker, losses

RANK, ALPHA, RATIO = 8, 64, 4.0


@pytest.fixture(scope="module")
def lora(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora")
    spec = make_spec(
        "lora", tiny_model_dir, write_rows(folder / "train", rows=8, context_length=64, repeated=True),
        folder / "lora", eval_data_dir=write_rows(folder / "eval", rows=2, context_length=64, repeated=True),
        eval_prompts=["What is Tessera?"], duration="6ba", learning_rate=1e-3,
        settings={"save_steps": 3, "micro_batch_size": 1, "global_batch_size": 2, "model.optim.weight_decay": 0.1,
                  "model.peft.peft_scheme": "lora", "model.peft.lora_tuning.rank": RANK,
                  "model.peft.lora_tuning.alpha": ALPHA, "model.peft.lora_tuning.loraplus_lr_ratio": RATIO},
    )
    lines = Worker(spec, folder, "lora").finish()
    # The same run from a copy of its step-3 checkpoint, as if it had been killed after it, on 2 processes.
    resumed = spec.model_copy(update={"run_name": "resumed", "output_dir": folder / "resumed", "processes": 2})
    resumed.output_dir.mkdir()
    shutil.copytree(spec.output_dir / "ep0-ba3", resumed.output_dir / "ep0-ba3")
    point_latest(resumed.output_dir, "ep0-ba3")
    return SimpleNamespace(spec=spec, lines=lines, resumed=resumed,
                           resumed_lines=Worker(resumed, folder, "resumed").finish())


def base_state(model_dir) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).state_dict()


def test_a_lora_run_trains_only_the_adapters_and_learns(lora, tiny_model_dir):
    lines, out = lora.lines, lora.spec.output_dir
    started = lines[0]
    # Per layer, rank x (in + out) for q 64->64, k and v 64->32, o 64->64, gate and up 64->128, down 128->64.
    assert started["trainable_params"] == 2 * RANK * (128 + 96 + 96 + 128 + 3 * 192)
    from transformers import AutoModelForCausalLM

    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_model_dir).parameters())
    assert started["total_params"] == base_params + started["trainable_params"]
    progress = losses(lines)
    assert list(progress) == list(range(1, 7))
    assert progress[6] < progress[1] - 0.25, progress  # it learns (the base, lm_head included, is frozen)
    evals = [m for m in lines if m["kind"] == "eval"]
    assert [m["batch"] for m in evals] == [3, 6] and evals[1]["loss"] < evals[0]["loss"]
    generations = [m for m in lines if m["kind"] == "generations"]
    assert [m["batch"] for m in generations] == [0, 3, 6] and all(len(m["responses"]) == 1 for m in generations)
    assert [m["tag"] for m in lines if m["kind"] == "checkpoint"] == ["ep0-ba3", "ep1-ba6"]

    saved = torch.load(out / "ep1-ba6/mp_rank_00_model_states.pt", weights_only=False)
    weights, base = saved["module"], base_state(tiny_model_dir)
    adapters = {k: v for k, v in weights.items() if ".lora_" in k}
    assert len(adapters) == 2 * 7 * 2 and all(torch.count_nonzero(v) for v in adapters.values())  # B starts at 0
    frozen = {k.removeprefix("base_model.model.").replace(".base_layer.", "."): v
              for k, v in weights.items() if ".lora_" not in k}
    assert frozen.keys() == base.keys()
    for name, tensor in frozen.items():
        assert torch.equal(tensor, base[name]), name  # the base model did not move


def test_loraplus_gives_the_b_matrices_ratio_times_the_learning_rate(lora):
    saved = torch.load(lora.spec.output_dir / "ep1-ba6/mp_rank_00_model_states.pt", weights_only=False)
    groups = saved["optimizer"]["param_groups"]
    assert [(g["lr_scale"], g["weight_decay"], len(g["params"])) for g in groups] == [
        (1.0, 0.1, 14), (RATIO, 0.1, 14)]  # A matrices, B matrices: all matrices, so all decay
    step_6_lr = next(m["lr"] for m in lora.lines if m["kind"] == "progress" and m["batch"] == 6)
    assert groups[0]["lr"] == pytest.approx(step_6_lr)
    assert groups[1]["lr"] == pytest.approx(RATIO * groups[0]["lr"])


def test_the_export_is_the_merged_model_and_the_adapter_reloads(lora, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    export = lora.spec.output_dir / "huggingface/ba6"
    assert {"config.json", "model.safetensors", "tokenizer.json", "adapter"} <= {p.name for p in export.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (export / "adapter").iterdir()}
    merged = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()  # no peft needed
    assert not any(".lora_" in k or "base_layer" in k for k in merged.state_dict())
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, export / "adapter").eval()

    tokenizer = AutoTokenizer.from_pretrained(export)
    inputs = tokenizer(["Tessera is a fine-tuning service"], return_tensors="pt")
    with torch.no_grad():
        want = adapted(**inputs).logits
        got = merged(**inputs).logits
        plain = adapted.get_base_model()
        with adapted.disable_adapter():
            untrained = plain(**inputs).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (got - untrained).abs().max() > 1e-3  # the adapter changed the model
    # The adapter is the checkpoint's: merged weight = base + B @ A x alpha / r.
    weights = torch.load(lora.spec.output_dir / "ep1-ba6/mp_rank_00_model_states.pt", weights_only=False)["module"]
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    a, b = weights[f"{name}.lora_A.default.weight"], weights[f"{name}.lora_B.default.weight"]
    torch.testing.assert_close(
        merged.state_dict()["model.layers.0.self_attn.q_proj.weight"],
        weights[f"{name}.base_layer.weight"] + b @ a * (ALPHA / RANK), atol=1e-6, rtol=0,
    )


def test_a_lora_run_resumes_from_its_checkpoint(lora):
    lines = lora.resumed_lines
    assert lines[0]["resumed_from"] == "ep0-ba3"
    resumed, expected = losses(lines), losses(lora.lines)
    assert list(resumed) == [4, 5, 6]
    for batch, loss in resumed.items():
        assert loss == pytest.approx(expected[batch], rel=1e-5), batch
    assert lines[-1]["kind"] == "finished" and os.readlink(lora.resumed.output_dir / LATEST) == "ep1-ba6"
    assert (lora.resumed.output_dir / "huggingface/ba6/adapter/adapter_config.json").is_file()


def test_init_from_a_lora_checkpoint_gives_its_merged_weights(lora, tiny_model_dir):
    """Continued training from a LoRA run starts from what it registered: the base with the adapters merged in."""
    from transformers import AutoModelForCausalLM

    weights = load_weights(lora.spec.output_dir / LATEST)
    merged = AutoModelForCausalLM.from_pretrained(lora.spec.output_dir / "huggingface/ba6", dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    check_same_architecture(weights, model, lora.spec.output_dir / LATEST, tiny_model_dir)  # base key names
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(weights[name], tensor, atol=1e-6, rtol=0, msg=name)
