"""`ocrtune serve`: the official openai client against it (plain and streaming), the endpoint
evaluated next to the local model, malformed requests, batching."""

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import REPO, TINY, make_folder, render_line, run_cli

pytestmark = pytest.mark.integration  # CLI subprocesses, training and generation runs


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _message(url, text="Free OCR."):
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]}]


@pytest.fixture(scope="module")
def server():
    """`ocrtune serve` in its own process on a free loopback port, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "finetune.cli", "serve", "--model", TINY, "--port", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert "serving" in line, line
    base = line.split(" on ")[1].split()[0]  # http://127.0.0.1:PORT/v1
    yield base
    proc.terminate()
    proc.wait(timeout=30)


def test_openai_client_plain_and_streaming(server):
    from openai import OpenAI

    client = OpenAI(base_url=server, api_key="unused")
    assert [m.id for m in client.models.list()] == [TINY]
    url = _data_url(render_line("Total 12.50"))
    plain = client.chat.completions.create(model=TINY, messages=_message(url), max_tokens=12)
    text = plain.choices[0].message.content
    assert text and plain.usage.completion_tokens == 12 and plain.choices[0].finish_reason == "length"
    assert plain.usage.prompt_tokens == 150 and plain.usage.total_tokens == 162
    pieces, usage, finish = [], None, None
    for chunk in client.chat.completions.create(model=TINY, messages=_message(url), max_tokens=12, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == text and finish == "length" and usage.completion_tokens == 12


def test_raw_stream_ends_with_done(server):
    body = json.dumps({"model": TINY, "messages": _message(_data_url(render_line("x"))), "max_tokens": 4,
                       "stream": True}).encode()
    req = urllib.request.Request(server + "/chat/completions", body, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"
        events = [e for e in resp.read().decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]" and all(e.startswith("data: ") for e in events)


@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not JSON"),
    (json.dumps({"messages": []}).encode(), 400, "non-empty list"),
    (json.dumps({"model": "other", "messages": [{"role": "user", "content": "hi"}]}).encode(), 404, "not served here"),
    (json.dumps({"messages": [{"role": "user", "content": "no image"}]}).encode(), 400, "exactly one image"),
    (json.dumps({"messages": _message("data:image/png;base64,!!!")}).encode(), 400, "not valid base64"),
    (json.dumps({"messages": _message("data:image/png;base64," + base64.b64encode(b"not an image").decode())}).encode(),
     400, "not an image"),
    (json.dumps({"messages": _message("../../etc/passwd")}).encode(), 400, "outside the data root"),
    (json.dumps({"messages": _message("https://example.com/a.png")}).encode(), 400, "not fetched"),
    (json.dumps({"messages": _message(_data_url(render_line("x"))), "max_tokens": 0}).encode(), 400, "max_tokens"),
])
def test_malformed_requests_get_4xx_and_the_server_keeps_serving(server, body, status, needle):
    req = urllib.request.Request(server + "/chat/completions", body, {"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == status
    error = json.loads(err.value.read())["error"]
    assert needle in error["message"]
    with urllib.request.urlopen(server + "/models", timeout=30) as resp:  # still alive
        assert json.loads(resp.read())["data"][0]["id"] == TINY


def test_endpoint_eval_matches_the_local_model(server, tmp_path):
    make_folder(tmp_path / "scans", 16)
    assert run_cli("data", "build", "--source", "folder", "--input", str(tmp_path / "scans"), "--output",
                   str(tmp_path / "data"), "--no-progress").returncode == 0
    res = run_cli("eval", "--model", TINY, "--data", str(tmp_path / "data"), "--output", str(tmp_path / "eval"),
                  "--max-new-tokens", "12", "--endpoint", server, "--endpoint-model", TINY, "--no-progress")
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(x) for x in (tmp_path / "eval/predictions.jsonl").read_text().splitlines()]
    assert rows and all(set(r["predictions"]) == {"base", f"endpoint:{TINY}"} for r in rows)
    assert all(r["predictions"]["base"] == r["predictions"][f"endpoint:{TINY}"] for r in rows)
    report = json.loads((tmp_path / "eval/report.json").read_text())
    assert report["systems"]["base"]["cer"] == report["systems"][f"endpoint:{TINY}"]["cer"]


def test_requests_arriving_together_are_batched():
    from finetune.serve import build_engine, make_server

    engine = build_engine(TINY, batch_wait_ms=200, max_batch=8)
    srv = make_server(engine, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/v1/chat/completions"
    answers = {}

    def call(k):
        body = json.dumps({"messages": _message(_data_url(render_line(f"page {k}"))), "max_tokens": 6}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout=60) as r:
            answers[k] = json.loads(r.read())["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=call, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
        time.sleep(0.01)
    for t in threads:
        t.join()
    srv.shutdown()
    assert len(answers) == 4 and max(engine.batches) > 1
    # a batched answer equals the same page generated alone
    from finetune.generate import generate_pages

    alone = generate_pages(engine.model, engine.builder(engine.default_prompt), [("0", render_line("page 2"))], 1, 6,
                           guard=engine.guard)
    assert alone[0].text == answers[2]


def test_endpoint_instruction_keeps_the_prompt_verbatim_after_the_image():
    from finetune.endpoint import instruction

    # the server puts the image and its newline first; a trailing space (OCR-2's official
    # prompt) changes the token ids, so it is kept
    assert instruction("<image>\nFree OCR. ") == "Free OCR. "
    assert instruction("<image>\n<|grounding|>Convert the document to markdown.") == \
        "<|grounding|>Convert the document to markdown."
