"""Text normalisation: Unicode NFC, one kind of line break and space, no control characters.

Runs first so that every later stage (hashes, n-grams, filters) sees one canonical spelling of the same text:
two copies of a page that differ only in CRLF line ends, non-breaking spaces or a decomposed "é" become exact
duplicates here.
"""

from __future__ import annotations

import re
import unicodedata

# C0/C1 control characters except tab and newline, plus invisible characters that only break words apart:
# U+00AD soft hyphen, U+200B zero-width space, U+2060 word joiner, U+FEFF byte-order mark.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u00ad\u200b\u2060\ufeff]")
# Unicode space separators (NBSP, thin space, ideographic space, ...) become an ASCII space. Runs of spaces and
# tabs are kept: they are indentation in code and alignment in tables.
_SPACES = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\x85\x0b\x0c]")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_RUN = re.compile(r"\n{3,}")


def normalize_text(text: str) -> str:
    """NFC; CRLF/CR/Unicode line separators -> "\\n"; control and zero-width characters removed; Unicode spaces ->
    " "; no whitespace at line ends; at most one blank line in a row; no whitespace around the text."""
    text = unicodedata.normalize("NFC", text)
    text = _LINE_BREAKS.sub("\n", text)
    text = _CONTROL.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _TRAILING.sub("\n", text + "\n")
    return _BLANK_RUN.sub("\n\n", text).strip()
