"""Foundational text from templates: descriptions, short stories, definitions, facts and dialogues.

Each document is assembled from several independently chosen sentences and slot values, so two documents of the
same kind share few word 5-grams and survive near-deduplication (MinHash at ~0.7 Jaccard) as distinct texts.
The definitions and facts are short true statements written for this project; stories and descriptions are
about made-up creatures and places, so nothing has to be remembered from outside the corpus.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from nanoseek.data.synth.vocab import NAMES, OBJECTS, place_name, pronoun

# ---------------------------------------------------------------------------------------------------------
# Knowledge: definitions and facts

DEFINITIONS: list[tuple[str, str]] = [
    ("triangle", "a flat shape with three straight sides and three corners"),
    ("square", "a flat shape with four equal sides and four right angles"),
    ("circle", "a round flat shape whose points are all the same distance from its center"),
    ("prime number", "a whole number greater than one that can only be divided evenly by one and itself"),
    ("even number", "a whole number that can be divided by two with nothing left over"),
    ("odd number", "a whole number that leaves one over when it is divided by two"),
    ("sum", "the result of adding numbers together"),
    ("difference", "the result of subtracting one number from another"),
    ("product", "the result of multiplying numbers together"),
    ("quotient", "the result of dividing one number by another"),
    ("fraction", "a number that describes a part of a whole, such as one half"),
    ("percent", "a part of one hundred, so fifty percent means half"),
    ("angle", "the opening between two lines that meet at a point"),
    ("noun", "a word that names a person, place, thing or idea"),
    ("verb", "a word that describes an action or a state"),
    ("adjective", "a word that describes a noun, such as red or tall"),
    ("sentence", "a group of words that expresses a complete thought"),
    ("paragraph", "a group of sentences about one main idea"),
    ("planet", "a large body that moves in an orbit around a star"),
    ("star", "a huge ball of hot gas that gives off its own light"),
    ("moon", "a natural body that moves in an orbit around a planet"),
    ("orbit", "the curved path one body takes around another in space"),
    ("gravity", "the force that pulls objects toward each other, like a ball falling to the ground"),
    ("atom", "the smallest unit of a chemical element"),
    ("molecule", "a group of atoms held together by chemical bonds"),
    ("cell", "the smallest living unit of a plant or an animal"),
    ("mammal", "a warm-blooded animal that feeds its young with milk"),
    ("reptile", "a cold-blooded animal with scales, such as a snake or a lizard"),
    ("insect", "a small animal with six legs and a body in three parts"),
    ("habitat", "the natural home of a plant or an animal"),
    ("predator", "an animal that hunts other animals for food"),
    ("herbivore", "an animal that eats only plants"),
    ("photosynthesis", "the process plants use to make food from sunlight, water and air"),
    ("evaporation", "the change of a liquid into a gas, as when a puddle dries in the sun"),
    ("condensation", "the change of a gas into a liquid, as when drops form on a cold glass"),
    ("river", "a large stream of fresh water that flows toward a sea, a lake or another river"),
    ("island", "a piece of land with water all around it"),
    ("desert", "a dry place that gets very little rain"),
    ("volcano", "an opening in the ground where melted rock comes out"),
    ("continent", "one of the very large areas of land on Earth, such as Africa or Asia"),
    ("map", "a drawing that shows where places are"),
    ("calendar", "a chart that shows the days, weeks and months of a year"),
    ("thermometer", "a tool that measures temperature"),
    ("magnet", "an object that pulls iron toward it"),
    ("battery", "a device that stores energy and gives it out as electricity"),
    ("computer", "a machine that follows instructions to store and work with information"),
    ("algorithm", "a list of steps that solves a problem"),
    ("program", "a set of instructions that a computer can follow"),
    ("variable", "a name that stands for a value that can change"),
    ("syllogism", "an argument that draws a conclusion from two premises"),
    ("premise", "a statement that an argument starts from"),
    ("conclusion", "the statement an argument tries to show"),
    ("hypothesis", "a guess that can be tested by an experiment"),
    ("experiment", "a test done to find out whether an idea is true"),
    ("library", "a place where books are kept for people to read or borrow"),
    ("recipe", "a list of ingredients and steps for making a dish"),
    ("orchard", "a piece of land where fruit trees are grown"),
    ("harbor", "a sheltered place on the coast where boats can stay"),
    ("bridge", "a structure that carries a road or a path over water or a valley"),
    ("season", "one of the four parts of the year: spring, summer, autumn and winter"),
]

FACTS: list[str] = [
    "A week has seven days.", "A year has twelve months.", "A day has twenty-four hours.",
    "An hour has sixty minutes.", "A minute has sixty seconds.", "A triangle has three sides.",
    "A square has four equal sides.", "Water freezes at zero degrees Celsius.",
    "Water boils at one hundred degrees Celsius at sea level.", "The Earth moves around the Sun.",
    "The Moon moves around the Earth.", "The Sun is a star.", "Plants need light to grow.",
    "Spiders have eight legs.", "Insects have six legs.", "Fish breathe with gills.",
    "Bees make honey.", "Whales are mammals.", "Bats are mammals that can fly.",
    "Penguins are birds that cannot fly.", "Ice is frozen water.", "Rain falls from clouds.",
    "The heart pumps blood around the body.", "People breathe in oxygen.",
    "Sound travels faster in water than in air.", "Light travels faster than sound.",
    "A rainbow has seven colors.", "Red, blue and yellow are primary colors.",
    "Two plus two equals four.", "Ten is an even number.", "Seven is a prime number.",
    "Nine is an odd number.", "One hundred is ten times ten.", "Half of ten is five.",
    "A circle has no corners.", "There are four seasons in a year.", "Snow is made of ice crystals.",
    "Metals conduct electricity.", "Wood floats on water.", "Magnets attract iron.",
    "The Pacific is the largest ocean.", "Mount Everest is the highest mountain above sea level.",
    "The Nile is one of the longest rivers in the world.", "Mercury is the planet closest to the Sun.",
    "Jupiter is the largest planet in the solar system.", "Mars is often called the red planet.",
    "The solar system has eight planets.", "Trees make oxygen.", "Frogs start their lives as tadpoles.",
    "Caterpillars turn into butterflies.", "Camels can go a long time without water.",
    "Owls hunt at night.", "A baby cat is called a kitten.", "A baby dog is called a puppy.",
    "A group of wolves is called a pack.", "Cows eat grass.", "Honey never spoils when sealed.",
    "The alphabet has twenty-six letters.", "A dozen means twelve.", "A century is one hundred years.",
]

# ---------------------------------------------------------------------------------------------------------
# Pools for descriptions and stories

_SIZES = ["small", "tiny", "large", "long-legged", "round", "slender", "heavy", "quick"]
_COLORS = ["grey", "green", "brown", "golden", "blue", "red", "spotted", "striped", "pale", "dark"]
_KINDS = ["bird", "lizard", "beetle", "frog", "fish", "fox", "moth", "goat", "snail", "otter"]
_HABITATS = ["the dry hills", "wet forests", "cold rivers", "the edges of lakes", "high meadows",
             "sandy shores", "old stone walls", "deep caves", "reed marshes", "pine woods"]
_FEATURES = ["a long tail", "soft fur", "sharp claws", "bright wings", "large eyes", "a short beak",
             "thick scales", "webbed feet", "a curled horn", "spotted ears", "a flat head", "strong legs"]
_FOODS = ["seeds", "small fish", "leaves", "berries", "insects", "roots", "moss", "nuts", "worms", "grass"]
_HABITS = [
    "It sleeps during the day and looks for food at night.", "It lives alone for most of the year.",
    "It moves in large groups in the spring.", "It builds a nest from twigs and mud.",
    "It hides under stones when the weather turns cold.", "It can stay still for hours.",
    "It swims well and dives for its food.", "It climbs trees to escape danger.",
    "It digs long tunnels in soft ground.", "It travels far to find water in summer.",
]
_SOUNDS = ["Its call is a short, sharp whistle.", "It makes a low humming sound.",
           "It is almost silent.", "It clicks its teeth when it is alarmed.",
           "At dawn it sings a song of three notes.", "It croaks loudly after rain."]
_TOWN_THINGS = ["its old bridge", "its apple orchards", "its busy market", "a tall clock tower",
                "its harbor", "a quiet library", "its woolen blankets", "a stone castle", "its bakeries"]
_TOWN_EVENTS = ["the people hold a lantern festival", "farmers bring their goats to the square",
                "a boat race takes place on the river", "the streets fill with music",
                "children fly kites on the hill", "everyone helps to paint the houses"]
_SEASONS = ["spring", "summer", "autumn", "winter"]
_GEO = ["a wide river", "the sea", "a pine forest", "two hills", "a deep lake", "the mountains", "a desert"]

_PLACES = ["a small village", "a town by the sea", "a farm near the woods", "a busy city",
           "a house on a hill", "a cabin by a lake", "an old mill"]
_PROBLEMS = [
    ("{n} lost {p} favorite {o}", "found the {o} under a bench in the park"),
    ("a storm broke the fence of the garden", "fixed the fence with wood from the shed"),
    ("{n} wanted to learn to swim", "practiced every morning until {s} could swim across the pond"),
    ("the town's bridge was closed", "helped the builders carry stones until the bridge was open again"),
    ("{n}'s friend felt sad", "baked a cake and spent the afternoon playing games with the friend"),
    ("a kitten was stuck in a tree", "brought a ladder and carried the kitten down"),
    ("the river was too high to cross", "waited two days until the water went down"),
    ("{n} could not find the way home", "followed the river back to the village"),
    ("the garden had no flowers", "planted seeds and watered them every day"),
    ("{n} had to finish a long book", "read ten pages each night and finished it in a month"),
]
_OPENINGS = ["Once upon a time, {n} lived in {pl}.", "There was once a child named {n} who lived in {pl}.",
             "{n} lived in {pl} with a grandmother and a dog.", "Long ago, in {pl}, lived {n}."]
_MIDDLES = ["{S} asked a neighbor for advice.", "{S} thought about it for a long time.",
            "At first {s} did not know what to do.", "{S} tried once and failed, but did not give up.",
            "A friend named {f} offered to help.", "{S} made a plan and wrote it down.",
            "It was hard work, and it took most of the day."]
_ENDINGS = ["In the end, everyone was happy.", "{S} learned that patience pays off.",
            "From then on, {n} was known as the most helpful person around.",
            "That night, {n} slept well.", "{f} said it was the best day of the year.",
            "Now {n} tells this story to every new visitor."]


def description(rng: random.Random) -> str:
    """A short field-guide entry for a made-up creature, or a note about a made-up town."""
    if rng.random() < 0.6:
        name = place_name(rng).lower()
        kind = rng.choice(_KINDS)
        feats = rng.sample(_FEATURES, 2)
        parts = [
            f"The {name} is a {rng.choice(_SIZES)} {rng.choice(_COLORS)} {kind} that lives in {rng.choice(_HABITATS)}.",
            f"It has {feats[0]} and {feats[1]}.",
            f"It eats mostly {rng.choice(_FOODS)}, and sometimes {rng.choice(_FOODS)}.",
            *rng.sample(_HABITS, 2),
            rng.choice(_SOUNDS),
            f"People in {place_name(rng)} say that seeing a {name} brings good luck in {rng.choice(_SEASONS)}.",
        ]
        head = parts[:1]
        tail = parts[1:]
        rng.shuffle(tail)
        return " ".join(head + tail)
    town = place_name(rng)
    things = rng.sample(_TOWN_THINGS, 2)
    size = rng.choice(["small", "quiet", "busy", "old", "growing"])
    parts = [
        f"{town} is {a_an(size)} {size} town near {rng.choice(_GEO)}.",
        f"About {rng.randrange(300, 9000, 50)} people live there.",
        f"The town is known for {things[0]} and {things[1]}.",
        f"Every {rng.choice(_SEASONS)}, {rng.choice(_TOWN_EVENTS)}.",
        f"The road to {place_name(rng)} takes about {rng.randint(2, 9)} hours by cart.",
        f"Most families in {town} keep {rng.choice(OBJECTS)[1]} and grow {rng.choice(_FOODS)}.",
        f"The oldest building in {town} is {rng.choice(['a mill', 'a chapel', 'a bridge', 'an inn', 'a tower'])}"
        f" built {rng.randint(80, 900)} years ago.",
    ]
    return " ".join(parts[:1] + rng.sample(parts[1:], len(parts) - 1))


def story(rng: random.Random, name: str | None = None) -> str:
    """A short story: opening, a problem, two or three middle sentences, the resolution and an ending."""
    n, f = rng.sample(NAMES, 2)
    if name is not None:
        n, f = name, (f if f != name else n)
    s_cap, _ = pronoun(n)
    s = s_cap.lower()
    poss = {"she": "her", "he": "his", "they": "their"}[s]
    problem, fix = rng.choice(_PROBLEMS)
    obj = rng.choice(OBJECTS)[0]
    fill = {"n": n, "f": f, "s": s, "S": s_cap, "p": poss, "o": obj, "pl": rng.choice(_PLACES)}
    lines = [rng.choice(_OPENINGS).format(**fill), f"One day, {problem.format(**fill)}."]
    lines += [m.format(**fill) for m in rng.sample(_MIDDLES, rng.randint(3, 4))]
    lines.append(f"So {n} {fix.format(**fill)}.")
    lines.append(rng.choice(_ENDINGS).format(**fill))
    return " ".join(lines)


def a_an(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def definition_sentence(term: str, meaning: str, rng: random.Random) -> str:
    form = rng.randrange(3)
    if form == 0:
        return f"{a_an(term).capitalize()} {term} is {meaning}."
    if form == 1:
        return f"The word {term} means {meaning}."
    return f"{term.capitalize()}: {meaning}."


def glossary(rng: random.Random) -> str:
    """A short glossary: an opening line and six to nine definitions."""
    intro = rng.choice(["Here are some words and what they mean.", "A few useful definitions.",
                        "Word list for today's lesson.", "Learn these words.", "Some terms explained simply."])
    entries = rng.sample(DEFINITIONS, rng.randint(6, 9))
    return " ".join([intro] + [definition_sentence(t, m, rng) for t, m in entries])


def facts(rng: random.Random) -> str:
    """A list of true facts, or a paragraph of geography about made-up places."""
    if rng.random() < 0.6:
        intro = rng.choice(["Did you know?", "Some facts about the world.", "Facts to remember.",
                            "A few things that are true.", "Quick facts."])
        return " ".join([intro] + rng.sample(FACTS, rng.randint(12, 15)))
    country = place_name(rng).rstrip("aeiou") + rng.choice(["ia", "land", "or"])
    cities = [place_name(rng) for _ in range(3)]
    parts = [
        f"{country} is a country with {rng.randint(2, 40)} million people.",
        f"Its capital is {cities[0]}, which lies near {rng.choice(_GEO)}.",
        f"{cities[1]} and {cities[2]} are also cities in {country}.",
        f"The main river of {country} is the {place_name(rng)}.",
        f"People in {country} grow {rng.choice(_FOODS)} and trade {rng.choice(OBJECTS)[1]}.",
        f"The highest point in {country} is {rng.randint(800, 4800)} meters above the sea.",
        f"Most people in {country} speak {place_name(rng)}, and many also learn {place_name(rng)} at school.",
        f"The best time to visit {country} is in {rng.choice(_SEASONS)}, when {rng.choice(_TOWN_EVENTS)}.",
    ]
    return " ".join(parts[:1] + rng.sample(parts[1:], len(parts) - 1))


_GREETINGS = [("Hello!", "Hello! How can I help you today?"), ("Hi there.", "Hi! What would you like to know?"),
              ("Good morning.", "Good morning! What can I do for you?")]
_THANKS = [("Thanks, that helps.", "You're welcome. Ask me anything else anytime."),
           ("Great, thank you!", "Glad I could help."), ("That was clear, thanks.", "Happy to help!")]


def qa_pair(rng: random.Random) -> tuple[str, str]:
    """One instruct-style question and its direct answer, from the definitions, the facts or a story."""
    kind = rng.randrange(3)
    if kind == 0:
        term, meaning = rng.choice(DEFINITIONS)
        ask = rng.choice(["What is {a} {t}?", "What does the word {t} mean?", "Can you define {t}?"])
        return ask.format(a=a_an(term), t=term), definition_sentence(term, meaning, rng)
    if kind == 1:
        fact = rng.choice(FACTS)
        return rng.choice(["Tell me a fact.", "Share something true about the world.", "Give me a fun fact."]), fact
    name = rng.choice(NAMES)
    ask = rng.choice(["Tell me a short story about {n}.", "Write a short story with {n} in it."])
    return ask.format(n=name), story(rng, name)


def dialogue(rng: random.Random) -> str:
    """A plain-text chat transcript ('User: ... / Assistant: ...') of three to six exchanges."""
    turns = [rng.choice(_GREETINGS)] if rng.random() < 0.5 else []
    turns += [qa_pair(rng) for _ in range(rng.randint(3, 4))]
    if rng.random() < 0.5:
        turns.append(rng.choice(_THANKS))
    return "\n".join(f"User: {q}\nAssistant: {a}" for q, a in turns)


# domain -> [(generator name, function)]; the corpus writer draws documents from these
GENERATORS: dict[str, list[tuple[str, Callable[[random.Random], str]]]] = {
    "general": [("description", description), ("story", story)],
    "knowledge": [("definitions", glossary), ("facts", facts)],
    "dialogue": [("dialogue", dialogue)],
}
