"""The curation pipeline end to end: accounting, provenance, dedup across shards, decontamination, PII, bad
input, resume after a killed run, parallel workers and cluster ranks, the command line."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nanoseek.data.curate import CurateConfig, add_arguments, curate, load_config, main
from nanoseek.data.curate.manifest import mixing_weights

PEOPLE = ["the farmer", "my neighbour", "the old teacher", "a young engineer", "the baker", "our guide",
          "the mayor", "a tired traveller", "the librarian", "my grandmother", "the captain", "a local painter"]
VERBS = ["visited", "described", "repaired", "painted", "measured", "photographed", "explored", "cleaned",
         "studied", "remembered", "admired", "mapped"]
THINGS = ["the stone bridge", "the northern harbour", "an abandoned mill", "the village library",
          "the market square", "a narrow canal", "the wooden chapel", "the copper mine", "the orchard",
          "the lighthouse", "the railway station", "the botanical garden", "a quiet valley", "the castle walls"]
WHEN = ["early in the morning", "after a long winter", "during the summer festival", "before the storm",
        "on a rainy afternoon", "late in the evening", "at the end of the harvest", "in the spring"]
WHY = ["because the council wanted a record of it", "so that visitors could learn its history",
       "while the children watched from the hill", "and wrote a short report about it",
       "with help from several friends", "although the weather was cold", "as part of a school project",
       "and shared the results with the town"]


def make_doc(rng: random.Random) -> str:
    """Eight varied English sentences in two paragraphs: passes every quality, language and toxicity rule."""
    slots = [rng.sample(x, 8) for x in (PEOPLE, VERBS, THINGS, WHEN, WHY)]
    s = [f"{p.capitalize()} {v} {t} {w} {y}." for p, v, t, w, y in zip(*slots, strict=True)]
    return " ".join(s[:4]) + "\n\n" + " ".join(s[4:])


def write_jsonl(path: Path, records: list, gz: bool = False) -> None:
    opener = gzip.open if gz else open
    with opener(path, "wt", encoding="utf-8") as f:
        for r in records:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")


def read_dir(path: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(path.glob("*.jsonl")) for line in f.read_text().splitlines()]


def fast_config(**changes) -> CurateConfig:
    """Default stages; the built-in eval splits are left out where a test plants its own eval set."""
    config = CurateConfig(workers=1, task_bytes=20_000)
    config.decontam.builtin = False
    for key, value in changes.items():
        obj = config
        *parents, leaf = key.split("__")
        for p in parents:
            obj = getattr(obj, p)
        setattr(obj, leaf, value)
    return config


EVAL_QUESTION = ("A lighthouse keeper climbs 137 steps twice a day and 89 extra steps on Sundays; "
                 "how many steps does she climb in a four week month?")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """Two inputs with planted problems of every kind; returns paths and the ids planted for each stage."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    good = [make_doc(rng) for _ in range(60)]
    a = [{"id": f"a{i}", "text": t} for i, t in enumerate(good[:40])]
    near = good[4].replace("visited", "saw", 1) if "visited" in good[4] else good[4].replace(".", "!", 1)
    a += [
        {"id": "exact-a", "text": good[3]},  # exact duplicate inside the file
        {"id": "near-a", "text": near},  # near duplicate: one word changed
        {"id": "tox", "text": "You are a stupid worthless idiot and everyone hates you. Shut up, you pathetic "
                               "moron, nobody wants you here. I will find you and make you regret it.\n\n"
                               + good[41]},
        {"id": "fr", "text": "Le marché de la ville se tient chaque samedi sur la place, et les habitants y "
                              "achètent du pain, du fromage et des légumes frais. " * 4},
        {"id": "short", "text": "Buy cheap watches now."},
        {"id": "pii", "text": good[42] + " Write to jane.doe@example.org or call (202) 555-0143."},
        {"id": "ctrl", "text": "\x00\x01\x02"},
        {"id": "leak", "text": good[43] + " " + EVAL_QUESTION},
        {"id": "math", "text": "48 / 2 = 24\n48 + 24 = 72\n#### 72", "domain": "math"},
        "{broken json",
        {"id": "int", "text": 7},
    ]
    b = [{"id": f"b{i}", "text": t} for i, t in enumerate(good[44:60])]
    b.append({"id": "exact-b", "text": good[5]})  # exact duplicate of a5, in another file and task
    write_jsonl(root / "a.jsonl", a)
    write_jsonl(root / "b.jsonl.gz", b, gz=True)
    write_jsonl(root / "eval.jsonl", [{"question": EVAL_QUESTION, "answer": "1274"}])
    return {"root": root, "inputs": [str(root / "a.jsonl"), str(root / "b.jsonl.gz")], "records": len(a) + len(b),
            "eval": str(root / "eval.jsonl")}


def test_accounting_provenance_and_every_stage(corpus, tmp_path):
    config = fast_config(decontam__paths=(corpus["eval"],))
    config.mix.targets = {"general": 0.5, "math": 0.5}
    out = tmp_path / "out"
    m = curate(corpus["inputs"], out, config)

    t = m["totals"]
    assert t["records"] == corpus["records"] == t["kept"] + t["removed"] + t["rejected"]
    kept, removed, rejects = read_dir(out / "documents"), read_dir(out / "removed"), read_dir(out / "rejects")
    assert (len(kept), len(removed), len(rejects)) == (t["kept"], t["removed"], t["rejected"])
    assert len(list((out / "documents").glob("shard-*.jsonl"))) == 2  # two tasks: dedup ran across them

    stage_of = {r["id"]: r for r in removed}
    assert stage_of["exact-a"]["stage"] == "exact_dedup" and stage_of["exact-a"]["duplicate_of"] == "a3"
    assert stage_of["exact-b"]["stage"] == "exact_dedup" and stage_of["exact-b"]["duplicate_of"] == "a5"
    assert stage_of["near-a"]["stage"] == "near_dedup" and stage_of["near-a"]["duplicate_of"] == "a4"
    assert stage_of["tox"]["stage"] == "toxicity"
    assert stage_of["fr"]["stage"] == "language" and "fr" in stage_of["fr"]["reason"]
    assert stage_of["short"]["stage"] == "quality"
    assert stage_of["ctrl"]["stage"] == "normalize"
    assert stage_of["leak"]["stage"] == "decontamination" and "eval.jsonl" in stage_of["leak"]["reason"]
    assert set(stage_of) == {"exact-a", "exact-b", "near-a", "tox", "fr", "short", "ctrl", "leak"}
    for stage, entry in m["stages"].items():
        assert entry["removed"] == sum(r["stage"] == stage for r in removed)
        assert entry["enabled"]
    assert {(r["file"].endswith("a.jsonl"), r["line"]) for r in rejects} == {(True, 50), (True, 51)}
    assert any("malformed JSON" in r["reason"] for r in rejects)

    by_id = {d["id"]: d for d in kept}
    assert "math" in by_id and by_id["math"]["domain"] == "math"  # quality rules skip math
    assert "<EMAIL>" in by_id["pii"]["text"] and "<PHONE_NUMBER>" in by_id["pii"]["text"]
    assert m["pii_replacements"] == {"email": 1, "phone": 1}
    for d in kept:
        assert d["content_hash"] == "sha256:" + hashlib.sha256(d["text"].encode()).hexdigest()
        assert d["source"] in corpus["inputs"] and d["license"] == "unknown" and d["tag"] in ("a.jsonl", "b.jsonl.gz")
    assert by_id["b3"]["source"].endswith("b.jsonl.gz") and by_id["b3"]["line"] == 4

    per_input = {e["source"]: e for e in m["inputs"]}
    a_in = per_input[corpus["inputs"][0]]
    assert (a_in["records"], a_in["rejected"]) == (51, 2)
    assert a_in["records"] == a_in["kept"] + a_in["removed"] + a_in["rejected"]
    doms = m["domains"]
    assert doms["math"]["docs"] == 1 and doms["general"]["docs"] == t["kept"] - 1
    share = doms["math"]["chars"] / (doms["math"]["chars"] + doms["general"]["chars"])
    assert doms["math"]["weight"] == pytest.approx(0.5 / share, rel=1e-4)
    card = (out / "data_card.md").read_text()
    assert "## Domain mix" in card and "a.jsonl" in card and f"**{t['records']:,}** input records" in card
    assert not (out / "work").exists()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["phase"] for r in metrics} == {"filter", "dedup", "write"}


def test_mixing_weights():
    w = mixing_weights({"a": 300, "b": 100}, {"a": 1, "b": 1, "c": 2})
    assert w["a"] == {"share": 0.75, "target": 0.25, "weight": pytest.approx(1 / 3, abs=1e-6)}
    assert w["b"]["weight"] == pytest.approx(1.0) and w["c"] == {"share": 0.0, "target": 0.5, "weight": None}
    assert mixing_weights({"a": 3, "b": 1}, {})["b"]["weight"] == pytest.approx(2.0)  # default: equal shares
    with pytest.raises(ValueError):
        mixing_weights({"a": 1}, {"a": -1})


def test_bad_inputs_are_errors_before_any_work(corpus, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="nope.jsonl: input path does not exist"):
        curate([corpus["inputs"][0], str(tmp_path / "nope.jsonl")], out, fast_config())
    assert not out.exists()
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x.txt").write_text("user file")
    with pytest.raises(ValueError, match="not empty"):
        curate(corpus["inputs"], tmp_path / "junk", fast_config())


def test_rerun_is_a_no_op_and_changed_settings_are_refused(corpus, tmp_path):
    out = tmp_path / "out"
    first = curate(corpus["inputs"], out, fast_config(toxicity__enabled=False))
    before = (out / "manifest.json").stat().st_mtime_ns
    assert curate(corpus["inputs"], out, fast_config(toxicity__enabled=False)) == first
    assert (out / "manifest.json").stat().st_mtime_ns == before
    assert curate(corpus["inputs"], out, fast_config(toxicity__enabled=False, workers=3)) == first  # not a result
    with pytest.raises(ValueError, match="other inputs or settings"):
        curate(corpus["inputs"], out, fast_config(quality__min_words=10))


def _config_file(path: Path, extra: str = "") -> Path:
    """Settings for the multi-process tests, which check the orchestration rather than the filters: the slow-to-
    load models (language, toxicity) are off so that each process starts quickly, and barriers poll often."""
    path.write_text("workers = 1\ntask_bytes = 20000\npoll_s = 0.05\n[decontam]\nbuiltin = false\n"
                    "[langid]\nenabled = false\n[toxicity]\nenabled = false\n" + extra)
    return path


def _run_in_subprocess(inputs: list[str], out: Path, config: Path, env: dict | None = None) -> subprocess.Popen:
    code = ("import sys; from nanoseek.data.curate import curate, load_config; "
            "curate(sys.argv[1].split(','), sys.argv[2], load_config(sys.argv[3]))")
    return subprocess.Popen([sys.executable, "-c", code, ",".join(inputs), str(out), str(config)],
                            env={**os.environ, **(env or {})}, stderr=subprocess.PIPE, text=True)


def test_resume_after_the_run_is_killed(tmp_path):
    rng = random.Random(3)
    inputs = []
    for k in range(6):  # six inputs of ~40 kB: six tasks, so the run is killed with work left to do
        path = tmp_path / f"part{k}.jsonl"
        docs = [make_doc(rng) for _ in range(50)]
        write_jsonl(path, [{"id": f"{k}-{i}", "text": t} for i, t in enumerate(docs + docs[:3])])
        inputs.append(str(path))
    config = _config_file(tmp_path / "c.toml")
    reference = curate(inputs, tmp_path / "ref", load_config(config))

    out = tmp_path / "out"
    proc = _run_in_subprocess(inputs, out, config)
    first_done = out / "work" / "task-00000" / "stats.json"
    deadline = time.time() + 120
    while not first_done.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it could be interrupted"
    assert first_done.exists()

    done_before = {i for i in range(6) if (out / "work" / f"task-{i:05d}" / "stats.json").exists()}
    metrics_before = len((out / "metrics.jsonl").read_text().splitlines()) if (out / "metrics.jsonl").exists() else 0
    resumed = curate(inputs, out, load_config(config))
    assert resumed["totals"] == reference["totals"] and resumed["stages"] == reference["stages"]
    for sub in ("documents", "removed", "rejects"):
        assert read_dir(out / sub) == read_dir(tmp_path / "ref" / sub)
        assert not list((out / sub).glob(".*"))  # no temporary files left behind
    new_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[metrics_before:]]
    refiltered = {r["task"] for r in new_rows if r["phase"] == "filter"}
    assert 0 in done_before and refiltered == set(range(6)) - done_before  # finished tasks were reused, not redone


def test_parallel_workers_and_cluster_ranks_give_the_serial_result(corpus, tmp_path):
    config = _config_file(tmp_path / "c.toml")
    serial = curate(corpus["inputs"], tmp_path / "serial", load_config(config))
    pooled = curate(corpus["inputs"], tmp_path / "pool", load_config(config, ["workers=2"]))
    assert pooled["totals"] == serial["totals"]
    procs = [_run_in_subprocess(corpus["inputs"], tmp_path / "ranks", config, {"RANK": str(r), "WORLD_SIZE": "2"})
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    ranks = json.loads((tmp_path / "ranks" / "manifest.json").read_text())
    assert ranks["totals"] == serial["totals"] and ranks["stages"] == serial["stages"]
    for sub in ("documents", "removed", "rejects"):
        expected = read_dir(tmp_path / "serial" / sub)
        assert read_dir(tmp_path / "pool" / sub) == expected
        assert read_dir(tmp_path / "ranks" / sub) == expected
    metrics = [json.loads(x) for x in (tmp_path / "ranks" / "metrics.jsonl").read_text().splitlines()]
    assert {(r["rank"], r["task"]) for r in metrics if r["phase"] == "filter"} == {(0, 0), (1, 1)}


def test_builtin_eval_splits_are_registered_and_disjoint_from_the_synth_corpus(tmp_path):
    from nanoseek.data import synth

    synth.write_synth(tmp_path / "synth", docs=100, sft=5, rl=5)
    problem = synth.make_problems("word_problems", 300, seed=0, difficulty=[1, 2, 3], split="eval")[7]
    leak = tmp_path / "leak.jsonl"
    write_jsonl(leak, [{"id": "leak", "text": "Homework: " + problem.question + "\n" + problem.solution}])
    config = CurateConfig(workers=1)
    config.decontam.builtin_difficulties = ("1-3",)  # the level set `write_synth` uses by default
    config.quality.enabled = config.langid.enabled = config.toxicity.enabled = False
    m = curate([str(tmp_path / "synth" / "corpus"), str(leak)], tmp_path / "out", config)
    (removed,) = read_dir(tmp_path / "out" / "removed")  # nothing else: the synth corpus is clean
    assert removed["id"] == "leak" and "builtin:word_problems" in removed["reason"]
    assert m["stages"]["decontamination"]["removed"] == 1
    assert set(m["domains"]) == {"general", "knowledge", "math_logic", "dialogue"}


def test_command_line(corpus, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    config = _config_file(tmp_path / "c.toml")
    args = parser.parse_args(["--input", *corpus["inputs"], "--output", str(tmp_path / "o"), "--config",
                              str(config), "--set", "quality.min_words=20", "--workers", "1"])
    assert main(args) == 0
    assert "records ->" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["config"]["quality"]["min_words"] == 20 and not manifest["stages"]["toxicity"]["enabled"]
    args = parser.parse_args(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o2")])
    assert main(args) == 2
    assert "missing: input path does not exist" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown field"):
        load_config(None, ["quality.min_wordz=3"])
    recipe = tmp_path / "recipe.toml"  # a whole recipe: only its [data.curate] table applies
    recipe.write_text("[model]\nlayers = 2\n[data.curate.dedup]\nbands = 20\nrows = 5\n")
    assert load_config(recipe).dedup.num_perm == 100


def test_conversations_and_preference_records_are_curated_turn_by_turn(tmp_path):
    """Chat (`messages`) and preference (`prompt`/`chosen`/`rejected`) records: PII redacted inside every turn,
    toxicity judged on the assistant turns, dedup on the whole conversation, decontamination on every turn, the
    record's shape kept (so the trainers read the output), and every input line accounted for."""
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.posttrain.preferences import load_pairs
    from nanoseek.posttrain.sft import load_examples

    def chat(user: str, reply: str, **extra) -> dict:
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": reply}], **extra}

    trip = "Of course. Write to me at help@travel.example and I will send a plan for Rome with museums and food."
    records = [
        chat("My e-mail is jane.doe@example.com, plan a trip to Rome?", trip, id="pii"),
        chat("My e-mail is jane.doe@example.com, plan a trip to Rome?", trip, id="copy"),  # the same conversation
        chat("My e-mail is jane.doe@example.com, plan a trip to Rome?", "Rome in spring is lovely.", id="other"),
        chat("What do you think of me?", "You are a worthless idiot, shut up and go kill yourself.", id="toxic"),
        chat("You are a worthless idiot, shut up.", "I am sorry you feel that way; how can I help?", id="rude_user"),
        chat(EVAL_QUESTION, "Let me think step by step.", id="leak"),
        {"id": "pref", "prompt": "Which is larger, 3 or 5? Call me at +1-202-555-0143.", "chosen": "5 is larger.",
         "rejected": "3 is larger."},
        {"id": "bad", "messages": [{"role": "robot", "content": "beep"}]},
        {"id": "pref_bad", "prompt": "hi", "chosen": [], "rejected": "no"},
    ]
    write_jsonl(tmp_path / "eval.jsonl", [{"question": EVAL_QUESTION, "answer": "1274"}])
    write_jsonl(tmp_path / "chats.jsonl", records)
    m = curate([str(tmp_path / "chats.jsonl")], tmp_path / "out",
               fast_config(decontam__paths=(str(tmp_path / "eval.jsonl"),)))
    t = m["totals"]
    assert t["records"] == 9 and t["kept"] + t["removed"] + t["rejected"] == 9 and t["rejected"] == 2
    kept = {r["id"]: r for r in read_dir(tmp_path / "out" / "documents")}
    removed = {r["id"]: r["stage"] for r in read_dir(tmp_path / "out" / "removed")}
    assert removed == {"copy": "exact_dedup", "toxic": "toxicity", "leak": "decontamination"}
    assert set(kept) == {"pii", "other", "rude_user", "pref"}
    assert kept["pii"]["messages"][0]["content"] == "My e-mail is <EMAIL>, plan a trip to Rome?"
    assert "<EMAIL>" in kept["pii"]["messages"][1]["content"] and kept["pii"]["domain"] == "dialogue"
    assert kept["pref"]["prompt"] == "Which is larger, 3 or 5? Call me at <PHONE_NUMBER>."  # strings stay strings
    assert kept["pref"]["chosen"] == "5 is larger."
    chats, pairs = tmp_path / "sft.jsonl", tmp_path / "pairs.jsonl"  # the trainers read the curated records
    write_jsonl(chats, [r for r in kept.values() if "messages" in r])
    write_jsonl(pairs, [r for r in kept.values() if "prompt" in r])
    tok = train_tokenizer([json.dumps(r) for r in records] * 4, 300)
    assert len(load_examples([chats], tok, 512, skip_invalid=False)[0]) == 3
    assert len(load_pairs(pairs, tok, 512)[0]) == 1


def test_problem_records_and_their_fields_survive_curation(tmp_path):
    """RL problem records ({question, answer} + task, difficulty, a rendered prompt, ...) are curated as a user
    and an assistant turn and written back as they came; every other field is carried into the curated record,
    its strings redacted like the turns (a copy of the question must not keep the e-mail), so GRPO reads the
    output; SFT records keep their `style`; a record's own `source` gives way to curation's provenance."""
    from nanoseek.data.curate import curate_set, set_config
    from nanoseek.data.tokenizer import train_tokenizer
    from nanoseek.infer.rollout import record_prompt

    question = "Mail bob@example.org: what is 17 + 25?"
    records = [
        {"id": "p1", "question": question, "answer": "42", "task": "arithmetic", "difficulty": 2,
         "prompt": f"User: {question}\nAssistant:", "paraphrases": [f"Again: {question}"], "source": "mine"},
        {"id": "p2", "question": "What is 3 + 4?", "answer": "7", "task": "arithmetic", "difficulty": 1},
        {"id": "p3", "question": "What is 3 + 4?", "answer": "7", "task": "arithmetic", "difficulty": 1},
        {"id": "s1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
         "style": "instruct"},
        {"id": "bad", "question": "What is 1 + 1?", "answer": 2},
    ]
    write_jsonl(tmp_path / "rl.jsonl", records)
    config = set_config()
    config.decontam.builtin = False
    m = curate_set([tmp_path / "rl.jsonl"], tmp_path / "out", tmp_path / "kept.jsonl", config)
    t = m["totals"]
    assert (t["records"], t["kept"], t["removed"], t["rejected"]) == (5, 3, 1, 1)
    kept = {r["id"]: r for r in map(json.loads, (tmp_path / "kept.jsonl").open())}
    assert set(kept) == {"p1", "p2", "s1"}  # p3 repeats p2
    p1 = kept["p1"]
    assert (p1["question"], p1["answer"]) == ("Mail <EMAIL>: what is 17 + 25?", "42")  # strings stay strings
    assert p1["prompt"] == "User: Mail <EMAIL>: what is 17 + 25?\nAssistant:"
    assert p1["paraphrases"] == ["Again: Mail <EMAIL>: what is 17 + 25?"]
    assert (p1["task"], p1["difficulty"], p1["source"]) == ("arithmetic", 2, str(tmp_path / "rl.jsonl"))
    assert kept["s1"]["style"] == "instruct"
    tok = train_tokenizer([json.dumps(r) for r in records] * 4, 300)
    prompt = record_prompt(tok, kept["p2"], "r1_zero", "kept.jsonl:2")
    assert prompt.columns["answer"] == "7" and prompt.columns["task"] == "arithmetic"


def test_the_data_card_reports_skewed_demographic_mentions(tmp_path):
    """The bias report (issue 16): mentions of each group per domain and source, a category flagged past the
    configured ratio with reweighting factors, a balanced one not flagged."""
    skewed = [{"id": f"s{i}", "domain": "news", "text": f"The king said that he and his son met the men at the "
               f"harbour on day {i}, and the boys cheered while he spoke to his brother about the old ships."}
              for i in range(12)]
    balanced = [{"id": f"b{i}", "domain": "stories", "text": f"She and he walked on day {i}; her brother and his "
                 f"sister met a woman and a man who told the girls and the boys about the harbour and the ships."}
                for i in range(12)]
    write_jsonl(tmp_path / "skewed.jsonl", skewed)
    write_jsonl(tmp_path / "balanced.jsonl", balanced)
    config = fast_config(quality__enabled=False, langid__enabled=False, dedup__near=False)  # near-identical texts
    m = curate([str(tmp_path / "skewed.jsonl"), str(tmp_path / "balanced.jsonl")], tmp_path / "out", config)
    bias = m["bias"]
    news, stories = bias["domains"]["news"]["gender"], bias["domains"]["stories"]["gender"]
    assert news["mentions"] == 12 * 9 and news["shares"] == {"female": 0.0, "male": 1.0}  # king, he, his, son, ...
    assert news["flagged"] and news["reweight"]["male"] == 0.5 and news["reweight"]["female"] is None
    assert not stories["flagged"] and stories["shares"]["female"] == 0.5
    assert {"domain": "news", "category": "gender"} in bias["flagged"]
    assert bias["sources"][str(tmp_path / "skewed.jsonl")]["gender"]["flagged"]
    card = (tmp_path / "out" / "data_card.md").read_text()
    assert "## Bias report" in card and "| domain `news` | gender | 108 |" in card and "**yes**" in card
