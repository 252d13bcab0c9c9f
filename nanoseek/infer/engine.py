"""The inference engine: continuous batching on a preallocated MLA latent cache.

The cache holds, per layer, only the normed KV latent c_kv [kv_lora_rank] and the rotated rope key k_pe
[qk_rope_head_dim] of every token (`LatentCache`, [L, max_batch, max_len, *]); decoding attends to it with the
absorbed weights, so a token costs 576 numbers per layer for V3 instead of 40,960. A DSA model (V3.2) also keeps
its indexer's key [index_head_dim] per token and layer, and each query attends to its top-k columns only.

Layout. Rows of the cache are sequences; columns are shared write positions. All rows write their next token at
the same column, the *frontier* `f` (the model's `forward_cached(start=f)`), and a boolean `key_mask`
[max_batch, max_len] marks which columns of each row hold real tokens. A row's rotary positions are its own
(`positions` [max_batch]), so where a prompt sits in its row does not matter (RoPE sees only differences):

    row 0  . . . a b c d e f g|        a long-running sequence
    row 1  . . . . . . p q r s|        a prompt admitted later: prefilled into the columns that end at f
    row 2  . . x y z w ~ v u t|        a speculative row whose draft was rejected leaves a hole (~)
                              f

A request for n samples (GRPO's group, `nanoseek eval`'s k, the API's `n`) takes n rows that share one prefill:
its prompt runs once and its latents, last hidden state and first-token logits are copied to the other rows,
which then sample on their own generators. Admitting a prompt longer than f shifts the batch right; when f
reaches the end of the cache every row's real columns are packed to the right (holes and padding squeezed out;
attention does not care about key order).
Finished rows are replaced by the last row (one copy), so the active rows stay packed at the front and every
forward pass sees a dense [n_active, ...] slice of the cache.

Images (a VL model, `nanoseek.model.vl.VLModel`): a request may carry pixels, one image per `<image>` placeholder
in its prompt (each expanded to the model's `image_tokens` ids). Images live only in the prompt, so only the
prefill sees them: `_admit` hands the images of the prompts it prefills, in order, to the VL model's prefill
forward, whose embedding writes the projected features over the placeholders; the cache then holds their latents
like any token's, and decode steps, packing and row moves are the text path unchanged.

`Engine` implements the `Backend` interface (add_request / step / abort, the shape of vLLM's LLMEngine), so a
GPU serving engine can stand in for it behind the server, the chat CLI and the verification loop.
"""

from __future__ import annotations

import uuid
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from nanoseek.infer.decoder import Decoder
from nanoseek.infer.sampling import Penalties, RowParams, SamplingParams, row_generator, sample
from nanoseek.model.mla import LatentCache


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    routing: bool = False  # record, for each generated token, the experts every MoE layer routed it to
    images: torch.Tensor | None = None  # [k, 3, S, S] pixels (`to_pixels`), one per <image> in the prompt, in order


@dataclass
class TokenEvent:
    """One step of one sample. `token` is None on a closing event that adds no token (a stop token or string, or
    an error)."""

    request_id: str
    index: int  # which of the request's n samples
    token: int | None
    text: str  # text that became final with this event ("" while a stop string might still be forming)
    finish_reason: str | None = None  # None while running, else "stop" | "length" | "abort" | "error"
    experts: list[list[int]] | None = None  # [n_moe_layers][top_k] for this token when the request asked
    error: str | None = None  # why the sample failed (finish_reason "error"); the engine's other rows go on
    stop_token: int | None = None  # the stop token (EOS or one of stop_token_ids) that ended the sample


@dataclass
class Completion:
    request_id: str
    index: int
    prompt_tokens: int
    tokens: list[int]  # generated ids, stop token excluded
    text: str
    finish_reason: str
    experts: list[list[list[int]]] | None = None  # per generated token: [n_moe_layers][top_k]
    stop_token: int | None = None  # which stop token ended it (finish_reason "stop" by a token, not a string)


class Backend(ABC):
    """A generator the server, chat and verification loop can drive (the native `Engine`, or e.g. vLLM).

    Contract: `add_request` queues a request (never blocks); each `step` advances all running requests by at least
    one token and returns the events produced (a sample that failed ends with finish_reason "error" and `error`
    set, the others go on); `has_work` says whether anything is queued or running.
    """

    tokenizer = None
    max_len: int
    max_batch: int
    image_tokens: int = 0  # prompt ids per image (a VL model); 0: the backend takes no images
    image_size: int = 0  # the square side images are resized to (`to_pixels`)

    @abstractmethod
    def add_request(self, request: Request) -> None: ...

    @abstractmethod
    def step(self) -> list[TokenEvent]: ...

    @abstractmethod
    def has_work(self) -> bool: ...

    @abstractmethod
    def abort(self, request_id: str) -> None: ...

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 stream: Callable[[TokenEvent], None] | None = None, routing: bool = False,
                 images: Sequence[torch.Tensor | None] | None = None) -> list[Completion]:
        """Run prompts to completion (batched together). Returns one Completion per prompt and sample, in prompt
        order then sample order. `stream` is called with every event as it happens; `images` gives each prompt's
        pixels (or None). A sample that fails raises RuntimeError (after aborting the call's other requests)."""
        params = params or SamplingParams()
        per_prompt = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"got {len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        images = [None] * len(prompts) if images is None else list(images)
        if len(images) != len(prompts):
            raise ValueError(f"got images for {len(images)} prompts, not {len(prompts)}")
        requests = [Request(list(p), sp, routing=routing, images=im)
                    for p, sp, im in zip(prompts, per_prompt, images, strict=True)]
        results: dict[tuple[str, int], Completion] = {}
        for r in requests:
            self.add_request(r)
            for i in range(r.params.n):
                results[(r.id, i)] = Completion(r.id, i, len(r.prompt), [], "", "", [] if routing else None)
        while self.has_work():
            for ev in self.step():
                if ev.error is not None:
                    for r in requests:
                        self.abort(r.id)
                    raise RuntimeError(f"generation failed: {ev.error}")
                c = results[(ev.request_id, ev.index)]
                if ev.token is not None:
                    c.tokens.append(ev.token)
                    if c.experts is not None and ev.experts is not None:
                        c.experts.append(ev.experts)
                c.text += ev.text
                if ev.finish_reason:
                    c.finish_reason, c.stop_token = ev.finish_reason, ev.stop_token
                if stream is not None:
                    stream(ev)
        return list(results.values())


class TextStream:
    """Incremental detokenisation with stop strings.

    Decoding token by token breaks multi-byte characters and merged pieces, so each step decodes a short window
    (from the last safe boundary) and emits only the new suffix; text that could still be the start of a stop
    string is held back until it is ruled out.

    Stop strings are matched as the text grows, character by character, each with its Knuth-Morris-Pratt table:
    `matched[j]` is the length of the longest prefix of stop string j that the text ends with, so a token costs
    time in proportion to its new characters, whatever the stop strings' length (a check of every prefix of every
    stop string at every token is quadratic in their length and let one request's long stops stall the engine).
    """

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, list(stop)
        self.fallback = [_kmp_table(s) for s in self.stop]
        self.matched = [0] * len(self.stop)
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0
        self.text = ""  # all final text so far (emitted + held back)
        self.emitted = 0

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token -> (newly releasable text, whether a stop string ended the text)."""
        self.ids.append(token)
        prefix = self.tokenizer.decode(self.ids[self.prefix_offset:self.read_offset])
        full = self.tokenizer.decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            new = full[len(prefix):]
            start = len(self.text)
            self.text += new
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            for i, char in enumerate(new):
                ended = 0  # the longest stop string that ends at this character
                for j, s in enumerate(self.stop):
                    k = self.matched[j]
                    while k and s[k] != char:
                        k = self.fallback[j][k - 1]
                    if s[k] == char:
                        k += 1
                    self.matched[j] = k
                    if k == len(s):
                        ended = max(ended, k)
                if ended:  # the first stop string to end cuts the text where it begins
                    self.text = self.text[:start + i + 1 - ended]
                    return self.release(len(self.text)), True
        return self.release(len(self.text) - max(self.matched, default=0)), False

    def flush(self) -> str:
        return self.release(len(self.text))

    def release(self, upto: int) -> str:
        out = self.text[self.emitted:upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return out


def _kmp_table(s: str) -> list[int]:
    """fallback[k - 1]: the length of the longest proper prefix of s[:k] that is also its suffix (where a match
    of k characters falls back to when the next character differs)."""
    fallback = [0] * len(s)
    k = 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fallback[k - 1]
        if s[i] == s[k]:
            k += 1
        fallback[i] = k
    return fallback


@dataclass
class Slot:
    """One sample of a request while it runs (a row of the cache)."""

    request: Request
    index: int
    generator: torch.Generator
    text: TextStream | None
    stop_ids: frozenset[int]
    max_tokens: int
    row: int = -1
    generated: int = 0
    finish_reason: str | None = None


class Engine(Backend):
    """Continuous-batching generation for a nanoseek `Transformer` (see the module docstring for the layout).

    model: an eval-mode Transformer; tokenizer: optional (needed for text and stop strings);
    max_batch: rows of the cache (concurrent samples); max_len: columns (default: the model's context);
    speculative: draft one token per step with the first MTP module and verify it (`nanoseek.infer.speculative`);
    fast: decode with `nanoseek.infer.decoder.Decoder` (False: the model's own `forward_cached`, the reference);
    compile: run decode steps as one `torch.compile` graph (`Decoder(compile=True)`, needs fast=True): several times
    faster per token at small batches, after a one-off compilation per batch size (~1 min on 2 CPU cores), so
    meant for long-lived engines (server, benchmarks, RL rollouts with a fixed batch), not for one short call.
    """

    def __init__(self, model, tokenizer=None, max_batch: int = 8, max_len: int | None = None,
                 speculative: bool = False, fast: bool = True, compile: bool = False):
        cfg = model.config
        self.model, self.tokenizer = model.eval(), tokenizer
        if compile and not fast:
            raise ValueError("compile=True needs fast=True (the reference path stays eager)")
        self.decoder = Decoder(model, compile) if fast else None
        self._recording = False  # routing hooks on: the compiled graph would not run them, use the eager path
        self.max_batch = max_batch
        self.max_len = min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.eos_id = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        self.drafter = None
        if speculative:
            if not len(model.mtp):
                raise ValueError("speculative decoding needs MTP modules (config num_nextn_predict_layers >= 1)")
            from nanoseek.infer.speculative import MTPDrafter

            self.drafter = MTPDrafter(self)
        layers = cfg.num_hidden_layers + (1 if speculative else 0)
        self.cache = LatentCache.empty(cfg, max_batch, self.max_len, layers=layers, dtype=self.dtype,
                                       device=self.device)
        self.key_mask = torch.zeros(max_batch, self.max_len, dtype=torch.bool, device=self.device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # next rotary position
        self.pending = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # sampled, not yet fed
        self.penalties: Penalties | None = None
        self.frontier = 0
        self.rows: list[Slot] = []
        self.waiting: deque[Request] = deque()
        self.row_params: RowParams | None = None
        self.moe_gates = [b.ffn.gate for b in model.blocks if b.is_moe]
        vl = getattr(model, "vl_config", None)  # a VLModel: prompts may hold images
        self.image_id = vl.image_token_id if vl is not None else None
        if vl is not None:
            self.image_tokens, self.image_size = vl.image_tokens, vl.vision.image_size
        # filler of a left-padded prefill (masked out): never the image id, which the VL embedding would count
        self.pad_id = cfg.vocab_size - 1 if self.image_id != cfg.vocab_size - 1 else cfg.vocab_size - 2

    # --- Backend --------------------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        p = request.params
        if not request.prompt:
            raise ValueError("request prompt is empty (at least one token, e.g. BOS, is needed)")
        if len(request.prompt) >= self.max_len:
            raise ValueError(f"prompt has {len(request.prompt)} tokens; the engine's context is {self.max_len}")
        if p.n > self.max_batch:
            raise ValueError(f"n={p.n} samples exceed the engine's max_batch={self.max_batch}")
        if p.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer")
        vocab = self.model.config.vocab_size
        bad = [t for t in request.prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} outside the vocabulary [0, {vocab})")
        self._check_images(request)
        self.waiting.append(request)

    def _check_images(self, request: Request) -> None:
        """A request's images must fill its placeholders exactly (else the prefill, shared with other requests,
        would fail): one image per `<image>`, each expanded to image_tokens ids, at the tower's size."""
        images = request.images
        if images is not None and len(images) and self.image_id is None:
            raise ValueError("this model takes no images (it is a text-only model)")
        if self.image_id is None:
            return
        placeholders = request.prompt.count(self.image_id)
        k = 0 if images is None else len(images)
        if placeholders != k * self.image_tokens:
            raise ValueError(f"the prompt holds {placeholders} image ids; {k} image(s) need {k * self.image_tokens} "
                             f"({self.image_tokens} per image)")
        if k and tuple(images.shape[1:]) != (3, self.image_size, self.image_size):
            raise ValueError(f"images have shape {tuple(images.shape)}; this model takes "
                             f"[k, 3, {self.image_size}, {self.image_size}] pixels")

    def has_work(self) -> bool:
        return bool(self.rows or self.waiting)

    def abort(self, request_id: str) -> None:
        self.waiting = deque(r for r in self.waiting if r.id != request_id)
        for seq in self.rows:
            if seq.request.id == request_id:
                seq.finish_reason = "abort"
        self._remove_finished()

    def step(self) -> list[TokenEvent]:
        """Admit waiting requests (prefill), then advance every running sample by one decode step."""
        events = self._admit()
        self._remove_finished()  # e.g. max_tokens=1, or a stop token first
        if not self.rows:
            return events
        if self.frontier + (2 if self.drafter else 1) > self.max_len:
            self._pack()
        if self.drafter is not None:
            events += self._emit(*self.drafter.verify())
            self.drafter.draft()
        else:
            events += self._emit(*self._decode())
        self._remove_finished()
        return events

    # --- admission and prefill -------------------------------------------------------------------
    def _admit(self) -> list[TokenEvent]:
        new: list[Slot] = []
        while self.waiting and len(self.rows) + len(new) + self.waiting[0].params.n <= self.max_batch:
            r = self.waiting.popleft()
            p = r.params
            stop_ids = frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos or self.eos_id is None
                                                      else frozenset([self.eos_id]))
            for i in range(p.n):
                text = TextStream(self.tokenizer, p.stop) if self.tokenizer is not None else None
                new.append(Slot(r, i, row_generator(p.seed, i), text, stop_ids,
                                min(p.max_tokens, self.max_len - len(r.prompt))))
        if not new:
            return []
        # a request's n samples share its prompt: each distinct prompt is prefilled once, into the first of its
        # rows, and its cache, hidden state and logits are copied to the others (a GRPO group of 8 prefills one
        # prompt, not eight); `first` [u] are the rows prefilled, `source` [len(new)] each row's prefilled row
        first = [i for i, s in enumerate(new) if s.index == 0]
        source = torch.tensor([k for k, j in enumerate(first) for _ in range(new[j].request.params.n)],
                              device=self.device)
        P = max(len(s.request.prompt) for s in new)
        n0 = len(self.rows)
        if n0 == 0:
            self.frontier = P
        elif self.frontier < P:
            self._shift_right(P - self.frontier)
        f, rows = self.frontier, slice(n0, n0 + len(new))
        ids = torch.full((len(first), P), self.pad_id, dtype=torch.long, device=self.device)
        mask = torch.zeros(len(first), P, dtype=torch.bool, device=self.device)
        for i, j in enumerate(first):
            prompt = new[j].request.prompt
            ids[i, P - len(prompt):] = torch.tensor(prompt, device=self.device)
            mask[i, P - len(prompt):] = True
        pad = (~mask).sum(1)
        positions = (torch.arange(P, device=self.device)[None] - pad[:, None]).clamp(min=0)
        self.key_mask[rows] = False
        self.key_mask[rows, f - P:f] = mask[source]
        self.positions[rows] = (P - pad)[source]
        self.rows.extend(new)
        for i, s in enumerate(new):
            s.row = n0 + i
        self._refresh_params()
        if self.penalties is not None or any(s.request.params.penalised for s in new):
            self._ensure_penalties()
            for s in new:
                self.penalties.reset_row(s.row, s.request.prompt)
        view = self.cache.view(slice(n0, n0 + len(first)), slice(f - P, f))
        padded = bool(pad.any())
        images = [new[j].request.images for j in first if new[j].request.images is not None
                  and len(new[j].request.images)]
        vision = {"images": torch.cat(images).to(self.device)} if images else {}  # a text model takes no images=
        with torch.no_grad(), self._routing(any(s.request.routing for s in new)) as routes:
            h = self.model.forward_cached(ids, view, 0, key_mask=mask if padded else None,
                                          positions=positions if padded else None, hidden=True, **vision)
            logits = self.model.head(h[:, -1])[source]
        if len(first) < len(new):  # copy each prefilled row's cache to its request's other rows
            for t in self.cache.tensors():
                t[:, rows, f - P:f] = t[:, n0 + source, f - P:f]  # advanced indexing copies first
        tokens = self._sample(logits, rows)
        self.pending[rows] = tokens
        experts = routes.last(len(first), P) if routes is not None else None
        events = self._emit({n0 + i: [int(t)] for i, t in enumerate(tokens.tolist())},
                            None if experts is None else {n0 + i: [experts[j]] for i, j in enumerate(source.tolist())})
        if self.drafter is not None:  # after _emit, so penalties count the first token
            self.drafter.prefill(rows, ids[source], h[source], tokens, mask[source] if padded else None,
                                 positions[source] if padded else None)
        return events

    def _ensure_penalties(self) -> None:
        if self.penalties is None:
            self.penalties = Penalties(self.max_batch, self.model.config.vocab_size, self.device)

    def _refresh_params(self) -> None:
        self.row_params = RowParams.stack([s.request.params for s in self.rows], self.device)

    def _sample(self, logits: torch.Tensor, rows: slice) -> torch.Tensor:
        """Sample for a contiguous range of rows (their parameters, generators and token statistics)."""
        rp = self.row_params.select(rows)
        gens = [s.generator for s in self.rows[rows]]
        pen = self.penalties
        counts = pen.output_counts[rows] if pen is not None else None
        seen = pen.prompt_seen[rows] if pen is not None else None
        return sample(logits, rp, gens, counts, seen)

    # --- decoding -------------------------------------------------------------------------------
    def _decode(self) -> tuple[dict[int, list[int]], dict[int, list] | None]:
        """One token for every running row: feed the pending tokens at the frontier column."""
        n, f = len(self.rows), self.frontier
        self.key_mask[:n, f] = True
        with torch.no_grad(), self._routing(any(s.request.routing for s in self.rows)) as routes:
            h = self.forward(self.pending[:n, None], n, f, self.positions[:n, None])
            logits = self.model.head(h[:, 0])
        self.frontier += 1
        self.positions[:n] += 1
        tokens = self._sample(logits, slice(0, n))
        self.pending[:n] = tokens
        experts = routes.last(n, 1) if routes is not None else None
        return ({i: [t] for i, t in enumerate(tokens.tolist())},
                None if experts is None else {i: [experts[i]] for i in range(n)})

    def forward(self, ids: torch.Tensor, n: int, start: int, positions: torch.Tensor) -> torch.Tensor:
        """ids [n, t] of the first n rows at columns start.. (start > 0) -> final hidden state [n, t, D]."""
        mask = self.mask(n, start + ids.shape[1])
        if self.decoder is not None:
            return self.decoder.forward(ids, self.view(n), start, mask, positions, eager=self._recording)
        return self.model.forward_cached(ids, self.view(n), start, key_mask=mask, positions=positions, hidden=True)

    def view(self, n: int) -> LatentCache:
        """The cache of the first n rows (a view: the model writes through it)."""
        return self.cache.view(slice(0, n))

    def mask(self, n: int, end: int) -> torch.Tensor | None:
        """key_mask of the first n rows, or None when every column up to `end` is real (the model's fast path)."""
        m = self.key_mask[:n, :end]
        return None if bool(m.all()) else self.key_mask[:n]

    def _routing(self, enabled: bool):
        self._recording = enabled
        return _RouteRecorder(self.moe_gates if enabled else [])

    # --- bookkeeping ----------------------------------------------------------------------------
    def _emit(self, new_tokens: dict[int, list[int]], experts: dict[int, list] | None) -> list[TokenEvent]:
        """Turn each row's new tokens into events; mark rows that finish (stop token, stop string, length). A row
        whose bookkeeping fails (detokenisation, stop strings) finishes with an error event; the others go on."""
        events = []
        for row, toks in new_tokens.items():
            seq = self.rows[row]
            try:
                events += self._emit_row(seq, toks, experts[row] if experts is not None else None)
            except Exception as e:
                seq.finish_reason = "error"
                events.append(TokenEvent(seq.request.id, seq.index, None, "", "error",
                                         error=f"{type(e).__name__}: {e}"))
        return events

    def _emit_row(self, seq: Slot, toks: list[int], experts: list | None) -> list[TokenEvent]:
        """The events of one row's new tokens (1, or 2 after a speculative step); `experts` has one per token."""
        events = []
        req = seq.request
        for j, tok in enumerate(toks):
            if seq.finish_reason:
                break
            ex = experts[j] if experts is not None and req.routing else None
            if tok in seq.stop_ids:
                seq.finish_reason = "stop"
                events.append(TokenEvent(req.id, seq.index, None, seq.text.flush() if seq.text else "", "stop", ex,
                                         stop_token=tok))
                break
            seq.generated += 1
            if self.penalties is not None and req.params.penalised:
                self.penalties.add(torch.tensor([seq.row]), torch.tensor([tok]))
            text, stopped = seq.text.push(tok) if seq.text else ("", False)
            if stopped:
                seq.finish_reason = "stop"
            elif seq.generated >= seq.max_tokens:
                seq.finish_reason = "length"
                text += seq.text.flush() if seq.text else ""
            events.append(TokenEvent(req.id, seq.index, tok, text, seq.finish_reason, ex))
        return events

    def _remove_finished(self) -> None:
        """Drop finished rows, moving the last row into each hole so active rows stay packed at the front."""
        changed = False
        row = 0
        while row < len(self.rows):
            if not self.rows[row].finish_reason:
                row += 1
                continue
            last = len(self.rows) - 1
            if row != last:
                self._move_row(last, row)
                self.rows[row] = self.rows[last]
                self.rows[row].row = row
            self.rows.pop()
            changed = True
        if changed:
            if not self.rows:
                self.frontier = 0
            self._refresh_params()

    def _move_row(self, src: int, dst: int) -> None:
        f = self.frontier
        for t in self.cache.tensors():
            t[:, dst, :f] = t[:, src, :f]
        for t in (self.key_mask, self.positions, self.pending):
            t[dst] = t[src]
        if self.penalties is not None:
            self.penalties.move_row(src, dst)
        if self.drafter is not None:
            self.drafter.move_row(src, dst)

    def _shift_right(self, by: int) -> None:
        """Move every row's columns `by` to the right (a longer prompt joins the batch) and the frontier too."""
        n, f = len(self.rows), self.frontier
        for t in self.cache.tensors():
            t[:, :n, by:f + by] = t[:, :n, :f].clone()
        self.key_mask[:n, by:f + by] = self.key_mask[:n, :f].clone()
        self.key_mask[:n, :by] = False
        self.frontier = f + by

    def _pack(self) -> None:
        """The frontier reached the end of the cache: move each row's real columns (skipping padding and
        speculative holes) to the right end [f' - count, f'), f' = the largest count. Attention ignores the order
        of keys and RoPE is already inside k_pe, so only the mask moves with them. A running row has at most
        max_len - 2 real columns (its prompt + max_tokens fit the cache), so two columns always come free."""
        n, f = len(self.rows), self.frontier
        counts = self.key_mask[:n, :f].sum(1).tolist()
        new_f = max(counts)
        for i, count in enumerate(counts):
            cols = self.key_mask[i, :f].nonzero().squeeze(1)
            for t in self.cache.tensors():
                t[:, i, new_f - count:new_f] = t[:, i, cols]  # advanced indexing copies: overlap is safe
            self.key_mask[i] = False
            self.key_mask[i, new_f - count:new_f] = True
        self.frontier = new_f


class _RouteRecorder:
    """Records the experts each MoE gate picks during one forward pass (forward hooks, removed on exit)."""

    def __init__(self, gates: list):
        self.gates, self.picks, self.handles = gates, [], []

    def __enter__(self) -> _RouteRecorder | None:
        if not self.gates:
            return None
        self.handles = [g.register_forward_hook(lambda _m, _i, out: self.picks.append(out[0])) for g in self.gates]
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()

    def last(self, batch: int, t: int) -> list[list[list[int]]]:
        """Experts at the last of t positions of each row: [batch][n_moe_layers][top_k]."""
        return self.at(batch, t, [t - 1] * batch)

    def at(self, batch: int, t: int, cols: Sequence[int]) -> list[list[list[int]]]:
        """Experts at position cols[b] of row b: [batch][n_moe_layers][top_k]."""
        picks = torch.stack([p.view(batch, t, -1) for p in self.picks[-len(self.gates):]], 1)  # [B, Lmoe, t, K]
        rows = torch.arange(batch)
        return picks[rows, :, torch.as_tensor(list(cols))].tolist()



def load_engine(path, max_batch: int = 8, max_len: int | None = None, speculative: bool = False,
                dtype: torch.dtype | None = None) -> Engine:
    """An engine for a checkpoint, run directory (its latest checkpoint) or HF directory, with the tokenizer
    saved beside the weights."""
    from nanoseek.data.tokenizer import Tokenizer
    from nanoseek.model.hf import load, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    if not (ckpt / "tokenizer.json").exists():
        raise FileNotFoundError(f"{ckpt}: no tokenizer.json beside the weights (save the tokenizer into the "
                                "checkpoint directory)")
    model = load(ckpt, dtype=dtype)
    tokenizer = Tokenizer.load(ckpt)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"{ckpt}: tokenizer has {tokenizer.vocab_size} ids, the model only "
                         f"{model.config.vocab_size}")
    return Engine(model, tokenizer, max_batch=max_batch, max_len=max_len, speculative=speculative)
