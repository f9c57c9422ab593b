"""Small data folders in DSS's layout, written by the tests (real completions, few rows)."""
from __future__ import annotations

import json
from pathlib import Path

# Real teacher completions (PaLM-540B, from the DSS release), including ones that do not parse.
CQA_OK = ("The answer must be something that has to do with the above problem. Of the above choices, only math "
          "problem has to do with the above problem. So the answer is (d) math problem.\n\nQ: \"The man was so "
          "hungry he could eat a horse.\"  What is this an example of?\nAnswer Choices:\n(a) horse\n(b) hunger\n")
CQA_NO_CHOICE = ("The answer must be something that holds shirts. Of the above choices, only suitcase, garment bag, "
                 "drawer, and dresser hold shirts. So the answer is one of these four.\n\nQ: What is the name of "
                 "the place where you can buy a new car?\nAnswer Choices:\n(a) car dealership\n(b) car lot\n")
SVAMP_OK = ("Luke scored 84 points after 2 rounds. So he scored 84 points in 2 rounds. 84 / 2 = 42. The answer is "
            "(84 / 2).\n\nQ: There are 120 students in the school. 1/3 of them are boys. How many students are "
            "boys?\nA: There are 120 students. 1/3 of them are boys. 1/3 of 120 is 120 / 3 = 40. The answer is (120 /")
SVAMP_UNCLOSED = ("Lewis earns 491 dollars every week. He has to pay 216 dollars every week. So he has 491 - 216 = "
                  "275 dollars left every week. So he has 1181 * 275 = 322,775 dollars left. The answer is ((491 - 21")
SVAMP_NO_ANSWER = ("John needs 11 nails in all. Each plank needs 3 nails. So 11 / 3 = "
                   "3.3333333333333333333333333333333333333333333333333333333333")
ESNLI_OK = ("The to go packages are not necessarily from lunch.\nAnswer: neutral\n\nPremise: Two women are embracing "
            "while holding to go packages.\nHypothesis: Two woman are holding packages.\nReasonings: Saying the two")
ESNLI_NO_ANSWER = ("The men are standing on steps leading out of a body of water. The boat is docked in the lake. "
                   "The men are standing by a docked boat.\n")
ESNLI_CUT = ("The woman is posing for the photographer, which is what people do at weddings.\n"
             "Answer: entailment\n\nPre")
ANLI_OK = ("Linguistics involves an analysis of language form, language meaning, and language in context, so context "
           "is also a crucial aspect. So the answer is contradiction.\n\nPremise: Franco Zeffirelli, KBE Grande "
           "Ufficiale OMRI (] ; born 12 February 1923) is an Italian director")
ANLI_LOWERCASE = ("Shameless was born in 1995, so the answer is contradiction.\n\nPremise: The 2016–17 season was "
                  "Manchester United's 25th season in the Premier League")


def cqa_row(i: int, answer_index: int = 3) -> dict:
    choices = [f"choice {i}{c}" for c in "abcde"]
    return {"id": f"q{i}", "question": f"Question number {i}?", "choices": choices,
            "answer": choices[answer_index], "abstractive_explanation": "", "extractive_explanation": ""}


def cqa_completion(i: int, choice: int = 3) -> str:
    return (f"Reasoning about question {i}. So the answer is ({'abcde'[choice]}) choice {i}{'abcde'[choice]}."
            f"\n\nQ: another question")


def write_split(root: Path, name: str, split: str, rows: list, completions: list[str], chunk: int = 3) -> None:
    """``rows``: dicts (one JSON line each) or raw strings (written as they are)."""
    folder = root / name
    (folder / "llm").mkdir(parents=True, exist_ok=True)
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / f"{name}_{split}.json").write_text("".join(line + "\n" for line in lines))
    for i in range(0, max(len(completions), 1), chunk):
        (folder / "llm" / f"{split}_CoT_{i // chunk}.json").write_text(json.dumps(completions[i:i + chunk]))


def write_cqa(root: Path, n_train: int = 20, n_test: int = 6) -> Path:
    """cqa with ``n_train`` training rows whose teacher is right except for row 1 (a different
    choice) and row 2 (a completion that does not parse), and a fully right test split."""
    train_completions = [cqa_completion(i) for i in range(n_train)]
    train_completions[1] = cqa_completion(1, choice=0)
    train_completions[2] = CQA_NO_CHOICE
    write_split(root, "cqa", "train", [cqa_row(i) for i in range(n_train)], train_completions)
    write_split(root, "cqa", "test", [cqa_row(100 + i) for i in range(n_test)],
                [cqa_completion(100 + i) for i in range(n_test)])
    return root
