"""`nanoseek chat --model PATH`: a streaming terminal chat.

The reasoning streams dimmed, the answer in plain text. Commands:
    /think         toggle reasoning mode (R1 style `<think>` chain) and direct answers (V3 style)
    /verify N      answer with the verification loop over N chains (0 turns it off)
    /image PATH    attach an image to the next message (a VL checkpoint; `--image PATH` attaches to the first)
    /reset         forget the conversation
    /help, /quit
Only the final answers stay in the history (DeepSeek's advice: reasoning is not fed back in later turns). Images
stay with the message they came with: it reads `<image>\\n` per image before its text (the turn the VL model
trained on), and every turn's prompt carries the pixels of all images so far, in order.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

import torch

from nanoseek.data.curate.images import open_image
from nanoseek.data.tokenizer import IMAGE_TOKEN
from nanoseek.infer.engine import Backend, TokenEvent
from nanoseek.infer.reasoning import ReasoningSplitter, split_reasoning
from nanoseek.infer.sampling import SamplingParams
from nanoseek.infer.verify import verify
from nanoseek.model.vision import to_pixels

DIM, RESET = "\033[2m", "\033[0m"
HELP = ("commands: /think (toggle reasoning), /verify N (N chains, 0 = off), /image PATH (attach to the next "
        "message), /reset, /help, /quit")


class ChatSession:
    """A conversation with a backend, printing to `out` as tokens arrive."""

    def __init__(self, backend: Backend, params: SamplingParams, thinking: bool = True, verify_n: int = 0,
                 threshold: float = 0.5, out: TextIO | None = None, color: bool = True):
        self.backend, self.tokenizer = backend, backend.tokenizer
        self.params, self.thinking, self.verify_n, self.threshold = params, thinking, verify_n, threshold
        self.out, self.color = out or sys.stdout, color
        self.messages: list[dict] = []
        self.images: list[torch.Tensor] = []  # pixels [1, 3, S, S] of the images in `messages`, in order
        self.attached: list[torch.Tensor] = []  # for the next message
        self.dimmed = False

    def command(self, line: str) -> bool:
        """Run a /command; False means quit."""
        name, _, arg = line.strip().partition(" ")
        if name in ("/quit", "/exit"):
            return False
        if name == "/think":
            self.thinking = not self.thinking
            self.say(f"reasoning {'on' if self.thinking else 'off'}")
        elif name == "/reset":
            self.messages.clear()
            self.images.clear()
            self.attached.clear()
            self.say("conversation cleared")
        elif name == "/image":
            try:
                self.attach(arg.strip())
            except ValueError as e:
                self.say(f"error: {e}")
        elif name == "/verify":
            if not arg.strip().isdigit() or int(arg) > self.backend.max_batch:
                self.say(f"usage: /verify N with 0 <= N <= {self.backend.max_batch}")
            else:
                self.verify_n = int(arg)
                self.say(f"verification {'off' if self.verify_n == 0 else f'over {self.verify_n} chains'}")
        else:
            self.say(HELP)
        return True

    def attach(self, path: str) -> None:
        """Attach the image at `path` to the next message (ValueError: not a VL model, or not a usable image)."""
        if not self.backend.image_tokens:
            raise ValueError("this model takes no images (it is a text-only model)")
        if not path:
            raise ValueError("usage: /image PATH")
        self.attached.append(to_pixels([open_image(path)], self.backend.image_size))
        self.say(f"image attached to the next message ({len(self.attached)}): {path}")

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def write(self, text: str, dim: bool = False) -> None:
        if not text:
            return
        if self.color and dim != self.dimmed:  # switch style only where reasoning starts or ends
            self.out.write(DIM if dim else RESET)
            self.dimmed = dim
        self.out.write(text)
        self.out.flush()

    def ask(self, text: str) -> str:
        """Answer a user message; returns the answer (reasoning excluded), which joins the history with the
        message. A message that cannot be answered (ValueError: e.g. the conversation outgrew the context) leaves
        the history as it was."""
        messages = [*self.messages, {"role": "user", "content": f"{IMAGE_TOKEN}\n" * len(self.attached) + text}]
        images = self.images + self.attached
        if images:  # each <image> expands to the model's image tokens
            prompt = self.tokenizer.encode_chat(messages, True, self.thinking, self.backend.image_tokens)[0]
        else:
            prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, thinking=self.thinking)
        pixels = torch.cat(images) if images else None
        answer = self._verified(prompt, pixels) if self.verify_n else self._streamed(prompt, pixels)
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.images, self.attached = images, []
        return answer

    def _streamed(self, prompt: list[int], pixels: torch.Tensor | None) -> str:
        splitter = ReasoningSplitter(self.thinking)
        answer: list[str] = []

        def show(pieces: tuple[str, str]) -> None:
            reasoning, content = pieces
            self.write(reasoning, dim=True)
            if content and not answer and self.thinking:
                self.write("\n")  # the answer starts on its own line after the reasoning
            if content:
                self.write(content)
                answer.append(content)

        def on_event(ev: TokenEvent) -> None:
            show(splitter.feed(ev.text))

        self.backend.generate([prompt], self.params, stream=on_event, images=[pixels])
        show(splitter.flush())
        self.write("\n")
        return "".join(answer).strip()

    def _verified(self, prompt: list[int], pixels: torch.Tensor | None) -> str:
        self.write(f"(verifying over {self.verify_n} chains...)\n", dim=True)
        verdict = verify(self.backend, prompt, self.verify_n, self.params, self.threshold,
                         prefill="<think>\n" if self.thinking else "", images=pixels)
        if verdict.sure:
            reasoning = split_reasoning(verdict.completions[verdict.chosen], thinking=False)[0]
            self.write(reasoning + "\n\n", dim=True)
        self.write(verdict.reply + "\n")
        self.write(f"(agreement {verdict.votes}/{verdict.n})\n", dim=True)
        return verdict.reply


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint, run directory (latest checkpoint) or HF dir")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens per answer (default 512)")
    parser.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (default 0.6)")
    parser.add_argument("--top-p", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--no-think", action="store_true", help="start with direct answers (toggle with /think)")
    parser.add_argument("--verify", type=int, default=0, metavar="N", help="verification loop over N chains")
    parser.add_argument("--threshold", type=float, default=0.5, help="agreement below which it says it is unsure")
    parser.add_argument("--speculative", action="store_true", help="MTP speculative decoding")
    parser.add_argument("--image", action="append", default=[], metavar="PATH", help="attach an image to the "
                        "first message (repeatable; a VL checkpoint; /image PATH attaches to a later one)")
    parser.add_argument("--no-color", action="store_true")


def main(args: argparse.Namespace) -> int:
    from nanoseek.infer.engine import load_engine

    try:
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed)
    except ValueError as e:
        print(f"nanoseek chat: error: {e}", file=sys.stderr)
        return 2
    engine = load_engine(args.model, max_batch=max(8, args.verify), speculative=args.speculative)
    session = ChatSession(engine, params, thinking=not args.no_think, verify_n=args.verify,
                          threshold=args.threshold, color=not args.no_color and sys.stdout.isatty())
    try:
        for path in args.image:
            session.attach(path)
    except ValueError as e:
        print(f"nanoseek chat: error: --image: {e}", file=sys.stderr)
        return 2
    session.say(f"nanoseek chat · {args.model} · {HELP}")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            session.say("")
            return 0
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line):
                return 0
            continue
        try:
            session.ask(line)
        except ValueError as e:  # this message only: the conversation goes on (try /reset when it is too long)
            session.say(f"error: {e}")
