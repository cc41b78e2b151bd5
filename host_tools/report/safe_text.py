"""Text that is safe to print on a terminal, whatever a device or a bundle put in it.

A device chooses its platform strings, runtime names, bundle names in its reports, event
details and error messages; a bundle chooses file and node names. Printed raw, an escape
sequence in any of them clears the screen, recolours ``edgectl``'s output, sets the window
title or writes the clipboard (OSC 52), and a bidirectional override makes a line read
differently from what it says. :func:`escape_for_terminal` replaces every such character
by a visible escape (``ESC`` -> ``\\x1b``, ``U+202E`` -> ``\\u202e``), so the text stays
readable and nothing in it is interpreted.

Escaped are:

- C0 controls (U+0000-U+001F: ESC, BEL, backspace, carriage return, tab, ...), except the
  newline of multi-line text; DEL (U+007F); C1 controls (U+0080-U+009F, among them the
  one-byte CSI U+009B and OSC U+009D);
- bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069) and the
  invisible direction marks (U+200E, U+200F, U+061C);
- the line and paragraph separators U+2028 and U+2029;
- lone surrogates (U+D800-U+DFFF), which JSON can carry and which would make printing fail.

A backslash is left as it is: escaping is for the terminal's sake, not a reversible
encoding, so a device that sends the four characters ``\\x1b`` is shown as sending them.
The JSON that ``--json`` prints needs none of this: :func:`json.dumps` with its default
``ensure_ascii=True`` writes every one of these characters as a ``\\uXXXX`` escape.
"""

from __future__ import annotations

import logging
import re

__all__ = ["TerminalSafeFormatter", "escape_for_terminal"]

_CONTROLS = "\x00-\x09\x0b-\x1f\x7f-\x9f"
_INVISIBLE = "\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff"
_UNSAFE_MULTILINE = re.compile(f"[{_CONTROLS}{_INVISIBLE}]")
_UNSAFE_ONE_LINE = re.compile(f"[\n{_CONTROLS}{_INVISIBLE}]")


def _visible(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_for_terminal(text: str, *, multiline: bool = False) -> str:
    """``text`` with every character a terminal would interpret replaced by a visible escape.

    Idempotent: the escapes are printable ASCII, so escaping escaped text changes nothing.

    Args:
        text: what is about to be printed.
        multiline: keep newlines (the renderer's own line breaks in multi-line text);
            without it a newline is escaped too, as a table cell or a one-line field needs.

    Returns:
        The text, unchanged where it held none of the characters listed in this module's
        docstring.
    """
    return (_UNSAFE_MULTILINE if multiline else _UNSAFE_ONE_LINE).sub(_visible, text)


class TerminalSafeFormatter(logging.Formatter):
    """A log formatter whose lines are escaped like everything else ``edgectl`` prints.

    Log records quote device ids, topics and payload fields; this keeps them from
    reaching the terminal raw. Newlines stay (tracebacks span lines).
    """

    def format(self, record: logging.LogRecord) -> str:
        """The record formatted as usual, then escaped with :func:`escape_for_terminal`.

        Args:
            record: the log record.

        Returns:
            The escaped text.
        """
        return escape_for_terminal(super().format(record), multiline=True)
