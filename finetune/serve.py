"""An OpenAI-compatible OCR server: `ocrtune serve --model M [--adapter DIR] [--port N]`.

    ocrtune serve --model builtin:tiny-random-deepseek-ocr-2 --adapter runs/tiny/adapter --port 8000
    python -c "from openai import OpenAI; c = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x'); ..."

POST /v1/chat/completions with one user message whose content holds a text part (the
instruction; `<image>\\n` is put in front unless the text has it) and an `image_url` part:
a base64 `data:image/...` URL, or a path inside `--image-root` (default: the current folder).
Non-streaming answers carry `usage`; `"stream": true` answers are server-sent events ending
with `data: [DONE]`. GET /v1/models lists the served model. Decoding is the one eval uses
(greedy, the repetition guard, the same sequence builder), so a served prediction equals
the local one. Requests that arrive together (within `--batch-wait-ms`) are generated as one
batch. Malformed requests get a 4xx JSON error and the server keeps serving.
"""

from __future__ import annotations

import base64
import binascii
import json
import queue
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from finetune.decoding import NO_REPEAT_NGRAM, NO_REPEAT_WINDOW


class RequestError(ValueError):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


@dataclass
class OcrRequest:
    image: object  # PIL image, already through data_prep's safe loader
    prompt: str
    max_tokens: int
    future: Future


class Engine:
    """The model, its builders (one per prompt) and a batching worker."""

    def __init__(self, model, processor, family, vision, guard, default_prompt: str, served_name: str,
                 max_batch: int = 8, batch_wait_ms: int = 20, max_tokens_cap: int = 8192):
        self.model, self.processor, self.family, self.vision, self.guard = model, processor, family, vision, guard
        self.default_prompt, self.served_name = default_prompt, served_name
        self.max_batch, self.batch_wait, self.max_tokens_cap = max_batch, batch_wait_ms / 1000, max_tokens_cap
        self.builders: dict[str, object] = {}
        self.lock = threading.Lock()  # one generate at a time on the model
        self.queue: queue.Queue[OcrRequest] = queue.Queue()
        self.batches: list[int] = []  # sizes of the batches run (reported by /v1/models for tests and ops)
        threading.Thread(target=self._worker, daemon=True).start()

    def builder(self, prompt: str):
        from finetune.sequence import builder_for

        if prompt not in self.builders:
            self.builders[prompt] = builder_for(self.family, self.processor, self.model.config, prompt, self.vision)
        return self.builders[prompt]

    def _worker(self):
        from finetune.generate import generate_pages

        while True:
            pending = [self.queue.get()]
            deadline = time.monotonic() + self.batch_wait
            while len(pending) < self.max_batch:
                try:
                    pending.append(self.queue.get(timeout=max(0.0, deadline - time.monotonic())))
                except queue.Empty:
                    break
            groups: dict[tuple[str, int], list[OcrRequest]] = {}
            for req in pending:
                groups.setdefault((req.prompt, req.max_tokens), []).append(req)
            for (prompt, max_tokens), reqs in groups.items():
                try:
                    with self.lock:
                        self.batches.append(len(reqs))
                        gens = generate_pages(self.model, self.builder(prompt), [(str(i), r.image) for i, r in enumerate(reqs)],
                                              len(reqs), max_tokens, guard=self.guard)
                    for req, gen in zip(reqs, gens):
                        req.future.set_result(gen)
                except Exception as exc:  # the server must keep serving; the caller gets a 500
                    for req in reqs:
                        req.future.set_exception(exc)

    def complete(self, image, prompt: str, max_tokens: int):
        req = OcrRequest(image, prompt, max_tokens, Future())
        self.queue.put(req)
        return req.future.result()

    def stream(self, image, prompt: str, max_tokens: int):
        from finetune.generate import stream_page

        with self.lock:
            yield from stream_page(self.model, self.builder(prompt), ("0", image), max_tokens, self.guard)


def parse_request(body: bytes, engine: Engine, image_root: Path, max_pixels: int):
    """-> (PIL image, prompt, max_tokens, stream, include_usage); RequestError on anything malformed."""
    from data_prep.images import ImageError, open_image
    from data_prep.sources.paths import UnsafePath, resolve_inside

    try:
        req = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(f"request body is not JSON ({exc})") from None
    if not isinstance(req, dict):
        raise RequestError("request body must be a JSON object")
    if req.get("model") not in (None, engine.served_name):
        raise RequestError(f"model {req.get('model')!r} is not served here (serving {engine.served_name!r})", 404,
                           "model_not_found")
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list")
    texts, images = [], []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise RequestError("each message needs a 'role' of system, user or assistant")
        content = m.get("content")
        if m["role"] != "user":
            continue
        if isinstance(content, str):
            texts.append(content)
            continue
        if not isinstance(content, list):
            raise RequestError("user message 'content' must be a string or a list of parts")
        for part in content:
            if not isinstance(part, dict):
                raise RequestError("content parts must be objects")
            if part.get("type") == "text":
                texts.append(str(part.get("text", "")))
            elif part.get("type") == "image_url":
                url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else part.get("image_url")
                if not isinstance(url, str) or not url:
                    raise RequestError("image_url part needs {'url': 'data:image/...;base64,...' or a path}")
                images.append(url)
            else:
                raise RequestError(f"unsupported content part type {part.get('type')!r}")
    if len(images) != 1:
        raise RequestError(f"exactly one image per request is supported, got {len(images)}")
    url = images[0]
    try:
        if url.startswith("data:"):
            header, _, data = url.partition(",")
            if ";base64" not in header:
                raise RequestError("data URL must be base64-encoded")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise RequestError("image data URL is not valid base64") from None
            image, _ = open_image(raw, max_pixels=max_pixels)
        elif "://" in url:
            raise RequestError("remote image URLs are not fetched; send a base64 data URL or a local path")
        else:
            image, _ = open_image(resolve_inside(image_root, url), max_pixels=max_pixels)
    except (ImageError, UnsafePath) as exc:
        raise RequestError(f"image: {exc}") from None
    text = "\n".join(t for t in texts if t.strip()).strip()
    prompt = engine.default_prompt if not text else (text if "<image>" in text else "<image>\n" + text)
    max_tokens = req.get("max_tokens", req.get("max_completion_tokens", 512))
    if not isinstance(max_tokens, int) or not 1 <= max_tokens <= engine.max_tokens_cap:
        raise RequestError(f"'max_tokens' must be an integer in 1..{engine.max_tokens_cap}")
    stream = bool(req.get("stream", False))
    include_usage = bool((req.get("stream_options") or {}).get("include_usage", False))
    return image, prompt, max_tokens, stream, include_usage


def make_handler(engine: Engine, image_root: Path, max_pixels: int):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # quiet: no request bodies or headers (API keys) in logs
            pass

        def _json(self, status: int, obj: dict):
            data = json.dumps(obj).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str):
            self._json(status, {"error": {"message": message, "type": kind, "code": status}})

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                self._json(200, {"object": "list", "data": [
                    {"id": engine.served_name, "object": "model", "created": 0, "owned_by": "ocrtune"}]})
            else:
                self._error(404, f"no route {self.path}", "not_found")

        def do_POST(self):
            if self.path.rstrip("/") != "/v1/chat/completions":
                self._error(404, f"no route {self.path}", "not_found")
                return
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            try:
                image, prompt, max_tokens, stream, include_usage = parse_request(body, engine, image_root, max_pixels)
            except RequestError as exc:
                self._error(exc.status, str(exc), exc.kind)
                return
            rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
            try:
                if stream:
                    self._stream(rid, created, image, prompt, max_tokens, include_usage)
                    return
                gen = engine.complete(image, prompt, max_tokens)
            except Exception as exc:  # a model failure: report it, keep serving
                self._error(500, f"generation failed: {type(exc).__name__}: {exc}", "server_error")
                return
            self._json(200, {
                "id": rid, "object": "chat.completion", "created": created, "model": engine.served_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": gen.text},
                             "finish_reason": "length" if gen.hit_max_tokens else "stop"}],
                "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.new_tokens,
                          "total_tokens": gen.prompt_tokens + gen.new_tokens},
            })

        def _stream(self, rid, created, image, prompt, max_tokens, include_usage):
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True

            def event(delta: dict, finish=None, usage=None):
                chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": engine.served_name,
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
                if usage is not None:
                    chunk["usage"] = usage
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                self.wfile.flush()

            event({"role": "assistant", "content": ""})
            final = None
            for item in engine.stream(image, prompt, max_tokens):
                if isinstance(item, str):
                    event({"content": item})
                else:
                    final = item
            event({}, finish="length" if final.hit_max_tokens else "stop")
            if include_usage:
                event({}, usage={"prompt_tokens": final.prompt_tokens, "completion_tokens": final.new_tokens,
                                 "total_tokens": final.prompt_tokens + final.new_tokens})
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()

    return Handler


def build_engine(model_name: str, adapter: str | Path | None = None, prompt: str | None = None, dtype: str = "auto",
                 no_repeat_ngram: int = NO_REPEAT_NGRAM, no_repeat_window: int = NO_REPEAT_WINDOW, max_batch: int = 8,
                 batch_wait_ms: int = 20, served_name: str | None = None) -> Engine:
    from finetune.runtime import load_for_inference

    inf = load_for_inference(model_name, adapter, prompt, dtype, no_repeat_ngram, no_repeat_window)
    name = served_name or (inf.name if adapter is None else f"{inf.name}+{Path(adapter).resolve().parent.name}")
    return Engine(inf.model, inf.processor, inf.family, inf.vision, inf.guard, inf.prompt, name,
                  max_batch=max_batch, batch_wait_ms=batch_wait_ms)


def make_server(engine: Engine, host: str = "127.0.0.1", port: int = 8000, image_root: str | Path = ".",
                max_pixels: int | None = None) -> ThreadingHTTPServer:
    from data_prep.images import DEFAULT_MAX_PIXELS

    server = ThreadingHTTPServer((host, port), make_handler(engine, Path(image_root), max_pixels or DEFAULT_MAX_PIXELS))
    server.daemon_threads = True
    return server
