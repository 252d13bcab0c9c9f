"""Game rules (Nim, tic-tac-toe) and transcripts of the optimal player for the built-in data.

A game is a set of pure functions over immutable states. Every state knows whose turn it is, and `value(state)`
is its game-theoretic value for the player to move (+1 win, 0 draw, -1 loss under perfect play), which gives
both the optimal player and a strategy metric: a move is *optimal* when it keeps that value.

A model plays by answering the question `describe(state)` in its usual answer format, and its move is read from
the extracted answer (`parse_move`). The rules live here, in the data layer, because the built-in data teaches
that exchange: `game_document` (a pretraining document) and `game_sft_record` (a chat conversation) show
positions exactly as the evaluator describes them, answered by the optimal player's move with a short reasoning
in the R1 format. nanoseek/eval/games.py adds the players and matches on top.

Decontamination: evaluation games start from `game.initial(rng)` positions and go on from there, and the
training transcripts show positions drawn from all of them (documents) or the same way (SFT conversations), so
training sees the evaluation's positions. That is by design: Nim with 3 heaps of at most 5 has 215 positions and
tic-tac-toe 5,478, so a game is judged like chess openings, on play, not on unseen positions. What a game
measures is whether the model moves legally and well, and the transcripts are the game's rules and strategy, not
answers to held-out problems.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from nanoseek.data.synth.tasks import r1_zero_prompt

Move = Any
State = Any


class Game(Protocol):
    name: str

    def initial(self, rng: random.Random) -> State: ...
    def to_move(self, state: State) -> int: ...  # 0 or 1
    def moves(self, state: State) -> list[Move]: ...
    def play(self, state: State, move: Move) -> State: ...
    def outcome(self, state: State) -> int | None: ...  # None while running, else the winner 0/1, or -1 draw
    def value(self, state: State) -> int: ...
    def optimal_move(self, state: State) -> Move: ...
    def describe(self, state: State) -> str: ...
    def parse_move(self, text: str) -> Move | None: ...


def _integers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


# --- Nim --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NimState:
    heaps: tuple[int, ...]
    player: int = 0


def nim_sum(heaps: tuple[int, ...]) -> int:
    return functools.reduce(lambda a, b: a ^ b, heaps, 0)


class Nim:
    """Normal-play Nim: take one or more objects from one heap; whoever takes the last object wins.

    Bouton's theorem: the player to move loses under perfect play iff the XOR of the heap sizes (the nim-sum)
    is 0, and a winning move is one that makes it 0."""

    name = "nim"

    def __init__(self, heaps: int = 3, max_heap: int = 5):
        if heaps < 1 or max_heap < 1:
            raise ValueError(f"Nim needs heaps >= 1 and max_heap >= 1, got {heaps}, {max_heap}")
        self.heaps, self.max_heap = heaps, max_heap

    def initial(self, rng: random.Random) -> NimState:
        return NimState(tuple(rng.randint(1, self.max_heap) for _ in range(self.heaps)))

    def to_move(self, state: NimState) -> int:
        return state.player

    def moves(self, state: NimState) -> list[tuple[int, int]]:
        """(heap index, how many to take)."""
        return [(i, k) for i, h in enumerate(state.heaps) for k in range(1, h + 1)]

    def play(self, state: NimState, move: tuple[int, int]) -> NimState:
        i, k = move
        if not (0 <= i < len(state.heaps) and 1 <= k <= state.heaps[i]):
            raise ValueError(f"illegal Nim move {move} in {state.heaps}")
        heaps = list(state.heaps)
        heaps[i] -= k
        return NimState(tuple(heaps), 1 - state.player)

    def outcome(self, state: NimState) -> int | None:
        return 1 - state.player if not any(state.heaps) else None  # the previous player took the last object

    def value(self, state: NimState) -> int:
        return 1 if nim_sum(state.heaps) else -1

    def optimal_move(self, state: NimState) -> tuple[int, int]:
        """Make the nim-sum 0; from a lost position (nim-sum 0) take one from the largest heap and wait."""
        s = nim_sum(state.heaps)
        if s:
            for i, h in enumerate(state.heaps):
                if h ^ s < h:
                    return i, h - (h ^ s)
        i = max(range(len(state.heaps)), key=lambda j: state.heaps[j])
        return i, 1

    def explain(self, state: NimState) -> str:
        """The optimal move's reasoning, short (~30 tokens) so that the R1-Zero template, the question and the
        answer fit one 128-token pretraining row. Each step is one a small model can copy or look up, and the
        move's legality rests only on the copies: the heaps restated as a XOR chain (its value, the nim-sum,
        is the one hard step), the chosen heap's size copied from the question ("heap 2 has 5" -> "Heap 2:
        5"), then that size XOR the nim-sum and the difference to take, which is at most the heap. A lost
        position (nim-sum 0) takes 1 from the largest heap, always legal, and says so."""
        i, k = self.optimal_move(state)
        s, h = nim_sum(state.heaps), state.heaps[i]
        chain = " xor ".join(map(str, state.heaps)) + f" = {s}."
        if s:
            return f"{chain} Heap {i + 1}: {h} xor {s} = {h ^ s}, take {k}."
        return f"{chain} Heap {i + 1}: {h} is the largest, take {k}."

    def format_move(self, move: tuple[int, int]) -> str:
        return f"{move[0] + 1} {move[1]}"

    def describe(self, state: NimState) -> str:
        """The position as a question, ~30 tokens for the same reason as `explain`: the rules are the game's
        name (normal-play Nim), and the built-in transcripts show them move by move. Each heap is labelled
        ("heap 2 has 5") so that the answer's reasoning can copy a heap's size by its label."""
        heaps = ", ".join(f"heap {i + 1} has {h}" for i, h in enumerate(state.heaps))
        return f"Nim: {heaps}. Which heap, how many?"

    def parse_move(self, text: str) -> tuple[int, int] | None:
        """Two numbers, the heap (from 1) then how many ("2 1", "2, 1"), or one "heap N" and one "take K"
        in either order ("heap 2, take 1", "take 1 from heap 2"). Anything else, e.g. one number, three
        unlabelled numbers or two heaps, is no move. Legality is the game's business, not the parser's."""
        heap = re.findall(r"\bheap\s*(\d+)", text, re.I)
        take = re.findall(r"\btakes?\s*(\d+)", text, re.I)
        if len(heap) == 1 and len(take) == 1:
            return int(heap[0]) - 1, int(take[0])
        numbers = _integers(text)
        return (numbers[0] - 1, numbers[1]) if len(numbers) == 2 and not heap and not take else None


# --- tic-tac-toe ------------------------------------------------------------------------------------------

_LINES = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]


def _ttt_to_move(board: str) -> int:
    return 0 if board.count("X") == board.count("O") else 1


def _ttt_outcome(board: str) -> int | None:
    for a, b, c in _LINES:
        if board[a] != "." and board[a] == board[b] == board[c]:
            return "XO".index(board[a])
    return -1 if "." not in board else None


@functools.cache  # 5,478 reachable boards: the whole game tree is solved once per process
def _ttt_score(board: str) -> int:
    """Negamax score for the player to move: its sign is the game value (+1 win, 0 draw, -1 loss); its size
    prefers quick wins and slow losses (a lost board scores -(1 + free cells) at its end), so the optimal
    player still blocks a threat in a lost position instead of losing on the spot."""
    result = _ttt_outcome(board)
    if result is not None:
        return 0 if result == -1 else -(1 + board.count("."))  # a finished line is the previous mover's win
    mark = "XO"[_ttt_to_move(board)]
    return max(-_ttt_score(board[:i] + mark + board[i + 1:]) for i, c in enumerate(board) if c == ".")


class TicTacToe:
    """3×3 tic-tac-toe; X (player 0) moves first. States are 9-character strings of "X", "O" and "."; moves
    are cell indices 0-8 (shown to the model as 1-9, row by row)."""

    name = "tictactoe"

    def initial(self, rng: random.Random) -> str:
        return "." * 9

    def to_move(self, state: str) -> int:
        return _ttt_to_move(state)

    def moves(self, state: str) -> list[int]:
        return [i for i, c in enumerate(state) if c == "."] if _ttt_outcome(state) is None else []

    def play(self, state: str, move: int) -> str:
        if not (isinstance(move, int) and 0 <= move < 9 and state[move] == ".") or _ttt_outcome(state) is not None:
            raise ValueError(f"illegal tic-tac-toe move {move} on {state}")
        return state[:move] + "XO"[_ttt_to_move(state)] + state[move + 1:]

    def outcome(self, state: str) -> int | None:
        return _ttt_outcome(state)

    def value(self, state: str) -> int:
        score = _ttt_score(state)
        return (score > 0) - (score < 0)

    def optimal_move(self, state: str) -> int:
        """The best-scoring move (quickest win, slowest loss), the first in cell order among equals."""
        return max(self.moves(state), key=lambda m: -_ttt_score(self.play(state, m)))

    def describe(self, state: str) -> str:
        rows = [" ".join(c if c != "." else str(3 * r + j + 1) for j, c in enumerate(state[3 * r:3 * r + 3]))
                for r in range(3)]
        me = "XO"[self.to_move(state)]
        return (f"We play tic-tac-toe; three in a row wins. You are {me}. The board, free cells numbered: "
                f"{' / '.join(rows)}. Which cell do you take? Answer with its number.")

    def parse_move(self, text: str) -> int | None:
        numbers = _integers(text)
        return numbers[0] - 1 if len(numbers) == 1 else None


GAMES: dict[str, Callable[[], Game]] = {"nim": Nim, "tictactoe": TicTacToe}


# --- transcripts for the built-in data ---------------------------------------------------------------------

def nim_game(rng: random.Random, game: Nim) -> tuple[list[NimState], list[NimState]]:
    """One game of the optimal player, first or second (a coin flip), against a random opponent from an
    evaluation-like start -> (the positions the optimal player faced, every position of the game in order).
    A random opponent leaves the varied positions, empty heaps and lost ones included, that an evaluated model
    meets; an optimal opponent would replay one of only 250 games."""
    state, seat = game.initial(rng), rng.randint(0, 1)
    faced, path = [], [state]
    while game.outcome(state) is None:
        if game.to_move(state) == seat:
            faced.append(state)
            state = game.play(state, game.optimal_move(state))
        else:
            state = game.play(state, rng.choice(game.moves(state)))
        path.append(state)
    return faced, path


def nim_completion(state: NimState, game: Nim) -> str:
    """The optimal player's answer in the R1 format: `<think>\\nreasoning\\n</think>\\n<answer>\\nH K\\n</answer>`."""
    move = game.format_move(game.optimal_move(state))
    return f"<think>\n{game.explain(state)}\n</think>\n<answer>\n{move}\n</answer>"


# Pretraining documents show positions with heaps up to this size, beyond the evaluated 5: one document per
# distinct position, and the wider heaps teach the same copies and XOR facts with more distinct documents.
DOCUMENT_MAX_HEAP = 7
NIM_DOCUMENTS = 2 * ((DOCUMENT_MAX_HEAP + 1) ** 3 - 1)  # distinct documents `game_document` writes: 2 × 511


def document_position(rng: random.Random) -> NimState:
    """Any position of three heaps up to DOCUMENT_MAX_HEAP, uniformly: the corpus redraws exact duplicates, so
    its documents cover distinct positions, all 215 of the evaluated game's once it holds them all."""
    heaps = (0, 0, 0)
    while not any(heaps):
        heaps = tuple(rng.randint(0, DOCUMENT_MAX_HEAP) for _ in range(3))
    return NimState(heaps)


def game_document(rng: random.Random) -> tuple[str, str]:
    """A pretraining document: one Nim position asked in the evaluator's words and answered by the optimal
    player in the R1 format, either in the R1-Zero template (the shape of corpus.math_document's R1 documents)
    or as the template's last lines alone ("User: ...\nAssistant:\n", a coin flip). One exchange is at most
    ~125 tokens, so it fits one 128-token row whole (the loader trains on a document's head and crops a longer
    one's tail, which had cut most answers off when a document held a whole game). The two shapes are for
    curation's near-duplicate filter: the template's 48 words make any two template documents ~0.6 similar,
    so MinHash links them into clusters and keeps about 150; the short shape shares little but its numbers
    (similarity <= 0.4) and survives whole. Returns (source, text)."""
    game = Nim(max_heap=DOCUMENT_MAX_HEAP)
    state = document_position(rng)
    question = game.describe(state)
    prompt = r1_zero_prompt(question) if rng.random() < 0.5 else f"User: {question}\nAssistant:\n"
    return "nanoseek-synth:nim:r1", prompt + nim_completion(state, game)


def game_sft_record(rng: random.Random) -> dict[str, Any]:
    """An SFT conversation: one position of an optimal player's Nim game and its answer in the R1 format
    (style "reasoning", so the chat template's thinking prompt sees it)."""
    game = Nim()
    state = rng.choice(nim_game(rng, game)[0])
    return {"messages": [{"role": "user", "content": game.describe(state)},
                         {"role": "assistant", "content": nim_completion(state, game)}],
            "style": "reasoning", "task": "nim", "answer": game.format_move(game.optimal_move(state))}
