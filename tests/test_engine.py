"""The engine (load once, generate, score from Python) and the continuous-batching scheduler.

Batched rows are checked against single runs token for token: requests join a running batch
at different steps, leave at different steps (end of text, max tokens, stop string,
cancellation) and slide their windows many times (cpm-tiny's window is 127 tokens)."""

from __future__ import annotations

import json
import threading

import pytest

from cpmgen.batch import QueueFull, Request, Scheduler
from cpmgen.engine import Engine
from cpmgen.errors import UserError

from helpers import CPM_TINY

MODEL = CPM_TINY

# prompt, task, options: different settings and seeds, all sliding several times
CASES = [
    ("今天天气很好，我们一起去公园散步。", "novel", dict(max_new_tokens=300, seed=1, ignore_eos=True)),
    ("从前有座山，山里有座庙。", "novel", dict(max_new_tokens=260, seed=2, temperature=1.0, top_k=50, stride=20,
                                       min_new_tokens=200)),
    ("春天来了<eod>花儿开了<eod>", "lyric", dict(max_new_tokens=240, seed=3, repetition_penalty=1.2)),
    ("中国经济发展", "novel", dict(max_new_tokens=280, seed=4, top_p=0.95, frequency_penalty=0.3, keep=2,
                             ignore_eos=True)),
]


@pytest.fixture(scope="module")
def engine():
    return Engine.load(str(MODEL), threads=1)


def test_engine_generates_and_scores_as_the_commands_do(engine, cpmgen_cli, tmp_path):
    for prompt, seed in (("今天天气很好", 1), ("从前有座山", 2)):
        result = engine.generate(prompt, max_new_tokens=40, seed=seed)
        (tmp_path / "prompt.txt").write_text(prompt, encoding="utf-8")
        code, out, err = cpmgen_cli("novel", tmp_path / "prompt.txt", "--model", MODEL, "--max-new-tokens", 40,
                                    "--seed", seed, "--json", "--threads", 1)
        assert code == 0, err
        command = json.loads(out.splitlines()[-1])
        assert result.samples[0] == command["ids"] and result.texts[0] == command["text"]
    text = "今天天气很好，我们一起去公园散步。"
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    code, out, err = cpmgen_cli("score", tmp_path / "text.txt", "--model", MODEL, "--json", "--threads", 1)
    assert code == 0, err
    assert engine.score(text)["logprobs"] == json.loads(out)["logprobs"]


def test_engine_refuses_bad_options_with_the_option_named(engine):
    with pytest.raises(UserError, match=r"^--top-p 2: must be in \(0, 1\]"):
        engine.prepare("今天", "novel", top_p=2)
    with pytest.raises(UserError, match="^task 'poem': choose lyric or novel$"):
        engine.prepare("今天", "poem")
    with pytest.raises(UserError, match="^--lines: only lyric counts lines"):
        engine.prepare("今天", "novel", lines=3)
    with pytest.raises(UserError, match="^the prompt is empty"):
        engine.prepare("  ", "novel")
    with pytest.raises(UserError, match="^colour: not an option here"):
        engine.prepare("今天", "novel", colour=1)
    with pytest.raises(UserError, match="^dtype: not an option here"):  # what to load is fixed once loaded
        engine.prepare("今天", "novel", dtype="bf16")


def collect(requests: dict, key, done: threading.Event):
    """An emit callback that records ids, text and the end of request `key`."""
    record = requests.setdefault(key, {"ids": [], "text": "", "end": None})

    def emit(kind, data):
        if kind == "token":
            token, text = data
            if token is not None:
                record["ids"].append(token)
            record["text"] += text
        else:
            record["end"] = (kind, data)
            done.set()
    return emit


@pytest.mark.slow
def test_batched_rows_equal_single_runs(engine):
    singles = [engine.generate(prompt, task, **options) for prompt, task, options in CASES]
    assert all(r.stats.slides >= 2 for r in singles)
    scheduler = Scheduler(engine.model, engine.tokenizer, max_batch=4, max_queue=4)
    records, finished = {}, [threading.Event() for _ in CASES]

    def submit(i):
        prompt, task, options = CASES[i]
        job, ids = engine.prepare(prompt, task, **options)
        emit = collect(records, i, finished[i])
        if i + 1 < len(CASES):  # the next request joins after this one's 15th token, mid-batch
            def chained(kind, data, emit=emit, i=i):
                emit(kind, data)
                if kind == "token" and len(records[i]["ids"]) == 15:
                    submit(i + 1)
            scheduler.submit(Request(job, ids, chained, seed=job.seed))
        else:
            scheduler.submit(Request(job, ids, emit, seed=job.seed))

    scheduler.start()
    try:
        submit(0)
        for event in finished:
            assert event.wait(300)
    finally:
        scheduler.close()
    for i, single in enumerate(singles):
        assert records[i]["ids"] == single.samples[0], f"request {i} differs from its single run"
        assert records[i]["text"] == single.texts[0]
        assert records[i]["end"] == ("done", single.stop_reasons[0])
    assert scheduler.counters["slides"] == sum(r.stats.slides for r in singles)


def test_a_cancelled_row_leaves_and_the_queue_has_a_limit(engine):
    scheduler = Scheduler(engine.model, engine.tokenizer, max_batch=1, max_queue=1)
    job, ids = engine.prepare("今天天气很好", "novel", max_new_tokens=0, seed=5)  # until stopped
    records, done = {}, [threading.Event(), threading.Event()]
    first = Request(job, ids, collect(records, 0, done[0]), seed=5)
    second = Request(engine.prepare("今天天气很好", "novel", max_new_tokens=5, seed=6)[0], ids, collect(records, 1, done[1]), seed=6)
    scheduler.submit(first)
    scheduler.submit(second)  # queued: the only row is taken
    with pytest.raises(QueueFull):
        scheduler.submit(Request(job, ids, lambda kind, data: None))
    scheduler.start()
    try:
        first.cancel()
        assert done[0].wait(60) and records[0]["end"] == ("done", "cancel")
        assert done[1].wait(60) and records[1]["end"] == ("done", "length")
    finally:
        scheduler.close()
    assert len(records[1]["ids"]) == 5
    assert records[1]["ids"] == engine.generate("今天天气很好", max_new_tokens=5, seed=6).samples[0]
    assert scheduler.running == 0 and scheduler.counters["requests_cancel"] == 1
