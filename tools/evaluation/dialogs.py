"""Scripted multi-session conversations and banks of unrelated facts with labelled evidence.

What ``apcm bench hybrid`` measures recall on besides the Debian FAQ set: data with
a known answer for every question, shaped like what agents store.

**Dialogs.** Each conversation is two people talking over a few dozen dated
sessions, stored one memory per turn with the prefix an agent writes,
``[8 May 2023] Caroline: ...``. Most turns are small talk (some of it on the same
topics as the facts, as distractors); woven in are *episodes* that carry one fact
about a speaker, each with a question (``question_kind``):

- ``stated``: the speaker says it; the question paraphrases that turn, which is
  the evidence.
- ``answer_next``: the other asks about it and the speaker answers in the next
  turn, briefly; the question paraphrases the *asking* turn, the evidence is the
  answer one turn later.
- ``answer_later``: as ``answer_next`` with a hesitation between: evidence two
  turns after the matching one.
- ``answer_before``: the speaker mentions it briefly, the other reacts in words
  the question uses; evidence one turn *before* the matching one.
- ``when``: a dated event ("When did Caroline ...?"); evidence the turn whose
  prefix carries the date.

Questions never copy a turn: they use other words for the topic (pet / dog,
vacation / trip) and keep the speaker's name, as questions about conversations do.

**Facts.** The same kinds of facts about many different people (full names),
one sentence each, written in random order: a bank where write order means
nothing. Each question paraphrases one fact.

Both are generated from a seed, so nothing large is committed and every run
sees the same data.
"""

from __future__ import annotations

import datetime as dt
import random
from dataclasses import dataclass
from typing import Any

FIRST = ["Caroline", "Melanie", "Jon", "Gina", "Deborah", "Jolene", "Audrey", "Andrew",
         "James", "John", "Maria", "Joanna", "Nate", "Tim", "Calvin", "Dave", "Evan", "Sam",
         "Priya", "Tomas", "Hiro", "Lena", "Omar", "Farah", "Kofi", "Ines", "Marek", "Yuki",
         "Rosa", "Bilal", "Greta", "Luis", "Nadia", "Oscar", "Petra", "Ravi", "Sofia", "Theo",
         "Uma", "Victor", "Wendy", "Xavier", "Yara", "Zane", "Amara", "Bruno", "Chloe",
         "Dmitri", "Elena", "Felix"]
LAST = ["Okafor", "Lindqvist", "Moreau", "Tanaka", "Haddad", "Kowalski", "Silva", "Brennan",
        "Novak", "Fischer", "Ibrahim", "Castillo", "Petrov", "Nakamura", "O'Neill", "Duarte",
        "Weber", "Mensah", "Rossi", "Andersen", "Kaur", "Schmidt", "Yilmaz", "Costa", "Dubois"]


@dataclass(frozen=True)
class FactType:
    """One kind of fact, with its wordings. ``{x}`` is the person, ``{v}`` the value,
    ``{o}`` the other speaker."""

    values: tuple[str, ...]
    say: tuple[str, ...]  # the person states it (topic words and the value)
    ask: tuple[str, ...]  # the other asks about it (topic words, no value)
    reply: tuple[str, ...]  # a brief answer: the value, few topic words
    react: tuple[str, ...]  # the other reacts to a brief mention (topic words)
    mention: tuple[str, ...]  # a brief mention of the value, no topic words
    question: tuple[str, ...]  # the question about it (other words than ``say``)
    fact: tuple[str, ...]  # one sentence about a named person, for the facts bank
    event: str = ""  # for ``when`` questions: "{x} ..." past-tense event phrase


FACTS: list[FactType] = [
    FactType(("a beagle", "a tabby cat", "a parrot", "a golden retriever", "two rabbits",
              "a corgi", "a tortoise"),
             ("I finally adopted {v} from the shelter last week, the house feels alive.",
              "Big news: we brought home {v} on Saturday!"),
             ("{x}, did you ever get that pet you kept talking about?",
              "So did you end up adopting an animal, {x}?"),
             ("Yes! {v}, and she already rules the house.", "We did, {v}. Best decision ever."),
             ("A new pet, how exciting! You must be so happy with the new addition.",),
             ("Guess what, we got {v}!",),
             ("What pet did {x} adopt?", "What kind of animal does {x} have at home now?"),
             ("{x} adopted {v} from an animal shelter.",),
             "adopt a pet"),
    FactType(("Lisbon", "Kyoto", "Reykjavik", "Cape Town", "Vancouver", "Marrakesh", "Hanoi",
              "Edinburgh", "Buenos Aires"),
             ("Just got back from our vacation in {v}, the food was unreal.",
              "We spent our summer holiday in {v} and walked everywhere."),
             ("Where did you go on your holiday, {x}?", "{x}, how was the big trip? Where to?"),
             ("{v}! We stayed nearly two weeks.", "Oh, {v}. I could live there honestly."),
             ("What a holiday that must have been! I need a vacation like that.",),
             ("I'm finally back from {v}.",),
             ("Where did {x} travel on vacation?", "Which city did {x} visit for the trip?"),
             ("{x} spent a summer vacation in {v}.",),
             "go on vacation"),
    FactType(("pottery", "rock climbing", "the violin", "salsa dancing", "woodworking",
              "watercolour painting", "chess", "surfing"),
             ("I signed up for a {v} class and I'm completely hooked.",
              "Lately all my free evenings go to {v}, it's my new hobby."),
             ("What have you been doing in your spare time lately, {x}?",
              "Picked up any new hobbies recently, {x}?"),
             ("{v}, believe it or not. Twice a week.", "Mostly {v}. I'm terrible but I love it."),
             ("That's such a fun new hobby, good for you for picking something up!",),
             ("I started {v}, by the way.",),
             ("What hobby did {x} take up?", "What new pastime has {x} started?"),
             ("{x} recently took up {v} as a hobby.",),
             "start a new hobby"),
    FactType(("a nurse", "a software engineer", "a high-school teacher", "an architect",
              "a pastry chef", "a paramedic", "a lawyer", "a graphic designer"),
             ("I accepted the offer, I start as {v} at the new place next month.",
              "After all those interviews I'm now working as {v}."),
             ("{x}, what did the new job turn out to be?", "So what's your new role, {x}?"),
             ("I'm {v} now. Still pinching myself.", "{v}, finally."),
             ("A new job, congratulations! Your career is really taking off.",),
             ("I'll be {v} from now on!",),
             ("What is {x}'s job now?", "What does {x} do for work after the career change?"),
             ("{x} works as {v}.",),
             "start the new job"),
    FactType(("a marathon", "a half marathon", "a triathlon", "a 10k charity run",
              "a cycling race", "an ultramarathon"),
             ("I ran {v} yesterday, my legs are still shaking.",
              "I finished {v} this weekend, first time ever!"),
             ("{x}, how did the race go? What distance was it again?",
              "Wasn't your big race this weekend, {x}? What was it?"),
             ("{v}! I finished, barely.", "It was {v} and I didn't stop once."),
             ("That race sounds brutal, I'm impressed you finished it!",),
             ("Did {v} on Sunday.",),
             ("What race did {x} complete?", "What running event did {x} finish?"),
             ("{x} completed {v}.",),
             "run the race"),
    FactType(("lasagna", "a lemon tart", "chicken curry", "sourdough bread", "paella",
              "dumplings", "banana bread"),
             ("I baked {v} for the family dinner and it vanished in minutes.",
              "My signature dish for the party was {v}."),
             ("{x}, what did you cook for the dinner party?",
              "What did you bring to the potluck, {x}?"),
             ("{v}, my grandmother's recipe.", "I made {v}. No leftovers!"),
             ("The dinner party sounds delicious, I wish I could cook like that.",),
             ("I made {v} again.",),
             ("What dish did {x} make for the dinner?", "What food did {x} prepare for guests?"),
             ("{x} cooked {v} for a dinner party.",),
             "cook for the dinner party"),
    FactType(("Dune", "Pride and Prejudice", "The Hobbit", "Beloved", "Norwegian Wood",
              "The Road", "Middlemarch"),
             ("I'm reading {v} for my book club and I can't put it down.",
              "Our book club picked {v} this month, I love it."),
             ("What's the book club reading at the moment, {x}?",
              "{x}, which novel are you on now?"),
             ("{v}. Slow start, great ending.", "We're on {v}."),
             ("Book clubs are great, I should join one and read more novels.",),
             ("Finished {v} last night.",),
             ("Which book is {x} reading?", "What novel did {x}'s book club choose?"),
             ("{x} is reading {v} with a book club.",),
             "finish the book"),
    FactType(("Denver", "Seattle", "Austin", "Boston", "Portland", "Chicago", "Toronto"),
             ("We signed the lease, we're moving to {v} in the spring.",
              "It's official, I'm relocating to {v} for good."),
             ("{x}, where are you moving to again?", "So which city are you relocating to, {x}?"),
             ("{v}. Boxes everywhere already.", "{v}, close to my sister."),
             ("Moving cities is such a big step, packing up a whole life!",),
             ("We're off to {v} soon.",),
             ("Where is {x} moving?", "Which city will {x} relocate to?"),
             ("{x} is moving to {v}.",),
             "move house"),
    FactType(("a support group", "a community garden", "an animal shelter", "a food bank",
              "a youth mentoring program", "a hospice"),
             ("I started volunteering at {v} on Saturdays, it's so rewarding.",
              "I've been giving my weekends to {v} as a volunteer."),
             ("{x}, where do you volunteer these days?",
              "Are you still doing volunteer work, {x}? Where?"),
             ("At {v}. It means a lot to me.", "{v}, every weekend."),
             ("Volunteering your weekends is so generous, the community is lucky.",),
             ("Spent the morning at {v} again.",),
             ("Where does {x} volunteer?", "What organisation does {x} help out at?"),
             ("{x} volunteers at {v}.",),
             "start volunteering"),
    FactType(("a red electric car", "a vintage motorbike", "a used minivan", "a cargo bike",
              "a camper van"),
             ("I finally bought {v}, no more waiting for the bus.",
              "We traded the old car in for {v}."),
             ("{x}, what did you end up buying to get around?",
              "Did you replace your car yet, {x}? With what?"),
             ("{v}! Drives like a dream.", "Got {v} in the end."),
             ("A new set of wheels, nice! Commuting will be so much easier.",),
             ("Picked up {v} today.",),
             ("What vehicle did {x} buy?", "What did {x} get to replace the old car?"),
             ("{x} bought {v}.",),
             "buy the new vehicle"),
    FactType(("Spanish", "Japanese", "Portuguese", "Korean", "Italian", "Arabic", "German"),
             ("I've been studying {v} every morning with an app and a tutor.",
              "My goal this year is to become fluent in {v}."),
             ("{x}, which language are you learning now?",
              "How are the language lessons going, {x}? Which one was it?"),
             ("{v}. The grammar is killing me.", "{v}, still at the basics."),
             ("Learning a new language as an adult takes real discipline!",),
             ("Did my {v} homework on the train.",),
             ("What language is {x} studying?", "Which language does {x} want to speak fluently?"),
             ("{x} is learning {v}.",),
             "start language lessons"),
    FactType(("a sunflower mural", "a portrait of her grandmother", "a lake at sunset",
              "a abstract city skyline", "a bowl of lemons"),
             ("I painted {v} this week, my first canvas in years.",
              "Just finished a painting: {v}."),
             ("{x}, what did you paint for the art show?",
              "What's the subject of your new painting, {x}?"),
             ("{v}. Took me days.", "It's {v}."),
             ("Your art is amazing, I love that you're painting again!",),
             ("Here's {v}, finished it last night.",),
             ("What did {x} paint?", "What is the subject of {x}'s artwork?"),
             ("{x} painted {v}.",),
             "finish the painting"),
    FactType(("Oliver", "Mia", "Leo", "Ava", "Noah", "Isla"),
             ("Our baby was born on Tuesday, we named him {v}.",
              "Meet the newest member of the family: little {v}!"),
             ("{x}, what did you two decide to call the baby?", "Did you pick a name yet, {x}?"),
             ("{v}. It just felt right.", "We went with {v}."),
             ("A newborn, congratulations! Parenthood is going to be wonderful.",),
             ("{v} finally slept through the night!",),
             ("What is the name of {x}'s baby?", "What did {x} name the child?"),
             ("{x}'s newborn child is named {v}.",),
             "have the baby"),
    FactType(("the guitar", "the piano", "the drums", "the cello", "the saxophone"),
             ("I've been taking {v} lessons and played my first song at the open mic.",
              "I'm learning to play {v}, my fingers hurt."),
             ("{x}, what instrument are you learning?",
              "Which instrument did you pick up for the music lessons, {x}?"),
             ("{v}. My neighbours are very patient.", "{v}!"),
             ("Music lessons, how cool! Playing an instrument is such a gift.",),
             ("Practised {v} for two hours.",),
             ("What instrument does {x} play?", "Which musical instrument is {x} learning?"),
             ("{x} is learning to play {v}.",),
             "play at the open mic"),
    FactType(("a broken wrist", "a sprained ankle", "pneumonia", "a concussion",
              "a knee injury"),
             ("The doctor says it's {v}, so I'm stuck at home for weeks.",
              "Ended up in the ER with {v}, what a week."),
             ("{x}, what did the doctor say about your injury?",
              "How are you feeling, {x}? What was the diagnosis?"),
             ("{v}. Could have been worse.", "It's {v}, sadly."),
             ("Oh no, a trip to the hospital! I hope you recover quickly.",),
             ("Still dealing with {v}.",),
             ("What health problem did {x} have?", "What was {x} diagnosed with?"),
             ("{x} was treated for {v}.",),
             "get hurt"),
    FactType(("a camping trip", "a beach day", "a museum visit", "a picnic in the park",
              "a zoo outing"),
             ("We took the kids on {v} and everyone was exhausted by the end.",
              "Family weekend: {v} with the children."),
             ("{x}, what did you do with the kids last weekend?",
              "How was the family weekend, {x}? What did you get up to?"),
             ("{v}! They loved it.", "Just {v}, simple but fun."),
             ("Family outings are the best, the children must have had a blast.",),
             ("Back from {v}.",),
             ("What did {x} do with the family?", "Where did {x} take the children?"),
             ("{x} took the family on {v}.",),
             "take the kids out"),
]

HESITATE = ("Hmm, let me think, it's been a busy few weeks.", "Ha, good question, one sec.",
            "Oh wow, you remember that?", "Right, I never told you properly!")
SMALL_TALK = (
    "How have you been? It feels like ages since we last talked.",
    "Work has been hectic, I barely had a minute to myself this week.",
    "The weather has been awful, rain every single day.",
    "I've been sleeping badly, too much coffee probably.",
    "Did you watch the game last night? What a finish.",
    "I'm trying to eat healthier, lots of salads lately.",
    "My sister visited for a few days, it was lovely to catch up.",
    "I keep meaning to call you and then the day disappears.",
    "Honestly I just needed a quiet weekend at home.",
    "That reminds me, I still owe you lunch.",
    "I saw a documentary about the ocean, it was stunning.",
    "The neighbours are renovating and the drilling never stops.",
    "I'm so proud of you, you've worked so hard for this.",
    "That's wonderful, tell me more when you have time.",
    "Same here, it's been a rollercoaster of a month.",
    "Thanks for listening, it really helps to talk.",
    "I laughed so hard at that, you always cheer me up.",
    "We should plan something together soon.",
    "I totally get it, take all the time you need.",
    "Wow, I had no idea. How are you feeling about it?",
    "Good luck, I'll be thinking of you!",
    "I'm exhausted but in a good way.",
    "Let's catch up properly next week, okay?",
    "It was good to hear from you, talk soon!",
    "I found an old photo of us from school, we looked so young.",
    "My phone died in the middle of the day, total chaos.",
    "Traffic this morning was unbelievable.",
    "I started a new podcast, it's about history.",
    "I'm thinking about redecorating the living room.",
    "The garden is finally blooming after all that rain.",
)
# small talk on the facts' topics: distractors that share their words
TOPICAL = (
    "I'd love a pet someday but my lease doesn't allow animals.",
    "I never get a real vacation, work always gets in the way.",
    "I keep saying I'll find a hobby, maybe next year.",
    "My job is fine, nothing new to report there.",
    "I could never run a race, I get tired climbing stairs.",
    "I'm a hopeless cook, I burn toast.",
    "I haven't read a book in months, I need to get back into it.",
    "Moving is the worst, I never want to pack boxes again.",
    "I want to volunteer more but I never find the time.",
    "My car is falling apart but I can't afford a new one.",
    "I tried learning a language once and gave up after a week.",
    "I can't paint to save my life, stick figures at best.",
    "My cousin just had a baby too, there's a baby boom in the family.",
    "I played the recorder at school, that's the extent of my music career.",
    "I hope you feel better soon, health comes first.",
    "We should take the kids out together some weekend.",
)


def _fill(template: str, x: str, v: str, o: str) -> str:
    return template.format(x=x, v=v, o=o)


def _date(d: dt.date) -> str:
    return f"{d.day} {d:%B %Y}"


def dialogs(conversations: int = 16, sessions: int = 16, episodes: int = 2,
            seed: int = 0) -> dict[str, Any]:
    """Conversations as ``{"conversations": [{"turns": [...], "questions": [...]}]}``.

    Each turn is ``{"id", "text", "session"}`` (ids within its conversation, in write
    order); each question ``{"question", "evidence", "kind", "conversation"}``.
    ``episodes`` fact episodes per session, each speaker's facts of one type told once.
    """
    rnd = random.Random(seed)
    out = []
    names = FIRST[:]
    rnd.shuffle(names)
    for c in range(conversations):
        a, b = names[2 * c % len(names)], names[(2 * c + 1) % len(names)]
        day = dt.date(2023, 1, 1) + dt.timedelta(days=rnd.randrange(300))
        turns: list[dict[str, Any]] = []
        questions: list[dict[str, Any]] = []
        told: set[tuple[str, int]] = set()
        plan = [(x, t) for x in (a, b) for t in range(len(FACTS))]
        rnd.shuffle(plan)
        for s in range(sessions):
            day += dt.timedelta(days=rnd.randint(3, 21))
            session = f"{c}-{s}"

            def say(speaker: str, text: str, _day: dt.date = day, _session: str = session,
                    _turns: list[dict[str, Any]] = turns) -> int:
                _turns.append({"id": len(_turns), "session": _session,
                               "text": f"[{_date(_day)}] {speaker}: {text}"})
                return len(_turns) - 1

            first = rnd.choice((a, b))
            say(first, rnd.choice(SMALL_TALK))
            say(b if first == a else a, rnd.choice(SMALL_TALK))
            for _ in range(episodes):
                if not plan:
                    break
                x, t = plan.pop()
                if (x, t) in told:
                    continue
                told.add((x, t))
                f = FACTS[t]
                o = b if x == a else a
                v = rnd.choice(f.values)
                kind = rnd.choice(("stated", "answer_next", "answer_later", "answer_before",
                                   "when"))
                slots = {"x": x, "v": v, "o": o}
                q = rnd.choice(f.question).format(**slots)
                if kind in ("stated", "when"):
                    evidence = say(x, rnd.choice(f.say).format(**slots))
                    if kind == "when":
                        q = f"When did {x} {f.event}?"
                    say(o, rnd.choice(SMALL_TALK[12:24]))
                elif kind in ("answer_next", "answer_later"):
                    say(o, rnd.choice(f.ask).format(**slots))
                    if kind == "answer_later":
                        say(x, rnd.choice(HESITATE))
                    evidence = say(x, rnd.choice(f.reply).format(**slots))
                else:
                    evidence = say(x, rnd.choice(f.mention).format(**slots))
                    say(o, rnd.choice(f.react).format(**slots))
                questions.append({"question": q, "evidence": evidence, "kind": kind,
                                  "conversation": c})
                for _ in range(rnd.randint(3, 8)):  # small talk between episodes
                    pool = TOPICAL if rnd.random() < 0.3 else SMALL_TALK
                    say(rnd.choice((a, b)), rnd.choice(pool))
        out.append({"speakers": [a, b], "turns": turns, "questions": questions})
    return {"source": f"scripted dialogs (tools/evaluation/dialogs.py, seed {seed})",
            "conversations": out}


def facts(people: int = 150, asked: int = 600, seed: int = 1) -> dict[str, Any]:
    """A bank of unrelated facts: ``{"memories": [{"id", "text"}], "questions": [...]}``.

    Every person has one fact of every kind, so a question must find the right kind
    among the person's facts (a name alone narrows it to ``len(FACTS)``); memories
    are in random order; ``asked`` of them get a question ``{"question", "evidence",
    "kind"}``.
    """
    rnd = random.Random(seed)
    names = [f"{f} {ln}" for f in FIRST for ln in LAST]
    rnd.shuffle(names)
    memories: list[dict[str, Any]] = []
    for person in names[:people]:
        for f in FACTS:
            v = rnd.choice(f.values)
            memories.append({"text": _fill(rnd.choice(f.fact), person, v, ""),
                             "question": _fill(rnd.choice(f.question), person, v, "")})
    rnd.shuffle(memories)
    questions: list[dict[str, Any]] = []
    for i, m in enumerate(memories):
        m["id"] = i
        question = m.pop("question")
        if i < asked:
            questions.append({"question": question, "evidence": i, "kind": "fact"})
    return {"source": f"scripted facts (tools/evaluation/dialogs.py, seed {seed})",
            "memories": memories, "questions": questions}
