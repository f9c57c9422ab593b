"""Prompt templates: a file (YAML or JSON) of instructions, a question with ``{field}`` slots filled
from each row of the data, few-shot exemplars, and stop sequences. One file serves both APIs:

    chat:        [system: instructions] + (user: question(shot), assistant: answer(shot))* + user: question(row)
    completion:  instructions + blank line + (question(shot) + " " + answer(shot) + blank line)* + question(row)

The four benchmarks' few-shot sets and one zero-shot template per task kind ship in prompts/. A
template never sees the gold label: ``{label}`` and the teacher's own fields are refused.
"""
from __future__ import annotations

import hashlib
import json
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cotmi_ds.data import TASK_KINDS
from cotmi_ds.errors import UsageError, not_utf8

PROMPT_DIR = Path(__file__).resolve().parent / "prompts"
KEYS = ("description", "task", "instructions", "question", "shots", "stop")
HIDDEN = ("label", "llm_label", "rationale")  # what the teacher must work out, not read
ANSWER = "answer"  # a shot's completion


def shipped_names() -> list[str]:
    return sorted(p.stem for p in PROMPT_DIR.glob("*.yaml"))


@dataclass(frozen=True)
class Template:
    where: str                  # the file (or shipped name) that errors name
    text: str                   # the file's text (hashed into the manifest)
    task: str | None
    instructions: str
    question: str
    shots: tuple[dict[str, Any], ...]
    stop: tuple[str, ...]

    @property
    def fields(self) -> tuple[str, ...]:
        return slots(self.question, self.where)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    def check_fields(self, available: set[str], data: str) -> None:
        """Every slot of the question is a field of the data (``{choices}`` needs a ``choices`` list)."""
        for name in self.fields:
            if name not in available:
                raise UsageError(f"{self.where}: field {{{name}}} in `question` is not a field of {data} "
                                 f"(its fields: {', '.join(sorted(available))})")

    def render(self, row: dict[str, Any], api: str, where: str) -> list[dict[str, str]] | str:
        """The request's messages (chat) or prompt (completion) for one row."""
        asked = fill(self.question, row, where)
        if api == "chat":
            messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
            for shot in self.shots:
                messages += [{"role": "user", "content": fill(self.question, shot, self.where)},
                             {"role": "assistant", "content": shot[ANSWER]}]
            return messages + [{"role": "user", "content": asked}]
        parts = [self.instructions] if self.instructions else []
        parts += [fill(self.question, shot, self.where) + " " + shot[ANSWER] for shot in self.shots]
        return "\n\n".join(parts + [asked])


def slots(text: str, where: str) -> tuple[str, ...]:
    """The ``{name}`` slots of a format string (``{{`` is a literal brace); only plain names."""
    names = []
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as e:
        raise UsageError(f"{where}: `question` is not a valid template ({e}); write a literal brace as {{{{ or }}}}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise UsageError(f"{where}: `question` slot {{{name}{'!' + conversion if conversion else ''}"
                             f"{':' + spec if spec else ''}}} must be a plain field name such as {{input}}")
        if name in HIDDEN:
            raise UsageError(f"{where}: field {{{name}}} in `question` would show the teacher what it must answer")
        if name not in names:
            names.append(name)
    return tuple(names)


def fill(question: str, row: dict[str, Any], where: str) -> str:
    values = {}
    for name in slots(question, where):
        value = row.get(name)
        if value is None:
            raise UsageError(f"{where}: no value for field {name!r}, which the template's `question` uses")
        if not isinstance(value, (str, int, float)):
            raise UsageError(f"{where}: field {name!r} is a {type(value).__name__}, not text: a template slot takes "
                             "text ({input} shows a row's choices as the student reads them)")
        values[name] = str(value)
    return question.format_map(values)


def load_template(spec: str) -> Template:
    """A shipped template by name, or a template file."""
    path = Path(spec)
    if not path.is_file():
        shipped = PROMPT_DIR / f"{spec}.yaml"
        if not shipped.is_file():
            raise UsageError(f"--template {spec}: no such file, and not a shipped template ({', '.join(shipped_names())})")
        path = shipped
    where = spec if path.parent == PROMPT_DIR else str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{where}: {not_utf8(e)}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise UsageError(f"{where}" + (f":{mark.line + 1}" if mark else "") + f": not valid YAML/JSON "
                         f"({getattr(e, 'problem', None) or e})") from None
    return _template(doc, text, where)


def _template(doc: Any, text: str, where: str) -> Template:
    if not isinstance(doc, dict):
        raise UsageError(f"{where}: expected a mapping with keys {', '.join(KEYS)}")
    for key in doc:
        if key not in KEYS:
            raise UsageError(f"{where}: unknown key {key!r} (keys: {', '.join(KEYS)})")
    question = doc.get("question")
    if not isinstance(question, str) or not question.strip():
        raise UsageError(f"{where}: `question` is required: the text asked for each row, e.g. \"Q: {{input}}\\nA:\"")
    fields = slots(question, where)
    if not fields:
        raise UsageError(f"{where}: `question` has no {{field}} slot, so every row would ask the same thing")
    for key in ("instructions", "description"):
        if not isinstance(doc.get(key) or "", str):
            raise UsageError(f"{where}: `{key}` must be text")
    task = doc.get("task")
    if task is not None and task not in TASK_KINDS:
        raise UsageError(f"{where}: `task` {task!r}: not one of {', '.join(TASK_KINDS)}")
    shots = doc.get("shots") or []
    if not isinstance(shots, list):
        raise UsageError(f"{where}: `shots` must be a list of exemplars")
    for i, shot in enumerate(shots, 1):
        if not isinstance(shot, dict) or not isinstance(shot.get(ANSWER), str):
            raise UsageError(f"{where}: shot {i} needs `{ANSWER}` (the completion to imitate) and the question's fields")
        missing = [name for name in fields if shot.get(name) is None]
        if missing:
            raise UsageError(f"{where}: shot {i} has no value for field {missing[0]!r}, which `question` uses")
    stop = doc.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)) or len(stop) > 4:
        raise UsageError(f"{where}: `stop` must be up to 4 non-empty strings")
    return Template(where, text, task, (doc.get("instructions") or "").strip(), question, tuple(shots), tuple(stop))


def settings_sha256(settings: dict[str, Any]) -> str:
    """The hash of everything that decides a completion besides the row (canonical JSON)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, ensure_ascii=False).encode()).hexdigest()
