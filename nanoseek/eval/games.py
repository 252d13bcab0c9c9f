"""Game evaluation: an optimal and a random player, the model as a player through text moves, and matches.

The rules (Nim, tic-tac-toe, `value`, `describe`, `parse_move`) live in nanoseek/data/synth/games.py, because the
built-in data teaches the same exchange; they are re-exported here. The model plays by answering a question that
describes the position (`describe`) in its usual answer format; its move is read from the extracted answer
(`parse_move`). No answer, an unreadable one or an illegal move forfeits the game, which is counted apart from
ordinary losses.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from nanoseek.data.synth.games import GAMES, Game, Move, Nim, NimState, State, TicTacToe
from nanoseek.rewards import extract_answer

__all__ = ["GAMES", "Game", "Nim", "NimState", "Player", "TicTacToe", "optimal_player", "play_match",
           "random_player", "text_player"]

# A player sees a batch of positions (its turn in each) and returns a move for each, None for "no legal move
# given" (the model's unreadable or illegal answers). Batching lets a model move in all games at once.
Player = Callable[[Sequence[State]], list[Move | None]]


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

def play_match(game: Game, player: Player, opponent: Player, n: int, seed: int = 0) -> dict[str, Any]:
    """`n` games of `player` against `opponent`, alternating who starts (player first in even games). All
    games advance together, so each side moves in every game awaiting it with one call.

    Returns rates over games from `player`'s side: win, draw, loss (forfeits included) and forfeit (no or
    illegal move), plus `optimal_move_rate`: the share of `player`'s moves that keep the position's value; and
    per game (for intervals over games): `outcomes` ("win", "draw", "loss" or "forfeit"), `moves` (the
    player's moves, a forfeiting one included) and `optimal_moves` (those that kept the value)."""
    if n < 1:
        raise ValueError(f"need at least one game, got n={n}")
    rng = random.Random(f"{game.name}|{seed}")
    states = [game.initial(rng) for _ in range(n)]
    seat = [g % 2 for g in range(n)]  # the player's seat (0 moves first)
    result: list[str | None] = [None] * n
    kept, moved = [0] * n, [0] * n
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
                    moved[g] += 1
                    continue
                before = states[g]
                states[g] = game.play(before, move)
                if side:
                    moved[g] += 1
                    after = game.outcome(states[g])
                    after_value = -game.value(states[g]) if after is None else \
                        (0 if after == -1 else (1 if after == seat[g] else -1))
                    kept[g] += after_value == game.value(before)
                end = game.outcome(states[g])
                if end is not None:
                    result[g] = "draw" if end == -1 else ("win" if end == seat[g] else "loss")
    count = {k: sum(r == k for r in result) for k in ("win", "draw", "loss", "forfeit")}
    return {"win": count["win"] / n, "draw": count["draw"] / n, "loss": (count["loss"] + count["forfeit"]) / n,
            "forfeit": count["forfeit"] / n, "optimal_move_rate": sum(kept) / sum(moved) if sum(moved) else 0.0,
            "games": n, "outcomes": result, "moves": moved, "optimal_moves": kept}
