"""Smoke tests of the benchmark scripts, so that they cannot rot.

Each script's ``main`` runs in-process with ``--quick --no-write`` (tiny sizes, a few rounds);
the authors' PyTorch algorithm is checked against smoa_jax on a tiny layer, and the RESULTS.md
writer is checked to touch only its own section.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

import smoa_jax
from smoa_jax.app import assets, datasets

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of scripts at the repo root, not installed
  sys.path.insert(0, str(ROOT))

from benchmarks import (
  _budgets,
  _common,
  _models,
  layer_step,
  mixed_precision,
  quality_real,
  quality_synthetic,
  remat,
  spectral_prep,
  study,
)
from benchmarks.authors_torch import compare_with_smoa_jax


def _results_text() -> str | None:
  return _common.RESULTS_PATH.read_text() if _common.RESULTS_PATH.exists() else None


@pytest.mark.slow  # a whole benchmark script end to end (-m slow)
def test_layer_step_quick_runs_and_does_not_write():
  before = _results_text()
  body = layer_step.main(["--quick", "--no-write"])
  assert "80x47" in body and "SMoA/LoRA" in body and "authors/SMoA" in body
  assert "merged/base" in body
  assert _results_text() == before


@pytest.mark.slow  # a whole benchmark script end to end (-m slow)
def test_spectral_prep_quick_runs_and_does_not_write():
  before = _results_text()
  body = spectral_prep.main(["--quick", "--no-write"])
  assert "48x96" in body and "same block K=2" in body
  assert _results_text() == before


@pytest.mark.slow  # a whole benchmark script end to end (-m slow)
def test_quality_synthetic_quick_runs_and_does_not_write():
  before = _results_text()
  body = quality_synthetic.main(["--quick", "--no-write"])
  rows = [line for line in body.splitlines() if line.startswith("| random 96x160 |")]
  assert len(rows) == len(quality_synthetic.TARGETS) * len(quality_synthetic.METHODS)
  assert sum("**best**" in row for row in rows) == len(quality_synthetic.TARGETS)
  assert _results_text() == before


@pytest.mark.slow  # compiles six training steps (a minute of CPU)
def test_remat_quick_runs_and_does_not_write():
  before = _results_text()
  body = remat.main(["--quick", "--no-write"])
  rows = [line for line in body.splitlines() if line.startswith(("| 16 |", "| 32 |"))]
  assert len(rows) == 2 * len(remat.POLICIES), body
  assert "`full` at T=32" in body and "`dots` at T=32" in body
  assert _results_text() == before


@pytest.mark.slow  # two short fine-tunes (tokenizes Shakespeare; needs the SmolLM2 tokenizer)
@pytest.mark.assets
@pytest.mark.skipif(not (assets.is_cached("smollm2") and assets.is_cached("shakespeare")),
                    reason="SmolLM2 or Shakespeare not cached (run 'smoa-jax fetch-assets')")
def test_mixed_precision_quick_runs_and_does_not_write():
  before = _results_text()
  body = mixed_precision.main(["--quick", "--no-write"])
  assert "| float32 | 0 |" in body and "| bfloat16 | 0 |" in body
  assert "= 0.50x." in body  # a bfloat16 base halves the tiny model's resident bytes
  assert _results_text() == before


@pytest.mark.slow  # about 20 tiny fine-tunes (tokenizes the sentiment data; MiniLM's tokenizer)
@pytest.mark.assets
@pytest.mark.skipif(not (assets.is_cached("minilm") and assets.is_cached("sentiment")),
                    reason="MiniLM or the sentiment data not cached (run 'smoa-jax fetch-assets')")
def test_study_quick_runs_every_part_then_trains_nothing_from_its_cache(tmp_path, monkeypatch):
  before = _results_text()
  argv = ["--task", "sentiment", "--quick", "--cache-dir", str(tmp_path)]
  first = study.main(argv)
  files = sorted((tmp_path / "sentiment").glob("*.json"))
  assert len(files) > 10 and "Not run yet" not in first, first
  conclusions = first[first.index("### Conclusions"):first.index("### Learning rates")]
  assert conclusions.count("\n- ") >= 6 and "**SMoA " in conclusions, conclusions
  records = [json.loads(f.read_text()) for f in files]
  assert all(r["config"]["quick"] for r in records)
  # The equal-wall-clock LoRA runs take their length from one side-by-side step timing.
  (timing,) = [r["result"] for r in records if r["config"]["method"] == "timing"]
  assert timing["rounds"] == 3 and timing["smoa_seconds"] > 0 and timing["lora_seconds"] > 0
  assert f"SMoA / LoRA = {timing['ratio']:.2f}" in first
  # Every part has its table, read back from the cache.
  for header in ("| method | chosen lr |", "| method | trainable | lr |", "| p | method | r |",
                 "| K | r | lr |", "| run | steps |"):
    assert header in first, header

  def no_training(*args, **kwargs):
    raise AssertionError("a cached run was trained again")

  monkeypatch.setattr(study.quality_real, "train_run", no_training)
  monkeypatch.setattr(study.quality_real, "make_context", no_training)
  second = study.main(argv)
  assert "trained 0 runs" in second
  assert second.rsplit("\n\n", 1)[0] == first.rsplit("\n\n", 1)[0]  # all but the last line
  assert sorted((tmp_path / "sentiment").glob("*.json")) == files
  assert _results_text() == before
  # The budget plot, drawn from the cache alone.
  runner = study.Runner(study.quick_study(study.STUDIES["sentiment"]), study.RunCache(tmp_path),
                        train=False)
  text = study.part_budget(runner, tmp_path / "budget.png")
  assert (tmp_path / "budget.png").stat().st_size > 0 and "budget.png)" in text


def test_study_renders_parts_without_runs_as_not_run_yet(tmp_path):
  # Publishing reads the cache only: with no runs, nothing is trained and nothing is faked.
  body = study.render(study.STUDIES["shakespeare"], study.RunCache(tmp_path), plots=False)
  assert body.count("Not run yet.") == len(study.PARTS) and "Reference: not run yet." in body
  assert "None yet: no comparison with an interval has run." in body
  assert not any(tmp_path.iterdir())


def test_study_quick_never_caches_into_the_repository():
  with pytest.raises(SystemExit):
    study.parse_args(["--task", "sentiment", "--quick", "--cache-dir",
                      str(study.RUNS_DIR / "sentiment")])


@pytest.mark.assets
@pytest.mark.skipif(not (assets.is_cached("smollm2") and assets.is_cached("sentiment")),
                    reason="SmolLM2 or the sentiment data not cached (run 'smoa-jax fetch-assets')")
def test_study_instruct_task_trains_on_answers_and_scores_generated_labels(tmp_path, monkeypatch):
  plan = study.quick_study(study.STUDIES["instruct"]).base
  ctx = quality_real.make_context(plan, True, tmp_path)
  train = ctx.data["train"]
  # Packed chat rows with the loss on the answers only.
  assert train["input_ids"].shape[1] == plan.seq_len
  assert 0 < train["loss_mask"].sum() < train["attention_mask"].sum()
  for split, limit in (("validation", plan.val_limit), ("test", plan.test_limit)):
    assert len(ctx.reviews[split]) == len(ctx.data[split]["labels"]) == limit
  truth = ctx.data["validation"]["labels"]
  # The metric reads the labels of the generated answers: an off-format answer (None) is wrong.
  read = [int(t) for t in truth[:5]] + [None] + [1 - int(t) for t in truth[6:]]

  def answers(model, tokenizer, texts, *, max_new_tokens, batch_size):
    assert texts == ctx.reviews["validation"] and max_new_tokens == plan.max_new_tokens
    return ["..."] * len(texts), read

  monkeypatch.setattr(datasets, "answer_sentiment", answers)
  assert quality_real._score(ctx, None, "validation") == pytest.approx(5 / len(truth))


@pytest.mark.slow  # about 2 minutes: every part with a tiny Llama that generates its answers
@pytest.mark.assets
def test_study_quick_runs_every_part_of_the_instruct_task(tmp_path):
  body = study.main(["--task", "instruct", "--quick", "--cache-dir", str(tmp_path)])
  assert "Not run yet" not in body and "Reference (instruct model zero-shot)" in body
  assert "| run | steps |" in body


def test_study_run_cache_round_trip_and_keys(tmp_path):
  cache = study.RunCache(tmp_path)
  spec = study.RunSpec("sentiment", "smoa", 8, 2, 0.04, 0, 300, 30, 32, 64, ("query", "value"),
                       None, None, False)
  assert cache.load(spec) is None
  cache.store(spec, {"val": 0.8, "test": 0.81})
  assert cache.load(spec) == {"val": 0.8, "test": 0.81}
  assert [p.name for p in (tmp_path / "sentiment").iterdir()] == [f"{spec.key}.json"]
  other = dataclasses.replace(spec, seed=1)
  assert other.key != spec.key and cache.load(other) is None
  assert dataclasses.replace(spec, protocol=study.PROTOCOL + 1).key != spec.key
  # A file that holds another run under this key (hand-edited, or a collision) is an error.
  cache.path(other).write_text(cache.path(spec).read_text())
  with pytest.raises(ValueError, match="delete it"):
    cache.load(other)


def test_study_estimate_counts_each_run_once(tmp_path):
  plan = study.STUDIES["shakespeare"]
  rate = study.SECONDS_PER_STEP["shakespeare"]
  minutes = study.estimate(plan, study.RunCache(tmp_path))
  steps = plan.base.steps
  # lr: the 3-point grid and one widening per method; seeds: 4 more seeds per method.
  assert minutes["lr"] == pytest.approx(4 * steps * sum(rate.values()) / 60)
  assert minutes["seeds"] == pytest.approx(4 * steps * sum(rate.values()) / 60)
  # budget: 4 budgets x 4 series at seed 0, less the 3 runs at p = 8 that the seeds part has.
  per_p = rate["lora"] + rate["hira"] + 2 * rate["smoa"]
  shared = rate["lora"] + rate["hira"] + rate["smoa"]
  assert minutes["budget"] == pytest.approx((4 * per_p - shared) * steps / 60)
  # K ablation: K = 4 (seeds 1, 2; seed 0 is on the budget curve) and K = 8 (seeds 0-2).
  assert minutes["kablation"] == pytest.approx(5 * rate["smoa"] * steps / 60)


def test_study_widens_the_grid_until_the_best_rate_is_interior():
  calls = []

  def score(lr):  # validation accuracy peaking at lr = 1e-3 (log-quadratic)
    calls.append(lr)
    return 1.0 - (np.log10(lr) + 3.0) ** 2

  choice = study.select_lr(score, (0.02, 0.04, 0.08), higher_is_better=True, factor=2.0,
                           max_widenings=10)
  # 0.02 / 2^4 = 0.00125 is the best; 0.000625 (one more step down) shows it is interior.
  assert choice.lr == 0.00125 and not choice.on_edge and choice.widenings == 5
  assert calls == [0.02, 0.04, 0.08, 0.01, 0.005, 0.0025, 0.00125, 0.000625]
  assert list(choice.scores) == sorted(calls)
  capped = study.select_lr(score, (0.02, 0.04, 0.08), higher_is_better=True, max_widenings=2)
  assert capped.lr == 0.005 and capped.on_edge and capped.widenings == 2
  # Perplexity (lower is better), the top rate diverges: widen upwards once, then stop there.
  ppl = {0.01: 70.0, 0.02: 65.0, 0.04: 60.0, 0.08: math.inf}
  choice = study.select_lr(ppl.__getitem__, (0.01, 0.02, 0.04), higher_is_better=False)
  assert choice.lr == 0.04 and not choice.on_edge and choice.widenings == 1


def test_study_paired_difference_on_known_numbers():
  t = 4.302652729911275  # scipy.stats.t.ppf(0.975, 2)
  res = study.paired_difference([3.0, 4.0, 5.0], [2.0, 2.0, 2.0], higher_is_better=True)
  # d = (1, 2, 3): mean 2, sd 1, half width t / sqrt(3).
  assert res.n == 3 and res.mean == pytest.approx(2.0)
  assert (res.low, res.high) == pytest.approx((2 - t / math.sqrt(3), 2 + t / math.sqrt(3)))
  assert res.verdict == "level"
  tight = ([2.0, 2.1, 1.9], [0.0, 0.0, 0.0])
  assert study.paired_difference(*tight, higher_is_better=True).verdict == "ahead"
  assert study.paired_difference(*tight, higher_is_better=False).verdict == "behind"
  assert study.paired_difference(tight[1], tight[0], higher_is_better=False).verdict == "ahead"
  assert study.paired_difference([1.0], [0.0], higher_is_better=True).verdict == "one seed"
  assert study.paired_difference([1.0, math.inf], [0.0, 1.0],
                                 higher_is_better=False).verdict == "diverged"
  with pytest.raises(ValueError, match="same seeds"):
    study.paired_difference([1.0, 2.0], [1.0], higher_is_better=True)


@pytest.mark.parametrize("method", quality_synthetic.METHODS)
def test_quality_synthetic_fits_an_update_it_can_represent(method):
  # Each method's own dW at random factors is a target it can reach: the fit must get close,
  # starting from other factors, or the fitter (shared over seeds and learning rates) is broken.
  w = np.random.default_rng(0).standard_normal((24, 40)).astype(np.float32)
  delta_fn, init = quality_synthetic.method_delta(method, w, r=4, k=2)
  a, b = init(jax.random.key(0))
  target = np.asarray(delta_fn((a, jax.random.normal(jax.random.key(1), b.shape))))
  fit = quality_synthetic.make_fitter(delta_fn, steps=300)
  start, _ = quality_synthetic.run_fit(fit, init(jax.random.key(2)), target, 0.0)
  err, dw = quality_synthetic.run_fit(fit, init(jax.random.key(2)), target, 3e-2)
  assert start == pytest.approx(1.0) and err < 0.1, (start, err)
  assert dw.shape == w.shape


@pytest.mark.parametrize(
    "n_in, n_out, config",
    [
        pytest.param(24, 40, smoa_jax.SMoAConfig(r=5, num_blocks=3, alpha=8), id="uneven-blocks"),
        pytest.param(40, 24, smoa_jax.SMoAConfig(r=5, num_blocks=3, alpha=8,
                                                 branch_ranks=(3, 0, 2)), id="frozen-block"),
    ])
def test_authors_torch_matches_smoa_jax(n_in, n_out, config):
  linear = nnx.Linear(n_in, n_out, rngs=nnx.Rngs(0))
  linear.bias[...] = jax.random.normal(jax.random.key(3), (n_out,))
  layer = smoa_jax.SMoADense.from_linear(linear, config, rngs=nnx.Rngs(1))
  # Non-zero b, so the adapter path really contributes (padding entries meet zero anchors).
  _models.randomize_lora_b(layer, seed=2, scale=1.0)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, n_in), dtype=np.float32)
  dy = rng.standard_normal((16, n_out), dtype=np.float32)
  diffs = compare_with_smoa_jax(layer, x, dy)
  assert all(v <= 1e-5 for v in diffs.values()), diffs


def test_write_section_rewrites_only_its_section(tmp_path):
  path = tmp_path / "RESULTS.md"
  kwargs = dict(command="python -m benchmarks.x --flag", machine="test machine", path=path)
  _common.write_section("a", "A", "first", **kwargs)
  _common.write_section("b", "B", "| t |\n| --- |", **kwargs)
  text = path.read_text()
  assert text.startswith(_common.RESULTS_HEADER)
  b_section = text[text.index("<!-- begin: b -->"):]
  _common.write_section("a", "A", "second", **kwargs)
  new = path.read_text()
  assert "second" in new and "first" not in new
  assert new.endswith(b_section) and new.count("<!-- begin: a -->") == 1
  assert "`python -m benchmarks.x --flag` on test machine" in new
  assert [p.name for p in tmp_path.iterdir()] == ["RESULTS.md"]  # no temp file left behind


def test_time_interleaved_rotates_within_groups():
  calls = []
  timings = _common.time_interleaved({"a": lambda: calls.append("a"),
                                      "b": lambda: calls.append("b")},
                                     {"c": lambda: calls.append("c")}, rounds=3, warmup=1)
  assert timings.rounds == 3 and len(calls) == 12
  # Groups run in order; the start rotates within each group from round to round.
  assert calls == ["a", "b", "c"] + ["a", "b", "c", "b", "a", "c", "a", "b", "c"]  # warmup first
  assert timings.ratio("a", "a") == 1.0


@pytest.mark.parametrize("n_in, n_out", [(24, 40), (37, 53)])
@pytest.mark.parametrize("num_blocks", [2, 3])
def test_equal_budget_configs_train_the_same_parameters(n_in, n_out, num_blocks):
  # The budget the quality and speed comparisons rest on: p (in + out) trainable parameters for
  # SMoA (K blocks of rank p), LoRA and HiRA (rank p), uneven blocks included.
  budget = _budgets.EqualBudget(p=3, num_blocks=num_blocks)
  linear = nnx.Linear(n_in, n_out, rngs=nnx.Rngs(0))
  layers = [smoa_jax.SMoADense.from_linear(linear, budget.smoa(), rngs=nnx.Rngs(1)),
            smoa_jax.LoRADense.from_linear(linear, budget.lora(), rngs=nnx.Rngs(1)),
            smoa_jax.HiRADense.from_linear(linear, budget.hira(), rngs=nnx.Rngs(1))]
  assert [layer.num_trainable_params for layer in layers] == [3 * (n_in + n_out)] * 3
  assert all(layer.config.alpha / layer.config.r == _budgets.SCALE for layer in layers)
  assert _budgets.EqualBudget.of_smoa(3 * num_blocks, num_blocks) == budget
  with pytest.raises(ValueError, match="multiple of K"):
    _budgets.EqualBudget.of_smoa(3 * num_blocks + 1, num_blocks)


def test_tree_nbytes_and_size_count_every_kind_of_array():
  import torch

  tree = {"jax": jax.numpy.zeros((3, 4)), "numpy": np.zeros(2, np.int64), "count": 7,
          "abstract": jax.ShapeDtypeStruct((5,), jax.numpy.bfloat16),
          "torch": [torch.zeros(3, dtype=torch.float64)]}
  assert _common.tree_nbytes(tree) == 3 * 4 * 4 + 5 * 2 + 2 * 8 + 3 * 8
  assert _common.tree_size(tree) == 12 + 5 + 2 + 3
  assert _common.format_mib(3 * 2**19) == "1.5" and _common.format_mib(2**30, 2) == "1,024.00"


def test_randomize_lora_b_makes_the_update_nonzero_and_repeatable():
  linear = nnx.Linear(24, 40, rngs=nnx.Rngs(0))
  layer = smoa_jax.SMoADense.from_linear(linear, _budgets.smoa_config(4, 2), rngs=nnx.Rngs(1))
  assert not np.any(layer.delta_weight())  # a fresh adapter's b is zero
  _models.randomize_lora_b(layer, seed=5)
  first = np.array(layer.lora_b[...])
  assert np.any(layer.delta_weight()) and 0 < np.abs(first).max() < 0.1
  _models.randomize_lora_b(layer, seed=5)
  np.testing.assert_array_equal(layer.lora_b[...], first)


def test_worker_process_rounds_and_errors():
  # benchmarks/model_step.py times each framework in its own process, one round per request.
  from benchmarks import _procs

  with _procs.Worker("tests.support.bench_worker") as worker:
    answer = worker.call("build", names=["a", "b"])
    assert answer == {"imported": [], "a": {}, "b": {}}  # the protocol imports neither runtime
    timings = _common.time_rounds([worker.round], rounds=2, warmup=1)
    assert timings.rounds == 2 and set(timings.samples) == {"a", "b"}
    # The start rotates from round to round inside the worker, as in one process.
    assert worker.call("calls") == ["a", "b"] + ["a", "b", "b", "a"]  # warmup first
    with pytest.raises(_procs.WorkerError, match="ZeroDivisionError"):
      worker.call("fail")
    with pytest.raises(_procs.WorkerError, match="ended"):
      worker.call("calls")
  assert worker.process.returncode not in (None, 0)


_HLO = """HloModule jit_step, entry_computation_layout={(f32[256]{0})->f32[2048]{0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %p = (s32[], f32[1024]{0}) parameter(0)
  %v = f32[1024]{0} get-tuple-element(%p), index=1
  %r = f32[1024]{0} all-reduce(%v), replica_groups=[1,8]<=[8], to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[1024]{0}) tuple(%i, %r)
}

%cond (p: (s32[], f32[1024])) -> pred[] {
  %p.1 = (s32[], f32[1024]{0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f32[256]) -> f32[2048] {
  %a = f32[256]{0} parameter(0)
  %g = f32[2048]{0} all-gather(%a), replica_groups=[1,8]<=[8], dimensions={0}
  %one = f32[256]{0} all-reduce(%a), replica_groups=[8,1]<=[8], to_apply=%add
  %init = (s32[], f32[1024]{0}) tuple(%z, %v0)
  %w = (s32[], f32[1024]{0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  ROOT %out = f32[2048]{0} copy(%g)
}
"""


def test_collective_bytes_count_operands_times_loop_trips_and_skip_groups_of_one():
  from benchmarks.collectives import collective_bytes

  found = collective_bytes(_HLO)
  assert found["all-gather"] == 256 * 4  # the operand, not the gathered result
  assert found["all-reduce"] == 3 * 1024 * 4  # 3 loop trips; the 1-device groups move nothing
  assert found["reduce-scatter"] == found["all-to-all"] == found["unknown-trip-count"] == 0
