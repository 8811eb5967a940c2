"""cpm-tiny, the small trained CPM-1 shipped in models/cpm-tiny (tools/train_tiny.py).

It loads like a release (Megatron layout, vocab inside the folder, heads from the stored
Megatron args) and it has learned the language: on held-out text, scored with the generation
window, its perplexity is below half that of a unigram model of the same text. The unigram
is estimated on the scored tokens themselves (maximum likelihood, in-sample), the best any
unigram model can do on them, so the comparison is stricter than against a unigram model
estimated on training text (on heldout.txt: about 550 in-sample against about 1540 for an
add-one unigram of the training tokens). The whole of heldout.txt (~6300 tokens) is scored:
on a short slice an in-sample unigram is unrealistically good (on the first 1500 tokens,
29% of which occur only once there, about 310 against 1570).
"""

from __future__ import annotations

import collections
import math
from pathlib import Path

import pytest

from cpmgen.config import Settings
from cpmgen.inspection import inspect_checkpoint
from cpmgen.loading import load_model
from cpmgen.score import score_ids
from cpmgen.tokenizer import CPMTokenizer, find_vocab
from cpmgen.window import Window

MODEL = Path(__file__).resolve().parent.parent / "models" / "cpm-tiny"


@pytest.fixture(scope="module")
def loaded():
    settings = Settings()
    settings.model.path = str(MODEL)
    return settings, load_model(settings)


@pytest.fixture(scope="module")
def tokenizer():
    return CPMTokenizer(find_vocab(None, None, str(MODEL)))


def test_inspect_reports_the_architecture_heads_included():
    report = inspect_checkpoint(MODEL)
    assert report["problems"] == []
    assert report["format"] == "megatron" and report["mp"] == 1
    assert report["dtype"] == "float16"
    # hidden 192 is no public CPM-1 size: the heads come from the Megatron args in the rank file
    assert (report["num_layers"], report["hidden_size"], report["num_heads"]) == (4, 192, 3)
    assert (report["vocab_size"], report["max_positions"]) == (8000, 128)
    assert report["bytes"] < 8_000_000  # a few MB, committed with the project


def test_loads_through_the_normal_path(loaded, tokenizer):
    _, result = loaded
    assert result.checkpoint.format == "megatron"
    assert (result.args.num_layers, result.args.hidden_size, result.args.num_heads) == (4, 192, 3)
    assert tokenizer.path == MODEL / "chinese_vocab.model"  # --model DIR alone finds the vocab
    assert tokenizer.vocab_size == result.args.vocab_size


def test_heldout_perplexity_is_below_half_the_unigram_perplexity(loaded, tokenizer):
    settings, result = loaded
    ids = tokenizer.encode((MODEL / "heldout.txt").read_text(encoding="utf-8"))
    window = Window.from_settings(settings.window, result.args.max_positions)
    assert len(ids) > 30 * window.size  # several thousand tokens: the score runs far past the window
    logprobs = score_ids(result.model, ids, window, fast=True)
    model_ppl = math.exp(-sum(logprobs) / len(logprobs))

    targets = ids[1:]  # the tokens the model was scored on
    counts = collections.Counter(targets)
    unigram_ppl = math.exp(-sum(math.log(counts[t] / len(targets)) for t in targets) / len(targets))

    assert model_ppl < 0.5 * unigram_ppl, f"cpm-tiny perplexity {model_ppl:.1f}, in-sample unigram {unigram_ppl:.1f}"


@pytest.mark.parametrize("kind", ["dict", "namespace"])
def test_heads_come_from_megatron_args_in_the_rank_file(tmp_path, kind):
    """Megatron stores its training arguments (an argparse Namespace) under `args`; their
    num_attention_heads names the head count that a non-preset hidden size cannot tell."""
    import argparse

    import torch

    from cpmgen.checkpoint import megatron
    from cpmgen.checkpoint.reader import architecture, open_checkpoint
    from cpmgen.config import ModelArgs
    from cpmgen.errors import UserError
    from cpmgen.synthetic import random_state_dict

    args = ModelArgs(num_layers=2, hidden_size=64, num_heads=8, vocab_size=300, max_positions=32)
    (tmp_path / "release").mkdir()
    (tmp_path / megatron.LATEST_FILE).write_text("release\n")
    stored = {"num_attention_heads": 8, "hidden_size": 64}
    state = {"iteration": 0, "mp_world_size": 1, "module": random_state_dict(args),
             "args": stored if kind == "dict" else argparse.Namespace(**stored)}
    torch.save(state, tmp_path / "release" / megatron.rank_file_name(0))
    ckpt = open_checkpoint(tmp_path)
    assert architecture(ckpt) == args
    assert architecture(ckpt, num_heads=4).num_heads == 4  # an explicit model.num_heads still wins
    assert inspect_checkpoint(tmp_path)["num_heads"] == 8

    state.pop("args")
    torch.save(state, tmp_path / "release" / megatron.rank_file_name(0))
    with pytest.raises(UserError, match="number of attention heads"):
        architecture(open_checkpoint(tmp_path))
