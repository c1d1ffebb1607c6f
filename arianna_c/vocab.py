"""Tokenizer vocabularies in and out of the runtime's tokenizer .bin.

The runtime encodes as SentencePiece BPE does with an identity normalizer, a dummy-prefix space
and byte fallback (README "File formats"): ids 0, 1, 2 are <unk>, <s>, </s>, the other pieces are
normal pieces (which merges may produce) or byte pieces "<0xNN>". A vocabulary from elsewhere is
accepted only when it encodes that way; anything else is refused with a ConvertError naming the
field and its value.

Read: a SentencePiece ``tokenizer.model``, a Llama-style Hugging Face ``tokenizer.json``
(SentencePiece BPE with byte fallback, no byte-level pre-tokenizer) and GGUF's
``tokenizer.ggml.*`` arrays (see gguf_io). Written: a SentencePiece model, a ``tokenizer.json``
that the ``tokenizers`` library encodes exactly like the runtime, and the GGUF arrays.

sentencepiece's protobuf module and ``tokenizers`` are imported by the functions that need them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from . import formats
from .export import SPACE_MARK, tokenizer_from_sentencepiece
from .interop import ConvertError

PathLike = Union[str, os.PathLike]
SPECIALS = (b"<unk>", b"<s>", b"</s>")
BYTE_PIECE = re.compile(rb"<0x[0-9A-Fa-f]{2}>\Z")

# Piece kinds, numbered as SentencePiece's ModelProto.SentencePiece.Type and GGUF's
# tokenizer.ggml.token_type number them (llama.cpp took SentencePiece's numbers).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
KIND_NAMES = {NORMAL: "normal", UNKNOWN: "unknown", CONTROL: "control",
              USER_DEFINED: "user-defined", UNUSED: "unused", BYTE: "byte"}
# What each of the first three ids must be, and the kind every later piece may have.
SPECIAL_KINDS = (UNKNOWN, CONTROL, CONTROL)
LATER_KINDS = (NORMAL, BYTE)

# SentencePiece ModelProto.TrainerSpec.ModelType
SP_MODEL_TYPES = {1: "unigram", 2: "BPE", 3: "word", 4: "char"}
SP_BPE = 2


@dataclass(frozen=True)
class Vocab:
    """Pieces as the tokenizer .bin stores them (a space for U+2581, "<0xNN>" for byte pieces)
    and their scores (a merge's priority: higher merges first)."""

    pieces: list[bytes]
    scores: list[float]

    def __len__(self) -> int:
        return len(self.pieces)

    def bin_bytes(self) -> bytes:
        return formats.tokenizer_bytes(self.pieces, self.scores)

    def texts(self) -> list[str]:
        """The pieces as SentencePiece, Hugging Face and GGUF spell them (U+2581 for a space);
        ConvertError for a piece that is not UTF-8 or that spells another piece's text."""
        texts, seen = [], {}
        for i, piece in enumerate(self.pieces):
            try:
                text = piece_text(piece)
            except UnicodeDecodeError:
                raise ConvertError(f"tokenizer piece {i} {piece!r} is not UTF-8 text, which "
                                   f"SentencePiece, Hugging Face and GGUF vocabularies hold") from None
            if text in seen:
                raise ConvertError(f"tokenizer pieces {seen[text]} and {i} are both {text!r} "
                                   f"once spaces are spelled U+2581")
            seen[text] = i
            texts.append(text)
        return texts

    def kinds(self) -> list[int]:
        return [piece_kind(i, p) for i, p in enumerate(self.pieces)]


def piece_text(piece: bytes) -> str:
    return piece.decode("utf-8").replace(" ", SPACE_MARK)


def piece_kind(index: int, piece: bytes) -> int:
    if index < len(SPECIAL_KINDS):
        return SPECIAL_KINDS[index]
    return BYTE if BYTE_PIECE.match(piece) else NORMAL


def check_kinds(kinds: Sequence[int], texts: Sequence[str], source: str, field: str) -> None:
    """ids 0, 1, 2 are the unknown, BOS and EOS pieces; every later one normal or byte."""
    if len(kinds) < len(SPECIAL_KINDS):
        raise ConvertError(f"{source}: {len(kinds)} pieces; the runtime needs at least <unk>, <s>, </s>")
    for i, kind in enumerate(kinds):
        allowed = (SPECIAL_KINDS[i],) if i < len(SPECIAL_KINDS) else LATER_KINDS
        if kind not in allowed:
            want = " or ".join(KIND_NAMES[k] for k in allowed)
            raise ConvertError(f"{source}: {field} of piece {i} {texts[i]!r} is "
                               f"{KIND_NAMES.get(kind, kind)}; the runtime needs {want} there "
                               f"(ids 0, 1, 2 = <unk>, <s>, </s>, then normal and byte pieces)")


def from_texts(texts: Sequence[str], scores: Sequence[float], source: str) -> Vocab:
    """A Vocab from SentencePiece-spelled pieces whose kinds were checked."""
    pieces = list(SPECIALS) + [t.replace(SPACE_MARK, " ").encode("utf-8") for t in texts[3:]]
    vocab = Vocab(pieces, [float(s) for s in scores])
    check_unique(vocab, source)
    return vocab


def check_unique(vocab: Vocab, source: str) -> None:
    seen: dict[bytes, int] = {}
    for i, piece in enumerate(vocab.pieces):
        if piece in seen:
            raise ConvertError(f"{source}: piece {i} {piece!r} repeats piece {seen[piece]}")
        seen[piece] = i


# ============================================================================ SentencePiece


def _sentencepiece_pb2():
    from sentencepiece import sentencepiece_model_pb2

    return sentencepiece_model_pb2


def read_sentencepiece(path: PathLike) -> Vocab:
    """A Vocab from a SentencePiece .model that encodes as the runtime does."""
    name = os.fspath(path)
    data = Path(path).read_bytes()
    proto = _sentencepiece_pb2().ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ConvertError(f"{name}: not a SentencePiece model ({exc})") from exc
    if not proto.pieces:
        raise ConvertError(f"{name}: not a SentencePiece model (no pieces)")
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != SP_BPE:
        kind = SP_MODEL_TYPES.get(trainer.model_type, str(trainer.model_type))
        raise ConvertError(f"{name}: unsupported tokenizer type: SentencePiece {kind} "
                           f"(trainer_spec.model_type); the runtime encodes SentencePiece BPE")
    wanted = [("trainer_spec.byte_fallback", trainer.byte_fallback, True),
              ("normalizer_spec.add_dummy_prefix", norm.add_dummy_prefix, True),
              ("normalizer_spec.remove_extra_whitespaces", norm.remove_extra_whitespaces, False),
              ("normalizer_spec.escape_whitespaces", norm.escape_whitespaces, True),
              ("trainer_spec.treat_whitespace_as_suffix", trainer.treat_whitespace_as_suffix, False),
              ("trainer_spec.unk_id", trainer.unk_id, 0),
              ("trainer_spec.bos_id", trainer.bos_id, 1),
              ("trainer_spec.eos_id", trainer.eos_id, 2)]
    for field, value, want in wanted:
        if value != want:
            raise ConvertError(f"{name}: {field} is {value}; the runtime's tokenizer needs {want}")
    if norm.precompiled_charsmap or norm.name not in ("identity", ""):
        raise ConvertError(f"{name}: normalizer_spec.name is {norm.name!r}; the runtime encodes "
                           f"with the identity normalization only")
    texts = [p.piece for p in proto.pieces]
    check_kinds([p.type for p in proto.pieces], texts, name, "type")
    vocab = Vocab(*formats.read_tokenizer(tokenizer_from_sentencepiece(path)))
    check_unique(vocab, name)
    return vocab


def sentencepiece_bytes(vocab: Vocab) -> bytes:
    """A serialized SentencePiece BPE model holding vocab, with the settings the runtime encodes
    with (identity normalization, dummy prefix, byte fallback, ids 0/1/2 = unk/bos/eos)."""
    pb2 = _sentencepiece_pb2()
    proto = pb2.ModelProto()
    for text, score, kind in zip(vocab.texts(), vocab.scores, vocab.kinds()):
        proto.pieces.add(piece=text, score=score, type=kind)
    trainer = proto.trainer_spec
    trainer.model_type = SP_BPE
    trainer.vocab_size = len(vocab)
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = 0, 1, 2, -1
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece = (s.decode() for s in SPECIALS)
    norm = proto.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return proto.SerializeToString()


# ============================================================================ tokenizer.json


def _walk(node):
    """Every dict inside a tokenizer.json component (Sequence components nest)."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _normalization(doc: dict, name: str) -> str:
    """Which SentencePiece-like space handling a tokenizer.json has: "sentencepiece" (prepend
    U+2581, replace spaces: exactly SentencePiece's) or "metaspace" (the Metaspace pre-tokenizer,
    which prepends U+2581 only when the text does not start with a space already)."""
    normalizer, pre = doc.get("normalizer"), doc.get("pre_tokenizer")
    if not all(part is None or isinstance(part, dict) for part in (normalizer, pre)):
        raise ConvertError(f"{name}: normalizer and pre_tokenizer must be objects or null")
    steps = normalizer.get("normalizers", []) if (normalizer or {}).get("type") == "Sequence" else [normalizer]
    steps = [s for s in steps if s is not None]
    prepend = {"type": "Prepend", "prepend": SPACE_MARK}
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": SPACE_MARK}
    if pre is None and len(steps) == 2 and prepend in steps and replace in steps:
        return "sentencepiece"
    if not steps and pre is not None and pre.get("type") == "Metaspace" \
            and pre.get("replacement") == SPACE_MARK and pre.get("split") is False \
            and pre.get("prepend_scheme") in ("first", "always"):
        return "metaspace"
    raise ConvertError(f"{name}: unsupported tokenizer normalization: normalizer "
                       f"{json.dumps(normalizer)}, pre_tokenizer {json.dumps(pre)} (the runtime "
                       f"needs SentencePiece's: prepend U+2581 and turn spaces into U+2581)")


def _merge_pairs(merges: list, name: str) -> list[tuple[str, str]]:
    pairs = []
    for rank, merge in enumerate(merges):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(pair, list) or len(pair) != 2 or not all(isinstance(p, str) for p in pair):
            raise ConvertError(f"{name}: model.merges[{rank}] is {merge!r}, not a pair")
        pairs.append((pair[0], pair[1]))
    return pairs


def read_tokenizer_json(path: PathLike) -> tuple[Vocab, str]:
    """A Vocab from a Llama-style tokenizer.json, and its space handling (see _normalization).

    Merge priorities become scores: the piece a merge of rank r makes first scores -r, so the
    runtime's highest-score-first merging applies the merges in the file's order."""
    name = os.fspath(path)
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConvertError(f"{name}: not a JSON tokenizer file ({exc})") from exc
    model = doc.get("model") if isinstance(doc, dict) else None
    if not isinstance(model, dict):
        raise ConvertError(f"{name}: no 'model' object; not a Hugging Face tokenizer.json")
    if any(node.get("type") == "ByteLevel" for node in _walk(doc)):
        raise ConvertError(f"{name}: unsupported tokenizer type: byte-level BPE (GPT-2 style, "
                           f"a ByteLevel component); the runtime encodes SentencePiece BPE with byte fallback")
    if model.get("type") != "BPE":
        raise ConvertError(f"{name}: unsupported tokenizer type: {model.get('type')} (model.type); "
                           f"the runtime encodes SentencePiece BPE with byte fallback")
    if model.get("byte_fallback") is not True:
        raise ConvertError(f"{name}: model.byte_fallback is {model.get('byte_fallback')}; "
                           f"the runtime needs byte fallback")
    normalization = _normalization(doc, name)
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise ConvertError(f"{name}: model.vocab is not an object of piece -> id")
    by_id = {i: text for text, i in vocab.items()}
    if sorted(by_id) != list(range(len(by_id))):
        raise ConvertError(f"{name}: model.vocab ids are not 0..{len(by_id) - 1} without gaps")
    texts = [by_id[i] for i in range(len(by_id))]
    added = [t for t in doc.get("added_tokens") or [] if isinstance(t, dict)]
    for token in added:
        i = token.get("id")
        if not isinstance(i, int) or i >= len(texts) or texts[i] != token.get("content"):
            raise ConvertError(f"{name}: added token {token.get('content')!r} (id {i}) is not the "
                               f"vocabulary's piece {i}; the runtime has no added tokens")
    special_ids = {t.get("id") for t in added if t.get("special")}
    kinds = [UNKNOWN if i == 0 else CONTROL if i in special_ids else
             BYTE if BYTE_PIECE.match(t.encode("utf-8")) else NORMAL for i, t in enumerate(texts)]
    if texts and model.get("unk_token") not in (None, texts[0]):
        raise ConvertError(f"{name}: model.unk_token is {model.get('unk_token')!r}, but piece 0 "
                           f"is {texts[0]!r}; the runtime's unknown piece is id 0")
    check_kinds(kinds, texts, name, "kind")
    merges = model.get("merges") or []
    if not isinstance(merges, list):
        raise ConvertError(f"{name}: model.merges is not a list")
    pairs = _merge_pairs(merges, name)
    rank_of: dict[str, int] = {}
    for rank, (left, right) in enumerate(pairs):
        rank_of.setdefault(left + right, rank)
    scores = []
    for i, text in enumerate(texts):
        if kinds[i] != NORMAL:
            scores.append(0.0)
        else:  # pieces no merge makes (single characters) rank after every merge
            scores.append(-float(rank_of.get(text, len(pairs) + i)))
    return from_texts(texts, scores, name), normalization


def merges_for(vocab: Vocab) -> list[tuple[str, str]]:
    """BPE merges reproducing the runtime's encoding of vocab: every split of a normal piece
    into two normal pieces, ordered by the piece's score (highest first), then by piece id."""
    texts, kinds = vocab.texts(), vocab.kinds()
    normal = {t: i for i, t in enumerate(texts) if kinds[i] == NORMAL}
    ranked = []
    for text, i in normal.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in normal and right in normal:
                ranked.append((-vocab.scores[i], i, normal[left], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def tokenizer_json(vocab: Vocab) -> str:
    """A tokenizer.json that the tokenizers library encodes like the runtime (<s> first)."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE

    texts = vocab.texts()
    unk, bos, eos = texts[:3]
    tok = Tokenizer(BPE(vocab={t: i for i, t in enumerate(texts)}, merges=merges_for(vocab),
                        unk_token=unk, fuse_unk=True, byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE_MARK),
                                           normalizers.Replace(" ", SPACE_MARK)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE_MARK, " "), decoders.ByteFallback(),
                                     decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)])
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in (unk, bos, eos)])
    return tok.to_str(pretty=True)


# ============================================================================ any tokenizer file


def read_tokenizer_file(path: PathLike) -> tuple[Vocab, Optional[str]]:
    """A Vocab from a SentencePiece .model or a tokenizer.json (told apart by their first byte),
    and a note for the user when the runtime's encoding can differ from the source's."""
    name = os.fspath(path)
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head.startswith(b"GGUF"):
        raise ConvertError(f"{name}: a GGUF file; convert it with from-gguf (model and tokenizer)")
    if not head.startswith(b"{"):
        return read_sentencepiece(path), None
    vocab, normalization = read_tokenizer_json(path)
    if normalization == "metaspace":
        return vocab, (f"{name} uses the Metaspace pre-tokenizer, which adds no U+2581 in front of "
                       f"a text that already starts with a space; the runtime encodes as "
                       f"SentencePiece does and always adds one")
    return vocab, None
