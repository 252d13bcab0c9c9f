"""Game environments for strategy evaluation: Nim and tic-tac-toe, an optimal and a random player, and the model
as a player through text moves.

A game is a set of pure functions over immutable states. Every state knows whose turn it is, and `value(state)`
is its game-theoretic value for the player to move (+1 win, 0 draw, -1 loss under perfect play), which gives
both the optimal player and a strategy metric: a move is *optimal* when it keeps that value.

The model plays by answering a question that describes the position (`describe`) in its usual answer format;
its move is read from the extracted answer (`parse_move`). No answer, an unreadable one or an illegal move
forfeits the game, which is counted apart from ordinary losses.
"""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nanoseek.rewards import extract_answer

Move = Any
State = Any
# A player sees a batch of positions (its turn in each) and returns a move for each, None for "no legal move
# given" (the model's unreadable or illegal answers). Batching lets a model move in all games at once.
Player = Callable[[Sequence[State]], list[Move | None]]


class Game(Protocol):
    name: str

    def initial(self, rng: random.Random) -> State: ...
    def to_move(self, state: State) -> int: ...  # 0 or 1
    def moves(self, state: State) -> list[Move]: ...
    def play(self, state: State, move: Move) -> State: ...
    def outcome(self, state: State) -> int | None: ...  # None while running, else the winner 0/1, or -1 draw
    def value(self, state: State) -> int: ...
    def describe(self, state: State) -> str: ...
    def parse_move(self, text: str) -> Move | None: ...


def _integers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


# --- Nim --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class NimState:
    heaps: tuple[int, ...]
    player: int = 0


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
        return 1 if functools.reduce(lambda a, b: a ^ b, state.heaps, 0) else -1

    def optimal_move(self, state: NimState) -> tuple[int, int]:
        """Make the nim-sum 0; from a lost position (nim-sum 0) take one from the largest heap and wait."""
        s = functools.reduce(lambda a, b: a ^ b, state.heaps, 0)
        if s:
            for i, h in enumerate(state.heaps):
                if h ^ s < h:
                    return i, h - (h ^ s)
        i = max(range(len(state.heaps)), key=lambda j: state.heaps[j])
        return i, 1

    def describe(self, state: NimState) -> str:
        heaps = ", ".join(f"heap {i + 1} has {h}" for i, h in enumerate(state.heaps))
        return (f"We play Nim: on your turn take one or more objects from a single heap; whoever takes the last "
                f"object wins. Now {heaps}. Which heap do you take from and how many? Answer with two numbers: "
                f"the heap, then how many.")

    def parse_move(self, text: str) -> tuple[int, int] | None:
        numbers = _integers(text)
        return (numbers[0] - 1, numbers[1]) if len(numbers) == 2 else None


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


# --- players ----------------------------------------------------------------------------------------------

def optimal_player(game: Game) -> Player:
    return lambda states: [game.optimal_move(s) for s in states]


def random_player(game: Game, seed: int = 0) -> Player:
    rng = random.Random(seed)
    return lambda states: [rng.choice(game.moves(s)) for s in states]


def text_player(game: Game, respond: Callable[[list[str]], list[str]]) -> Player:
    """The model as a player: `respond` maps position descriptions to full completions (answer format
    included); the move is read from each completion's extracted answer. None when it has none or it does
    not parse as a move."""
    def play(states: Sequence[State]) -> list[Move | None]:
        replies = respond([game.describe(s) for s in states])
        out = []
        for reply in replies:
            answer = extract_answer(reply)
            out.append(None if answer is None else game.parse_move(answer))
        return out
    return play


# --- matches ----------------------------------------------------------------------------------------------

def play_match(game: Game, player: Player, opponent: Player, n: int, seed: int = 0) -> dict[str, float]:
    """`n` games of `player` against `opponent`, alternating who starts (player first in even games). All
    games advance together, so each side moves in every game awaiting it with one call.

    Returns rates over games from `player`'s side: win, draw, loss (forfeits included) and forfeit (no or
    illegal move), plus `optimal_move_rate`: the share of `player`'s moves that keep the position's value."""
    if n < 1:
        raise ValueError(f"need at least one game, got n={n}")
    rng = random.Random(f"{game.name}|{seed}")
    states = [game.initial(rng) for _ in range(n)]
    seat = [g % 2 for g in range(n)]  # the player's seat (0 moves first)
    result: list[str | None] = [None] * n
    kept = moved = 0
    while True:
        live = [g for g in range(n) if result[g] is None]
        if not live:
            break
        for side, who in ((True, player), (False, opponent)):
            turn = [g for g in live if result[g] is None and (game.to_move(states[g]) == seat[g]) == side]
            if not turn:
                continue
            for g, move in zip(turn, who([states[g] for g in turn]), strict=True):
                if move is None or move not in game.moves(states[g]):
                    if not side:
                        raise RuntimeError(f"{game.name}: the opponent made an illegal move {move!r}")
                    result[g] = "forfeit"
                    moved += 1
                    continue
                before = states[g]
                states[g] = game.play(before, move)
                if side:
                    moved += 1
                    after = game.outcome(states[g])
                    after_value = -game.value(states[g]) if after is None else \
                        (0 if after == -1 else (1 if after == seat[g] else -1))
                    kept += after_value == game.value(before)
                end = game.outcome(states[g])
                if end is not None:
                    result[g] = "draw" if end == -1 else ("win" if end == seat[g] else "loss")
    count = {k: sum(r == k for r in result) for k in ("win", "draw", "loss", "forfeit")}
    return {"win": count["win"] / n, "draw": count["draw"] / n, "loss": (count["loss"] + count["forfeit"]) / n,
            "forfeit": count["forfeit"] / n, "optimal_move_rate": kept / moved if moved else 0.0, "games": n}
