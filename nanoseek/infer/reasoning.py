"""Separating a completion's reasoning from its answer, as DeepSeek's API returns them (`reasoning_content` and
`content`), also while the text is still streaming in.

The R1 format is `<think>\\n...\\n</think>\\n<answer>\\n...\\n</answer>`; the chat template may already have opened
the `<think>` (reasoning mode) or closed it (direct mode), so the splitter starts in the state the prompt left.
Tags are routing marks, not text: they are dropped, and a tag split across two streamed pieces is held back
until it is complete.
"""

from __future__ import annotations

TAGS = ("<think>", "</think>", "<answer>", "</answer>")


class ReasoningSplitter:
    """feed(text piece) -> (reasoning delta, content delta); flush() at the end."""

    def __init__(self, thinking: bool):
        self.in_reasoning = thinking  # True when the prompt ends inside `<think>`
        self.buffer = ""
        self.started = {True: False, False: False}  # has the channel shown a non-space character yet

    def feed(self, text: str) -> tuple[str, str]:
        self.buffer += text
        out = {True: [], False: []}
        while True:
            hits = [(self.buffer.find(t), t) for t in TAGS if t in self.buffer]
            if not hits:
                break
            at, tag = min(hits)
            self._emit(out, self.buffer[:at])
            self.buffer = self.buffer[at + len(tag):]
            if tag == "<think>":
                self.in_reasoning = True
            elif tag == "</think>":
                self.in_reasoning = False
        hold = max((k for t in TAGS for k in range(1, len(t)) if self.buffer.endswith(t[:k])), default=0)
        self._emit(out, self.buffer[:len(self.buffer) - hold])
        self.buffer = self.buffer[len(self.buffer) - hold:]
        return "".join(out[True]), "".join(out[False])

    def flush(self) -> tuple[str, str]:
        out = {True: [], False: []}
        self._emit(out, self.buffer)
        self.buffer = ""
        return "".join(out[True]), "".join(out[False])

    def _emit(self, out: dict, text: str) -> None:
        channel = self.in_reasoning
        if not self.started[channel]:  # drop the newlines that follow an opening tag
            text = text.lstrip()
            self.started[channel] = bool(text)
        if text:
            out[channel].append(text)


def split_reasoning(text: str, thinking: bool) -> tuple[str, str]:
    """A whole completion -> (reasoning, answer), both stripped."""
    splitter = ReasoningSplitter(thinking)
    r1, c1 = splitter.feed(text)
    r2, c2 = splitter.flush()
    return (r1 + r2).strip(), (c1 + c2).strip()
