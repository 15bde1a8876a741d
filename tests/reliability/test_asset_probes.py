"""Probes: asset downloads that are tampered with, interrupted, offline, or would run code.

Every index here is built by the test (a local HTTP server or a ``file://`` directory); nothing
reaches the real PyPI.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from smoa_jax.app import assets, cli
from tests.reliability import probe, probe_cases
from tests.support.package_index import (
  EXPECTED,
  Index,
  closed_port_url,
  contents,
  isolate,
  pin,
  sha256,
  tar_gz,
  vader_sdist,
  write_file_index,
)


@pytest.fixture
def cache(tmp_path, monkeypatch):
  return isolate(monkeypatch, tmp_path)


@probe_cases("assets", {
    "by_hand": ("an archive in `<cache>/downloads` whose sha256 differs from the pin (tampered, "
                "or copied in by hand)",
                "AssetError naming the file, the expected and the actual sha256; the file is "
                "deleted, nothing is extracted"),
    "from_index": ("an index (a mirror) that serves other bytes under the pinned file name",
                   "AssetError naming the URL and both sha256; nothing is kept in the cache"),
})
@pytest.mark.parametrize("case", ["by_hand", "from_index"])
def test_tampered_archive_is_refused(cache, monkeypatch, case):
  genuine, tampered = vader_sdist(), vader_sdist(b"1\t4.0\tEvil twin.\r\n")
  package = pin(monkeypatch, "VADER", genuine)
  with Index({package: tampered}) as index:
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    if case == "by_hand":
      (cache / "downloads").mkdir(parents=True)
      (cache / "downloads" / package.filename).write_bytes(tampered)
    where = cache / "downloads" if case == "by_hand" else index.url.replace("simple", "files")
    with pytest.raises(assets.AssetError, match=(
        rf"refused {re.escape(f'{where}/{package.filename}')}: its sha256 is {sha256(tampered)}, "
        rf"but .* pinned to sha256 {package.sha256}\. The file was deleted and nothing was "
        "extracted")):
      assets.fetch_sentiment()
    assert len(index.requests) == (0 if case == "by_hand" else 2)  # no second chance by hand
  assert contents(cache) == ["downloads"] and not assets.is_cached("sentiment")


class _CtrlC(assets.tqdm):
  """A progress bar whose first update is a Ctrl-C."""

  def update(self, n=1):
    raise KeyboardInterrupt


@probe_cases("assets", {
    "dropped": ("the connection drops half-way through a download",
                "one-line AssetError naming the package; no file under its final name, no partial "
                "file, nothing extracted; the next fetch completes"),
    "ctrl_c": ("Ctrl-C during a download",
               "KeyboardInterrupt; no file under its final name, no partial file, nothing "
               "extracted; the next fetch completes"),
})
@pytest.mark.parametrize("case", ["dropped", "ctrl_c"])
def test_interrupted_download_leaves_nothing(cache, monkeypatch, case):
  data = vader_sdist()
  package = pin(monkeypatch, "VADER", data)
  with Index({package: data}, truncate=case == "dropped") as index:
    monkeypatch.setenv("PIP_INDEX_URL", index.url)
    if case == "dropped":
      with pytest.raises(assets.AssetError, match=(
          r"^cannot download vadersentiment==3\.3\.2 \(.*connection closed after \d+ of "
          rf"{len(data)} bytes\)[^\n]*$")):
        assets.fetch_sentiment()
    else:
      with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(assets, "tqdm", _CtrlC)
        assets.fetch_sentiment()
    assert contents(cache) == ["downloads"] and not assets.is_cached("sentiment")
    index.truncate = False
    assert assets.load_sentiment() == EXPECTED
    assert contents(cache) == ["downloads", f"downloads/{package.filename}", "sentiment",
                               "sentiment/.complete", f"sentiment/{assets.SENTIMENT_FILE}"]


@probe_cases("assets", {
    "unreachable": ("`smoa-jax fetch-assets` while the package index cannot be reached",
                    "exit 1, one line `smoa-jax: error: cannot download vadersentiment==3.3.2 "
                    "(...)` with the curl command and the file to copy it to; nothing written"),
    "no_index": ("`smoa-jax fetch-assets` with pip set to `no-index` (PIP_NO_INDEX=1)",
                 "the same one line, saying pip is set to no-index; nothing written"),
})
@pytest.mark.parametrize("case", ["unreachable", "no_index"])
def test_no_network_gives_one_line_with_the_manual_fallback(cache, monkeypatch, capsys, case):
  monkeypatch.setenv("PIP_INDEX_URL", closed_port_url())
  if case == "no_index":
    monkeypatch.setenv("PIP_NO_INDEX", "1")
  assert cli.main(["fetch-assets", "sentiment"]) == 1
  out, err = capsys.readouterr()
  target = cache / "downloads" / assets.VADER.filename
  assert out == "" and err.count("\n") == 1, err
  assert err.startswith("smoa-jax: error: cannot download vadersentiment==3.3.2 (")
  assert ("Connection refused" if case == "unreachable" else "no-index") in err
  assert err.endswith(f"curl -L -o {target} {assets.VADER.url}\n")
  with pytest.raises(assets.AssetError) as raised:  # the Python API: the same single line
    assets.fetch_sentiment()
  assert "\n" not in str(raised.value)
  assert contents(cache) == []


# An sdist whose build would leave a mark: setup.py runs whenever pip prepares its metadata.
_SETUP_PY = """import pathlib
pathlib.Path({marker!r}).write_text("setup.py ran")
from setuptools import setup
setup(name="evil", version="1.0")
"""


def _evil_index(tmp_path: Path) -> tuple[assets._Package, bytes, Path, str]:
  marker = tmp_path / "setup.py-ran"
  data = tar_gz({"evil-1.0/setup.py": _SETUP_PY.format(marker=str(marker)).encode(),
                 "evil-1.0/PKG-INFO": b"Metadata-Version: 2.1\nName: evil\nVersion: 1.0\n"})
  package = assets._Package("evil", "1.0", "https://example.invalid/evil-1.0.tar.gz", sha256(data))
  return package, data, marker, write_file_index(tmp_path / "index", {package: data})


@probe("assets", "an sdist whose `setup.py` would run code when built",
       "downloaded and sha256-checked without building it: setup.py never runs, no 'Preparing "
       "metadata', no process but `pip config list`")
def test_no_build_step_runs(cache, tmp_path, monkeypatch, capfd):
  package, data, marker, index = _evil_index(tmp_path)
  monkeypatch.setenv("PIP_INDEX_URL", index)
  commands, run = [], subprocess.run

  def recording_run(cmd, *args, **kwargs):
    commands.append(cmd[1:])
    return run(cmd, *args, **kwargs)

  monkeypatch.setattr(assets.subprocess, "run", recording_run)
  assert assets._download(package).read_bytes() == data
  assert not marker.exists()
  assert "Preparing metadata" not in "".join(capfd.readouterr())
  assert commands == [["-m", "pip", "config", "list"]]


@pytest.mark.slow
def test_pip_download_would_run_the_setup_py(tmp_path, monkeypatch):
  """The control for test_no_build_step_runs: its sdist does run code under `pip download`, even
  with --no-deps, --no-build-isolation and a hash-pinned requirement."""
  pytest.importorskip("setuptools")  # what its setup.py imports
  isolate(monkeypatch, tmp_path)
  package, _, marker, index = _evil_index(tmp_path)
  requirements = tmp_path / "requirements.txt"
  requirements.write_text(f"evil==1.0 --hash=sha256:{package.sha256}\n")
  result = subprocess.run(
      [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation",
       "--require-hashes", "--index-url", index, "--dest", str(tmp_path / "dest"), "-r",
       str(requirements)], capture_output=True, text=True, check=False)
  assert "Preparing metadata" in result.stdout and marker.read_text() == "setup.py ran"
