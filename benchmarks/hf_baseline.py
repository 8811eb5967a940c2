"""The HF transformers baseline: a GPT2LMHeadModel holding cpmgen's weights, converted
in-process through cpmgen's own mapping (cpmgen.checkpoint.hf), checked against cpmgen's logits
and greedy tokens, its generate() timed per token like cpmgen's, and what it does past its
1024 positions.

transformers is imported inside hf_model_from_cpmgen only, so importing this module costs
nothing where transformers is not used.
"""

from __future__ import annotations

import time

import torch

from cpmgen.checkpoint.hf import EOS_ID, hf_config, megatron_to_hf
from cpmgen.generate import generate
from cpmgen.model import CPMModel
from timing import TokenClock, rate_figures
from workload import GREEDY, WINDOW, random_ids


def hf_model_from_cpmgen(model: CPMModel, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """A transformers GPT2LMHeadModel holding `model`'s weights in `dtype`, built in-process with
    cpmgen's own mapping (megatron_to_hf renames and transposes the Conv1D weights; hf_config sets
    gelu_new, i.e. tanh GELU, the LayerNorm eps, no dropout, tied output layer).

    `model` must hold the plain CPMModel state: load it with runtime.prepack False and no
    quantization (the packed and int8 forms have no Linear weights to convert). Tensors that
    need no transpose are shared with `model` when it is in `dtype` already. HF masks with the
    dtype's minimum where CPM uses -10000; both give the masked keys a probability of exactly 0.
    `attn_implementation` is "sdpa" or "eager"; choose_attn_implementation times both."""
    from transformers import GPT2Config, GPT2LMHeadModel

    try:
        state = megatron_to_hf({name: tensor.detach().to(dtype) for name, tensor in model.state_dict().items()})
    except ValueError as e:
        raise ValueError(f"{e}: pass a plain CPMModel (runtime.prepack False, runtime.quantize none)") from None
    config = GPT2Config(**hf_config(model.args, dtype), attn_implementation=attn_implementation)
    with torch.device("meta"):  # no random initialisation: every tensor comes from `state`
        hf = GPT2LMHeadModel(config)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    if missing != ["lm_head.weight"] or unexpected:
        raise ValueError(f"HF GPT-2 state mismatch: missing {missing}, unexpected {unexpected}")
    hf.tie_weights()
    if hf.lm_head.weight is not hf.transformer.wte.weight:
        raise ValueError("lm_head.weight is not tied to transformer.wte.weight")
    if hf.config._attn_implementation != attn_implementation:
        raise ValueError(f"asked for {attn_implementation} attention, got {hf.config._attn_implementation}")
    # the ids generate() would otherwise warn about; EOS_ID is CPM's </s>
    hf.generation_config.pad_token_id = EOS_ID
    hf.generation_config.eos_token_id = EOS_ID
    return hf.eval().requires_grad_(False)


def hf_logits_diff(model: CPMModel, hf_model, tokens: int = 64, seed: int = 0) -> dict:
    """Both models on the same random ids, no cache: max |HF - cpmgen| over all logits, the
    largest logit for scale, and the share of positions whose argmax agrees."""
    ids = torch.tensor([random_ids(tokens, model.args.vocab_size, seed)], device=model.word_embeddings.weight.device)
    with torch.inference_mode():
        ours = model(ids, torch.arange(tokens, device=ids.device)).float()
        theirs = hf_model(input_ids=ids).logits.float()
    return {"tokens": tokens, "dtype": str(hf_model.dtype).removeprefix("torch."),
            "attn_implementation": hf_model.config._attn_implementation,
            "max_abs_diff": float((theirs - ours).abs().max()), "max_abs_logit": float(ours.abs().max()),
            "argmax_agree": float((theirs.argmax(-1) == ours.argmax(-1)).float().mean())}


def hf_generate(hf_model, prompt_ids: list[int], new_tokens: int, streamer=None) -> list[int]:
    """Greedy, exactly `new_tokens` new tokens (min_new_tokens keeps EOS from ending it), with cache."""
    ids = torch.tensor([prompt_ids], device=hf_model.device)
    with torch.inference_mode():
        out = hf_model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=new_tokens, min_new_tokens=new_tokens, use_cache=True,
                                pad_token_id=EOS_ID, eos_token_id=EOS_ID, streamer=streamer)
    return out[0, len(prompt_ids):].tolist()


def hf_generate_rate(hf_model, prompt_ids: list[int], new_tokens: int, reps: int = 3) -> dict:
    """HF greedy generate of `new_tokens` tokens after `prompt_ids`, timed per token by a streamer:
    the first token (the prompt's prefill) apart from the `new_tokens - 1` decode steps after it;
    the fastest of `reps` runs, after a short untimed one that takes the one-time costs."""
    hf_generate(hf_model, prompt_ids, 4)
    runs = []
    for _ in range(reps):
        clock = TokenClock()
        start = time.perf_counter()
        hf_generate(hf_model, prompt_ids, new_tokens, clock)
        runs.append([start] + clock.times[1:])  # times[0] is the prompt's put, before the prefill
    return {"impl": "transformers", "dtype": str(hf_model.dtype).removeprefix("torch."),
            "attn_implementation": hf_model.config._attn_implementation, **rate_figures(runs, len(prompt_ids))}


def choose_attn_implementation(hf_model, prompt_ids: list[int], new_tokens: int, reps: int = 3) -> dict:
    """Time hf_generate_rate with "sdpa" and "eager" attention, leave `hf_model` on the faster,
    and return {"attn_implementation": the faster, "rates": both rates}."""
    rates = {}
    for attn in ("sdpa", "eager"):
        hf_model.set_attn_implementation(attn)
        rates[attn] = hf_generate_rate(hf_model, prompt_ids, new_tokens, reps)
    faster = max(rates, key=lambda attn: rates[attn]["tokens_per_s"])
    hf_model.set_attn_implementation(faster)
    return {"attn_implementation": faster, "rates": rates}


def greedy_agreement(model: CPMModel, hf_model, prompt_ids: list[int], new_tokens: int) -> dict:
    """Whether HF's greedy tokens equal cpmgen's (fast path, WINDOW) for `new_tokens` tokens.

    Reported, not asserted: different summation orders can flip a near tie, after which the two
    continuations part for good. HF cannot emit EOS here (min_new_tokens) while cpmgen can;
    with 30000 random-weight logits that matters only if cpmgen picks EOS (id 2)."""
    ours = [tokens[0] for tokens in generate(model, prompt_ids, WINDOW, GREEDY, new_tokens)]
    theirs = hf_generate(hf_model, prompt_ids, new_tokens)
    mismatch = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b), None)
    return {"compared": new_tokens, "equal": ours == theirs, "first_mismatch": mismatch,
            "dtype": str(hf_model.dtype).removeprefix("torch.")}


def hf_past_window(hf_model, prompt_ids: list[int], new_tokens: int) -> dict:
    """What HF generate does when prompt + new tokens pass the model's n_positions (1024): GPT-2
    has no window to slide, so it is expected to fail on the position embedding lookup."""
    positions = len(prompt_ids) + new_tokens
    try:
        hf_generate(hf_model, prompt_ids, new_tokens)
    except Exception as e:  # whatever it raises is the finding
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return {"positions": positions, "fails": True, "error": f"{type(e).__name__}: {message}"}
    return {"positions": positions, "fails": False, "error": ""}
