"""Chat templates as data: how a list of messages becomes the text a model continues.

A template is a handful of format strings, one per part of a conversation, plus the text
that opens the assistant's reply and the strings that end it.  ``<s>`` and ``</s>`` inside a
template (never inside a message) stand for the BOS and EOS tokens; everything else is text.

    >>> from arianna_c import chat
    >>> chat.render(chat.TEMPLATES["qa"], [{"role": "user", "content": "What is resonance?"}])
    [Special(token=1), 'Q: What is resonance?\\nA:']

Templates:

- ``qa``: ``Q: ...`` / ``A: ...`` lines in one paragraph, the form the persona's dialogue
  module is trained on and the default for a vocabulary without chat pieces.
- ``llama-2``: Llama 2's ``[INST] ... [/INST]`` turns, the system prompt inside the first
  ``<<SYS>>`` block, each exchange between BOS and EOS (as ./run -m chat writes it).
- ``chatml``: ``<|im_start|>role ... <|im_end|>``, chosen by default when the vocabulary has
  an ``<|im_start|>`` piece.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Template:
    """One chat format.  Each string formats one message with ``{content}``; ``user_first``
    (if set) formats the first user message when there is a system prompt, with ``{system}``
    holding the system part already formatted (Llama 2 puts the system prompt inside it)."""

    name: str
    system: str
    user: str
    assistant: str
    generation: str  # opens the assistant's reply the model writes
    stop: tuple[str, ...] = ()  # text that ends an assistant reply (besides BOS/EOS)
    user_first: Optional[str] = None


TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="qa",
            system="{content}\n",
            user="Q: {content}\n",
            assistant="A: {content}\n",
            generation="A:",
            stop=("\nQ:",),
        ),
        Template(
            name="llama-2",
            system="<<SYS>>\n{content}\n<</SYS>>\n\n",
            user="<s>[INST] {content} [/INST]",
            assistant=" {content} </s>",
            generation="",
            stop=("[INST]",),
            user_first="<s>[INST] {system}{content} [/INST]",
        ),
        Template(
            name="chatml",
            system="<|im_start|>system\n{content}<|im_end|>\n",
            user="<|im_start|>user\n{content}<|im_end|>\n",
            assistant="<|im_start|>assistant\n{content}<|im_end|>\n",
            generation="<|im_start|>assistant\n",
            stop=("<|im_end|>", "<|im_start|>"),
        ),
    )
}

DEFAULT_TEMPLATE = "qa"


@dataclass(frozen=True)
class Special:
    """A special token in a rendered prompt (BOS or EOS), as opposed to text."""

    token: int


BOS, EOS = Special(1), Special(2)
_MARKERS = {"<s>": BOS, "</s>": EOS}
_MARKER_RE = re.compile("(<s>|</s>)")

Message = Mapping[str, str]
Part = Union[str, Special]


def get_template(name: str) -> Template:
    """The template called name; ValueError listing the known ones otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}") from None


def choose_template(name: Optional[str] = None, pieces: Iterable[str] = ()) -> Template:
    """The template a conversation uses: the one named, else the one the vocabulary points
    to (ChatML when it has an ``<|im_start|>`` piece), else ``qa``.  Model files carry no
    chat metadata, so the vocabulary is the only hint a model gives."""
    if name is not None:
        return get_template(name)
    if "<|im_start|>" in set(pieces):
        return TEMPLATES["chatml"]
    return TEMPLATES[DEFAULT_TEMPLATE]


def check_messages(messages: Sequence[Message]) -> None:
    """ValueError/TypeError naming the message that is not {"role": ..., "content": str}."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, not {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: give at least one message")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', not {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role {role!r} is invalid: it must be one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}].content must be a str, not {type(content).__name__}")
        if role == "system" and i != 0:
            raise ValueError(f"messages[{i}] is a system message: only the first message may be one")


def _parts(text: str) -> list[Part]:
    """A formatted template string split at its <s> / </s> markers."""
    return [_MARKERS.get(piece, piece) for piece in _MARKER_RE.split(text) if piece]


def _format(fmt: str, content: str, system: str = "") -> list[Part]:
    """fmt with the markers of the template itself turned into tokens; a message's own text
    is never searched for markers (a user typing "</s>" gets those characters)."""
    out: list[Part] = []
    for chunk in re.split(r"(\{content\}|\{system\})", fmt):
        if chunk == "{content}":
            out.append(content)
        elif chunk == "{system}":
            out.append(system)
        elif chunk:
            out.extend(_parts(chunk))
    return out


def render_turns(template: Template, messages: Sequence[Message]) -> list[list[Part]]:
    """The parts of each message in turn (the system message joins the first user turn where
    the template says so), without the generation prompt."""
    check_messages(messages)
    turns: list[list[Part]] = []
    system = None
    for i, m in enumerate(messages):
        role, content = m["role"], m["content"]
        if role == "system":
            if template.user_first is not None:
                system = content
                continue
            turns.append(_format(template.system, content))
        elif role == "user":
            if system is not None:
                sys_text = "".join(p for p in _format(template.system, system) if isinstance(p, str))
                turns.append(_format(template.user_first or template.user, content, sys_text))
                system = None
            else:
                turns.append(_format(template.user, content))
        else:
            turns.append(_format(template.assistant, content))
    if system is not None:  # a system prompt with no user turn yet
        turns.append(_format(template.system, system))
    return turns


def render(template: Template, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Part]:
    """The whole prompt as text and special tokens, BOS first (added when the template does
    not start with one), ending with the opening of the assistant's reply."""
    parts = [p for turn in render_turns(template, messages) for p in turn]
    if add_generation_prompt:
        parts += _parts(template.generation)
    if not parts or parts[0] != BOS:
        parts.insert(0, BOS)
    return _merge(parts)


def _merge(parts: list[Part]) -> list[Part]:
    """Adjacent text parts joined, empty ones dropped (each text part is encoded on its own,
    with SentencePiece's dummy prefix, so the split must only happen at special tokens)."""
    out: list[Part] = []
    for p in parts:
        if isinstance(p, str):
            if not p:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += p
                continue
        out.append(p)
    return out


def prompt_tokens(parts: Sequence[Part], encode: Callable[[str], list[int]]) -> list[int]:
    """Token ids of a rendered prompt: special tokens as they are, each text part encoded on
    its own by encode (text -> ids, no BOS), so after a special token the text gets
    SentencePiece's dummy prefix, as llama.cpp tokenizes such prompts."""
    tokens: list[int] = []
    for part in parts:
        tokens += [part.token] if isinstance(part, Special) else encode(part)
    return tokens


@dataclass
class Conversation:
    """Messages accumulated turn by turn, for a chat loop that keeps its session."""

    template: Template
    messages: list[dict] = field(default_factory=list)

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})
        check_messages(self.messages)
