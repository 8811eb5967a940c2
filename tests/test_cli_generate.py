"""`cpmgen lyric` / `cpmgen novel` end to end: JSON, streaming, files, Ctrl-C, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import TINY


@pytest.fixture(scope="module")
def model_dir(model_dir_factory):
    return model_dir_factory("gen", seed=3)


@pytest.mark.slow
@pytest.mark.parametrize("task", ["lyric", "novel"])
def test_json_fast_equals_no_fast_past_the_window(cpmgen_cli, model_dir, prompt_file, task):
    common = [task, prompt_file, "-m", model_dir, "--json", "--seed", "5", "--stride", "8",
              "--max-new-tokens", "150"]
    code, out, _ = cpmgen_cli(*common)
    assert code == 0
    fast = json.loads(out)
    code, out, _ = cpmgen_cli(*common, "--no-fast")
    slow = json.loads(out)
    assert fast["ids"] == slow["ids"] and fast["text"] == slow["text"]
    assert set(fast) >= {"task", "prompt_ids", "ids", "text", "stats"}
    assert set(fast["stats"]) == {"new_tokens", "seconds", "tokens_per_s", "slides", "prefill_tokens"}
    assert fast["task"] == task
    if fast["stop_reason"] == "length":
        assert len(fast["ids"]) == 150 and fast["stats"]["slides"] >= 3


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [["--quantize", "int8"], ["--quantize", "int4"], ["--set", "runtime.prepack=false"],
                                     ["--kv-cache-dtype", "bf16"], ["--quantize", "int8", "--kv-cache-dtype", "fp32"]],
                         ids=["int8", "int4", "plain-linears", "bf16-kv-cache", "int8-fp32-kv-cache"])
def test_other_kernels_fast_equal_no_fast(cpmgen_cli, model_dir, prompt_file, kernels):
    common = ["novel", prompt_file, "-m", model_dir, "--json", "--seed", "5", "--stride", "8",
              "--max-new-tokens", "100", *kernels]
    code, out, _ = cpmgen_cli(*common)
    assert code == 0
    code, slow, _ = cpmgen_cli(*common, "--no-fast")
    assert json.loads(out)["ids"] == json.loads(slow)["ids"]


def test_num_samples_gives_a_list(cpmgen_cli, model_dir, prompt_file):
    code, out, _ = cpmgen_cli("lyric", prompt_file, "-m", model_dir, "--json", "--seed", "1",
                       "--num-samples", "3", "--max-new-tokens", "20")
    samples = json.loads(out)
    assert code == 0 and isinstance(samples, list) and len(samples) == 3
    assert len({tuple(s["ids"]) for s in samples}) > 1


def test_out_seq_length_is_the_total_length(cpmgen_cli, model_dir, prompt_file):
    code, out, _ = cpmgen_cli("lyric", prompt_file, "-m", model_dir, "--json", "--greedy",
                       "--out-seq-length", "40")
    result = json.loads(out)
    assert len(result["prompt_ids"]) + len(result["ids"]) == 40


def test_streamed_text_equals_the_full_decode(cpmgen_cli, model_dir, prompt_file, tmp_path):
    """Not a terminal: plain streamed text, which must equal the typed prompt and the decoded ids
    in the JSON, and the --output file."""
    common = ["novel", prompt_file, "-m", model_dir, "--seed", "9", "--max-new-tokens", "80"]
    code, streamed, _ = cpmgen_cli(*common, "--output", tmp_path / "out.txt")
    assert code == 0
    code, out, _ = cpmgen_cli(*common, "--json")
    result = json.loads(out)
    from cpmgen.tokenizer import CPMTokenizer

    tokenizer = CPMTokenizer(model_dir / "chinese_vocab.model")
    # the prompt is echoed as typed (pieces between <eod> joined), not re-decoded: 岗 is not in
    # this small vocab, and a re-decode would show it as ⁇
    assert streamed == "春天的风吹过山岗我们一起唱歌" + result["text"] + "\n"
    assert result["text"] == tokenizer.decode([i for i in result["ids"] if i != tokenizer.eod_id])
    assert (tmp_path / "out.txt").read_text(encoding="utf-8") == streamed


def test_stdin_input(cpmgen_cli, monkeypatch, model_dir):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("从前有一座山"))
    code, out, _ = cpmgen_cli("novel", "-", "-m", model_dir, "--json", "--greedy",
                       "--max-new-tokens", "5")
    assert code == 0 and len(json.loads(out)["ids"]) <= 5


def test_config_file_and_model_from_environment(cpmgen_cli, monkeypatch, model_dir, prompt_file, tmp_path):
    config = tmp_path / "novel.yaml"
    config.write_text("generate:\n  max_new_tokens: 7\n  json: true\nsampling:\n  greedy: true\n")
    monkeypatch.setenv("CPMGEN_MODEL", str(model_dir))
    code, out, _ = cpmgen_cli("novel", prompt_file, "--config", config)
    assert code == 0
    result = json.loads(out)
    assert result["stop_reason"] == "eod" or len(result["ids"]) == 7


BAD = [
    (["--max-new-tokens", "-1"], "error: --max-new-tokens -1: must not be negative"),
    (["--out-seq-length", "-5"], "error: --out-seq-length -5: must not be negative"),
    (["--top-p", "0"], "error: --top-p 0.0: must be in (0, 1]; 1 turns nucleus sampling off"),
    (["--top-p", "1.5"], "error: --top-p 1.5: must be in (0, 1]; 1 turns nucleus sampling off"),
    (["--set", "window.strid=3"], "error: --set window.strid=3: unknown key window.strid; valid keys: "
                                  "window.size, window.stride, window.keep"),
    (["--num-samples", "0"], "error: --num-samples 0: must be at least 1"),
    (["--stride", "0"], "error: --stride 0: must be at least 1"),
    (["--quantize", "int3"], "error: --quantize int3: choose none, int8 or int4"),
    (["--kv-cache-dtype", "int8"], "error: --kv-cache-dtype int8: choose auto, fp32, bf16 or fp16 (or float32, "
                                   "bfloat16, float16)"),
    (["--kv-cache-dtype", "fp16", "--device", "cpu"],
     "error: --kv-cache-dtype fp16: the CPU's attention reads fp32 or bf16 caches; choose bf16"),
]


@pytest.mark.parametrize("extra, message", BAD)
def test_bad_options(cpmgen_cli, model_dir, prompt_file, extra, message):
    code, out, err = cpmgen_cli("novel", prompt_file, "-m", model_dir, *extra)
    assert code == 2
    assert err.strip() == message
    assert out == ""


def test_empty_input(cpmgen_cli, model_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text(" <eod>\n<eod>", encoding="utf-8")
    code, _, err = cpmgen_cli("lyric", empty, "-m", model_dir)
    assert code == 2
    assert err.strip() == f"error: {empty}: the prompt is empty; write the opening text (lyric: lines ending with <eod>)"


def test_non_utf8_input(cpmgen_cli, model_dir, tmp_path):
    gbk = tmp_path / "gbk.txt"
    gbk.write_bytes("春天的风".encode("gbk"))
    output = tmp_path / "out.txt"
    code, _, err = cpmgen_cli("novel", gbk, "-m", model_dir, "--output", output)
    assert code == 2
    assert err.strip() == (f"error: {gbk}: input file is not valid UTF-8 (byte 0); convert it, "
                           "e.g. iconv -f GBK -t UTF-8")
    assert not output.exists()


def test_missing_model_path(cpmgen_cli, prompt_file):
    code, _, err = cpmgen_cli("novel", prompt_file)
    assert code == 2
    assert err.strip() == "error: no model folder: pass --model DIR, set model.path in a config, or export CPMGEN_MODEL=DIR"


@pytest.mark.slow
def test_ctrl_c_keeps_what_was_generated(cpmgen_env, model_dir, prompt_file, tmp_path):
    """Unlimited generation, interrupted: exit 130, the text so far printed and saved.
    (lyric: a generated <eod> is a line break, so nothing but Ctrl-C ends it)"""
    output = tmp_path / "story.txt"
    env = dict(os.environ)  # cpmgen_env has cleared CPMGEN_* and any user config
    proc = subprocess.Popen([sys.executable, "-m", "cpmgen", "lyric", str(prompt_file), "-m", str(model_dir),
                             "--max-new-tokens", "0", "--output", str(output), "--seed", "2", "--stride", "16",
                             "--temperature", "3"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = b""
    while len(first) < 300:  # the prompt and some generated text have streamed (raw reads: communicate() bypasses buffers)
        first += os.read(proc.stdout.fileno(), 4096)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err.decode()
    assert b"Traceback" not in err
    streamed = (first + rest).decode("utf-8")
    assert output.read_text(encoding="utf-8") == streamed
    assert len(first + rest) > 300


@pytest.mark.slow
def test_stop_string_ends_on_the_token_that_completes_it(cpmgen_cli, model_dir, prompt_file):
    from cpmgen.tokenizer import CPMTokenizer

    tokenizer = CPMTokenizer(model_dir / "chinese_vocab.model")
    common = ["novel", prompt_file, "-m", model_dir, "--json", "--seed", "3", "--max-new-tokens", "60"]
    code, out, _ = cpmgen_cli(*common)
    free = json.loads(out)
    # choose as stop text the decoded text of generated tokens 10..11: the run must end on token 11
    stop = tokenizer.decode(free["ids"][10:12])
    assert stop and stop not in tokenizer.decode(free["ids"][:11])
    code, out, _ = cpmgen_cli(*common, "--stop", stop, "--stop", "never-generated-text")
    stopped = json.loads(out)
    assert code == 0 and stopped["stop_reason"] == "stop"
    assert stopped["ids"] == free["ids"][:12]
    assert stopped["text"].endswith(stop)


@pytest.mark.slow
@pytest.mark.parametrize("seed", ["1", "4"])
def test_lyric_lines_counts_every_line_break_shown(cpmgen_cli, model_dir, prompt_file, seed):
    """--lines N ends once the new text shows N line breaks: a generated <eod> (id 7) and the
    newline piece ▃ (id 3) both show as one, so both count."""
    code, out, _ = cpmgen_cli("lyric", prompt_file, "-m", model_dir, "--json", "--seed", seed,
                              "--temperature", "2", "--lines", "3", "--max-new-tokens", "0")
    result = json.loads(out)
    assert code == 0 and result["stop_reason"] == "lines"
    assert result["text"].count("\n") == 3 and result["text"].endswith("\n")
    assert result["ids"].count(7) + result["ids"].count(3) == 3 and result["ids"][-1] in (3, 7)


def test_keep_longer_than_the_prompt(cpmgen_cli, model_dir, prompt_file):
    code, _, err = cpmgen_cli("novel", prompt_file, "-m", model_dir, "--keep", "40")
    assert code == 2 and err.startswith("error: --keep 40: the prompt has only ")


@pytest.mark.slow
def test_keep_fast_equals_slow_via_the_cli(cpmgen_cli, model_dir, prompt_file):
    common = ["lyric", prompt_file, "-m", model_dir, "--json", "--seed", "8", "--stride", "8", "--keep", "6",
              "--max-new-tokens", "150"]
    fast = json.loads(cpmgen_cli(*common).stdout)
    slow = json.loads(cpmgen_cli(*common, "--no-fast").stdout)
    assert fast["ids"] == slow["ids"] and fast["stats"]["slides"] >= 3


def test_prompt_longer_than_the_window_is_cut_with_a_warning(cpmgen_cli, model_dir, tmp_path):
    from corpus import CORPUS

    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text(CORPUS[:600], encoding="utf-8")
    code, out, err = cpmgen_cli("novel", long_prompt, "-m", model_dir, "--json", "--greedy",
                                "--max-new-tokens", "5")
    assert code == 0
    prompt_ids = json.loads(out)["prompt_ids"]
    assert len(prompt_ids) > TINY.max_positions
    assert err.strip() == (f"warning: the prompt has {len(prompt_ids)} tokens, more than the "
                           f"{TINY.max_positions - 1}-token window; keeping its last part")


# ----------------------------------------------------------------------------- the flags people type


def _run_json(cpmgen_cli, *args):
    result = cpmgen_cli(*args, "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
def test_prompt_option_and_piped_stdin_equal_a_prompt_file(cpmgen_cli, monkeypatch, model_dir, prompt_file):
    import io

    common = ["-m", model_dir, "-s", "4", "-n", "12"]
    from_file = _run_json(cpmgen_cli, "novel", prompt_file, *common)
    text = prompt_file.read_text(encoding="utf-8")
    assert _run_json(cpmgen_cli, "novel", "-p", text, *common)["ids"] == from_file["ids"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))  # piped: not a terminal, no '-' needed
    assert _run_json(cpmgen_cli, "novel", *common)["ids"] == from_file["ids"]


def test_prompt_text_given_as_a_file_name_says_how(cpmgen_cli, model_dir):
    code, out, err = cpmgen_cli("novel", "今天天气很好", "-m", model_dir)
    assert code == 2 and out == ""
    assert err.strip() == "error: 今天天气很好: input file not found; to give the prompt text itself, use -p/--prompt TEXT"


@pytest.mark.slow
def test_temperature_0_is_greedy_and_dtype_accepts_torch_names(cpmgen_cli, model_dir, prompt_file):
    common = ["novel", prompt_file, "-m", model_dir, "-n", "20"]
    greedy = _run_json(cpmgen_cli, *common, "--greedy", "-s", "1")
    assert _run_json(cpmgen_cli, *common, "--temperature", "0", "-s", "2")["ids"] == greedy["ids"]
    assert _run_json(cpmgen_cli, *common, "--greedy", "--dtype", "float32")["ids"] == greedy["ids"]


@pytest.mark.slow
def test_sample_k_of_a_batch_is_the_single_run_with_seed_s_plus_k(cpmgen_cli, model_dir, prompt_file):
    common = ["novel", prompt_file, "-m", model_dir, "-n", "30", "--stride", "8"]
    batch = _run_json(cpmgen_cli, *common, "-s", "7", "--num-samples", "3")
    assert [s["seed"] for s in batch] == [7, 8, 9]
    for k, sample in enumerate(batch):
        assert _run_json(cpmgen_cli, *common, "-s", str(7 + k))["ids"] == sample["ids"]


def test_out_seq_length_with_max_new_tokens_is_an_error(cpmgen_cli, model_dir, prompt_file):
    code, out, err = cpmgen_cli("novel", prompt_file, "-m", model_dir, "--out-seq-length", "40", "-n", "5")
    assert code == 2 and out == ""
    assert err.strip() == "error: --out-seq-length and --max-new-tokens both set the length; give one of them"


@pytest.mark.parametrize("extra, words", [
    (["-n", "9"], "Stopped: reached the limit of 9 new tokens."),
    pytest.param(["-n", "0", "--lines", "1"], "Stopped: wrote 1 line(s) (--lines).", marks=pytest.mark.slow),
])
def test_plain_run_says_why_it_stopped(cpmgen_cli, model_dir, prompt_file, extra, words):
    code, out, err = cpmgen_cli("lyric", prompt_file, "-m", model_dir, "-s", "3", "--temperature", "2", *extra)
    assert code == 0
    assert err.strip().startswith("done: ") and err.strip().endswith(words)


def test_stop_text_reason_in_words(cpmgen_cli, model_dir, prompt_file):
    first = _run_json(cpmgen_cli, "novel", prompt_file, "-m", model_dir, "-s", "3", "-n", "30")
    stop = first["text"][5:7]
    code, _, err = cpmgen_cli("novel", prompt_file, "-m", model_dir, "-s", "3", "-n", "30", "--stop", stop)
    assert code == 0 and err.strip().endswith("Stopped: wrote a --stop text.")


def test_version(cpmgen_cli):
    from importlib.metadata import version

    code, out, _ = cpmgen_cli("--version")
    assert code == 0 and out.strip() == f"cpmgen {version('cpmgen')}"


COMMANDS = ["lyric", "novel", "score", "tokenize", "inspect-ckpt", "reshard", "convert"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_the_model_the_same_way_and_only_options_the_command_takes(cpmgen_cli, command):
    code, out, _ = cpmgen_cli(command, "--help")
    assert code == 0
    assert "--model" in out and "-m" in out
    assert not any(kind in out for kind in ("<int>", "<float>", "<list[str]>"))  # options show what they take
    rejected = {"novel": ["--lines"], "lyric": ["--ignore-eos", "--min-new-tokens"]}.get(command, [])
    assert not any(option in out for option in rejected)
    if command in ("lyric", "novel"):
        for panel in ("Input", "Generation", "Sampling", "Window", "Model & runtime", "Output", "Examples"):
            assert panel in out
        assert "default: generate." not in out and "[default: 0.9]" in out


def test_model_option_and_positional_folder_are_the_same(cpmgen_cli, model_dir, tmp_path):
    by_option = json.loads(cpmgen_cli("inspect-ckpt", "-m", model_dir, "--json").stdout)
    assert by_option == json.loads(cpmgen_cli("inspect-ckpt", model_dir, "--json").stdout)
    code, _, err = cpmgen_cli("inspect-ckpt", model_dir, "-m", tmp_path, "--json")
    assert code == 2 and err.startswith("error: the model folder is given twice")


def test_interactive_loop_ctrl_c_at_the_prompt(monkeypatch):
    """Ctrl-C once at the prompt says how to quit and asks again; twice in a row quits; a typed
    \\n in a lyric prompt starts a new line (<eod>)."""
    from cpmgen import cli, console

    answers = iter([KeyboardInterrupt, "春天<eod>夏天\\n秋天", KeyboardInterrupt, KeyboardInterrupt, "never read"])

    def fake_input(prompt):
        answer = next(answers)
        if answer is KeyboardInterrupt:
            raise KeyboardInterrupt
        return answer

    monkeypatch.setattr(console.stderr, "input", fake_input)
    assert list(cli._Terminal("lyric")) == ["春天<eod>夏天<eod>秋天"]
    assert next(answers) == "never read"
