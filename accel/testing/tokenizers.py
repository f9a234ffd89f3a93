"""Offline tokenizers for the test and benchmark pipelines, built in memory (no hub access).

The CLIP tokenizer uses OpenAI's real 49,408-token BPE vocabulary when the ``open-clip-torch`` package
is installed (its wheel ships ``bpe_simple_vocab_16e6.txt.gz``; install it with ``pip install --no-deps
open-clip-torch``, because its dependencies pull in a torchvision that may not match the installed torch).
Without it, a small byte-level vocabulary without merges is used, so text still round-trips.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import logging
import string
from pathlib import Path
from typing import Any, cast

from transformers import CLIPTokenizer, T5Tokenizer

logger = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
CLIP_VOCAB_SIZE = 49408
"""Size of the real CLIP vocabulary (256 bytes, 256 end-of-word bytes, 48,894 merges, 2 specials)."""

_BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
_NUM_MERGES = 49152 - 256 - 2  # as in OpenAI's CLIP: vocabulary 49,152 minus bytes and specials


def bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2's reversible map from the 256 byte values to printable unicode characters."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def _bpe_path() -> Path | None:
    """The BPE merges file shipped with ``open_clip``, located without importing the package."""
    try:
        spec = importlib.util.find_spec("open_clip")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / _BPE_FILE
    return path if path.is_file() else None


@functools.lru_cache(maxsize=4)
def _clip_vocab(bpe_path: str | None) -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    """Parse (and cache per process) the CLIP vocabulary and merges; byte-level only without a file."""
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    if bpe_path is not None:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as file:
            lines = file.read().split("\n")
        for line in lines[1 : _NUM_MERGES + 1]:
            first, second = line.split()
            merges.append((first, second))
        vocab.extend(first + second for first, second in merges)
    vocab.extend([BOS_TOKEN, EOS_TOKEN])
    if bpe_path is not None:
        logger.info("CLIP tokenizer: real %d-token BPE vocabulary from %s", len(vocab), bpe_path)
    else:
        logger.info(
            "CLIP tokenizer: open_clip is not installed; byte-level fallback vocabulary of %d tokens "
            "(pip install --no-deps open-clip-torch for the real one)",
            len(vocab),
        )
    return {token: i for i, token in enumerate(vocab)}, tuple(merges)


def _cached_clip_vocab() -> tuple[dict[str, int], tuple[tuple[str, str], ...]]:
    path = _bpe_path()
    return _clip_vocab(str(path) if path is not None else None)


def has_real_clip_vocab() -> bool:
    """Whether :func:`clip_tokenizer` uses the real 49,408-token CLIP vocabulary (open-clip-torch present)."""
    return _bpe_path() is not None


def clip_vocab_size() -> int:
    """Number of tokens of :func:`clip_tokenizer` (49,408 real, 514 byte-level), without building one."""
    return len(_cached_clip_vocab()[0])


def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """A CLIP tokenizer built in memory: the real CLIP BPE vocabulary when available, else byte-level.

    Args:
        max_length: ``model_max_length`` of the tokenizer (CLIP's text encoders use 77).

    Returns:
        A fresh ``CLIPTokenizer`` (the parsed vocabulary is cached per process); ``len(tokenizer)`` is
        49,408 with the real vocabulary and 514 with the byte-level fallback.
    """
    vocab, merges = _cached_clip_vocab()
    return CLIPTokenizer(
        vocab=dict(vocab),
        # transformers 5 annotates `merges` as list[str], but its tokenizers backend needs (a, b) tuples
        # ("a b" strings raise TypeError).
        merges=cast(Any, list(merges)),
        model_max_length=max_length,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
    )


@functools.lru_cache(maxsize=1)
def _t5_pieces() -> tuple[tuple[str, float], ...]:
    """Unigram pieces over printable ASCII characters, with and without SentencePiece's word marker."""
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    for char in string.ascii_letters + string.digits + string.punctuation:
        pieces.append(("\u2581" + char, -2.5))
        pieces.append((char, -3.0))
    return tuple(pieces)


def t5_tokenizer(max_length: int = 512) -> T5Tokenizer:
    """A small T5 tokenizer built in memory: a unigram model over characters with pad/eos/unk.

    Ids 0, 1 and 2 are ``<pad>``, ``</s>`` and ``<unk>`` as in T5; there are no ``<extra_id_*>`` tokens,
    so ``len(tokenizer)`` is the vocabulary size a matching ``T5EncoderModel`` needs.
    """
    return T5Tokenizer(
        vocab=list(_t5_pieces()),
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=0,
        model_max_length=max_length,
    )
