"""Exceptions raised by smoa-jax.

Every error the library raises on bad input derives from :class:`SMoAError`, so a caller (the
command line, a training script) can tell "the user gave us something wrong" from a bug. Each
also derives from the matching built-in type (``ValueError``, ``OSError``, ...) so code written
against the standard exceptions keeps working.
"""

from __future__ import annotations


class SMoAError(Exception):
  """Base class of every error smoa-jax raises on bad input or a failed operation."""


class ConfigError(SMoAError, ValueError):
  """An adapter config (or a layer built from one) has an invalid field or does not fit a layer."""


class KernelError(SMoAError, ValueError):
  """A kernel cannot be adapted: wrong rank, or NaN/Inf values at spectral preprocessing."""


class TargetError(SMoAError, ValueError):
  """`target_modules` / `exclude_modules` / `layers_to_transform` select nothing usable."""


class CheckpointError(SMoAError, ValueError):
  """A checkpoint or model directory is missing, malformed, unsafe or does not fit the model."""


class AdapterMismatchError(SMoAError, ValueError):
  """A saved adapter does not belong to this base model or this config."""


class DataError(SMoAError, ValueError):
  """Training or evaluation data is empty, malformed or out of range."""


class NonFiniteLossError(SMoAError, FloatingPointError):
  """Training produced a NaN or infinite loss; the last good checkpoint is kept."""
