"""Each curation filter on crafted documents: normalisation, Gopher / C4 / FineWeb rules, language, toxicity, PII."""

from __future__ import annotations

import unicodedata

import pytest

from nanoseek.data.curate.filters import QualityConfig, c4, fineweb, gopher_quality, gopher_repetition, quality
from nanoseek.data.curate.normalize import normalize_text
from nanoseek.data.curate.pii import PiiConfig, luhn_valid, redact

CFG = QualityConfig()

# A plain, well-formed English page: every rule set must let it through unchanged.
GOOD = """The history of the town begins with a small market that grew up beside the river crossing.
Farmers from the surrounding valleys brought grain, wool and cheese to sell, and merchants built stone houses
along the main street. By the fourteenth century the market had become one of the busiest in the region.

In the following centuries the town changed with the trade that passed through it. A bridge replaced the
ford, a guild hall was raised in the square, and the church was rebuilt twice after fires. Visitors today can
still walk the old lanes and see the carved doorways of the merchant houses.

The museum in the guild hall tells this story with maps, tools and letters written by the families who lived
here. It is open every day except Monday, and entry is free for children and students."""


def test_good_page_passes_every_rule_set():
    assert gopher_quality(GOOD, CFG) is None
    assert gopher_repetition(GOOD, CFG) is None
    assert fineweb(GOOD, CFG) is None
    text, reason = c4(GOOD, CFG)
    assert reason is None and text.split() == GOOD.split()
    assert quality(GOOD, CFG)[1] is None


# --- normalisation -------------------------------------------------------------------------------------------

def test_normalize_nfc_linebreaks_controls_spaces():
    decomposed = "Cafe\u0301"  # e + combining acute
    raw = f"  {decomposed}\r\nline\u00a0two \t\r\n\n\n\nx\x00y\u200bz\n    indented code\n\n"
    out = normalize_text(raw)
    assert out == "Caf\u00e9\nline two\n\nxyz\n    indented code"
    assert unicodedata.is_normalized("NFC", out)
    assert normalize_text("\x00\x01\u200b") == ""


# --- Gopher quality ------------------------------------------------------------------------------------------

def _sentences(n_words: int) -> str:
    base = "the cat sat with the dog and looked to the garden of the house that they have".split()
    return " ".join(base[i % len(base)] for i in range(n_words)) + "."


@pytest.mark.parametrize("text, expected", [
    (_sentences(30), "30 words < 50"),
    (" ".join(["the", "extraordinarily", "incomprehensibilities"] * 30), "mean word length"),
    (" ".join(["a", "b", "of", "to"] * 20), "mean word length"),
    (_sentences(60) + " #tag" * 12, "#-to-word ratio"),
    (_sentences(60) + " wait..." * 12, "ellipsis-to-word ratio"),
    ("\n".join(["\u2022 the item with a name and a price"] * 10), "start with a bullet"),
    ("\n".join([_sentences(15)[:-1] + " and then..." for _ in range(6)] + [_sentences(40)]), "end with an ellipsis"),
    (_sentences(40) + " " + " ".join(["12", "345", "6789", "10", "11"] * 8), "contain a letter"),
    (" ".join(["cat", "sat", "dog", "garden", "house", "looked"] * 12), "stop words"),
])
def test_gopher_quality_rules(text, expected):
    reason = gopher_quality(text, CFG)
    assert reason is not None and expected in reason, reason


def test_gopher_quality_thresholds_are_configurable():
    short = _sentences(30)
    assert gopher_quality(short, QualityConfig(min_words=20)) is None


# --- Gopher repetition ---------------------------------------------------------------------------------------

def test_gopher_repetition_rules():
    lines = [f"Line number {w} talks about a different topic today." for w in ("one", "two", "three", "four")]
    dup_lines = "\n".join(lines + [lines[0]] * 3)
    assert "duplicate line fraction" in gopher_repetition(dup_lines, CFG)
    paragraphs = ["First paragraph about the river and its bridge.", "Second paragraph about the market.",
                  "Third one about the church."]
    dup_paras = "\n\n".join(paragraphs + [paragraphs[1], paragraphs[1]])
    assert "duplicate paragraph fraction" in gopher_repetition(dup_paras, CFG)
    top_bigram = " ".join(["buy now"] * 30 + GOOD.split()[:60])
    assert "top 2-gram 'buy now'" in gopher_repetition(top_bigram, CFG)
    words = GOOD.split()
    repeated = " ".join(words[:80] + words[10:40])  # a 30-word passage repeated once inside one line
    assert "repeated 5-grams" in gopher_repetition(repeated, CFG)
    assert gopher_repetition(" ".join(words[:110]), CFG) is None  # the same words without the repeat pass


# --- C4 ------------------------------------------------------------------------------------------------------

def test_c4_rules():
    assert c4(GOOD + "\nLorem ipsum dolor sit amet, consectetur.", CFG)[1] == "c4: contains 'lorem ipsum'"
    assert c4(GOOD + "\nfunction f() { return 1; } is shown here.", CFG)[1] == "c4: contains a curly bracket"
    assert c4(GOOD + "\nfunction f() { }", QualityConfig(c4_curly_bracket=False))[1] is None
    assert "sentences in kept lines < 5" in c4("One sentence here. Two sentences here.", CFG)[1]
    cleaned, reason = c4(GOOD + "\nPlease enable JavaScript to view the comments.\n"
                         "Read our privacy policy and terms of use.\nShort line.\n"
                         "The bridge was built in 1350.[3] It still stands.[citation needed]", CFG)
    assert reason is None
    assert "JavaScript" not in cleaned and "privacy policy" not in cleaned and "Short line." not in cleaned
    assert "The bridge was built in 1350. It still stands." in cleaned  # citation markers removed
    assert "\n\n" in cleaned  # paragraph breaks survive
    cleaned, _ = c4(GOOD + "\nA line without an end mark", QualityConfig(c4_terminal_punctuation=True))
    assert "A line without an end mark" not in cleaned


# --- FineWeb -------------------------------------------------------------------------------------------------

def test_fineweb_rules():
    no_punct = "\n".join(f"menu entry number {i} for the site navigation bar here" for i in range(20))
    assert "end in punctuation" in fineweb(no_punct, CFG)
    short = "\n".join(["Home.", "About us.", "Contact.", "A long enough line that ends in a full stop here."])
    assert "<= 30 characters" in fineweb(short, CFG)
    repeated = GOOD + "\n" + "\n".join(["Share this article with your friends today."] * 3)
    assert "repeated lines hold" in fineweb(repeated, CFG)
    newline_heavy = "\n".join(f"Item {w}." for w in ["one", "two", "three", "four", "five", "six", "seven"])
    assert "newlines per word" in fineweb(newline_heavy, QualityConfig(max_short_lines=1.0))


def test_quality_skips_nothing_by_itself_and_reports_first_rule():
    text, reason = quality("Too short.", CFG)
    assert reason.startswith("gopher_quality")


# --- language ------------------------------------------------------------------------------------------------

def test_language_identification():
    from nanoseek.data.curate.langid import LangIdConfig, identify, language_reason

    cfg = LangIdConfig()
    assert language_reason(GOOD, cfg) is None
    french = ("Le marché de la ville se tient chaque samedi sur la place de l'église, et les habitants viennent "
              "y acheter du pain, du fromage et des légumes frais.")
    assert identify(french)[0] == "fr"
    assert "fr" in language_reason(french, cfg)
    assert language_reason(french, LangIdConfig(languages=("en", "fr"))) is None


# --- toxicity ------------------------------------------------------------------------------------------------

HELD_OUT_TOXIC = [
    "You are a stupid worthless idiot and I hate you.",
    "I will hurt you and your family, watch your back.",
    "Shut up you pathetic moron, nobody wants you here.",
    "Those filthy animals should be exterminated from our country.",
]
HELD_OUT_CLEAN = [
    "The process was killed by the operating system after it ran out of memory.",
    "She baked a chocolate cake for her sister's birthday.",
    "Can you tell me how you solved the puzzle so quickly?",
    "The war ended in 1945 after six years of fighting.",
    GOOD,
]


def test_toxicity_classifier_on_held_out_sentences():
    from nanoseek.data.curate.toxicity import ToxicityConfig, toxicity_reason, train_classifier

    cfg = ToxicityConfig()
    clf = train_classifier(cfg)
    for text in HELD_OUT_TOXIC:  # none of these is in the training set
        assert toxicity_reason(text, cfg, clf) is not None, text
    for text in HELD_OUT_CLEAN:
        assert toxicity_reason(text, cfg, clf) is None, text
    # one abusive paragraph inside a long clean page is found by the windowed score
    assert toxicity_reason(GOOD + "\n\n" + HELD_OUT_TOXIC[0] + " " + HELD_OUT_TOXIC[2], cfg, clf) is not None


def test_toxicity_word_lists_and_custom_training(tmp_path):
    from nanoseek.data.curate.toxicity import ToxicityConfig, load_labelled, toxicity_reason, train_classifier

    cfg = ToxicityConfig(threshold=1.01)  # classifier can never fire: only the word lists decide
    clf = train_classifier(cfg)
    assert "profanity word list" in toxicity_reason("What the fuck is this shit, man?", cfg, clf)
    assert toxicity_reason(GOOD + " Damn.", cfg, clf) is None  # one mild word in a long page is below 2%
    custom = tmp_path / "labels.txt"
    custom.write_text("1\tpurple bananas are evil\n1\tevil purple bananas\n0\tyellow bananas are tasty\n"
                      "0\tripe yellow bananas\n")
    clf = train_classifier(ToxicityConfig(train_path=str(custom)))
    p_bad, p_good = clf.predict(["purple evil"]), clf.predict(["yellow tasty"])
    assert p_bad[0] > 0.5 > p_good[0]
    bad = tmp_path / "bad.txt"
    bad.write_text("1\tok line\nmaybe\tnot a label\n")
    with pytest.raises(ValueError, match=r"bad.txt:2"):
        load_labelled(bad)


# --- PII -----------------------------------------------------------------------------------------------------

def test_luhn():
    assert luhn_valid("79927398713") and luhn_valid("4111111111111111") and luhn_valid("5500000000000004")
    assert not luhn_valid("79927398710") and not luhn_valid("4111111111111112")


def test_pii_redaction():
    text = ("Write to john.doe+news@example.co.uk or call +1-202-555-0143 or (202) 555-0143. "
            "Server 192.168.1.20 and 2001:db8::8a2e:370:7334. Card 4111 1111 1111 1111, "
            "not a card 4111-1111-1111-1112. Version 1.2.3, time 12:30:45, 999.1.1.1.")
    out, counts = redact(text)
    assert out == ("Write to <EMAIL> or call <PHONE_NUMBER> or <PHONE_NUMBER>. "
                   "Server <IP_ADDRESS> and <IP_ADDRESS>. Card <CARD_NUMBER>, "
                   "not a card 4111-1111-1111-1112. Version 1.2.3, time 12:30:45, 999.1.1.1.")
    assert counts == {"email": 1, "phone": 2, "ip": 2, "card": 1}
    math = "She has 1234567890 apples; 48/2 = 24 and 3 + 4 = 7.\n#### 72"
    assert redact(math) == (math, {})  # numbers in math text are not phone numbers
    out, counts = redact(text, PiiConfig(email=False, phone=False))
    assert "john.doe+news@example.co.uk" in out and "<IP_ADDRESS>" in out and "phone" not in counts


# --- decontamination -----------------------------------------------------------------------------------------

def test_decontamination_index():
    from nanoseek.data.curate.decontam import DecontamConfig, build_index

    question = "a train leaves the station at nine and travels sixty miles per hour until it reaches the coast"
    boilerplate = "answer the following question and show every step of your reasoning before the final answer"
    eval_sets = {
        "qa": [question, "What is 3 + 4?", "name the river that flows through the old market town"],  # 18, 4, 10
        "templated": [f"{boilerplate} item {i}" for i in range(12)],  # shared by 12 items: boilerplate
    }
    index = build_index(eval_sets, DecontamConfig(max_item_frequency=10))
    docs = [
        "Yesterday " + question.upper() + ", said the teacher.",  # 13-gram copied (case and punctuation ignored)
        "Quiz: Name the river that flows through the old market town!",  # a 10-word eval text copied whole
        "What is 3 + 4? Seven.",  # a 4-word eval text is too short to count as a leak
        "Please " + boilerplate + ".",  # template text shared by many eval items is not a leak
        "A train leaves the station at nine and then stops.",  # fewer than 13 words in common
    ]
    matches = index.match(docs)
    assert matches[0] == ("qa", 6) and matches[1] == ("qa", 1)  # 18 words hold six 13-grams
    assert matches[2:] == [None, None, None]
    assert index.items == 1 + 1 + 12
