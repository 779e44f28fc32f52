"""Builds tests/fixtures/conversation_eval.json: a recall evaluation from real Q&A text.

Source: the FAQ files Debian ships under /usr/share/doc (sed, valgrind, zlib, xz,
lsof, procps, man-db, ncurses, base-files, gnupg), written by those projects'
maintainers. Each FAQ is one *session*: a user asks, a maintainer answers, turn
after turn. The memories are the answer turns (every paragraph of every answer,
as an agent would have remembered them from those conversations); the questions
are the askers' questions, and each question's *evidence* is the first paragraph
of its answer. Questions are not stored as memories (a stored question would
trivially match itself).

Usage: python scripts/build_conversation_eval.py [--out PATH]
"""

from __future__ import annotations

import argparse
import gzip
import json
import re
from pathlib import Path

SOURCES = [
    "sed/sedfaq.txt.gz", "valgrind/FAQ.txt.gz", "zlib1g-dev/FAQ.gz", "xz-utils/faq.txt.gz",
    "lsof/00FAQ.gz", "procps/FAQ.gz", "man-db/FAQ", "ncurses-base/FAQ", "base-files/FAQ",
    "gnupg/FAQ",
]
DOC = Path("/usr/share/doc")
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "conversation_eval.json"
_NUMBER = re.compile(r"^\s*(?:Q:|(?:\d+\.)+\d*\.?|\d+\))\s*")
_ANSWER = re.compile(r"^\s*A:\s*")
MAX_TURN_CHARS = 1200
MIN_EVIDENCE_LETTERS = 25


def _read(path: Path) -> str:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    return path.read_bytes().decode("utf-8", errors="replace")


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n\s*\n", text.replace("\t", "    ")) if p.strip()]


def _question(par: str) -> str | None:
    """The question a paragraph asks, if it is a question heading."""
    lines = par.strip("\n").splitlines()
    first = lines[0]
    indent = len(first) - len(first.lstrip())
    flat = " ".join(line.strip() for line in lines)
    numbered = bool(_NUMBER.match(first))
    if not flat.endswith("?") or len(flat) > 300 or (indent > 2 and not numbered):
        return None
    q = _NUMBER.sub("", flat).strip()
    return q if len(q) >= 12 else None


def _turn(par: str) -> str:
    flat = " ".join(line.strip() for line in par.splitlines())
    return _ANSWER.sub("", re.sub(r"-{6,}|={6,}|~{6,}", "", flat)).strip()[:MAX_TURN_CHARS]


def build() -> dict:
    memories: list[dict] = []
    questions: list[dict] = []
    for source in SOURCES:
        path = DOC / source
        if not path.exists():
            continue
        session = source.split("/")[0]
        current: dict | None = None
        for par in _paragraphs(_read(path)):
            q = _question(par)
            if q is not None:
                current = {"question": q, "session": session, "evidence": None}
                questions.append(current)
                continue
            if current is None:
                continue
            text = _turn(par)
            if not text:
                continue
            memories.append({"id": len(memories), "text": text, "session": session})
            if current["evidence"] is None and \
                    sum(c.isalpha() for c in text) >= MIN_EVIDENCE_LETTERS:
                current["evidence"] = memories[-1]["id"]
    questions = [q for q in questions if q["evidence"] is not None]
    # drop exact duplicate questions (some FAQs repeat one in a table of contents)
    seen: set[str] = set()
    unique = []
    for q in questions:
        if q["question"].lower() not in seen:
            seen.add(q["question"].lower())
            unique.append(q)
    return {
        "source": "Debian /usr/share/doc FAQs: " + ", ".join(SOURCES),
        "memories": memories,
        "questions": unique,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    data = build()
    args.out.write_text(json.dumps(data, ensure_ascii=False, indent=0))
    sessions = sorted({m["session"] for m in data["memories"]})
    print(f"{len(data['memories'])} memories in {len(sessions)} sessions, "
          f"{len(data['questions'])} questions -> {args.out} "
          f"({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main()
