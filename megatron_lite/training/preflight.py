"""Checks of the run's inputs on the filesystem and of the overrides themselves, made by the launching
process before any rank starts (data files, tokenizer, cache and checkpoint directories, W&B names,
deleted keys). Each problem is one ValueError naming the key, the value and what would work. Nothing
is created here: a path is only checked to be creatable.

`scrub_hydra_output` then masks credentials in the record Hydra wrote of the run (`.hydra/*.yaml`).
"""

from __future__ import annotations

import os
import re
import sys

from megatron_lite.training.config import RunConfig
from megatron_lite.training.logging import REDACTED, is_secret_key, scrub_secrets

# What W&B refuses in a project name (wandb_settings.validate_project), applied to the entity too.
_WANDB_FORBIDDEN = re.compile(r"[/\\#?%:]")
_WANDB_NAME_MAX = 128
_WANDB_TAG_MAX = 64


def check_overrides(overrides: list[str]) -> None:
    """The command-line overrides themselves: a deleted key would silently run with the schema default."""
    for override in overrides:
        if override.startswith("~"):
            key = override[1:].split("=", 1)[0]
            raise ValueError(f"deleting keys is not supported ({override}): set the value instead, e.g. "
                             f"{key}=... (or {key}=null where null is allowed)")


def _expand(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


def _creatable(key: str, value: str) -> None:
    """`value` is a directory, or can be made one: its nearest existing ancestor is a writable directory."""
    path = _expand(value)
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise ValueError(f"{key}={value} is a file, not a directory: choose another path")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{key}={value} is not writable by this user: choose another path")
        return
    ancestor = os.path.dirname(path)
    while not os.path.exists(ancestor):  # the root always exists, so this ends
        ancestor = os.path.dirname(ancestor)
    if not os.path.isdir(ancestor):
        raise ValueError(f"{key}={value} cannot be created: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ValueError(f"{key}={value} cannot be created: {ancestor} is not writable by this user")


def _data_files(cfg: RunConfig) -> None:
    data = cfg.data
    if data.tokenizer_path and not os.path.isfile(_expand(data.tokenizer_path)):
        what = "is a directory" if os.path.isdir(_expand(data.tokenizer_path)) else "does not exist"
        raise ValueError(f"data.tokenizer_path={data.tokenizer_path} {what}: give a tokenizers JSON file (e.g. made "
                         "by scripts/preprocess_data.py tokenizer=hf train_bpe_vocab_size=N tokenizer_path=...)")
    if data.name == "indexed":
        keys = [(f"data.train_prefixes[{i}]", prefix) for i, prefix in enumerate(data.train_prefixes)]
        for key, prefix in [*keys, ("data.validation_prefix", data.validation_prefix)]:
            missing = [prefix + ext for ext in (".bin", ".idx") if not os.path.isfile(_expand(prefix + ext))]
            if missing:
                raise ValueError(f"{key}={prefix}: no {' or '.join(missing)}; make them with "
                                 "scripts/preprocess_data.py input=... output_prefix=...")
    else:  # shakespeare: tokenized into cache_dir on first use (indexed runs never touch it)
        _creatable("data.cache_dir", data.cache_dir)


def _vocabulary(cfg: RunConfig) -> None:
    from megatron_lite.data.tokenizer import build_tokenizer

    try:
        tokenizer = build_tokenizer(cfg.data.tokenizer, cfg.data.tokenizer_path)
    except Exception as err:  # noqa: BLE001 - a file the tokenizers library cannot read, no EOD token, ...
        detail = " ".join(str(err).split())[:300]
        raise ValueError(f"data.tokenizer_path={cfg.data.tokenizer_path} cannot be used as a tokenizer "
                         f"({type(err).__name__}: {detail})") from None
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the {cfg.data.tokenizer} "
                         f"tokenizer's {tokenizer.vocab_size} tokens: set model.vocab_size>={tokenizer.vocab_size}")


def _checkpoint_paths(cfg: RunConfig) -> None:
    ckpt = cfg.checkpoint
    if ckpt.dir and os.path.isabs(os.path.expanduser(ckpt.dir)):  # a relative one lives in the run's output dir
        _creatable("checkpoint.dir", ckpt.dir)
    if ckpt.resume_from:
        path = _expand(ckpt.resume_from)
        if not os.path.isdir(path):
            raise ValueError(f"checkpoint.resume_from={ckpt.resume_from} "
                             + ("is a file" if os.path.exists(path) else "does not exist")
                             + ": give the checkpoint.dir of the run to continue (it holds step_* directories)")


def _wandb(cfg: RunConfig) -> None:
    w = cfg.logging.wandb
    if w.mode == "disabled":
        return
    for key, value in (("logging.wandb.project", w.project), ("logging.wandb.entity", w.entity)):
        if value is not None and (not value or len(value) > _WANDB_NAME_MAX or _WANDB_FORBIDDEN.search(value)):
            raise ValueError(f"{key}={value!r} is not a valid W&B name: 1 to {_WANDB_NAME_MAX} characters, "
                             "none of / \\ # ? % :")
    for i, tag in enumerate(w.tags):
        if not 1 <= len(str(tag)) <= _WANDB_TAG_MAX:
            raise ValueError(f"logging.wandb.tags[{i}]={tag!r} is not a valid W&B tag: 1 to {_WANDB_TAG_MAX} "
                             "characters")
    if w.dir is not None:
        _creatable("logging.wandb.dir", w.dir)


def check_inputs(cfg: RunConfig) -> None:
    """Everything on the filesystem the run will read or write, and names W&B would refuse mid-run."""
    _data_files(cfg)
    _vocabulary(cfg)
    _checkpoint_paths(cfg)
    _wandb(cfg)


# `key=value` at the start of a string or after an item separator (`,` in override_dirname); the
# key may carry Hydra's +, ++ or ~ prefix.
_OVERRIDE_KEY = re.compile(r"(?:^|(?<=,))([+~]{0,2}[A-Za-z_][\w.\-\[\]]*)=")


def _secret_override_key(key: str) -> bool:
    name = key.lstrip("+~").split(".")[-1]
    return is_secret_key(re.sub(r"\[\d*\]$", "", name))


def scrub_override(text: str) -> str:
    """One override string (`a.b=value`) with the value masked when the key is secret, and URL
    credentials masked anywhere."""
    key, eq, _ = text.partition("=")
    if eq and _secret_override_key(key):
        return f"{key}={REDACTED}"
    return scrub_secrets(text)


def scrub_override_list(text: str) -> str:
    """Several overrides joined by `,` (Hydra's `hydra.job.override_dirname`): each secret key's value
    is masked up to the next `,key=` (or the end), and URL credentials anywhere."""
    matches = list(_OVERRIDE_KEY.finditer(text))
    out, pos = [], 0
    for i, match in enumerate(matches):
        if not _secret_override_key(match.group(1)):
            continue
        end = matches[i + 1].start() - 1 if i + 1 < len(matches) else len(text)  # the `,` before the next key
        out += [text[pos:match.end()], REDACTED]
        pos = end
    out.append(text[pos:])
    return scrub_secrets("".join(out))


def _scrub_record(value, parent: str | None = None):
    """Hydra's record: nested dicts, lists of override strings, and override_dirname."""
    if isinstance(value, dict):
        return {key: REDACTED if is_secret_key(key) else _scrub_record(item, str(key)) for key, item in value.items()}
    if isinstance(value, list):
        return [_scrub_record(item, parent) for item in value]
    if isinstance(value, str):
        if parent == "override_dirname":
            return scrub_override_list(value)
        return scrub_override(value)
    return value


def scrub_hydra_output(output_dir: str | None) -> None:
    """Hydra's record of the run (`.hydra/config.yaml`, `overrides.yaml`, `hydra.yaml`) with credentials
    masked, as in W&B and the checkpoints: secret-looking keys, secret `key=value` overrides (also in
    hydra.overrides.* and hydra.job.override_dirname) and user:password@ in URLs. Files that need no
    change are left alone; each rewrite is atomic. Never raises (a missing folder is fine; a file that
    cannot be rewritten is named in a warning): the record is a convenience, not the run."""
    if not output_dir:
        return
    from omegaconf import OmegaConf

    for name in ("config.yaml", "overrides.yaml", "hydra.yaml"):
        path = os.path.join(output_dir, ".hydra", name)
        tmp = f"{path}.{os.getpid()}.tmp"
        try:
            if not os.path.isfile(path):
                continue
            content = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            scrubbed = _scrub_record(content)
            if scrubbed == content:
                continue
            OmegaConf.save(OmegaConf.create(scrubbed), tmp)
            os.replace(tmp, path)
        except Exception as err:  # noqa: BLE001 - an unreadable or odd file stays as Hydra wrote it
            print(f"warning: could not mask credentials in {path} ({type(err).__name__}: {err})", file=sys.stderr)
            try:
                os.remove(tmp)
            except OSError:
                pass
