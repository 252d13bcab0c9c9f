"""PII redaction: e-mail addresses, phone numbers, IP addresses and payment-card numbers become placeholders.

Patterns are deliberately conservative where the built-in corpora live: a bare run of digits is an answer to a
math problem, not a phone number, so phones need a "+" country code or the usual separators, and card numbers
must pass the Luhn checksum that every issued card number satisfies. IP addresses are validated by `ipaddress`.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass

PLACEHOLDERS = {"email": "<EMAIL>", "ip": "<IP_ADDRESS>", "card": "<CARD_NUMBER>", "phone": "<PHONE_NUMBER>"}

_EMAIL = re.compile(r"(?<![\w.+-])[\w.+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
_IPV4 = re.compile(r"(?<![\w.])(?:\d{1,3}\.){3}\d{1,3}(?![\w.]|\.\d)")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])")
_CARD = re.compile(r"(?<![\w-])\d(?:[ -]?\d){12,18}(?![\w-])")  # 13-19 digits, optional single spaces/dashes
_PHONE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]?\d{2,4}){2,4}"  # +44 20 7946 0958, +1-202-555-0143
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]\d{4}"  # (202) 555-0143
    r"|\d{3}[.-]\d{3}[.-]\d{4}"  # 202-555-0143, 202.555.0143
    r")(?!\w)"
)


@dataclass
class PiiConfig:
    enabled: bool = True
    email: bool = True
    phone: bool = True
    ip: bool = True
    card: bool = True


def luhn_valid(digits: str) -> bool:
    """Luhn checksum: doubling every second digit from the right, the digit sum is a multiple of 10."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _ip(match: re.Match[str]) -> bool:
    try:
        ipaddress.ip_address(match.group())
    except ValueError:
        return False
    return True


def _card(match: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", match.group())
    return 13 <= len(digits) <= 19 and luhn_valid(digits)


def redact(text: str, config: PiiConfig | None = None) -> tuple[str, Counter[str]]:
    """Replace PII with placeholders; returns (redacted text, number of replacements per kind).
    Order matters: e-mails first (they contain digits and dots), cards before phones (a card has phone-like runs)."""
    config = config or PiiConfig()
    counts: Counter[str] = Counter()
    rules = (
        ("email", _EMAIL, None),
        ("ip", _IPV4, _ip),
        ("ip", _IPV6, _ip),
        ("card", _CARD, _card),
        ("phone", _PHONE, None),
    )
    for kind, pattern, valid in rules:
        if not getattr(config, kind):
            continue

        def replace(m: re.Match[str], kind: str = kind, valid=valid) -> str:
            if valid is not None and not valid(m):
                return m.group()
            counts[kind] += 1
            return PLACEHOLDERS[kind]

        text = pattern.sub(replace, text)
    return text, counts
