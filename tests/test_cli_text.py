"""`cpmgen tokenize` and `cpmgen score`, the vocab checks, and the shipped task configs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from cpmgen.config import Settings, load_settings
from cpmgen.loading import load_model
from cpmgen.score import score_ids
from cpmgen.tokenizer import CPMTokenizer
from cpmgen.window import Window

from corpus import CORPUS, train_test_vocab
from helpers import TINY

# a 31-token window, so that the story slides it several times
ARGS = dataclasses.replace(TINY, max_positions=32)
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def model_dir(model_dir_factory):
    return model_dir_factory("text", ARGS, mp=2, seed=5)


@pytest.fixture
def story(tmp_path):
    path = tmp_path / "story.txt"
    path.write_text(CORPUS[:400], encoding="utf-8")
    return path


def test_tokenize_json(cpmgen_cli, model_dir):
    code, out, _ = cpmgen_cli("tokenize", "今天 天气\n很好", "-m", model_dir, "--json")
    result = json.loads(out)
    tokenizer = CPMTokenizer(model_dir / "chinese_vocab.model")
    assert code == 0
    assert result["ids"] == tokenizer.encode("今天 天气\n很好")
    assert result["pieces"] == tokenizer.pieces(result["ids"])
    assert result["decoded"] == tokenizer.decode(result["ids"])


def test_tokenize_file_and_explicit_vocab(cpmgen_cli, model_dir, story):
    code, out, _ = cpmgen_cli("tokenize", "--file", story, "--vocab", model_dir / "chinese_vocab.model", "--json")
    assert code == 0
    assert json.loads(out)["ids"] == CPMTokenizer(model_dir / "chinese_vocab.model").encode(story.read_text())


def test_tokenize_without_vocab(cpmgen_cli, tmp_path):
    code, _, err = cpmgen_cli("tokenize", "你好")
    assert code == 2
    assert err.strip() == ("error: no vocab file: pass --vocab PATH to chinese_vocab.model (from the bpe_3w_new/ "
                           "folder of the CPM-1-Generate repository)")


def test_score_json_matches_the_model(cpmgen_cli, model_dir, story):
    code, out, _ = cpmgen_cli("score", story, "-m", model_dir, "--json", "--stride", "8")
    assert code == 0
    result = json.loads(out)
    assert set(result) == {"ids", "logprobs", "nll", "perplexity"}
    ids = result["ids"]
    assert len(ids) > 3 * ARGS.max_positions  # several window slides
    assert len(result["logprobs"]) == len(ids) - 1
    assert result["nll"] == pytest.approx(-sum(result["logprobs"]) / len(result["logprobs"]))
    assert result["perplexity"] == pytest.approx(math.exp(result["nll"]))
    # logprobs[i] is log p(ids[i+1] | the window), checked directly for a token inside the first window
    settings = Settings()
    settings.model.path = str(model_dir)
    model = load_model(settings).model
    with torch.inference_mode():
        logits = model(torch.tensor([ids[:10]]), torch.arange(10))[0, -1]
    assert result["logprobs"][9] == pytest.approx(float(torch.log_softmax(logits, -1)[ids[10]]), abs=1e-4)


@pytest.mark.slow
def test_score_fast_equals_slow(model_dir, story):
    settings = Settings()
    settings.model.path = str(model_dir)
    model = load_model(settings).model
    ids = CPMTokenizer(model_dir / "chinese_vocab.model").encode(story.read_text())[:150]
    for stride in (1, 8, 31):
        window = Window(ARGS.max_positions - 1, stride)
        fast, slow = score_ids(model, ids, window, fast=True), score_ids(model, ids, window, fast=False)
        torch.testing.assert_close(torch.tensor(fast), torch.tensor(slow), atol=1e-4, rtol=0)


def test_vocab_size_must_match_the_model(cpmgen_cli, model_dir, story, tmp_path):
    other = train_test_vocab(tmp_path / "other.model", vocab_size=600)
    code, out, err = cpmgen_cli("score", story, "-m", model_dir, "--vocab", other)
    assert code == 2 and out == ""
    assert err.strip() == (f"error: {other}: vocab has 600 pieces but the model {model_dir} has vocab size 1000; "
                           "pass the --vocab the model was trained with")


def test_score_too_short(cpmgen_cli, model_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("", encoding="utf-8")
    code, _, err = cpmgen_cli("score", short, "-m", model_dir)
    assert code == 2
    assert err.strip() == f"error: {short}: the text has 0 token(s); scoring needs at least 2"


@pytest.mark.parametrize("task", ["lyric", "novel"])
def test_shipped_configs_are_the_defaults(cpmgen_env, task):
    shipped = yaml.safe_load((ROOT / "configs" / f"{task}.yaml").read_text(encoding="utf-8"))
    assert shipped == load_settings(task=task).to_dict()


def test_shipped_long_novel_config(cpmgen_env):
    settings = load_settings(str(ROOT / "configs" / "long-novel.yaml"), ["sampling.seed=2"], task="novel")
    assert (settings.generate.max_new_tokens, settings.generate.ignore_eos) == (5000, True)
    assert (settings.sampling.repetition_penalty, settings.sampling.seed) == (1.1, 2)


def test_config_precedence_one_rule(cpmgen_env, monkeypatch, tmp_path):
    """Later wins: ~/.config/cpmgen/config.yaml < $CPMGEN_CONFIG < --config < $CPMGEN_MODEL < --set;
    every file layers over the one before (none replaces another)."""
    import os

    home = Path(os.environ["XDG_CONFIG_HOME"]) / "cpmgen" / "config.yaml"
    home.parent.mkdir(parents=True)
    home.write_text("model:\n  path: /home-config\nwindow:\n  stride: 3\n  keep: 1\ngenerate:\n  num_samples: 2\n")
    env_config = tmp_path / "env.yaml"
    env_config.write_text("model:\n  path: /env-config\nwindow:\n  stride: 5\n")
    cli_config = tmp_path / "cli.yaml"
    cli_config.write_text("window:\n  keep: 2\n")

    assert load_settings().model.path == "/home-config"
    monkeypatch.setenv("CPMGEN_CONFIG", str(env_config))
    settings = load_settings(str(cli_config))
    assert settings.model.path == "/env-config"
    assert (settings.window.stride, settings.window.keep, settings.generate.num_samples) == (5, 2, 2)
    monkeypatch.setenv("CPMGEN_MODEL", "/from-environment")
    assert load_settings(str(cli_config)).model.path == "/from-environment"  # the environment beats files
    assert load_settings(sets=["model.path=/x"]).model.path == "/x"  # the command line beats the environment


@pytest.mark.slow
def test_window_report_buckets_by_position(cpmgen_cli, model_dir, story):
    code, out, _ = cpmgen_cli("score", story, "-m", model_dir, "--json", "--stride", "8", "--window-report",
                              "--keep", "4")
    result = json.loads(out)
    buckets = result["window_report"]
    size = ARGS.max_positions - 1
    assert [b["start"] for b in buckets] == list(range(0, len(result["ids"]), size))
    assert sum(b["tokens"] for b in buckets) == len(result["logprobs"])
    first = result["logprobs"][:size - 1]
    assert buckets[0]["nll"] == pytest.approx(-sum(first) / len(first))
