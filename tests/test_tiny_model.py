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
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from cpmgen.config import Settings
from cpmgen.inspection import inspect_checkpoint
from cpmgen.loading import load_model
from cpmgen.score import score_ids
from cpmgen.tokenizer import CPMTokenizer, find_vocab
from cpmgen.window import Window

MODEL = Path(__file__).resolve().parent.parent / "models" / "cpm-tiny"
EOD_SEED = 2  # a seed at which the model writes end of text within 400 tokens of PROMPT


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
    assert (report["num_layers"], report["hidden_size"], report["num_heads"]) == (4, 192, 4)
    assert (report["vocab_size"], report["max_positions"]) == (8000, 128)
    assert report["bytes"] < 8_000_000  # a few MB, committed with the project


def test_loads_through_the_normal_path(loaded, tokenizer):
    _, result = loaded
    assert (result.args.num_layers, result.args.hidden_size, result.args.num_heads) == (4, 192, 4)
    assert tokenizer.path == MODEL / "chinese_vocab.model"  # --model DIR alone finds the vocab
    assert tokenizer.vocab_size == result.args.vocab_size


@pytest.mark.slow
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
    import dataclasses

    import torch

    from cpmgen.checkpoint import megatron
    from cpmgen.checkpoint.reader import architecture, open_checkpoint
    from cpmgen.errors import UserError
    from cpmgen.synthetic import random_state_dict
    from helpers import TINY

    args = dataclasses.replace(TINY, num_heads=8)  # not TINY's 4, which the explicit count below gives
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


# ----------------------------------------------------------------------------- every command on the shipped model

PROMPT = "新华社北京一月五日电"


def _json(cpmgen_cli, *args):
    result = cpmgen_cli(*args, "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_ignore_eos_writes_on_past_several_windows(cpmgen_cli, tokenizer):
    """At this seed the model ends its text early; with --ignore-eos the same tokens come, then
    the end of text (kept in the window, shown as a line break) and the rest, window after window,
    the fast path token for token the slow one."""
    common = ["novel", "-m", MODEL, "-p", PROMPT, "-n", "400", "-s", str(EOD_SEED)]
    ended = _json(cpmgen_cli, *common)
    assert ended["stop_reason"] == "eod" and len(ended["ids"]) < 400
    on = _json(cpmgen_cli, *common, "--ignore-eos")
    assert on["stop_reason"] == "length" and len(on["ids"]) == 400 and on["stats"]["slides"] >= 3
    n = len(ended["ids"])
    assert on["ids"][:n] == ended["ids"] and on["ids"][n] == tokenizer.eod_id
    assert on["text"].startswith(ended["text"] + "\n")
    slow = _json(cpmgen_cli, *common, "--ignore-eos", "--no-fast", "-n", "200")
    assert slow["ids"] == on["ids"][:200]
    # --min-new-tokens: an end of text before that many tokens is passed over the same way
    at_least = _json(cpmgen_cli, *common, "--min-new-tokens", str(n + 1))
    assert at_least["ids"][:n + 1] == on["ids"][:n + 1] and len(at_least["ids"]) > n + 1


@pytest.mark.slow
def test_reshard_2_and_4_and_mp2_generation_on_the_shipped_model(cpmgen_cli, tmp_path):
    for mp in (2, 4):
        result = cpmgen_cli("reshard", "-m", MODEL, "--mp", mp, "-o", tmp_path / f"mp{mp}")
        assert result.code == 0, result.stderr
        report = json.loads(cpmgen_cli("inspect-ckpt", tmp_path / f"mp{mp}", "--json").stdout)
        assert (report["mp"], report["num_heads"], report["problems"]) == (mp, 4, [])
    single = _json(cpmgen_cli, "novel", "-m", MODEL, "-p", PROMPT, "-n", "40", "-s", "3", "--ignore-eos")
    proc = subprocess.run([sys.executable, "-m", "cpmgen", "novel", "-m", str(tmp_path / "mp2"), "-p", PROMPT,
                           "-n", "40", "-s", "3", "--ignore-eos", "--mp", "2", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["ids"] == single["ids"]


@pytest.mark.slow
def test_convert_round_trip_on_the_shipped_model(cpmgen_cli, tmp_path):
    assert cpmgen_cli("convert", "-m", MODEL, "--to", "hf", "-o", tmp_path / "hf").code == 0
    assert cpmgen_cli("convert", "-m", tmp_path / "hf", "--to", "megatron", "--mp", "2", "-o", tmp_path / "back").code == 0
    ids = [_json(cpmgen_cli, "novel", "-m", folder, "-p", PROMPT, "-n", "30", "--greedy")["ids"]
           for folder in (MODEL, tmp_path / "hf", tmp_path / "back")]
    assert ids[0] == ids[1] == ids[2]
