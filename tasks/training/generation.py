"""Answers to the run's eval prompts, sampled from the current weights: what `generations` lines report."""

import torch


@torch.no_grad()
def answer(engine, tokenizer, prompts: list[str], seed: int, device: torch.device, synced: bool) -> list[str]:
    """Sample an answer to each prompt with the anchor's settings, seeded, leaving the training RNG untouched.

    The same seed at every checkpoint makes answers differ only because the weights did.
    """
    engine.eval()
    responses = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for prompt in prompts:
            if tokenizer.chat_template:
                messages = [{"role": "user", "content": prompt}]
                inputs = tokenizer.apply_chat_template(
                    messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
                )
            else:
                inputs = tokenizer(prompt, return_tensors="pt")
            inputs = inputs.to(device)
            output = engine.module.generate(
                **inputs,
                max_new_tokens=100,
                do_sample=True,
                temperature=1.0,
                top_k=50,
                top_p=0.95,
                pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
                synced_gpus=synced,
            )
            responses.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
    engine.train()
    return responses
