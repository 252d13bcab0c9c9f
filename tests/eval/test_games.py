"""Game environments: rules, optimal players checked against brute-force search, matches and text moves."""

import functools
import random

import pytest

from nanoseek.eval.games import (
    Nim,
    NimState,
    TicTacToe,
    optimal_player,
    play_match,
    random_player,
    text_player,
)


@functools.cache
def nim_wins(heaps: tuple[int, ...]) -> bool:
    """Brute force: does the player to move win? (No nim-sum theory: try every move.)"""
    return any(not nim_wins(tuple(sorted(heaps[:i] + (h - k,) + heaps[i + 1:])))
               for i, h in enumerate(heaps) for k in range(1, h + 1))


ALL_NIM = [(a, b, c) for a in range(5) for b in range(5) for c in range(5)]


def test_nim_rules():
    nim = Nim(heaps=3, max_heap=5)
    s = NimState((1, 0, 2))
    assert nim.moves(s) == [(0, 1), (2, 1), (2, 2)]
    s2 = nim.play(s, (2, 2))
    assert s2 == NimState((1, 0, 0), player=1) and nim.outcome(s2) is None
    end = nim.play(s2, (0, 1))
    assert nim.outcome(end) == 1  # player 1 took the last object
    for bad in [(1, 1), (2, 3), (3, 1), (0, 0)]:
        with pytest.raises(ValueError, match="illegal Nim move"):
            nim.play(s, bad)
    start = nim.initial(random.Random(0))
    assert len(start.heaps) == 3 and all(1 <= h <= 5 for h in start.heaps) and start.player == 0


@pytest.mark.parametrize("heaps", ALL_NIM)
def test_nim_value_and_optimal_move_match_brute_force(heaps):
    nim = Nim()
    state = NimState(heaps)
    wins = nim_wins(tuple(sorted(heaps)))
    assert nim.value(state) == (1 if wins else -1)
    if any(heaps):
        after = nim.play(state, nim.optimal_move(state))
        if wins:  # the optimal move leaves the opponent a lost position
            assert not nim_wins(tuple(sorted(after.heaps)))


@functools.cache
def ttt_brute(board: str) -> int:
    """Negamax over the full tree with no shared code: value for the player to move."""
    lines = [(0, 1, 2), (3, 4, 5), (6, 7, 8), (0, 3, 6), (1, 4, 7), (2, 5, 8), (0, 4, 8), (2, 4, 6)]
    for a, b, c in lines:
        if board[a] != "." and board[a] == board[b] == board[c]:
            return -1  # the previous player just completed a line
    free = [i for i, ch in enumerate(board) if ch == "."]
    if not free:
        return 0
    mark = "X" if board.count("X") == board.count("O") else "O"
    return max(-ttt_brute(board[:i] + mark + board[i + 1:]) for i in free)


def all_boards():
    seen, frontier = {"." * 9}, ["." * 9]
    game = TicTacToe()
    while frontier:
        b = frontier.pop()
        for m in game.moves(b):
            nb = game.play(b, m)
            if nb not in seen:
                seen.add(nb)
                frontier.append(nb)
    return seen


def test_tictactoe_rules():
    game = TicTacToe()
    b = game.play(game.initial(random.Random(0)), 4)
    assert b == "....X...." and game.to_move(b) == 1
    b = game.play(b, 0)
    assert b == "O...X...." and game.to_move(b) == 0
    with pytest.raises(ValueError, match="illegal tic-tac-toe move"):
        game.play(b, 4)
    assert game.outcome("XXXOO....") == 0 and game.outcome("XXOOOXXXO") == -1 and game.outcome("X........") is None
    assert game.moves("XXXOO....") == []  # the game is over
    assert len(all_boards()) == 5478  # the known count of reachable positions


def test_tictactoe_value_matches_brute_force_everywhere():
    game = TicTacToe()
    for board in all_boards():
        assert game.value(board) == ttt_brute(board), board
        if game.outcome(board) is None:
            move = game.optimal_move(board)
            after = game.play(board, move)
            assert -ttt_brute(after) == ttt_brute(board)  # the optimal move keeps the value
    assert game.value("." * 9) == 0  # perfect play draws


def test_tictactoe_optimal_wins_now_and_blocks():
    game = TicTacToe()
    assert game.optimal_move("XX.OO....") == 2  # X completes the top row
    assert game.optimal_move("X...X..O.") == 8  # O must block the diagonal


@pytest.mark.parametrize("game", [Nim(), TicTacToe()])
def test_optimal_player_never_loses_to_random(game):
    r = play_match(game, optimal_player(game), random_player(game, seed=1), n=40, seed=2)
    assert r["loss"] == 0.0 and r["forfeit"] == 0.0 and r["optimal_move_rate"] == 1.0
    assert r["win"] > 0.5


def test_optimal_against_optimal():
    ttt = TicTacToe()
    assert play_match(ttt, optimal_player(ttt), optimal_player(ttt), n=6)["draw"] == 1.0
    nim = Nim()
    r = play_match(nim, optimal_player(nim), optimal_player(nim), n=40, seed=5)
    # whoever starts in a winning position wins: the outcome is fixed by the deal and the seat
    rng = random.Random("nim|5")
    deals = [nim.initial(rng) for _ in range(40)]
    expected = sum((nim.value(d) == 1) == (g % 2 == 0) for g, d in enumerate(deals)) / 40
    assert r["win"] == pytest.approx(expected) and r["draw"] == 0.0


def test_text_player_reads_answers_and_forfeits_on_bad_moves():
    nim = Nim()
    seen = []

    def respond(questions):  # answers "1 1" (take one from heap 1) in the R1 format
        seen.extend(questions)
        return ["<think>\ntake one\n</think>\n<answer>\n1 1\n</answer>"] * len(questions)

    player = text_player(nim, respond)
    assert player([NimState((2, 1, 1)), NimState((0, 3, 1))]) == [(0, 1), (0, 1)]
    assert "heap 1 has 2, heap 2 has 1, heap 3 has 1" in seen[0]
    # (0, 1) is illegal when heap 1 is empty: the game is forfeited, counted as a loss
    r = play_match(nim, player, optimal_player(nim), n=10, seed=0)
    assert 0 < r["forfeit"] <= r["loss"] and r["draw"] == 0.0
    assert r["win"] + r["draw"] + r["loss"] == pytest.approx(1.0)
    mute = text_player(nim, lambda qs: ["I don't know"] * len(qs))
    r = play_match(nim, mute, random_player(nim), n=4)
    assert r["forfeit"] == 1.0 and r["loss"] == 1.0 and r["optimal_move_rate"] == 0.0


@pytest.mark.parametrize(("game", "text", "move"), [
    (Nim(), "2 3", (1, 3)), (Nim(), "heap 1, take 2", (0, 2)), (Nim(), "3", None), (Nim(), "1 2 3", None),
    (TicTacToe(), "5", 4), (TicTacToe(), "cell 9", 8), (TicTacToe(), "1 or 2", None), (TicTacToe(), "x", None),
])
def test_parse_move(game, text, move):
    assert game.parse_move(text) == move


def test_describe_shows_free_cells():
    text = TicTacToe().describe("X...O....")
    assert "You are X" in text and "X 2 3 / 4 O 6 / 7 8 9" in text


def test_match_reports_each_game_for_intervals():
    nim = Nim()
    half = text_player(nim, lambda qs: ["<answer>\n9 9\n</answer>"] * len(qs))  # always illegal
    r = play_match(nim, half, random_player(nim, seed=3), n=6, seed=1)
    assert r["outcomes"] == ["forfeit"] * 6 and r["moves"] == [1] * 6 and r["optimal_moves"] == [0] * 6
    r = play_match(nim, optimal_player(nim), random_player(nim, seed=3), n=12, seed=1)
    assert len(r["outcomes"]) == 12 and set(r["outcomes"]) <= {"win", "loss", "draw", "forfeit"}
    assert r["win"] == pytest.approx(r["outcomes"].count("win") / 12)
    assert r["optimal_move_rate"] == pytest.approx(sum(r["optimal_moves"]) / sum(r["moves"]))
    assert all(m >= 1 for m in r["moves"])
