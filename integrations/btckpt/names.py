"""Names from checkpoints and buckets made safe to show: one place that escapes and redacts.

File names, tensor names, keys and URLs come from manifests, safetensors headers and bucket listings,
i.e. from whoever wrote them. Before any of them reaches a terminal or a log:

- :func:`printable` replaces control characters (ESC, BEL, CR, bidi overrides, ...) with visible escapes
  (``\\x1b``), so a name cannot retitle a window, clear a screen or forge a line;
- :func:`text` wraps a name as a ``rich``/Textual ``Text``: shown literally, never parsed as markup
  (a tensor named ``[/]`` or ``[blink]x`` is just that);
- :func:`redact_url` hides credentials inside URLs (``s3://key:secret@...``, signed query strings).

:class:`SafeLogArgs` applies :func:`printable` and :func:`redact_url` to every argument of btckpt's log
records (installed on the ``btckpt`` loggers on import), and ``CheckpointError`` messages pass through
the same two functions. btckpt's own multi-line texts (a ``CheckpointError`` given one argument per line,
a restore report) have a ``safe_text()`` that escapes each line on its own: their newlines read as
newlines in a log, a newline inside a name still shows as ``\\x0a``. Torch-free and rich-free (``text``
imports rich lazily).

Internal: not a public API (the public surface is ``btckpt``'s ``__all__``, ``btckpt.hf`` and
``btckpt.lightning``); its names may change without notice.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from numbers import Number
from typing import Any

__all__ = ["printable", "text", "redact_url", "remember_secrets", "safe", "SafeLogArgs", "install_log_filter"]

_KEEP = frozenset("\n\t")


def _escape_char(c: str) -> str:
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"


def printable(name: Any, *, keep_newlines: bool = False) -> str:
    """``str(name)`` with every non-printable character (C0/C1 controls, DEL, bidi and other format
    characters, line separators) replaced by a visible escape such as ``\\x1b``. With ``keep_newlines``,
    ``\\n`` and ``\\t`` stay (for multi-line messages); a plain name never keeps them."""
    s = str(name)
    if s.isprintable():
        return s
    return "".join(c if c.isprintable() or (keep_newlines and c in _KEEP) else _escape_char(c) for c in s)


# user:password@ (or a bare token@) right after a scheme, and the values of query parameters
_USERINFO = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s?#]+@")
_QUERY = re.compile(r"([?&][^=&#\s]+=)[^&#\s'\"]*")


_SECRETS: set[str] = set()


def remember_secrets(url: Any) -> None:
    """Note the credentials inside ``url`` (user info, query values) so that :func:`redact_url` hides them
    wherever they show up later, also without their ``scheme://`` (a library's error naming the path)."""
    s = str(url)
    for m in _USERINFO.finditer(s):
        info = s[m.end(1):m.end() - 1]
        _SECRETS.update(p for p in (info, *info.split(":", 1)) if len(p) >= 4)
    if "://" in s:
        for m in _QUERY.finditer(s):
            value = s[m.end(1):m.end()]
            if len(value) >= 4:
                _SECRETS.add(value)


def redact_url(url: Any) -> str:
    """``url`` (or any text holding URLs) with credentials hidden: ``s3://key:secret@bucket/x?sig=abc``
    becomes ``s3://***@bucket/x?sig=***``. Names without credentials come back unchanged."""
    s = str(url)
    for secret in sorted(_SECRETS, key=len, reverse=True) if _SECRETS else ():
        s = s.replace(secret, "***")
    if "@" not in s and "=" not in s:
        return s
    s = _USERINFO.sub(r"\1***@", s)
    return _QUERY.sub(lambda m: m.group(1) + "***" if "://" in s[:m.start()] else m.group(0), s)


def safe(value: Any, *, keep_newlines: bool = False) -> str:
    """:func:`printable` of :func:`redact_url`: what a log line or error message may show of ``value``."""
    return printable(redact_url(value), keep_newlines=keep_newlines)


def text(name: Any, style: str = "") -> Any:
    """A ``rich.text.Text`` showing ``name`` literally (escaped, never markup): for tables, trees, labels."""
    from rich.text import Text  # rich (0.1 s) loads only to render: errors imports this module, so every import does

    return Text(safe(name), style=style)


def _arg(a: Any) -> Any:
    if isinstance(a, Number):
        return a
    own = getattr(a, "safe_text", None)  # btckpt's own multi-line text (CheckpointError, RestoreReport): escaped
    if callable(own):                    # line by line, so its newlines stay newlines
        return own()
    return safe(a)


class SafeLogArgs(logging.Filter):
    """Escapes and redacts the message and the arguments of every record (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, Mapping):
            record.args = {k: _arg(v) for k, v in record.args.items()}
        elif record.args:
            record.args = tuple(_arg(a) for a in record.args)
        if isinstance(record.msg, str):
            record.msg = safe(record.msg, keep_newlines=True)
        return True


_FILTER = SafeLogArgs()


def install_log_filter(*names: str) -> None:
    """Put :class:`SafeLogArgs` on the named loggers (default: ``btckpt`` and ``btckpt.upload``); idempotent."""
    for n in names or ("btckpt", "btckpt.upload"):
        lg = logging.getLogger(n)
        if _FILTER not in lg.filters:
            lg.addFilter(_FILTER)


install_log_filter()
