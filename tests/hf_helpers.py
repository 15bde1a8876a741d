"""Helpers for tests that build tiny random Hugging Face models with transformers."""

import torch


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Perturb every parameter (so zero biases and unit norms are exercised too); eval mode."""
  torch.manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return model.eval()
