"""Checks of the run's inputs on the filesystem and of the overrides themselves, made by the launching
process before any rank starts (data files, tokenizer, cache and checkpoint directories, W&B names,
deleted keys). Each problem is one ValueError naming the key, the value and what would work."""

from __future__ import annotations

from megatron_lite.training.config import RunConfig


def check_overrides(overrides: list[str]) -> None:
    """The command-line overrides themselves (e.g. a deleted key)."""


def check_inputs(cfg: RunConfig) -> None:
    """Everything on the filesystem the run will read or write."""
