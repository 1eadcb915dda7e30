#!/usr/bin/env python
"""Write the bundled evaluation tasks, interp/data/tasks/*.jsonl, deterministically (seeded; no downloads).

    .venv/bin/python scripts/make_tasks.py            # (re)write every task file
    .venv/bin/python scripts/make_tasks.py --check    # fail if a file differs from what would be written
    .venv/bin/python scripts/make_tasks.py --score    # score SmolLM2 on every task (the README table)

Every fact and word list is written out below. Tasks (see interp/tasks.py for the kinds):
  capitals    next_token  "... The capital of France is" -> " Paris" (countries, US states, provinces)
  arithmetic  next_token  "2 + 5 = 7\\n9 - 4 = 5\\n13 - 6 = " -> "7" (one-digit results; digits are single tokens)
  sentiment   choice      "Review: ...\\nSentiment:" -> [" positive", " negative"] (explicit, negated, implicit)
  agreement   choice      "The keys near the cabinet" -> [" is", " are"] (attractors, relative clauses)
  text        perplexity  short plain English sentences from templates
  testbed_vqa vqa         questions about held-out synthetic scenes (scene seed, question, answer) for the testbed VLMs
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "interp" / "data" / "tasks"
SEED = 1234

# ------------------------------------------------------------------------------------------- capitals
# (name as it reads after "The capital of", capital). Only uncontested, stable capitals with one spelling
# in common use; countries whose capital is ambiguous (e.g. Bolivia, South Africa, Sri Lanka) are left out.
COUNTRIES = [
    # Europe
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("the United Kingdom", "London"), ("Ireland", "Dublin"), ("Belgium", "Brussels"),
    ("the Netherlands", "Amsterdam"), ("Austria", "Vienna"), ("Poland", "Warsaw"),
    ("the Czech Republic", "Prague"), ("Slovakia", "Bratislava"), ("Hungary", "Budapest"),
    ("Romania", "Bucharest"), ("Bulgaria", "Sofia"), ("Greece", "Athens"), ("Serbia", "Belgrade"),
    ("Croatia", "Zagreb"), ("Slovenia", "Ljubljana"), ("Bosnia and Herzegovina", "Sarajevo"),
    ("Montenegro", "Podgorica"), ("Albania", "Tirana"), ("North Macedonia", "Skopje"), ("Denmark", "Copenhagen"),
    ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"), ("Iceland", "Reykjavik"),
    ("Estonia", "Tallinn"), ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Belarus", "Minsk"),
    ("Russia", "Moscow"), ("Malta", "Valletta"), ("Cyprus", "Nicosia"), ("Turkey", "Ankara"),
    ("Armenia", "Yerevan"), ("Azerbaijan", "Baku"), ("Switzerland", "Bern"), ("Liechtenstein", "Vaduz"),
    # Asia
    ("China", "Beijing"), ("Japan", "Tokyo"), ("South Korea", "Seoul"), ("North Korea", "Pyongyang"),
    ("Mongolia", "Ulaanbaatar"), ("India", "New Delhi"), ("Pakistan", "Islamabad"), ("Bangladesh", "Dhaka"),
    ("Nepal", "Kathmandu"), ("Bhutan", "Thimphu"), ("Afghanistan", "Kabul"), ("Iran", "Tehran"),
    ("Iraq", "Baghdad"), ("Syria", "Damascus"), ("Jordan", "Amman"), ("Lebanon", "Beirut"),
    ("Saudi Arabia", "Riyadh"), ("Oman", "Muscat"), ("the United Arab Emirates", "Abu Dhabi"), ("Qatar", "Doha"),
    ("Bahrain", "Manama"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"), ("Laos", "Vientiane"),
    ("Cambodia", "Phnom Penh"), ("Malaysia", "Kuala Lumpur"), ("Indonesia", "Jakarta"),
    ("the Philippines", "Manila"), ("Uzbekistan", "Tashkent"), ("Turkmenistan", "Ashgabat"),
    ("Kyrgyzstan", "Bishkek"), ("Tajikistan", "Dushanbe"), ("Brunei", "Bandar Seri Begawan"),
    ("East Timor", "Dili"),
    # Africa
    ("Egypt", "Cairo"), ("Libya", "Tripoli"), ("Tunisia", "Tunis"), ("Algeria", "Algiers"), ("Morocco", "Rabat"),
    ("Sudan", "Khartoum"), ("South Sudan", "Juba"), ("Ethiopia", "Addis Ababa"), ("Eritrea", "Asmara"),
    ("Somalia", "Mogadishu"), ("Kenya", "Nairobi"), ("Uganda", "Kampala"), ("Rwanda", "Kigali"),
    ("the Democratic Republic of the Congo", "Kinshasa"), ("the Republic of the Congo", "Brazzaville"),
    ("Angola", "Luanda"), ("Zambia", "Lusaka"), ("Zimbabwe", "Harare"), ("Mozambique", "Maputo"),
    ("Malawi", "Lilongwe"), ("Botswana", "Gaborone"), ("Namibia", "Windhoek"), ("Madagascar", "Antananarivo"),
    ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Senegal", "Dakar"), ("Mali", "Bamako"), ("Niger", "Niamey"),
    ("Gabon", "Libreville"), ("Liberia", "Monrovia"), ("Sierra Leone", "Freetown"), ("Guinea", "Conakry"),
    ("Burkina Faso", "Ouagadougou"), ("Mauritania", "Nouakchott"), ("the Gambia", "Banjul"),
    ("Lesotho", "Maseru"), ("Equatorial Guinea", "Malabo"), ("the Central African Republic", "Bangui"),
    ("Cape Verde", "Praia"), ("Mauritius", "Port Louis"),
    # Americas
    ("the United States", "Washington"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Cuba", "Havana"),
    ("Jamaica", "Kingston"), ("Haiti", "Port-au-Prince"), ("the Dominican Republic", "Santo Domingo"),
    ("Honduras", "Tegucigalpa"), ("Nicaragua", "Managua"), ("El Salvador", "San Salvador"),
    ("Venezuela", "Caracas"), ("Ecuador", "Quito"), ("Peru", "Lima"), ("Chile", "Santiago"),
    ("Argentina", "Buenos Aires"), ("Uruguay", "Montevideo"), ("Colombia", "Bogotá"), ("Brazil", "Brasília"),
    ("Guyana", "Georgetown"), ("Suriname", "Paramaribo"), ("the Bahamas", "Nassau"),
    ("Trinidad and Tobago", "Port of Spain"), ("Barbados", "Bridgetown"), ("Belize", "Belmopan"),
    # Oceania
    ("Australia", "Canberra"), ("New Zealand", "Wellington"), ("Fiji", "Suva"),
    ("Papua New Guinea", "Port Moresby"), ("Samoa", "Apia"), ("Vanuatu", "Port Vila"),
    ("the Solomon Islands", "Honiara"),
    # countries of the United Kingdom
    ("Scotland", "Edinburgh"), ("Wales", "Cardiff"), ("Northern Ireland", "Belfast"),
]

# US states whose capital is not also the state's name and has one spelling (Minnesota's "St. Paul"/"Saint
# Paul" and Oklahoma City are left out).
US_STATES = [
    ("Alabama", "Montgomery"), ("Alaska", "Juneau"), ("Arizona", "Phoenix"), ("Arkansas", "Little Rock"),
    ("California", "Sacramento"), ("Colorado", "Denver"), ("Connecticut", "Hartford"), ("Delaware", "Dover"),
    ("Florida", "Tallahassee"), ("Georgia", "Atlanta"), ("Hawaii", "Honolulu"), ("Idaho", "Boise"),
    ("Illinois", "Springfield"), ("Indiana", "Indianapolis"), ("Iowa", "Des Moines"), ("Kansas", "Topeka"),
    ("Kentucky", "Frankfort"), ("Louisiana", "Baton Rouge"), ("Maine", "Augusta"), ("Maryland", "Annapolis"),
    ("Massachusetts", "Boston"), ("Michigan", "Lansing"), ("Mississippi", "Jackson"),
    ("Missouri", "Jefferson City"), ("Montana", "Helena"), ("Nebraska", "Lincoln"), ("Nevada", "Carson City"),
    ("New Hampshire", "Concord"), ("New Jersey", "Trenton"), ("New Mexico", "Santa Fe"), ("New York", "Albany"),
    ("North Carolina", "Raleigh"), ("North Dakota", "Bismarck"), ("Ohio", "Columbus"), ("Oregon", "Salem"),
    ("Pennsylvania", "Harrisburg"), ("Rhode Island", "Providence"), ("South Carolina", "Columbia"),
    ("South Dakota", "Pierre"), ("Tennessee", "Nashville"), ("Texas", "Austin"), ("Utah", "Salt Lake City"),
    ("Vermont", "Montpelier"), ("Virginia", "Richmond"), ("Washington", "Olympia"),
    ("West Virginia", "Charleston"), ("Wisconsin", "Madison"), ("Wyoming", "Cheyenne"),
]

PROVINCES = [  # Canadian provinces and Australian states
    ("Ontario", "Toronto"), ("British Columbia", "Victoria"), ("Alberta", "Edmonton"), ("Manitoba", "Winnipeg"),
    ("Saskatchewan", "Regina"), ("Nova Scotia", "Halifax"), ("New Brunswick", "Fredericton"),
    ("Prince Edward Island", "Charlottetown"),
    ("New South Wales", "Sydney"), ("Queensland", "Brisbane"), ("Western Australia", "Perth"),
    ("South Australia", "Adelaide"), ("Tasmania", "Hobart"),
]

# Few-shot prefix: two solved examples that are not themselves items.
CAPITALS_SHOTS = "The capital of Portugal is Lisbon. The capital of Kenya is Nairobi. "
CAPITALS_SHOT_SUBJECTS = {"Portugal", "Kenya"}


def make_capitals(rng: random.Random) -> list[dict]:
    items = []
    for c, cap in COUNTRIES:
        if c in CAPITALS_SHOT_SUBJECTS:
            continue
        items.append({"prompt": f"{CAPITALS_SHOTS}The capital of {c} is", "answer": f" {cap}",
                      "group": "country", "subject": c, "roles": {"subject": c}})
    for s, cap in US_STATES:
        items.append({"prompt": f"{CAPITALS_SHOTS}The capital of the US state of {s} is", "answer": f" {cap}",
                      "group": "us_state", "subject": s, "roles": {"subject": s}})
    for p, cap in PROVINCES:
        items.append({"prompt": f"{CAPITALS_SHOTS}The capital of {p} is", "answer": f" {cap}",
                      "group": "province", "subject": p, "roles": {"subject": p}})
    rng.shuffle(items)
    return [{"kind": "next_token", **it} for it in items]


# ------------------------------------------------------------------------------------------- arithmetic
def make_arithmetic(rng: random.Random) -> list[dict]:
    """Every a+b and a-b with a single-digit result (0-9) and 0 <= a <= 19, in a 2-shot format.

    The format is "a + b = r": SmolLM2's tokenizer splits digits and the space before them into separate
    tokens, so the prompt ends with "= " and the answer (one digit) is exactly one token.
    """
    problems = []
    for a in range(10):
        for b in range(10):
            if a + b <= 9:
                problems.append((a, "+", b, a + b))
    for a in range(20):
        for b in range(a + 1):
            if a - b <= 9:
                problems.append((a, "-", b, a - b))
    rng.shuffle(problems)
    items = []
    for a, op, b, r in problems:
        shots = []
        while len(shots) < 2:  # two solved examples of the same kind, different from the item
            x = rng.randrange(0, 20 if op == "-" else 10)
            y = rng.randrange(0, x + 1) if op == "-" else rng.randrange(0, 10 - x)
            z = x - y if op == "-" else x + y
            shot = f"{x} {op} {y} = {z}\n"
            if z <= 9 and (x, y) != (a, b) and shot not in shots:
                shots.append(shot)
        items.append({"kind": "next_token", "prompt": "".join(shots) + f"{a} {op} {b} = ", "answer": str(r),
                      "op": op, "a": a, "b": b})
    return items


# ------------------------------------------------------------------------------------------- sentiment
POS_ADJ = ["wonderful", "excellent", "delightful", "fantastic", "superb", "charming", "brilliant", "enjoyable",
           "great", "lovely", "impressive", "beautiful", "fun", "clever", "amazing", "pleasant", "memorable",
           "outstanding", "terrific", "touching"]
NEG_ADJ = ["terrible", "awful", "boring", "dull", "disappointing", "horrible", "dreadful", "tedious", "bland",
           "mediocre", "poor", "weak", "messy", "annoying", "painful", "forgettable", "clumsy", "lifeless",
           "frustrating", "ugly"]
NOUNS = ["movie", "film", "book", "restaurant", "hotel", "album", "show", "game", "phone", "meal", "concert",
         "novel", "play", "laptop", "cafe", "series", "museum", "course", "app", "camera"]
ASPECTS = ["story", "acting", "food", "service", "music", "price", "design", "ending", "staff", "writing",
           "atmosphere", "battery", "screen", "plot", "characters"]
POS_VERB = ["loved", "enjoyed", "adored", "liked"]
NEG_VERB = ["hated", "disliked", "regretted", "could not stand"]

# Things a reviewer did or would do: sentiment with no evaluative adjective (the hard part of the task).
POS_EVENTS = ["I would happily go back again", "I have already recommended it to all my friends",
              "it was worth every penny", "I could not stop smiling", "I am going back next week",
              "it exceeded my expectations", "I would give it ten out of ten", "I want to buy another one",
              "I have told everyone about it", "I would pay twice the price for it", "we stayed until the very end",
              "it made my whole week"]
NEG_EVENTS = ["I asked for my money back", "I fell asleep halfway through", "I want those two hours back",
              "it broke after one day", "I will never go back", "it was a waste of money",
              "we left after twenty minutes", "I would give it one out of ten", "I returned it the next morning",
              "I warned all my friends to stay away", "I regret every penny I spent on it",
              "I could not wait for it to end"]

# (template, style). {adj}/{adj2}: adjectives of the item's polarity; {oadj}: of the other polarity;
# {event}: an event of the item's polarity; {verb}: a verb of the item's polarity.
SENT_TEMPLATES = {
    "explicit": ["The {noun} was {adj}.", "I thought the {noun} was {adj} and {adj2}.", "What a {adj} {noun}!",
                 "The {aspect} was {adj}, and the {noun} overall was {adj2}.", "I {verb} this {noun}. It was {adj}.",
                 "Honestly, the {noun} was {adj} from start to finish."],
    "negated": ["The {noun} was not {oadj} at all.", "Nobody could call this {noun} {oadj}.",
                "I would never say the {noun} was {oadj}."],
    "implicit": ["I tried the {noun} last week, and {event}.", "About the {noun}: {event}.",
                 "We went for the {noun}. In the end, {event}.", "My verdict on the {noun}? {Event}."],
    "contrast": ["The {aspect} was {oadj}, but {event}.", "I expected a {oadj} {noun}, but it was {adj}.",
                 "At first the {noun} seemed {oadj}; by the end, {event}."],
}
SENT_MIX = ["explicit"] * 3 + ["negated"] * 2 + ["implicit"] * 3 + ["contrast"] * 2


def make_sentiment(rng: random.Random, n: int = 240) -> list[dict]:
    """Zero-shot "Review: ...\nSentiment:" with choices [" positive", " negative"], balanced labels."""
    items, seen = [], set()
    for _ in range(100 * n):  # draws until n distinct items; fails loudly if the lists are too small
        if len(items) == n:
            break
        label = len(items) % 2  # 0 positive, 1 negative
        style = SENT_MIX[(len(items) // 2) % len(SENT_MIX)]
        tmpl = rng.choice(SENT_TEMPLATES[style])
        mine, other = (POS_ADJ, NEG_ADJ) if label == 0 else (NEG_ADJ, POS_ADJ)
        adj, adj2 = rng.sample(mine, 2)
        event = rng.choice(POS_EVENTS if label == 0 else NEG_EVENTS)
        text = tmpl.format(noun=rng.choice(NOUNS), aspect=rng.choice(ASPECTS), adj=adj, adj2=adj2,
                           oadj=rng.choice(other), event=event, Event=event[0].upper() + event[1:],
                           verb=rng.choice(POS_VERB if label == 0 else NEG_VERB))
        text = re.sub(r"\b([Aa]) ([aeiou])", r"\1n \2", text)  # "a awful" -> "an awful"
        text = text[0].upper() + text[1:]
        if text in seen:
            continue
        seen.add(text)
        items.append({"kind": "choice", "prompt": f"Review: {text}\nSentiment:",
                      "choices": [" positive", " negative"], "answer": label, "style": style})
    if len(items) < n:
        raise RuntimeError("make_sentiment: too few distinct items; widen the word lists")
    rng.shuffle(items)
    return items


# ------------------------------------------------------------------------------------------- agreement
SUBJECTS = [("key", "keys"), ("author", "authors"), ("dog", "dogs"), ("teacher", "teachers"), ("car", "cars"),
            ("picture", "pictures"), ("student", "students"), ("doctor", "doctors"), ("building", "buildings"),
            ("report", "reports"), ("box", "boxes"), ("child", "children"), ("man", "men"), ("woman", "women"),
            ("letter", "letters"), ("painting", "paintings"), ("bottle", "bottles"), ("farmer", "farmers"),
            ("senator", "senators"), ("pilot", "pilots"), ("lamp", "lamps"), ("book", "books"),
            ("singer", "singers"), ("lawyer", "lawyers")]
ATTRACTORS = [("cabinet", "cabinets"), ("table", "tables"), ("window", "windows"), ("garden", "gardens"),
              ("house", "houses"), ("tree", "trees"), ("door", "doors"), ("shelf", "shelves"),
              ("river", "rivers"), ("school", "schools"), ("office", "offices"), ("church", "churches")]
PREPS = ["near", "next to", "behind", "beside", "by", "in front of", "above", "across from"]
ANIMATE = [("author", "authors"), ("teacher", "teachers"), ("student", "students"), ("doctor", "doctors"),
           ("child", "children"), ("man", "men"), ("woman", "women"), ("farmer", "farmers"),
           ("senator", "senators"), ("pilot", "pilots"), ("singer", "singers"), ("lawyer", "lawyers")]
RC_SUBJECTS = [("guard", "guards"), ("manager", "managers"), ("neighbour", "neighbours"), ("nurse", "nurses"),
               ("chef", "chefs"), ("officer", "officers")]
RC_VERBS = [("likes", "like"), ("admires", "admire"), ("knows", "know"), ("hates", "hate"), ("watches", "watch"),
            ("trusts", "trust")]
VERB_PAIRS = [(" is", " are"), (" was", " were")]
# every condition puts a noun of the other number between the subject and the verb
AGREE_CONDS = ["pp", "pp2", "obj_rc", "obj_rc_pp", "subj_rc"]


def make_agreement(rng: random.Random, n: int = 250) -> list[dict]:
    """Subject-verb agreement across an attractor of the other number: choose " is"/" are" (or was/were).

    pp      "The key near the cabinets"                    (prepositional phrase)
    pp2     "The key near the cabinets behind the doors"   (two of them)
    obj_rc  "The key that the guards like"                 (object relative clause)
    obj_rc_pp "The key that the guards near the doors like" (both)
    subj_rc "The author who likes the guards"              (subject relative clause)
    """
    items, seen = [], set()
    for _ in range(100 * n):
        if len(items) == n:
            break
        cond = AGREE_CONDS[len(items) % len(AGREE_CONDS)]
        pl = rng.random() < 0.5
        other = int(not pl)
        if cond == "pp":
            phrase = f"The {rng.choice(SUBJECTS)[pl]} {rng.choice(PREPS)} the {rng.choice(ATTRACTORS)[other]}"
        elif cond == "pp2":
            p1, p2 = rng.sample(PREPS, 2)
            a1, a2 = rng.sample(ATTRACTORS, 2)
            phrase = f"The {rng.choice(SUBJECTS)[pl]} {p1} the {a1[other]} {p2} the {a2[other]}"
        elif cond == "obj_rc":
            phrase = (f"The {rng.choice(SUBJECTS)[pl]} that the {rng.choice(RC_SUBJECTS)[other]} "
                      f"{rng.choice(RC_VERBS)[other]}")
        elif cond == "obj_rc_pp":
            phrase = (f"The {rng.choice(SUBJECTS)[pl]} that the {rng.choice(RC_SUBJECTS)[other]} "
                      f"{rng.choice(PREPS)} the {rng.choice(ATTRACTORS)[other]} {rng.choice(RC_VERBS)[other]}")
        else:
            phrase = (f"The {rng.choice(ANIMATE)[pl]} who {rng.choice(RC_VERBS)[pl]} the "
                      f"{rng.choice(RC_SUBJECTS)[other]}")
        if phrase in seen:
            continue
        seen.add(phrase)
        items.append({"kind": "choice", "prompt": phrase, "choices": list(rng.choice(VERB_PAIRS)),
                      "answer": int(pl), "condition": cond})
    if len(items) < n:
        raise RuntimeError("make_agreement: too few distinct items; widen the word lists")
    rng.shuffle(items)
    return items


# ------------------------------------------------------------------------------------------- text
NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Isla", "Jack", "Kate", "Leo",
         "Maria", "Noah", "Olivia", "Peter", "Rosa", "Sam", "Tom", "Uma"]
PLACES = ["market", "library", "park", "station", "bakery", "beach", "museum", "post office", "garden", "school"]
FOODS = ["bread", "apples", "cheese", "coffee", "rice", "tomatoes", "milk", "eggs", "oranges", "soup"]
ANIMALS = ["cat", "dog", "horse", "rabbit", "bird", "cow", "fox", "duck"]
THINGS = ["table", "tree", "bed", "car", "bench", "window", "bridge", "chair"]
CITIES = ["London", "Paris", "Berlin", "Madrid", "Rome", "Tokyo", "Chicago", "Sydney", "Toronto", "Dublin"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
TIMES = ["in the morning", "after lunch", "in the evening", "before dinner", "at night", "on the weekend"]
OBJECTS = ["a letter", "a book", "a new bike", "a warm coat", "some flowers", "a cake", "a small gift", "a map"]
JOBS = ["teacher", "doctor", "farmer", "baker", "nurse", "pilot", "writer", "painter", "driver", "cook"]
TEXT_TEMPLATES = [
    "{name} went to the {place} to buy some {food}.",
    "The {animal} slept under the {thing} all afternoon.",
    "It rained in {city} on {day}, so we stayed inside.",
    "{name} reads a book {time} before going to sleep.",
    "My brother works as a {job} in a small town near {city}.",
    "{name} gave {name2} {obj} for her birthday.",
    "We walked to the {place} {time} and talked about the weather.",
    "The {job} said that the {place} would be closed on {day}.",
    "Every {day}, {name} makes {food} for the whole family.",
    "There was a {animal} sitting on the {thing} when we came home.",
    "{name} and {name2} took the train from {city} to {city2}.",
    "The children played near the {place} until it got dark.",
    "I forgot to bring {obj}, so I went back home to get it.",
    "After a long week, {name} wanted to rest {time}.",
    "The old {job} lived in a house next to the {place}.",
    "{name} called her mother {time} to ask about the {food}.",
]


def make_text(rng: random.Random, n: int = 300) -> list[dict]:
    items, seen = [], set()
    for _ in range(100 * n):  # draws until n distinct items; fails loudly if the lists are too small
        if len(items) == n:
            break
        tmpl = rng.choice(TEXT_TEMPLATES)
        name, name2 = rng.sample(NAMES, 2)
        city, city2 = rng.sample(CITIES, 2)
        text = tmpl.format(name=name, name2=name2, place=rng.choice(PLACES), food=rng.choice(FOODS),
                           animal=rng.choice(ANIMALS), thing=rng.choice(THINGS), city=city, city2=city2,
                           day=rng.choice(DAYS), time=rng.choice(TIMES), obj=rng.choice(OBJECTS),
                           job=rng.choice(JOBS))
        if text in seen:
            continue
        seen.add(text)
        items.append({"kind": "perplexity", "text": text})
    if len(items) < n:
        raise RuntimeError("make_text: too few distinct items; widen the word lists")
    return items


def make_testbed_vqa(rng: random.Random, n_scenes: int = 60) -> list[dict]:
    """Questions about held-out testbed scenes (make_dataset(60, seed=3, split="test"): disjoint from training
    and from the scenes the vision probes are calibrated on), one per question type; the scene is rebuilt
    from ``scene_seed`` when scored (kind ``vqa``, for the llava_ar / llada_diffusion testbeds)."""
    sys.path.insert(0, str(OUT.parent.parent.parent))
    from interp.testbed.items import vqa_items
    return vqa_items(n_scenes, seed=3, split="test")


MAKERS = {"capitals": make_capitals, "arithmetic": make_arithmetic, "sentiment": make_sentiment,
          "agreement": make_agreement, "text": make_text, "testbed_vqa": make_testbed_vqa}


def render(name: str) -> str:
    rng = random.Random(f"{SEED}:{name}")  # one stream per task: editing one task leaves the others as they are
    return "".join(json.dumps(it, ensure_ascii=False) + "\n" for it in MAKERS[name](rng))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="compare with the files on disk instead of writing")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--score", nargs="*", metavar="TASK", default=None,
                    help="score SmolLM2 on these tasks (all when none named) instead of writing; see interp.tasks")
    a = ap.parse_args(argv)
    if a.score is not None:
        sys.path.insert(0, str(OUT.parent.parent.parent))
        from interp.tasks import main as score
        score(a.score)
        return 0
    a.out.mkdir(parents=True, exist_ok=True)
    bad = 0
    for name in MAKERS:
        text, path = render(name), a.out / f"{name}.jsonl"
        if a.check:
            same = path.is_file() and path.read_text(encoding="utf-8") == text
            bad += not same
            print(f"{'ok  ' if same else 'DIFF'} {path}")
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path} ({text.count(chr(10))} items)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
