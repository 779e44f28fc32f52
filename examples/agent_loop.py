"""A scripted agent loop (no LLM) that keeps what it learns in ApCM across runs.

Run it twice against the same server (restart the server in between if you like:
acknowledged memories survive). The first run has an empty memory, "learns" facts
from its conversation and remembers them; the second run answers the same user's
questions from memory.

    python examples/agent_loop.py --target localhost:50051 --user alice

Needs a server with a text model (``make serve`` serves one).
"""

from __future__ import annotations

import argparse

from apcm.client import MemoryClient

BANK = "agent-example"
CONVERSATION = [  # what the user tells the agent in the first run
    "My name is Alice and I work as a marine biologist in Lisbon.",
    "I am allergic to peanuts, so please never suggest recipes with them.",
    "My daughter Maya turns seven on the 3rd of June.",
    "I prefer trains to planes when I travel in Europe.",
]
QUESTIONS = [  # what the agent needs to know in a later run
    "What food allergy does the user have?",
    "When is the birthday of the user's daughter?",
    "How does the user like to travel?",
    "Where does the user work?",
]


def run(target: str, user: str) -> int:
    with MemoryClient(target) as mem:
        mem.create_bank(BANK, capacity=1000, exist_ok=True)
        known = mem.recall(QUESTIONS, bank=BANK, top_k=1, filter={"user": user})
        if not any(known):
            print(f"run 1: nothing remembered about {user}; learning from the conversation")
            keys = [f"{user}-fact-{i}" for i in range(len(CONVERSATION))]
            mem.remember(CONVERSATION, bank=BANK, keys=keys,
                         metadata={"user": user, "kind": "fact"})
            print(f"remembered {len(CONVERSATION)} facts")
            return 0
        print(f"run 2: answering from memory about {user}")
        for question, hits in zip(QUESTIONS, known, strict=True):
            print(f"Q: {question}\nA: {hits[0].text}  (score {hits[0].score:.2f})")
        return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="localhost:50051", help="ApCM server HOST:PORT")
    parser.add_argument("--user", default="alice", help="whose memories to use")
    args = parser.parse_args()
    return run(args.target, args.user)


if __name__ == "__main__":
    raise SystemExit(main())
