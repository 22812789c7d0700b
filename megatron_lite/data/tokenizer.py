"""Tokenizers: a dependency-free byte tokenizer and Hugging Face `tokenizers` JSON files.

Both expose the same small surface (`vocab_size`, `eod_id`, `name`, `encode`, `encode_batch`,
`decode`), which is all preprocessing and training need.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from pathlib import Path

# Tried in order when a tokenizer file does not say which token ends a document.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "[SEP]")
BPE_EOD_TOKEN = "<|endoftext|>"


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, plus one end-of-document id (256)."""

    name = "byte"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod_id(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        # A window may start or end inside a multi-byte character, and a model may have more ids than
        # bytes (a Hugging Face vocabulary): never raise on decode, unknown ids become U+FFFD.
        data = b"".join(bytes([int(i)]) if 0 <= int(i) < 256 else "\ufffd".encode() for i in ids
                        if int(i) != self.eod_id)
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A `tokenizers.Tokenizer` JSON file (what `tokenizer.json` of a HF model repo holds)."""

    def __init__(self, path: str | Path, eod_token: str | None = None):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        self._tok = Tokenizer.from_file(str(self.path))
        self._eod_id = self._find_eod(eod_token)
        # The name keys preprocessing caches, so two different files never share one.
        digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:12]
        self.name = f"hf-{digest}"

    def _find_eod(self, eod_token: str | None) -> int:
        candidates = (eod_token,) if eod_token else EOD_CANDIDATES
        for token in candidates:
            token_id = self._tok.token_to_id(token)
            if token_id is not None:
                return token_id
        raise ValueError(
            f"{self.path}: no end-of-document token among {list(candidates)}; "
            "pass eod_token=... naming the one this tokenizer uses"
        )

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int:
        return self._eod_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, path: str | Path) -> HFTokenizer:
    """Train a GPT-2 style byte-level BPE on `texts`, save it as JSON at `path` and load it.

    Byte-level means every string round-trips exactly, whatever the training texts held.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small for byte-level BPE: it needs at least "
            f"{len(alphabet) + 1} (256 bytes plus the end-of-document token)"
        )
    tok = Tokenizer(models.BPE())
    # No prefix space: it would add a character that decode cannot tell from the text's own.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BPE_EOD_TOKEN],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tok.save(str(tmp))
    tmp.replace(path)
    return HFTokenizer(path, eod_token=BPE_EOD_TOKEN)


def build_tokenizer(kind: str, path: str | Path | None = None) -> ByteTokenizer | HFTokenizer:
    """`kind` is "byte" (no file) or "hf" (a `tokenizers` JSON file at `path`)."""
    if kind == "byte":
        return ByteTokenizer()
    if kind == "hf":
        if not path:
            raise ValueError("tokenizer kind 'hf' needs a path to a tokenizers JSON file")
        return HFTokenizer(path)
    raise ValueError(f"unknown tokenizer kind {kind!r}; expected 'byte' or 'hf'")
