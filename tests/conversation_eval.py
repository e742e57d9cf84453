"""The built-in conversation detector measured on the labelled set (tests/data/conversations.jsonl):
`python -m tests.conversation_eval` prints precision, recall and every miss (the README's figures)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.conversation import Detection, detect

DATA = Path(__file__).parent / "data" / "conversations.jsonl"


@dataclass(frozen=True)
class Scored:
    case: dict[str, Any]
    detection: Detection

    @property
    def correct(self) -> bool:
        return self.detection.detected == self.case["detected"]

    @property
    def prompt_ok(self) -> bool:
        prompt = (self.detection.image_prompt or "").lower()
        return all(word in prompt for word in self.case["words"])


def cases() -> list[dict[str, Any]]:
    return [json.loads(line) for line in DATA.read_text().splitlines() if line.strip()]


def score(held_out: bool | None = None) -> tuple[list[Scored], float, float]:
    """All cases, or only those written after the detector's rules were (`heldOut`), or only before."""
    chosen = [c for c in cases() if held_out is None or bool(c.get("heldOut")) == held_out]
    scored = [Scored(c, detect([(m["role"], m["content"]) for m in c["messages"]])) for c in chosen]
    true_pos = sum(s.detection.detected and s.case["detected"] for s in scored)
    predicted = sum(s.detection.detected for s in scored)
    actual = sum(s.case["detected"] for s in scored)
    return scored, true_pos / max(predicted, 1), true_pos / max(actual, 1)


def main() -> None:
    for name, held_out in (("all", None), ("written with the rules", False), ("held out", True)):
        scored, precision, recall = score(held_out)
        positives = [s for s in scored if s.case["detected"] and s.detection.detected]
        prompts = sum(s.prompt_ok for s in positives)
        print(
            f"{name}: {len(scored)} conversations, precision {precision:.2f}, recall {recall:.2f}; "
            f"prompts holding the expected words: {prompts}/{len(positives)}"
        )
    for s in score()[0]:
        if not s.correct or (s.detection.detected and s.case["detected"] and not s.prompt_ok):
            print(
                f"  expected {s.case['detected']}, got {s.detection}: {s.case['messages'][-1]['content']!r}"
            )


if __name__ == "__main__":
    main()
