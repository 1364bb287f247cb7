"""OpenAI-compatible chat-completions endpoints as evaluation systems (`ocrtune eval --endpoint`).

    ocrtune eval --model M --data runs/data --output runs/cmp \\
        --endpoint https://api.provider.example/v1 --endpoint-model deepseek-ai/DeepSeek-OCR

Each page goes as one user message: the eval prompt's instruction text (the `<image>`
placeholder removed) and the page as a base64 PNG data URL; temperature 0 and the eval's
max tokens. The API key is read from an environment variable (default OPENAI_API_KEY),
never from the command line, and never logged. 429 and 5xx answers are retried.
"""

from __future__ import annotations

import base64
import io
import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from finetune.errors import OcrtuneError


class EndpointError(OcrtuneError, RuntimeError):
    pass


def instruction(prompt: str) -> str:
    """The text a chat API receives for an ocrtune prompt: the placeholder is the image part.
    A server puts the image (and its newline) first, so a leading `<image>\n` is dropped and the
    rest is sent verbatim: OCR-2's official prompt ends in a space that changes its token ids."""
    if prompt.startswith("<image>\n"):
        return prompt[len("<image>\n"):]
    return prompt.replace("<image>", "").strip()


def _png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def complete(url: str, model: str, prompt: str, image, max_tokens: int, api_key: str | None, retries: int = 4,
             timeout: float = 300.0) -> tuple[str, int, bool]:
    """(text, completion tokens, hit max tokens) for one page."""
    body = json.dumps({
        "model": model, "temperature": 0, "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": instruction(prompt)},
            {"type": "image_url", "image_url": {"url": _png_data_url(image)}}]}],
    }).encode()
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    endpoint = url.rstrip("/") + "/chat/completions"
    for attempt in range(retries + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(endpoint, body, headers), timeout=timeout) as resp:
                answer = json.loads(resp.read())
            choice = answer["choices"][0]
            text = choice["message"]["content"] or ""
            tokens = (answer.get("usage") or {}).get("completion_tokens", 0)
            return text, tokens, choice.get("finish_reason") == "length"
        except urllib.error.HTTPError as exc:
            if exc.code in (429, 500, 502, 503, 504) and attempt < retries:
                time.sleep(min(30.0, 0.5 * 2 ** attempt))
                continue
            detail = exc.read()[:300].decode(errors="replace")
            raise EndpointError(f"{endpoint}: HTTP {exc.code} ({detail})") from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            if attempt < retries:
                time.sleep(min(30.0, 0.5 * 2 ** attempt))
                continue
            raise EndpointError(f"{endpoint}: cannot connect ({exc})") from None
        except (KeyError, IndexError, json.JSONDecodeError) as exc:
            raise EndpointError(f"{endpoint}: not a chat-completions answer ({exc})") from None
    raise AssertionError("unreachable")


def run_endpoint(url: str, model: str, prompt: str, pages, max_tokens: int, key_env: str, concurrency: int = 4,
                 on_batch=None, progress=None) -> list[tuple[str, int, bool]]:
    """Every page through the endpoint, `concurrency` requests in flight; results in page order."""
    api_key = os.environ.get(key_env)
    results: list = [None] * len(pages)

    def one(i):
        return i, complete(url, model, prompt, pages[i][1], max_tokens, api_key)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        for i, res in pool.map(one, range(len(pages))):
            results[i] = res
            if on_batch is not None:
                on_batch([(i, res)])
            if progress is not None:
                progress.update(1)
    return results
