"""`cpmgen serve` as a client sees it: a live server on a random loopback port, driven with
the `openai` client, raw HTTP and a real browser (Debian's chromium through Playwright)."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from helpers import CPM_TINY

openai = pytest.importorskip("openai")

MODEL = CPM_TINY
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, tmp: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("CPMGEN_")}
        env["XDG_CONFIG_HOME"] = str(tmp)
        self.log = open(tmp / "server.log", "w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "cpmgen", "serve", "--model", str(MODEL), "--port",
                                      str(self.port), "--threads", "1", *args], stdout=self.log,
                                     stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 120
        while True:
            assert self.proc.poll() is None, self.logs()
            try:
                urllib.request.urlopen(self.url + "/health", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, self.logs()
                time.sleep(0.2)

    def logs(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text()

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()

    def client(self, key: str = "none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0)

    def post(self, body, key: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
        headers = {"Content-Type": "application/json"}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + "/v1/completions", data=data, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def get(self, path: str, key: str | None = None) -> tuple[int, str]:
        request = urllib.request.Request(self.url + path, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    def wait_idle(self) -> dict:
        """/health once no request runs or waits (a closed stream frees its row at the next step)."""
        deadline = time.monotonic() + 60
        while True:
            health = json.loads(self.get("/health")[1])
            if health["running"] == 0 and health["queued"] == 0 or time.monotonic() > deadline:
                return health
            time.sleep(0.1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    live = LiveServer(tmp_path_factory.mktemp("serve"), "--max-batch", "4", "--max-queue", "4")
    yield live
    live.close()


@pytest.fixture(scope="module")
def locked(tmp_path_factory):
    """One row, one queue place, an API key."""
    live = LiveServer(tmp_path_factory.mktemp("serve-key"), "--max-batch", "1", "--max-queue", "1",
                      "--api-key", "s3cret")
    yield live
    live.close()


def command_run(cpmgen_cli, tmp_path, prompt: str, task: str, *options) -> dict:
    path = tmp_path / f"prompt-{abs(hash((prompt, options)))}.txt"
    path.write_text(prompt, encoding="utf-8")
    code, out, err = cpmgen_cli(task, path, "--model", MODEL, "--json", "--threads", 1, *options)
    assert code == 0, err
    return json.loads(out.splitlines()[-1])


def test_streaming_and_plain_answers_agree_and_count_tokens(server):
    client = server.client()
    plain = client.completions.create(model="cpm-tiny", prompt="今天天气很好", max_tokens=30, seed=7,
                                      extra_body={"ignore_eos": True})
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage.completion_tokens == len(plain.model_extra["cpmgen"]["ids"]) == 30
    assert plain.usage.prompt_tokens == 5 and plain.usage.total_tokens == 35  # the prompt is 5 tokens
    chunks = list(client.completions.create(model="cpm-tiny", prompt="今天天气很好", max_tokens=30, seed=7,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"
    assert [i for c in chunks for i in c.model_extra["cpmgen"].get("ids", [])] == plain.model_extra["cpmgen"]["ids"]
    assert chunks[-1].usage.completion_tokens == 30


def test_raw_sse_ends_with_done(server):
    request = urllib.request.Request(server.url + "/v1/completions", headers={"Content-Type": "application/json"},
                                     data=json.dumps({"prompt": "从前", "max_tokens": 3, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: "):] for line in response.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    final = json.loads(events[-2])
    assert final["choices"][0]["finish_reason"] == "length" and final["usage"]["completion_tokens"] == 3


def test_stop_strings_and_end_of_text_as_the_command(server, cpmgen_cli, tmp_path):
    client = server.client()
    answer = client.completions.create(model="m", prompt="今天天气很好", max_tokens=200, seed=3, stop=["。", "，"])
    command = command_run(cpmgen_cli, tmp_path, "今天天气很好", "novel", "--max-new-tokens", 200, "--seed", 3,
                          "--stop", "。", "--stop", "，")
    assert answer.choices[0].text == command["text"] and answer.choices[0].text[-1] in "。，"
    assert answer.choices[0].finish_reason == "stop" and answer.model_extra["cpmgen"]["stop_reason"] == "stop"
    # seed 1 on this prompt reaches the end of text: finish_reason stop, cpmgen's reason eod
    answer = client.completions.create(model="m", prompt="今天天气很好，我们一起去公园散步。", max_tokens=0, seed=1)
    assert answer.choices[0].finish_reason == "stop" and answer.model_extra["cpmgen"]["stop_reason"] == "eod"


@pytest.mark.parametrize("body, status, message", [
    ({"prompt": 5}, 400, "prompt: must be text (one string)"),
    ({"prompt": ["a", "b"]}, 400, "prompt: must be text (one string)"),
    ({"prompt": " "}, 400, "the prompt is empty; write the opening text (lyric: lines ending with <eod>)"),
    ({"prompt": "a", "temperature": -1}, 400, "temperature -1: must be 0 (greedy) or more"),
    ({"prompt": "a", "top_p": 2}, 400, "top_p 2: must be in (0, 1]; 1 turns nucleus sampling off"),
    ({"prompt": "a", "max_tokens": -1}, 400, "max_tokens -1: must not be negative"),
    ({"prompt": "a", "max_tokens": "9"}, 400, "max_tokens: must be an integer or null"),
    ({"prompt": "a", "task": "poem"}, 400, "task 'poem': choose lyric or novel"),
    ({"prompt": "a", "lines": 2}, 400, "lines: only lyric counts lines; use max_tokens or stop for novel"),
    ({"prompt": "a", "stop": [""]}, 400, "stop '': a stop text must not be empty"),
    ({"prompt": "a", "n": 2}, 400, "n: cpmgen supports only 1"),
    ({"prompt": "a", "colour": 1}, 400, "colour: unknown field"),
])
def test_bad_parameters_are_4xx_with_a_message(server, body, status, message):
    code, answer = server.post(body)
    assert code == status
    assert answer["error"]["message"].startswith(message)


def test_not_json_and_too_long(server):
    assert server.post(None, raw=b"{nope") == (400, {"error": {"message": "the request body is not JSON",
                                                               "type": "invalid_request_error", "param": None,
                                                               "code": None}})
    code, answer = server.post({"prompt": "字" * 100_001})
    assert code == 413 and "limit of 100000" in answer["error"]["message"]
    code, text = server.get("/nowhere")
    assert code == 404 and "no such route" in json.loads(text)["error"]["message"]


def test_a_client_that_goes_away_frees_its_row(server):
    client = server.client()
    stream = client.completions.create(model="m", prompt="今天天气很好", max_tokens=0, seed=2, stream=True,
                                       extra_body={"ignore_eos": True})
    texts = [next(iter(stream)).choices[0].text for _ in range(20)]
    assert len(texts) == 20
    stream.close()
    assert server.wait_idle()["running"] == 0
    # a plain (not streamed) request whose client goes away before the answer
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.request("POST", "/v1/completions", json.dumps({"prompt": "从前", "max_tokens": 0, "ignore_eos": True}),
                       {"Content-Type": "application/json"})
    deadline = time.monotonic() + 30
    while json.loads(server.get("/health")[1])["running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    connection.close()
    assert server.wait_idle()["running"] == 0
    metrics = server.get("/metrics")[1]
    assert "cpmgen_batch_rows 0" in metrics
    assert int(re.search(r'cpmgen_requests_total\{reason="cancel"\} (\d+)', metrics).group(1)) >= 2


def test_models_health_and_metrics(server):
    models = json.loads(server.get("/v1/models")[1])
    assert models["data"][0]["id"] == "cpm-tiny"
    assert json.loads(server.get("/health")[1])["status"] == "ok"
    metrics = server.get("/metrics")[1]
    for name in ("cpmgen_completion_tokens_total", "cpmgen_batch_rows", "cpmgen_queue_length", "cpmgen_steps_total"):
        assert f"# TYPE {name}" in metrics
    assert "prompt_tokens=" in server.logs() and "finish=length" in server.logs()


def test_four_concurrent_streams_each_equal_their_own_command_run(server, cpmgen_cli, tmp_path):
    """Different prompts, settings and seeds, started at different times, each past several
    window slides (cpm-tiny's window is 127 tokens), token for token as `cpmgen novel`/`lyric`."""
    cases = [
        ("今天天气很好，我们一起去公园散步。", {"max_tokens": 300, "seed": 13, "ignore_eos": True},
         ["--max-new-tokens", 300, "--seed", 13, "--ignore-eos"]),
        ("从前有座山，山里有座庙。", {"max_tokens": 260, "seed": 12, "temperature": 1.0, "top_k": 50, "stride": 20,
                             "min_tokens": 200},
         ["--max-new-tokens", 260, "--seed", 12, "--temperature", 1.0, "--top-k", 50, "--stride", 20,
          "--min-new-tokens", 200]),
        ("春天来了<eod>花儿开了<eod>", {"task": "lyric", "max_tokens": 240, "seed": 11, "repetition_penalty": 1.2},
         ["--max-new-tokens", 240, "--seed", 11, "--repetition-penalty", 1.2]),
        ("中国经济发展", {"max_tokens": 280, "seed": 13, "top_p": 0.95, "presence_penalty": 0.3, "keep": 2,
                    "ignore_eos": True},
         ["--max-new-tokens", 280, "--seed", 13, "--top-p", 0.95, "--presence-penalty", 0.3, "--keep", 2,
          "--ignore-eos"]),
    ]
    results = [None] * len(cases)
    first_chunk = [threading.Event() for _ in cases]

    def stream(i):
        prompt, fields, _ = cases[i]
        extra = {k: v for k, v in fields.items() if k not in ("max_tokens", "seed", "temperature", "top_p")}
        chunks = server.client().completions.create(
            model="m", prompt=prompt, stream=True, extra_body=extra,
            **{k: v for k, v in fields.items() if k in ("max_tokens", "seed", "temperature", "top_p")})
        ids, text, slides = [], "", 0
        for chunk in chunks:
            first_chunk[i].set()
            info = chunk.model_extra["cpmgen"]
            ids += info.get("ids", [])
            text += chunk.choices[0].text
            slides = info["slides"]
        results[i] = (ids, text, slides)

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(len(cases))]
    for i, thread in enumerate(threads):
        thread.start()
        assert first_chunk[i].wait(120)  # the next one joins a batch that is already running
    for thread in threads:
        thread.join(300)
    for (prompt, fields, options), (ids, text, slides) in zip(cases, results):
        command = command_run(cpmgen_cli, tmp_path, prompt, fields.get("task", "novel"), *options)
        assert ids == command["ids"] and text == command["text"]
        assert slides == command["stats"]["slides"] >= 2


def test_api_key_required_when_set(locked):
    code, answer = locked.post({"prompt": "今天", "max_tokens": 2})
    assert code == 401 and answer["error"]["message"] == ("missing or wrong API key: send the header "
                                                          "Authorization: Bearer KEY")
    assert locked.post({"prompt": "今天", "max_tokens": 2}, key="wrong")[0] == 401
    assert locked.get("/v1/models")[0] == 401 and locked.get("/metrics")[0] == 401
    assert locked.get("/health")[0] == 200 and locked.get("/")[0] == 200  # the page asks for the key itself
    with pytest.raises(openai.AuthenticationError):
        locked.client("wrong").completions.create(model="m", prompt="今天", max_tokens=2)
    assert locked.client("s3cret").completions.create(model="m", prompt="今天", max_tokens=2).usage.completion_tokens == 2


def test_past_the_queue_limit_429_and_the_queued_request_runs_later(locked):
    client = locked.client("s3cret")
    # no end of text: a sampled <eod> would end it early and free the row before the third request
    running = client.completions.create(model="m", prompt="今天天气很好", max_tokens=0, seed=4, stream=True,
                                        extra_body={"ignore_eos": True})
    next(iter(running))  # holds the only row
    queued_chunks = []
    queued = threading.Thread(target=lambda: queued_chunks.extend(
        client.completions.create(model="m", prompt="从前有座山", max_tokens=5, seed=1, stream=True)))
    queued.start()
    deadline = time.monotonic() + 30
    while json.loads(locked.get("/health")[1])["queued"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with pytest.raises(openai.RateLimitError, match="server busy"):
        client.completions.create(model="m", prompt="今天", max_tokens=2)
    running.close()
    queued.join(60)
    assert queued_chunks[-1].choices[0].finish_reason == "length" and queued_chunks[-1].usage.completion_tokens == 5
    assert "cpmgen_rejected_total 1" in locked.get("/metrics", key="s3cret")[1]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="no chromium here (apt-get install chromium)")
def test_the_page_in_a_browser(server, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        # a fresh profile (Playwright passes it as --user-data-dir)
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True,
            viewport={"width": 900, "height": 800},
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page()
            # cpm-tiny samples <eod> after a few hundred tokens with this seed, under a second in:
            # the page's request goes on past it, so that it is still running when Stop is clicked
            page.route("**/v1/completions", lambda route: route.continue_(
                post_data=json.dumps({**json.loads(route.request.post_data), "ignore_eos": True})))
            page.goto(server.url + "/")
            page.fill("#prompt", "今天天气很好，我们一起去公园散步。")
            page.fill("#max_tokens", "0")  # until Stop
            page.fill("#seed", "5")
            page.click("#generate")
            page.wait_for_function("document.getElementById('new').textContent.length > 20", timeout=60_000)
            first = len(page.text_content("#new"))
            page.wait_for_function(f"document.getElementById('new').textContent.length > {first + 20}",
                                   timeout=60_000)
            page.wait_for_function("/[0-9.]+ tokens\\/s/.test(document.getElementById('status').textContent)")
            assert "window slide" in page.text_content("#status")
            page.click("#stop")
            page.wait_for_function("document.getElementById('generate').disabled === false")
            assert "stopped" in page.text_content("#status") and page.text_content("#error") == ""
            # long Chinese text wraps inside the box instead of running off the page
            assert page.evaluate("(() => { const o = document.getElementById('out');"
                                 " return o.scrollWidth <= o.clientWidth; })()")
            assert page.text_content("#given") == "今天天气很好，我们一起去公园散步。"
            with page.expect_download() as download:
                page.click("#download")
            saved = Path(download.value.path()).read_text(encoding="utf-8")
            assert saved == page.text_content("#given") + page.text_content("#new")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            assert (tmp_path / "page.png").stat().st_size > 10_000
        finally:
            browser.close()
    assert server.wait_idle()["running"] == 0  # Stop closed the stream: the row is free


def test_serve_refuses_bad_options_before_loading(cpmgen_cli):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out, err = cpmgen_cli("serve", "--model", MODEL, "--port", port)
    assert code == 2
    assert err == f"error: --host 127.0.0.1 --port {port}: cannot listen there (Address already in use); choose another --port\n"
    code, out, err = cpmgen_cli("serve", "--model", MODEL, "--max-batch", 0)
    assert (code, err) == (2, "error: --max-batch 0: must be at least 1\n")
