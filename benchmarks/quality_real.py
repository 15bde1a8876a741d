"""Benchmark: fine-tuning quality on real data at equal trainable parameters (issue 7, items 5b-5d).

Two real tasks, the same training loop (:func:`smoa_jax.train`: AdamW, warmup + cosine decay,
global-norm clipping 1.0, no weight decay, adapter dropout 0) and the same steps, batch and
targets for every method; only the adapter differs:

``sentiment``
    all-MiniLM-L6-v2 (BERT, 22.7M parameters) classifies movie-review sentences (Hutto & Gilbert,
    ICWSM 2014) on the fixed split of :func:`smoa_jax.app.datasets.split_sentiment` (the demo's and
    the CLI's: 500 validation / 1,000 test / the rest train), 64 tokens. Targets: the ``query``
    and ``value`` projections of all six layers (the demo's choice). Every method trains the
    same fresh classification head (``classifier``; ``mark_trainable``). Metric: test accuracy.
    Floors: the linear probe (frozen encoder, only the head trains) and the majority class of
    the training split.
``shakespeare``
    SmolLM2-135M (Llama, 30 layers) on Shakespeare's plays (:func:`smoa_jax.app.datasets.
    split_shakespeare`: 8-line passages; Hamlet and Macbeth are the test plays, The Tempest the
    validation play, the 39 others train), 128 tokens with an EOS appended (as ``smoa-jax
    finetune`` does). Targets ``q_proj, k_proj, v_proj, up_proj, down_proj`` of all 30 layers.
    Metric: test perplexity (exp of the mean next-token loss over real tokens), before and after.
``instruct`` (for ``benchmarks/study.py`` only; not one of this script's ``--task`` choices)
    SmolLM2-135M-Instruct instruction-tuned on the sentiment chat task of
    ``benchmarks/instruct_sentiment.py`` (the sentiment split above posed as one user turn, the
    answer ``positive`` or ``negative``; loss on the answer only, packed rows of 128 tokens).
    Metric: the accuracy of GENERATED answers (greedy, at most ``max_new_tokens`` tokens; an
    answer that does not start with a label is wrong), on evenly spaced subsets of the
    validation and test reviews. Reference: the instruct model zero-shot.

Methods, at an equal budget of trainable parameters (``p`` = LoRA's rank): **SMoA** r = 2p, K = 2
spectral blocks (``sum_k r_k (|C_k| + |R_k|) = p (in + out)`` on every kernel), **LoRA** r = p,
**HiRA** r = p (``(a b) * W`` over the whole matrix); every scaling ``alpha / r`` is 2. **Full
FT** trains the targeted kernels themselves (an upper bound, with far more parameters). So SMoA
vs HiRA isolates what the spectral block split buys at a fixed budget (two aligned blocks of rank
p each, against one modulated rank-p update over all of W), SMoA/HiRA vs LoRA what the Hadamard
modulation by W buys, and full FT / the floor bracket them. (The synthetic benchmark,
``benchmarks/quality_synthetic.py``, also isolates the permutation.)

Protocol: for every method the learning rate is chosen from a small grid by the VALIDATION metric
of one run with seed 0; that run is also the first seed. Seeds 1 and 2 then train with the chosen
rate; the seed sets the adapter and head initialisation and the data order. The test split is
evaluated only for these final runs; we report mean and sample standard deviation over seeds.
SmolLM2's validation and test metrics use fixed, evenly spaced subsets of the held-out passages
(``--val-limit`` / ``--test-limit``) to fit the compute budget; MiniLM's use the full splits.

Spectral coverage (item 5d): for the seed-0 run of every method, each learned update dW (for full
FT: trained minus pretrained kernel) is projected on the singular directions of its pretrained W
(:func:`smoa_jax.app.analysis.direction_energy`): ``E(j)`` is the share of ``||dW||^2`` inside W's
top-``j`` singular directions on both sides. We report ``E`` at 10/25/50% of the directions,
dW's effective rank (:func:`smoa_jax.app.analysis.effective_rank`) and ``||dW|| / ||W||``, averaged
over the analysed kernels (all of MiniLM's; every fifth layer of SmolLM2's), and plot the mean
curves to ``benchmarks/plots/quality_real_coverage.png``.

Budget: sized for about 90 minutes on 2 CPU cores (``--help`` lists the knobs; the defaults are
the full run). ``--quick`` swaps in tiny random models with the real tokenizers and data (a smoke
test of the code path, not a result). Nothing is cached in the repository.

Run from the repository root: ``python -m benchmarks.quality_real [--task sentiment|shakespeare|all]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from benchmarks import _budgets, _common, _models

SECTION = "quality_real"
MODULE = "benchmarks.quality_real"
PLOT_PATH = Path(__file__).resolve().parent / "plots" / "quality_real_coverage.png"
FRACTIONS = (0.1, 0.25, 0.5)  # of W's singular directions, for the coverage table
ANALYSE_EVERY = 5  # SmolLM2 coverage: every fifth layer (0, 5, ..., 25)


@dataclasses.dataclass(frozen=True)
class Method:
  """One fine-tuning method and its learning-rate grid."""

  name: str
  kind: str  # smoa | lora | hira | full | probe
  lrs: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
  """Sizes and hyper-parameters of one task (identical for every method)."""

  task: str
  p: int
  targets: tuple[str, ...]
  steps: int
  batch_size: int
  seq_len: int
  warmup_steps: int
  seeds: tuple[int, ...]
  methods: tuple[Method, ...]
  val_limit: int | None
  test_limit: int | None
  eval_batch: int
  num_blocks: int = 2  # SMoA's K (r = K p)
  max_new_tokens: int = 8  # instruct: the longest generated answer scored

  @property
  def higher_is_better(self) -> bool:
    return self.task != "shakespeare"

  @property
  def metric(self) -> str:
    return "perplexity" if self.task == "shakespeare" else "accuracy"

  @property
  def reference_name(self) -> str:
    """The floor every method is read against."""
    return {"sentiment": "majority class", "shakespeare": "pretrained model"}.get(
        self.task, "instruct model zero-shot")

  @property
  def budget(self) -> _budgets.EqualBudget:
    """SMoA r = K p in K blocks (K = 2 unless set) vs LoRA and HiRA r = p."""
    return _budgets.EqualBudget(self.p, num_blocks=self.num_blocks)


SENTIMENT = Plan(
    task="sentiment", p=4, targets=("query", "value"), steps=100, batch_size=32, seq_len=64,
    warmup_steps=10, seeds=(0, 1, 2),
    methods=(Method("SMoA", "smoa", (2e-2, 4e-2)), Method("LoRA", "lora", (4e-3, 8e-3)),
             Method("HiRA", "hira", (2e-2, 4e-2)), Method("full FT", "full", (1e-4, 4e-4)),
             Method("linear probe", "probe", (1e-2, 5e-2))),
    val_limit=None, test_limit=None, eval_batch=100)
SHAKESPEARE = Plan(
    task="shakespeare", p=8, targets=_models.LLAMA_TARGETS,
    steps=30, batch_size=4, seq_len=128, warmup_steps=3, seeds=(0, 1, 2),
    methods=(Method("SMoA", "smoa", (1e-2, 3e-2, 1e-1)), Method("LoRA", "lora", (2e-3, 5e-3, 1e-2)),
             Method("HiRA", "hira", (1e-2, 3e-2, 1e-1)),
             Method("full FT", "full", (3e-5, 1e-4, 3e-4))),
    val_limit=48, test_limit=64, eval_batch=16)
PLANS = {"sentiment": SENTIMENT, "shakespeare": SHAKESPEARE}
# The study's third task (no grid of its own here: the study chooses the rates).
INSTRUCT = Plan(
    task="instruct", p=8, targets=_models.LLAMA_TARGETS, steps=24, batch_size=4, seq_len=128,
    warmup_steps=2, seeds=(0, 1, 2), methods=(), val_limit=100, test_limit=100, eval_batch=25)


def quick_plan(plan: Plan) -> Plan:
  """The same methods on tiny sizes, one seed, one learning rate each (a smoke test). Instruct
  rows keep their length: a chat-templated review does not fit into 16 tokens."""
  methods = tuple(dataclasses.replace(m, lrs=m.lrs[:1]) for m in plan.methods)
  return dataclasses.replace(plan, p=2, steps=3, batch_size=4,
                             seq_len=plan.seq_len if plan.task == "instruct" else 16,
                             warmup_steps=1, seeds=(0,), methods=methods, val_limit=8,
                             test_limit=8, eval_batch=8, max_new_tokens=2)


# -- models and data -------------------------------------------------------------------------------
def _tiny_dir(task: str, vocab_size: int, directory: Path) -> Path:
  """A tiny randomly initialised model of the task's family, saved in Hugging Face format."""
  import transformers

  # One layer, every target kernel 32 x 32: the set-up ops compile for a single shape.
  if task == "sentiment":
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=64)
    return _models.save_random_model(transformers.BertModel, config, directory)
  return _models.save_random_llama(
      _models.tiny_llama_config(vocab_size, 256 if task == "instruct" else 64), directory)


def _evenly(arrays: dict[str, np.ndarray], limit: int | None) -> dict[str, np.ndarray]:
  """``limit`` evenly spaced examples (all when ``limit`` is None or not smaller)."""
  n = len(next(iter(arrays.values())))
  if limit is None or limit >= n:
    return arrays
  rows = np.linspace(0, n - 1, limit).round().astype(int)
  return {k: v[rows] for k, v in arrays.items()}


@dataclasses.dataclass
class Context:
  """Everything a task's runs share: model directory, tokenized splits, the loss, cached blocks."""

  plan: Plan
  model_dir: Path
  data: dict[str, dict[str, np.ndarray]]
  task: Any
  tokenizer: Any = None  # instruct: asks the held-out reviews
  # instruct: the held-out reviews by split (``data[split]["labels"]`` holds their labels).
  reviews: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  # SMoA spectral blocks by K, then by module path (computed once per K).
  blocks: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
  kernel_curves: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


def make_context(plan: Plan, quick: bool, workdir: Path) -> Context:
  """Tokenize the task's fixed split; the real model directory, or a tiny random one (quick)."""
  import transformers

  import smoa_jax
  from smoa_jax.app import assets
  from smoa_jax.training import data as data_lib
  from smoa_jax.app import datasets

  real_dir = assets.fetch_minilm() if plan.task == "sentiment" else assets.fetch_smollm2()
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(real_dir))
  model_dir = _tiny_dir(plan.task, len(tokenizer), workdir / plan.task) if quick else real_dir
  if plan.task == "instruct":
    return _instruct_context(plan, quick, model_dir, tokenizer)
  if plan.task == "sentiment":
    parts = datasets.split_sentiment(assets.load_sentiment())
    records = {name: data_lib.Records(texts, labels, 2, f"sentiment/{name}")
               for name, (texts, labels) in parts.items()}
    task = smoa_jax.ClassificationTask()
  else:
    parts = datasets.split_shakespeare(assets.load_shakespeare())
    records = {name: data_lib.Records(texts, None, None, f"shakespeare/{name}")
               for name, texts in parts.items()}
    task = smoa_jax.CausalLMTask()
  data = {}
  for name, rec in records.items():
    if quick:  # a few dozen examples: the smoke test tokenizes in well under a second
      rec = dataclasses.replace(rec, texts=rec.texts[:QUICK_EXAMPLES],
                                labels=None if rec.labels is None else rec.labels[:QUICK_EXAMPLES])
    arrays = data_lib.tokenize(rec, tokenizer, plan.seq_len,
                               add_eos=plan.task == "shakespeare").arrays
    data[name] = _evenly(arrays, _limit(plan, name))
  return Context(plan, model_dir, data, task)


QUICK_EXAMPLES = 64  # per split, with --quick


def _limit(plan: Plan, split: str) -> int | None:
  return {"validation": plan.val_limit, "test": plan.test_limit}.get(split)


def _instruct_context(plan: Plan, quick: bool, model_dir: Path, tokenizer: Any) -> Context:
  """The sentiment chat task: packed training rows (loss on the answers), held-out reviews."""
  import smoa_jax
  from smoa_jax.app import assets, datasets, llm_demo

  data, reviews = {}, {}
  for name, (texts, labels) in datasets.split_sentiment(assets.load_sentiment()).items():
    if quick:
      texts, labels = texts[:QUICK_EXAMPLES], labels[:QUICK_EXAMPLES]
    if name == "train":
      data[name] = llm_demo.chat_training_data(tokenizer, texts, labels, plan.seq_len).arrays
      continue
    rows = _evenly({"rows": np.arange(len(texts))}, _limit(plan, name))["rows"]
    reviews[name] = [texts[i] for i in rows]
    data[name] = {"labels": np.asarray(labels)[rows]}
  return Context(plan, model_dir, data, smoa_jax.CausalLMTask(), tokenizer, reviews)


def load_model(ctx: Context, seed: int):
  """A fresh pretrained model (MiniLM gets a fresh 2-class head initialised by ``seed``)."""
  import smoa_jax

  if ctx.plan.task == "sentiment":
    with warnings.catch_warnings():  # the fresh classification head is expected
      warnings.simplefilter("ignore")
      return smoa_jax.from_hf(ctx.model_dir, num_labels=2, seed=seed)
  return smoa_jax.from_hf(ctx.model_dir)


def adapter_config(kind: str, plan: Plan):
  """The method's config at the common budget (``None`` for the linear probe)."""
  import smoa_jax

  return {
      "smoa": plan.budget.smoa,
      "lora": plan.budget.lora,
      "hira": plan.budget.hira,
      "full": lambda targets: smoa_jax.FullFineTuneConfig(target_modules=targets),
      "probe": lambda targets: None,
  }[kind](plan.targets)


# -- one run ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
  """One trained model and what it scored."""

  method: Method
  lr: float
  seed: int
  trainable: int
  head: int
  seconds: float  # training and validation
  val: float | None
  model: Any
  train_seconds: float = math.nan  # training alone (compiling included)
  loss: float = math.nan  # mean training loss over the run (NaN when it diverged)


def adapted_model(ctx: Context, kind: str, seed: int, plan: Plan | None = None
                  ) -> tuple[Any, int, int]:
  """``(model, trainable, head)``: a fresh model (:func:`load_model`) with the method's adapter
  at ``plan``'s budget (default ``ctx.plan``), the classification head trainable on sentiment;
  ``trainable`` counts the adapter's arrays, ``head`` the head's. SMoA's spectral blocks are
  computed once per K and kept in ``ctx.blocks``."""
  from flax import nnx

  import smoa_jax

  plan = ctx.plan if plan is None else plan
  model = load_model(ctx, seed)
  config = adapter_config(kind, plan)
  trainable = 0
  if config is not None:
    smoa_blocks = ctx.blocks.get(plan.num_blocks) if kind == "smoa" else None
    report = smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(seed), verbose=False,
                                    blocks=smoa_blocks)
    if kind == "smoa" and smoa_blocks is None:
      ctx.blocks[plan.num_blocks] = {path: layer.blocks
                                     for path, layer in smoa_jax.adapter_layers(model)}
    trainable = report.trainable_params
  head = 0
  if plan.task == "sentiment":
    smoa_jax.mark_trainable(model, r"classifier/.*")
    head = _common.tree_size([v for path, v in nnx.iter_graph(model)
                              if isinstance(v, smoa_jax.TrainableParam) and "classifier" in path])
  return model, trainable, head


def train_run(ctx: Context, method: Method, lr: float, seed: int, *, validate: bool,
              plan: Plan | None = None) -> Run:
  """Adapt a fresh model (:func:`adapted_model`), train it, and (``validate``) score it on the
  validation split.

  ``plan`` overrides ``ctx.plan``'s budget and schedule (``p``, ``num_blocks``, ``steps``,
  ``warmup_steps``); the data and evaluation stay ``ctx``'s. A run whose loss becomes non-finite
  scores the worst possible validation metric.
  """
  import smoa_jax

  plan = ctx.plan if plan is None else plan
  model, trainable, head = adapted_model(ctx, method.kind, seed, plan)
  train_config = smoa_jax.TrainConfig(
      steps=plan.steps, batch_size=plan.batch_size, learning_rate=lr,
      warmup_steps=plan.warmup_steps, seed=seed, log_every=plan.steps, progress=False)
  start = time.perf_counter()
  val, loss, train_seconds = None, math.nan, math.nan
  try:
    result = smoa_jax.train(model, ctx.task, ctx.data["train"], train_config)
    train_seconds, loss = time.perf_counter() - start, result.train_metrics["loss"]
    if validate:
      val = _score(ctx, model, "validation")
  except smoa_jax.NonFiniteLossError:
    val = -math.inf if plan.higher_is_better else math.inf
  return Run(method, lr, seed, trainable, head, time.perf_counter() - start, val, model,
             train_seconds, loss)


def _score(ctx: Context, model: Any, split: str) -> float:
  """The task's metric on ``split``; instruct: the accuracy of the generated answers."""
  import smoa_jax

  if ctx.plan.task == "instruct":
    from smoa_jax.app.datasets import answer_sentiment

    _, labels = answer_sentiment(model, ctx.tokenizer, ctx.reviews[split],
                                 max_new_tokens=ctx.plan.max_new_tokens,
                                 batch_size=ctx.plan.eval_batch)
    return float(np.mean([a == t for a, t in zip(labels, ctx.data[split]["labels"])]))
  return smoa_jax.evaluate(model, ctx.task, ctx.data[split],
                           batch_size=ctx.plan.eval_batch)[ctx.plan.metric]


def _fmt(plan: Plan, value: float) -> str:
  if not math.isfinite(value):
    return "diverged"
  return f"{100 * value:.1f}%" if plan.higher_is_better else f"{value:.2f}"


# -- spectral coverage -----------------------------------------------------------------------------
@dataclasses.dataclass
class Coverage:
  """dW statistics of one method, averaged over the analysed kernels."""

  energy_at: dict[float, float]
  kernel_energy_at: dict[float, float]
  effective_rank: float
  norm_ratio: float
  kernels: int
  curve: np.ndarray  # mean E over GRID
  kernel_curve: np.ndarray  # mean W energy share over GRID
  uniform_curve: np.ndarray  # mean (j / in)(j / out) over GRID


GRID = np.linspace(0.0, 1.0, 201)


def _layer_of(path: Sequence[Any]) -> int | None:
  numbers = [int(p) for p in path if isinstance(p, int) or (isinstance(p, str) and p.isdigit())]
  return numbers[-1] if numbers else None


def _analysed(plan: Plan, path: Sequence[Any], quick: bool) -> bool:
  if plan.task == "sentiment" or quick:
    return True
  layer = _layer_of(path)
  return layer is not None and layer % ANALYSE_EVERY == 0


def coverage(ctx: Context, run: Run, quick: bool) -> Coverage:
  """Energy of each learned dW over its W's singular directions (see the module docstring)."""
  from flax import nnx

  import smoa_jax
  from smoa_jax.app import analysis

  pairs: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # module path -> (W, dW), (in, out)
  if run.method.kind == "full":
    base = {tuple(p): v for p, v in nnx.iter_graph(load_model(ctx, run.seed))
            if isinstance(v, nnx.Param)}
    for path, v in nnx.iter_graph(run.model):
      if (isinstance(v, smoa_jax.TrainableParam) and path[-1] == "kernel"
          and str(path[-2]) in ctx.plan.targets and _analysed(ctx.plan, path, quick)):
        w = np.asarray(base[tuple(path)][...], np.float64)
        pairs["/".join(map(str, path[:-1]))] = (w, np.asarray(v[...], np.float64) - w)
  else:
    for path, layer in smoa_jax.adapter_layers(run.model):
      if _analysed(ctx.plan, path.split("/"), quick):
        pairs[path] = (np.asarray(layer.base_kernel(), np.float64),
                       np.asarray(layer.delta_weight(), np.float64))
  curves, kernel_curves, uniform, ranks, norms = [], [], [], [], []
  for path, (w, dw) in pairs.items():
    q = min(w.shape)
    x = np.arange(1, q + 1) / q
    curves.append(np.interp(GRID, x, analysis.direction_energy(dw, w), left=0.0))
    if path not in ctx.kernel_curves:  # W is the same for every method: its curves once
      j = np.arange(1, q + 1)
      # W's own energy in its top-j directions: the share of ||W||^2 in its top j singular values.
      ctx.kernel_curves[path] = (np.interp(GRID, x, analysis.direction_energy(w, w), left=0.0),
                                 np.interp(GRID, x, (j / w.shape[0]) * (j / w.shape[1]), left=0.0))
    kernel_curves.append(ctx.kernel_curves[path][0])
    uniform.append(ctx.kernel_curves[path][1])
    ranks.append(analysis.effective_rank(dw))
    norms.append(float(np.linalg.norm(dw) / np.linalg.norm(w)))
  curve, kernel_curve = np.mean(curves, axis=0), np.mean(kernel_curves, axis=0)
  at = {f: float(np.interp(f, GRID, curve)) for f in FRACTIONS}
  kernel_at = {f: float(np.interp(f, GRID, kernel_curve)) for f in FRACTIONS}
  return Coverage(at, kernel_at, float(np.mean(ranks)), float(np.mean(norms)), len(pairs),
                  curve, kernel_curve, np.mean(uniform, axis=0))


def plot_coverage(results: dict[str, dict[str, Coverage]], path: Path) -> Path:
  """One panel per task: mean dW energy over W's singular directions, by method (PNG)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
  for ax, (task, by_method) in zip(axes[0], results.items()):
    for name, cov in by_method.items():
      ax.plot(GRID, cov.curve, label=f"dW {name}")
    first = next(iter(by_method.values()))
    ax.plot(GRID, first.kernel_curve, "k--", alpha=0.6, label="W itself (share of ||W||^2)")
    ax.plot(GRID, first.uniform_curve, "k:", alpha=0.6, label="no preferred direction")
    ax.set(xlabel="fraction of W's singular directions (largest first)",
           ylabel="cumulative share of ||dW||^2", title=task, xlim=(0, 1), ylim=(0, 1.02))
    ax.legend(fontsize=7, loc="lower right")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


# -- one task --------------------------------------------------------------------------------------
@dataclasses.dataclass
class MethodResult:
  """A method's grid, chosen rate and final runs."""

  method: Method
  grid: dict[float, float]  # lr -> validation metric (seed 0)
  lr: float
  tests: list[float]
  trainable: int
  head: int
  seconds: list[float]
  coverage: Coverage | None = None

  @property
  def mean(self) -> float:
    return statistics.mean(self.tests)

  @property
  def std(self) -> float:
    return statistics.stdev(self.tests) if len(self.tests) > 1 else 0.0


@dataclasses.dataclass
class TaskResult:
  plan: Plan
  methods: list[MethodResult]
  reference: dict[str, float]  # majority class (sentiment) / pretrained model (shakespeare)
  sizes: dict[str, int]
  seconds: float


def run_task(plan: Plan, quick: bool, workdir: Path, log: Callable[[str], None]) -> TaskResult:
  """Grid on validation (seed 0), then the remaining seeds at the chosen rate; test at the end."""
  started = time.perf_counter()
  ctx = make_context(plan, quick, workdir)
  sizes = {name: len(arrays["input_ids"]) for name, arrays in ctx.data.items()}
  log(f"{plan.task}: {sizes['train']} train / {sizes['validation']} validation / "
      f"{sizes['test']} test examples; {plan.steps} steps of {plan.batch_size} x {plan.seq_len} "
      f"tokens; seeds {list(plan.seeds)}")
  if plan.task == "sentiment":
    train_labels, test_labels = ctx.data["train"]["labels"], ctx.data["test"]["labels"]
    majority = int(np.bincount(train_labels).argmax())
    reference = {"majority class": float(np.mean(test_labels == majority))}
  else:
    base = load_model(ctx, 0)
    reference = {"pretrained (test)": _score(ctx, base, "test"),
                 "pretrained (validation)": _score(ctx, base, "validation")}
    del base
  log(f"{plan.task}: reference " + ", ".join(f"{k} {_fmt(plan, v)}" for k, v in reference.items()))
  total = sum(len(m.lrs) + len(plan.seeds) - 1 for m in plan.methods)
  done = 0
  results = []
  for method in plan.methods:
    grid: dict[float, float] = {}
    best: Run | None = None
    for lr in method.lrs:
      done += 1
      run = train_run(ctx, method, lr, plan.seeds[0], validate=True)
      grid[lr] = run.val
      log(f"[{plan.task} {done}/{total}] {method.name} lr {lr:g} seed {plan.seeds[0]}: "
          f"validation {plan.metric} {_fmt(plan, run.val)} ({run.seconds:.0f} s)")
      better = best is None or (run.val > best.val if plan.higher_is_better else run.val < best.val)
      if better:
        best = run
    runs = [best]
    for seed in plan.seeds[1:]:
      done += 1
      run = train_run(ctx, method, best.lr, seed, validate=False)
      runs.append(run)
      log(f"[{plan.task} {done}/{total}] {method.name} lr {best.lr:g} seed {seed} "
          f"({run.seconds:.0f} s)")
    tests = [_score(ctx, r.model, "test") for r in runs]
    result = MethodResult(method, grid, best.lr, tests, best.trainable, best.head,
                          [r.seconds for r in runs])
    if method.kind != "probe":
      result.coverage = coverage(ctx, best, quick)
    log(f"{plan.task}: {method.name} test {plan.metric} "
        + " / ".join(_fmt(plan, t) for t in tests) + f" (lr {best.lr:g})")
    results.append(result)
    del runs, best
  return TaskResult(plan, results, reference, sizes, time.perf_counter() - started)


# -- report ----------------------------------------------------------------------------------------
def _verdict(res: TaskResult, a: str, b: str) -> str:
  """One sentence comparing methods ``a`` and ``b`` on the test metric."""
  by_name = {m.method.name: m for m in res.methods}
  if a not in by_name or b not in by_name:
    return ""
  x, y = by_name[a], by_name[b]
  plan = res.plan
  if not (math.isfinite(x.mean) and math.isfinite(y.mean)):
    return f"- {a} vs {b}: a run diverged; no comparison."
  diff = x.mean - y.mean
  better = diff > 0 if plan.higher_is_better else diff < 0
  # Standard error of a difference of two means over n seeds each: sqrt((s_a^2 + s_b^2) / n).
  n = len(x.tests)
  error = math.sqrt((x.std ** 2 + y.std ** 2) / n) if n > 1 else 0.0
  scale, unit = (100, " points") if plan.higher_is_better else (1, "")
  text = f"- {a} vs {b}: {_fmt(plan, x.mean)} vs {_fmt(plan, y.mean)}: "
  if diff == 0:
    return text + "equal."
  if abs(diff) < 2 * error:
    return (text + f"the difference ({abs(diff) * scale:.2f}{unit}) is within two standard "
            f"errors ({2 * error * scale:.2f}{unit}) of the seed spread: no clear winner.")
  return (text + f"{a} is {'better' if better else 'worse'} by {abs(diff) * scale:.2f}{unit}"
          + (f" (two standard errors: {2 * error * scale:.2f}{unit})." if n > 1 else
             " (one seed: no error estimate)."))


def render(results: list[TaskResult], plot: str | None) -> str:
  parts = [
      "Fine-tuning quality at equal trainable parameters on two real tasks. Protocol, targets and "
      "budgets: see the docstring of `benchmarks/quality_real.py`. The learning rate of every "
      "method was chosen on the validation split (seed 0, grid shown); the test split was "
      "evaluated only for the final runs. Mean +- sample std over seeds; 'trainable' excludes "
      "the shared classification head.",
      "How to read the comparisons (the ablation): at the same number of trainable parameters, "
      "**SMoA vs HiRA** isolates the spectral block split (two aligned diagonal blocks, each with "
      "rank p, against one W-modulated rank-p update over the whole matrix); **HiRA vs LoRA** "
      "isolates the Hadamard modulation by W (a high-rank update that follows W's entries, "
      "against a plain rank-p update); **full FT** of the same kernels is the upper bound and "
      "the **linear probe** (sentiment) or the pretrained model (Shakespeare) the floor. With "
      "few steps on 2 CPU cores these are short fine-tunes: they measure how well each "
      "parametrisation adapts within a small, fixed compute budget.",
  ]
  coverage_rows = []
  for res in results:
    plan = res.plan
    unit = "test accuracy" if plan.higher_is_better else "test perplexity"
    rows = []
    for m in res.methods:
      grid = ", ".join(f"{lr:g}: {_fmt(plan, v)}" for lr, v in m.grid.items())
      per_seed = " / ".join(_fmt(plan, t) for t in m.tests)
      mean = (f"{100 * m.mean:.1f}% +- {100 * m.std:.1f}" if plan.higher_is_better
              else f"{m.mean:.2f} +- {m.std:.2f}")
      rows.append([m.method.name, f"{m.trainable:,}", f"{m.lr:g}", mean, per_seed, grid,
                   f"{statistics.mean(m.seconds):.0f}"])
      if m.coverage is not None:
        c = m.coverage
        coverage_rows.append([plan.task, m.method.name]
                             + [f"{100 * c.energy_at[f]:.1f}%" for f in FRACTIONS]
                             + [f"{c.effective_rank:.1f}", f"{c.norm_ratio:.2e}", c.kernels])
    head = res.methods[0].head
    title = (f"**{plan.task}** ({res.sizes['train']:,} train / {res.sizes['validation']:,} "
             f"validation / {res.sizes['test']:,} test examples; {plan.steps} steps of "
             f"{plan.batch_size} x {plan.seq_len} tokens, warmup {plan.warmup_steps}; targets "
             f"{', '.join(plan.targets)}; p = {plan.p}: SMoA r={plan.budget.smoa_rank} "
             f"K={plan.budget.num_blocks}, LoRA and HiRA r={plan.budget.lora_rank}"
             + (f"; every method also trains the {head:,}-parameter head" if head else "")
             + f"; wall time {res.seconds / 60:.0f} min).")
    reference = "; ".join(f"{k}: {_fmt(plan, v)}" for k, v in res.reference.items())
    parts += [title,
              _common.markdown_table(["method", "trainable", "lr", f"{unit} (mean +- std)",
                                      "per seed", "validation by lr (seed 0)", "s / run"], rows),
              f"Reference: {reference}.",
              "\n".join(v for v in (_verdict(res, "SMoA", "LoRA"), _verdict(res, "SMoA", "HiRA"),
                                    _verdict(res, "HiRA", "LoRA"), _verdict(res, "SMoA", "full FT"))
                        if v)]
  if coverage_rows:
    fraction_headers = [f"E at {int(100 * f)}%" for f in FRACTIONS]
    kernel_text = "; ".join(
        f"{res.plan.task}: " + ", ".join(f"{100 * res.methods[0].coverage.kernel_energy_at[f]:.0f}%"
                                         for f in FRACTIONS)
        for res in results if res.methods[0].coverage is not None)
    parts += [
        "Spectral coverage of the learned updates (seed-0 runs): `E at x%` is the share of "
        "||dW||^2 inside the span of W's top x% singular directions (both sides; "
        "`smoa_jax.app.analysis.direction_energy`), averaged over the analysed kernels. For "
        f"reference, W's own energy in its top 10/25/50% directions is {kernel_text}; an update "
        "with no preferred direction would have about 1%, 6% and 25%. Lower E at small x means "
        "dW reaches further beyond W's dominant directions (broader coverage).",
        _common.markdown_table(["task", "method"] + fraction_headers
                               + ["eff. rank of dW", "norm(dW) / norm(W)", "kernels"], coverage_rows)]
    if plot:
      parts.append(f"![coverage]({plot})")
  return "\n\n".join(parts)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
  parser = _common.benchmark_parser(
      MODULE, "Quality of SMoA vs LoRA, HiRA, full fine-tuning (and a linear probe) at equal "
              "trainable parameters on real data: MiniLM sentiment, SmolLM2 Shakespeare; "
              "spectral coverage of the learned updates.",
      epilog="The defaults are the full run (about 90 minutes on 2 CPU cores).")
  parser.add_argument("--task", choices=("sentiment", "shakespeare", "all"), default="all")
  parser.add_argument("--sentiment-steps", type=int, default=SENTIMENT.steps)
  parser.add_argument("--shakespeare-steps", type=int, default=SHAKESPEARE.steps)
  parser.add_argument("--shakespeare-batch", type=int, default=SHAKESPEARE.batch_size)
  parser.add_argument("--val-limit", type=int, default=SHAKESPEARE.val_limit,
                      help="Shakespeare validation passages (evenly spaced subset)")
  parser.add_argument("--test-limit", type=int, default=SHAKESPEARE.test_limit,
                      help="Shakespeare test passages (evenly spaced subset)")
  parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
  _common.add_run_flags(parser,
                        quick="tiny random models, 3 steps, one seed: a smoke test (never writes)",
                        no_write="leave benchmarks/RESULTS.md and benchmarks/plots/ alone")
  args = parser.parse_args(argv)
  if args.quick:
    args.no_write = True
  return args


def plans_from_args(args: argparse.Namespace) -> list[Plan]:
  seeds = tuple(range(args.seeds))
  chosen = {"sentiment": dataclasses.replace(SENTIMENT, steps=args.sentiment_steps, seeds=seeds),
            "shakespeare": dataclasses.replace(
                SHAKESPEARE, steps=args.shakespeare_steps, batch_size=args.shakespeare_batch,
                val_limit=args.val_limit, test_limit=args.test_limit, seeds=seeds)}
  names = list(chosen) if args.task == "all" else [args.task]
  return [quick_plan(chosen[n]) if args.quick else chosen[n] for n in names]


def main(argv: Sequence[str] | None = None) -> str:
  """Run the benchmark, print the results, update RESULTS.md unless told not to; return the body."""
  argv = _common.cli_argv(argv)
  args = parse_args(argv)
  load_at_start = _common.load_average()
  started = time.perf_counter()

  log = _common.minutes_log(started)

  with (tempfile.TemporaryDirectory(prefix="smoa-quality-real-") as workdir,
        _models.fast_compile(args.quick)):
    results = [run_task(plan, args.quick, Path(workdir), log) for plan in plans_from_args(args)]
  plot = None
  if not args.no_write:
    covered = {res.plan.task: {m.method.name: m.coverage for m in res.methods if m.coverage}
               for res in results}
    written = plot_coverage(covered, PLOT_PATH)
    plot = written.relative_to(_common.RESULTS_PATH.parent).as_posix()
  body = render(results, plot)
  body += f"\n\nTotal wall time {(time.perf_counter() - started) / 60:.0f} min."
  _common.publish(SECTION, "quality_real: fine-tuning quality on real data, equal budgets", body,
                  module=MODULE, argv=argv, write=not args.no_write, load_at_start=load_at_start)
  return body


if __name__ == "__main__":
  main()
