"""`cpmgen serve`: one loaded model for many clients, in the OpenAI completions shape.

POST /v1/completions (streamed as server-sent events ending with [DONE], or one JSON answer),
GET /v1/models, /health, /metrics (Prometheus text) and the writing page at /. Requests run
as rows of one continuously batched scheduler (batch.py). Errors are JSON with a 4xx status
and a one-line message, never a traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from sse_starlette.sse import EventSourceResponse
from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from cpmgen.batch import QueueFull, Request, Scheduler
from cpmgen.engine import Engine
from cpmgen.errors import UserError

log = logging.getLogger("cpmgen.serve")
STATIC = Path(__file__).parent / "static"
FINISH_REASONS = {"eod": "stop", "stop": "stop", "length": "length", "cancel": "stop"}


@dataclass
class Limits:
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 100_000
    max_tokens: int = 0  # ceiling on max_tokens; 0: none (a request may generate until stopped)


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": None}}, status_code=self.status)


# name: (accepted JSON types, engine option or None when only checked)
FIELDS: dict[str, tuple[tuple[type, ...], Optional[str]]] = {
    "model": ((str,), None), "prompt": ((str, list), None), "stream": ((bool,), None),
    "max_tokens": ((int, type(None)), "max_new_tokens"), "temperature": ((int, float), "temperature"),
    "top_p": ((int, float), "top_p"), "stop": ((str, list, type(None)), "stop"), "seed": ((int, type(None)), "seed"),
    "task": ((str,), None), "top_k": ((int,), "top_k"), "repetition_penalty": ((int, float), "repetition_penalty"),
    "frequency_penalty": ((int, float), "frequency_penalty"), "presence_penalty": ((int, float), "presence_penalty"),
    "keep": ((int,), "keep"), "stride": ((int,), "stride"), "lines": ((int, type(None)), "lines"),
    "greedy": ((bool,), "greedy"), "ignore_eos": ((bool,), "ignore_eos"), "min_tokens": ((int,), "min_new_tokens"),
    # OpenAI fields accepted at the one value cpmgen supports
    "n": ((int,), None), "echo": ((bool,), None), "logprobs": ((type(None),), None), "best_of": ((int,), None),
    "suffix": ((type(None),), None), "user": ((str,), None), "stream_options": ((dict, type(None)), None),
}


def option_names(message: str) -> str:
    """The engine names options as the command line does (--top-p); the API calls them top_p."""
    message = message.replace("--max-new-tokens", "max_tokens")
    return re.sub(r"--([a-z]+(?:-[a-z]+)*)", lambda m: m.group(1).replace("-", "_"), message)


def parse_completion(body: Any, engine: Engine, limits: Limits):
    """(job, prompt ids, task name, stream) from a completions body; ApiError 400 on anything wrong."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise ApiError(400, "prompt: must be text (one string)", "prompt")
    for key, value in body.items():
        if key not in FIELDS:
            raise ApiError(400, f"{key}: unknown field (cpmgen accepts {', '.join(FIELDS)})", key)
        types, _ = FIELDS[key]
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join("null" if t is type(None) else {str: "text", int: "an integer", float: "a number",
                                 bool: "true/false", list: "a list", dict: "an object"}[t] for t in types)
            raise ApiError(400, f"{key}: must be {names}", key)
    for key, allowed in (("n", 1), ("best_of", 1), ("echo", False)):
        if key in body and body[key] != allowed:
            raise ApiError(400, f"{key}: cpmgen supports only {json.dumps(allowed)}", key)
    if len(prompt) > limits.max_prompt_chars:
        raise ApiError(413, f"prompt: {len(prompt)} characters, more than this server's limit of "
                            f"{limits.max_prompt_chars}", "prompt")
    stop = body.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "stop: must be text or a list of texts", "stop")
    max_tokens = body.get("max_tokens")
    if limits.max_tokens and (not max_tokens or max_tokens > limits.max_tokens):
        if max_tokens:
            raise ApiError(400, f"max_tokens: {max_tokens} is above this server's limit of {limits.max_tokens}",
                           "max_tokens")
        max_tokens = limits.max_tokens
    options = {engine_key: body[key] for key, (_, engine_key) in FIELDS.items() if engine_key and key in body}
    options["max_new_tokens"] = max_tokens or 0
    options["stop"] = [stop] if isinstance(stop, str) else list(stop or [])
    task = body.get("task", "novel")
    try:
        job, ids = engine.prepare(prompt, task, **options)
    except UserError as e:
        raise ApiError(400, option_names(str(e))) from None
    return job, ids, task, bool(body.get("stream", False))


class Server:
    def __init__(self, engine: Engine, scheduler: Scheduler, model_name: str, limits: Limits,
                 api_key: Optional[str] = None):
        self.engine, self.scheduler, self.model_name = engine, scheduler, model_name
        self.limits, self.api_key = limits, api_key
        self.started = time.time()
        self.app = Starlette(routes=[
            Route("/", self.page), Route("/health", self.health), Route("/metrics", self.metrics),
            Route("/v1/models", self.models), Route("/v1/completions", self.completions, methods=["POST"]),
        ], exception_handlers={ApiError: lambda request, e: e.response(), 404: self.not_found,
                               405: self.not_allowed, 500: self.internal})

    # ------------------------------------------------------------------ plain routes

    async def page(self, request: HttpRequest) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8")

    async def health(self, request: HttpRequest) -> Response:
        return JSONResponse({"status": "ok", "model": self.model_name, "running": self.scheduler.running,
                             "queued": self.scheduler.queued})

    async def models(self, request: HttpRequest) -> Response:
        self.authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                         "created": int(self.started), "owned_by": "cpmgen"}]})

    async def metrics(self, request: HttpRequest) -> Response:
        self.authorize(request)
        s = self.scheduler
        c = s.counters
        lines = [
            "# HELP cpmgen_requests_total Finished requests by how they ended.",
            "# TYPE cpmgen_requests_total counter",
            *(f'cpmgen_requests_total{{reason="{r}"}} {c[f"requests_{r}"]}'
              for r in ("eod", "stop", "length", "cancel", "error")),
            "# HELP cpmgen_rejected_total Requests refused because the queue was full (429).",
            "# TYPE cpmgen_rejected_total counter", f"cpmgen_rejected_total {c['rejected']}",
            "# HELP cpmgen_prompt_tokens_total Prompt tokens of admitted requests.",
            "# TYPE cpmgen_prompt_tokens_total counter", f"cpmgen_prompt_tokens_total {c['prompt_tokens']}",
            "# HELP cpmgen_completion_tokens_total Tokens generated.",
            "# TYPE cpmgen_completion_tokens_total counter",
            f"cpmgen_completion_tokens_total {c['completion_tokens']}",
            "# HELP cpmgen_steps_total Batch decode steps.",
            "# TYPE cpmgen_steps_total counter", f"cpmgen_steps_total {c['steps']}",
            "# HELP cpmgen_window_slides_total Window slides (each a re-encode of one row).",
            "# TYPE cpmgen_window_slides_total counter", f"cpmgen_window_slides_total {c['slides']}",
            "# HELP cpmgen_batch_rows Requests in the running batch.",
            "# TYPE cpmgen_batch_rows gauge", f"cpmgen_batch_rows {s.running}",
            "# HELP cpmgen_batch_capacity Rows of the batch (--max-batch).",
            "# TYPE cpmgen_batch_capacity gauge", f"cpmgen_batch_capacity {s.max_batch}",
            "# HELP cpmgen_queue_length Requests waiting for a row.",
            "# TYPE cpmgen_queue_length gauge", f"cpmgen_queue_length {s.queued}",
        ]
        return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")

    def authorize(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header Authorization: Bearer KEY",
                           kind="authentication_error")

    async def not_found(self, request, exc) -> Response:
        return ApiError(404, f"{request.url.path}: no such route (see /v1/completions, /v1/models, /health, "
                             "/metrics)").response()

    async def not_allowed(self, request, exc) -> Response:
        return ApiError(405, f"{request.method} {request.url.path}: method not allowed").response()

    async def internal(self, request, exc) -> Response:
        log.exception("request failed", exc_info=exc)
        return ApiError(500, f"internal error: {type(exc).__name__}", kind="server_error").response()

    # ------------------------------------------------------------------ completions

    async def completions(self, request: HttpRequest) -> Response:
        self.authorize(request)
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body_bytes:
            raise ApiError(413, f"request body of {length} bytes is above this server's limit of "
                                f"{self.limits.max_body_bytes}")
        raw = await request.body()
        if len(raw) > self.limits.max_body_bytes:
            raise ApiError(413, f"request body of {len(raw)} bytes is above this server's limit of "
                                f"{self.limits.max_body_bytes}")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not JSON") from None
        job, prompt_ids, task, stream = parse_completion(body, self.engine, self.limits)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        gen = Request(job, prompt_ids, lambda kind, data: loop.call_soon_threadsafe(events.put_nowait, (kind, data)),
                      rid, **({"seed": job.seed} if job.seed is not None else {}))
        try:
            self.scheduler.submit(gen)
        except QueueFull as e:
            raise ApiError(429, f"server busy: {e}", kind="rate_limit_error") from None
        created = int(time.time())
        if stream:
            return EventSourceResponse(self._stream(gen, events, created, task), ping=15)
        return await self._complete(request, gen, events, created, task)

    def _extra(self, gen: Request, completion_tokens: int) -> dict:
        stats = gen.stats
        return {"tokens": completion_tokens, "tokens_per_s": round(stats.tokens_per_s, 2), "slides": stats.slides,
                "seed": gen.seed}

    def _usage(self, gen: Request, completion_tokens: int) -> dict:
        return {"prompt_tokens": len(gen.prompt_ids), "completion_tokens": completion_tokens,
                "total_tokens": len(gen.prompt_ids) + completion_tokens}

    def _chunk(self, gen: Request, created: int, text: str, finish: Optional[str], extra: dict) -> dict:
        return {"id": gen.id, "object": "text_completion", "created": created, "model": self.model_name,
                "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish}], "cpmgen": extra}

    async def _stream(self, gen: Request, events: asyncio.Queue, created: int, task: str):
        count, reason = 0, "cancel"
        try:
            while True:
                kind, data = await events.get()
                if kind == "token":
                    token, text = data
                    count += token is not None
                    extra = self._extra(gen, count)
                    extra["ids"] = [] if token is None else [token]
                    yield {"data": json.dumps(self._chunk(gen, created, text, None, extra), ensure_ascii=False)}
                    continue
                if kind == "error":
                    reason = "error"
                    yield {"data": json.dumps({"error": {"message": data, "type": "server_error", "param": None,
                                                         "code": None}}, ensure_ascii=False)}
                else:
                    reason = data
                    final = self._chunk(gen, created, "", FINISH_REASONS[data], {**self._extra(gen, count),
                                                                                  "stop_reason": data})
                    final["usage"] = self._usage(gen, count)
                    yield {"data": json.dumps(final, ensure_ascii=False)}
                yield {"data": "[DONE]"}
                break
        finally:  # also when the client went away: its row is freed at the next step
            gen.cancel()
            self._log(gen, task, count, reason)

    async def _complete(self, request: HttpRequest, gen: Request, events: asyncio.Queue, created: int,
                        task: str) -> Response:
        texts, ids, reason = [], [], "cancel"
        checked = time.monotonic()
        try:
            while True:
                if time.monotonic() - checked > 1.0:  # a client that went away frees its row
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    checked = time.monotonic()
                try:
                    kind, data = await asyncio.wait_for(events.get(), timeout=1.0)
                except asyncio.TimeoutError:
                    continue
                if kind == "token":
                    token, text = data
                    texts.append(text)
                    if token is not None:
                        ids.append(token)
                elif kind == "error":
                    reason = "error"
                    raise ApiError(500, data, kind="server_error")
                else:
                    reason = data
                    break
        finally:
            gen.cancel()
            self._log(gen, task, len(ids), reason)
        answer = self._chunk(gen, created, "".join(texts), FINISH_REASONS[reason],
                             {**self._extra(gen, len(ids)), "stop_reason": reason, "ids": ids})
        answer["usage"] = self._usage(gen, len(ids))
        return JSONResponse(answer)

    def _log(self, gen: Request, task: str, completion_tokens: int, reason: str) -> None:
        ttft = f"{gen.first_token - gen.submitted:.3f}s" if gen.first_token else "-"
        log.info("%s %s prompt_tokens=%d completion_tokens=%d tokens_per_s=%.1f slides=%d ttft=%s finish=%s",
                 gen.id, task, len(gen.prompt_ids), completion_tokens, gen.stats.tokens_per_s, gen.stats.slides,
                 ttft, reason)


def serve(engine: Engine, host: str, port: int, max_batch: int, max_queue: int, limits: Limits,
          api_key: Optional[str], model_name: str) -> None:
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    scheduler = Scheduler(engine.model, engine.tokenizer, max_batch, max_queue, engine.decode).start()
    server = Server(engine, scheduler, model_name, limits, api_key)
    log.info("serving %s on http://%s:%d/ (max batch %d, queue %d, API key %s)", model_name, host, port, max_batch,
             max_queue, "required" if api_key else "off")
    try:
        uvicorn.run(server.app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        scheduler.close()
