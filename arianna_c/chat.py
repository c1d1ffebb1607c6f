"""Chat templates as data: how a list of messages becomes the text a model continues.

The templates live in the library (src/chat.c), the one table that ./run -m chat, Model.chat,
the Chat loop and the server read; so do the rendering, the rule that picks a template for a
vocabulary, and what of a generated reply is its text (src/conversation.c, :class:`Reply`).
A template is a handful of format strings, one per part of a conversation, plus the text that
opens the assistant's reply and the strings that end it.
``<s>`` and ``</s>`` inside a template (never inside a message) stand for the BOS and EOS
tokens; everything else is text.

    >>> from arianna_c import chat
    >>> chat.render(chat.TEMPLATES["qa"], [{"role": "user", "content": "What is resonance?"}])
    [Special(token=1), 'Q: What is resonance?\\nA:']

Templates:

- ``qa``: ``Q: ...`` / ``A: ...`` lines in one paragraph, the form the persona's dialogue
  module is trained on and the default for a vocabulary without chat pieces.
- ``llama-2``: Llama 2's ``[INST] ... [/INST]`` turns, the system prompt inside the first
  ``<<SYS>>`` block, each exchange between BOS and EOS.
- ``chatml``: ``<|im_start|>role ... <|im_end|>``, chosen by default when the vocabulary has
  an ``<|im_start|>`` piece.

Reading the table opens the library (the first use of TEMPLATES or a function here).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from ._lib import _error_check, ffi, load
from .runtime import _text_bytes


@dataclass(frozen=True)
class Template:
    """One chat format, as the library's table has it.  Each string formats one message with
    ``{content}``; ``user_first`` (if set) formats the first user message when there is a
    system prompt, with ``{system}`` holding the system part already formatted (Llama 2 puts
    the system prompt inside it)."""

    name: str
    system: str
    user: str
    assistant: str
    generation: str  # opens the assistant's reply the model writes
    stop: tuple[str, ...] = ()  # text that ends an assistant reply (besides BOS/EOS)
    user_first: Optional[str] = None


def _text(p: Any) -> Optional[str]:
    return None if p == ffi.NULL else ffi.string(p).decode("utf-8")


def _template(c: Any) -> Template:
    """The Template of a C ac_chat_template."""
    stops = tuple(_text(s) for s in c.stop if s != ffi.NULL)
    return Template(name=_text(c.name), system=_text(c.system), user=_text(c.user), assistant=_text(c.assistant),
                    generation=_text(c.generation), stop=stops, user_first=_text(c.user_first))


class _Table(Mapping[str, Template]):
    """The library's templates by name, in its order; read from the library on first use."""

    def __init__(self) -> None:
        self._items: Optional[dict[str, Template]] = None

    def _load(self) -> dict[str, Template]:
        if self._items is None:
            lib = load()
            items = (_template(lib.ac_chat_template_at(i)) for i in range(lib.ac_chat_template_count()))
            self._items = {t.name: t for t in items}
        return self._items

    def __getitem__(self, name: str) -> Template:
        return self._load()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._load())

    def __len__(self) -> int:
        return len(self._load())


TEMPLATES: Mapping[str, Template] = _Table()


@dataclass(frozen=True)
class Special:
    """A special token in a rendered prompt (BOS or EOS), as opposed to text."""

    token: int


BOS, EOS = Special(1), Special(2)

Message = Mapping[str, str]
Part = Union[str, Special]


def _c_template(template: Template) -> Any:
    """The library's template of that name (AriannaError, a ValueError, listing the known
    names otherwise)."""
    lib = load()
    c = lib.ac_chat_template_get(template.encode() if isinstance(template, str) else template.name.encode())
    if c == ffi.NULL:
        _error_check(lib.AC_ERR_ARG)
    return c


def get_template(name: str) -> Template:
    """The template called name; ValueError (AriannaError) listing the known ones otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"a chat template name must be a str, not {type(name).__name__}")
    return TEMPLATES[_text(_c_template(name).name)]


def choose_template(name: Optional[str] = None, pieces: Iterable[str] = ()) -> Template:
    """The template a conversation uses: the one named, else the one the vocabulary (its
    pieces as stored) suggests, by the library's rule: ChatML when it has an ``<|im_start|>``
    piece, else ``qa``."""
    if name is not None:
        return get_template(name)
    data = [p.encode("utf-8") for p in pieces]
    held = [ffi.new("char[]", d) for d in data]
    c = load().ac_chat_template_for_vocab(ffi.new("const char *[]", held) if held else ffi.NULL,
                                          ffi.new("size_t[]", [len(d) for d in data]) if held else ffi.NULL,
                                          len(held))
    return TEMPLATES[_text(c.name)]


def _c_messages(messages: Sequence[Message]) -> tuple[Any, list]:
    """messages as C ac_chat_message values (the types checked here, the values by the
    library; contents encoded as prompts are), and the buffers they point into (keep them
    alive)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, not {type(messages).__name__}")
    c = ffi.new("ac_chat_message[]", max(len(messages), 1))
    keep: list = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', not {type(m).__name__}")
        role, content = m.get("role"), m.get("content")
        if not isinstance(role, str):
            raise ValueError(f"messages[{i}].role {role!r} is invalid: it must be one of system, user, assistant")
        if not isinstance(content, str):
            raise TypeError(f"messages[{i}].content must be a str, not {type(content).__name__}")
        data = _text_bytes(content)
        keep += [ffi.new("char[]", role.encode("utf-8")), ffi.new("char[]", data)]
        c[i].role, c[i].content, c[i].content_len = keep[-2], keep[-1], len(data)
    return c, keep


def render(template: Template, messages: Sequence[Message], add_generation_prompt: bool = True) -> list[Part]:
    """The whole prompt as text and special tokens, BOS first (added when the template does
    not start with one), ending with the opening of the assistant's reply; rendered by the
    library."""
    lib = load()
    c_template = _c_template(template)
    c_messages, keep = _c_messages(messages)
    parts: list[Part] = []

    @ffi.callback("int(void *, int, const char *, size_t)")
    def on_part(user: Any, token: int, text: Any, size: int) -> int:
        parts.append(Special(token) if token >= 0 else ffi.unpack(text, size).decode("utf-8", "surrogatepass"))
        return 0

    _error_check(lib.ac_chat_render(c_template, c_messages, len(messages), int(add_generation_prompt), on_part,
                                    ffi.NULL))
    del keep
    return parts


class Reply:
    """A reply's text as it streams, by the library's rule (ac_chat_reply, the one ./run -m
    chat and Chat follow): the whitespace a template leaves before the reply (``A:`` then
    `` The...``) is not part of it.  ``push(text)`` returns the text that is final now."""

    def __init__(self) -> None:
        lib = load()
        out = ffi.new("ac_chat_reply **")
        _error_check(lib.ac_chat_reply_create(out))
        self._c = ffi.gc(out[0], lib.ac_chat_reply_free)
        self._text, self._size = ffi.new("const char **"), ffi.new("size_t *")

    def push(self, text: str, final: bool = False) -> str:
        data = text.encode("utf-8")
        _error_check(load().ac_chat_reply_push(self._c, data, len(data), int(final), self._text, self._size))
        return ffi.unpack(self._text[0], self._size[0]).decode("utf-8")


def reply_text(text: str) -> str:
    """The text of a whole reply, by the same rule."""
    return Reply().push(text, final=True)
