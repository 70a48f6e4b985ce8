"""Prompt uploads: parse JSON, JSONL or CSV, validate every record, store all or nothing.

Every error names where it is (`line`: the line of a JSONL/CSV file, or the 1-based position of
a record in a JSON body) and which field, so a person can fix the file in one pass.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.models import ComparisonPair, Project, Prompt, Response
from app.services import audit, inputs
from app.services.errors import FieldError, InvalidInput, UnsupportedMediaType
from app.services.projects import project_settings

ROLES = ("system", "user", "assistant")
MAX_TEXT_CHARS = 200_000
MAX_EXTERNAL_ID_CHARS = 200
MAX_MODEL_NAME_CHARS = 200  # responses.model_name is a VARCHAR(200)
MAX_RESPONSES = 16
RECORD_FIELDS = {"prompt", "messages", "external_id", "metadata", "responses"}
# Reported once; past this many, a file is clearly wrong in a systematic way.
MAX_REPORTED_ERRORS = 1000

JSONL_TYPES = {
    "application/jsonl",
    "application/x-jsonl",
    "application/x-ndjson",
    "application/ndjson",
    "application/json-lines",
}
CSV_TYPES = {"text/csv", "application/csv"}


@dataclass
class ResponseIn:
    text: str
    model: str | None = None


@dataclass
class PromptRecord:
    """One validated prompt, ready to store."""

    line: int
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    external_id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    responses: list[ResponseIn] = field(default_factory=list)


@dataclass
class UploadResult:
    created: int = 0
    duplicates: int = 0
    errors: int = 0
    responses_created: int = 0
    pairs_created: int = 0
    prompt_ids: list[int] = field(default_factory=list)

    def as_dict(self) -> dict[str, int]:
        return {
            "created": self.created,
            "duplicates": self.duplicates,
            "errors": self.errors,
            "responses_created": self.responses_created,
            "pairs_created": self.pairs_created,
        }


# --- validation of one record -------------------------------------------------------------


def _type_name(value: Any) -> str:
    return {
        dict: "object",
        list: "array",
        str: "string",
        bool: "boolean",
        type(None): "null",
        int: "number",
        float: "number",
    }.get(type(value), type(value).__name__)


def validate_record(data: Any, line: int, errors: list[FieldError]) -> PromptRecord | None:
    """Check one decoded record; append its problems to `errors` and return it if clean."""
    start = len(errors)

    def err(fieldname: str | None, message: str) -> None:
        errors.append(FieldError(line, fieldname, message))

    if not isinstance(data, dict):
        err(None, f"expected an object, got {_type_name(data)}")
        return None
    for key in sorted(set(data) - RECORD_FIELDS):
        err(key, f"unknown field (expected one of: {', '.join(sorted(RECORD_FIELDS))})")

    record = PromptRecord(line=line)
    has_prompt = data.get("prompt") is not None
    has_messages = data.get("messages") is not None
    if has_prompt and has_messages:
        err("prompt", "give either 'prompt' or 'messages', not both")
    elif not has_prompt and not has_messages:
        err("prompt", "missing: each record needs 'prompt' (text) or 'messages' (a chat)")
    elif has_prompt:
        record.text = _check_text(data["prompt"], "prompt", err)
    else:
        record.messages = _check_messages(data["messages"], err)

    external_id = data.get("external_id")
    if external_id is not None:
        if isinstance(external_id, bool) or not isinstance(external_id, str | int):
            err("external_id", f"must be a string or an integer, got {_type_name(external_id)}")
        else:
            external_id = str(external_id).strip()
            if not external_id:
                err("external_id", "must not be empty")
            elif (problem := inputs.string_problem(external_id)) is not None:
                err("external_id", problem)
            elif len(external_id) > MAX_EXTERNAL_ID_CHARS:
                err("external_id", f"longer than {MAX_EXTERNAL_ID_CHARS} characters")
            else:
                record.external_id = external_id

    metadata = data.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            err("metadata", f"must be an object, got {_type_name(metadata)}")
        elif (problem := inputs.value_problem(metadata)) is not None:
            err("metadata", problem)
        else:
            record.metadata = metadata

    responses = data.get("responses")
    if responses is not None:
        record.responses = _check_responses(responses, err)

    return record if len(errors) == start else None


def _check_text(value: Any, name: str, err: Any) -> str | None:
    if not isinstance(value, str):
        err(name, f"must be a string, got {_type_name(value)}")
        return None
    if not value.strip():
        err(name, "must not be empty")
        return None
    if len(value) > MAX_TEXT_CHARS:
        err(name, f"longer than {MAX_TEXT_CHARS} characters")
        return None
    if (problem := inputs.string_problem(value)) is not None:
        err(name, problem)
        return None
    return value


def _check_messages(value: Any, err: Any) -> list[dict[str, str]] | None:
    if not isinstance(value, list):
        err("messages", f"must be an array of messages, got {_type_name(value)}")
        return None
    if not value:
        err("messages", "must not be empty")
        return None
    messages: list[dict[str, str]] = []
    ok = True
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            err(where, f"must be an object with 'role' and 'content', got {_type_name(message)}")
            ok = False
            continue
        extra = set(message) - {"role", "content"}
        if extra:
            err(where, f"unknown keys: {', '.join(sorted(extra))}")
            ok = False
        role = message.get("role")
        if role not in ROLES:
            err(f"{where}.role", f"unknown role {role!r} (expected system, user or assistant)")
            ok = False
        content = _check_text(message.get("content"), f"{where}.content", err)
        if content is None:
            ok = False
        elif role in ROLES:
            messages.append({"role": role, "content": content})
    if ok and messages[-1]["role"] != "user":
        err("messages", "the last message must be from the user (responses answer it)")
        ok = False
    return messages if ok else None


def _check_responses(value: Any, err: Any) -> list[ResponseIn]:
    if not isinstance(value, list):
        err("responses", f"must be an array, got {_type_name(value)}")
        return []
    if len(value) > MAX_RESPONSES:
        err("responses", f"at most {MAX_RESPONSES} responses per prompt")
        return []
    out: list[ResponseIn] = []
    for i, item in enumerate(value):
        where = f"responses[{i}]"
        if isinstance(item, str):
            item = {"text": item}
        if not isinstance(item, dict):
            err(where, f"must be an object with 'text', got {_type_name(item)}")
            continue
        extra = set(item) - {"text", "model"}
        if extra:
            err(where, f"unknown keys: {', '.join(sorted(extra))}")
            continue
        text = _check_text(item.get("text"), f"{where}.text", err)
        model = item.get("model")
        if model is not None and not isinstance(model, str):
            err(f"{where}.model", f"must be a string, got {_type_name(model)}")
            continue
        if model is not None and (problem := inputs.string_problem(model)) is not None:
            err(f"{where}.model", problem)
            continue
        if model is not None and len(model) > MAX_MODEL_NAME_CHARS:
            err(f"{where}.model", f"longer than {MAX_MODEL_NAME_CHARS} characters")
            continue
        if text is not None:
            out.append(ResponseIn(text=text, model=model or None))
    return out


def _check_duplicates_in_batch(records: list[PromptRecord], errors: list[FieldError]) -> None:
    first_line: dict[str, int] = {}
    for record in records:
        if record.external_id is None:
            continue
        if record.external_id in first_line:
            errors.append(
                FieldError(
                    record.line,
                    "external_id",
                    f"duplicate external_id {record.external_id!r} (first on line "
                    f"{first_line[record.external_id]})",
                )
            )
        else:
            first_line[record.external_id] = record.line


# --- parsing ------------------------------------------------------------------------------


def _limit_records(count: int, max_records: int) -> None:
    if count > max_records:
        raise InvalidInput(
            f"too many records: the limit is {max_records} per upload",
            [FieldError(None, None, f"more than {max_records} records; split the file")],
        )


def _finish(records: list[PromptRecord], errors: list[FieldError], what: str) -> list[PromptRecord]:
    _check_duplicates_in_batch(records, errors)
    if errors:
        errors.sort(key=lambda e: e.line or 0)
        shown = errors[:MAX_REPORTED_ERRORS]
        raise InvalidInput(f"{len(errors)} error(s) in {what}; nothing was stored", shown)
    if not records:
        raise InvalidInput(f"{what} has no records", [FieldError(None, None, "no records found")])
    return records


def parse_json_records(data: Any, max_records: int) -> list[PromptRecord]:
    """Validate the `prompts` array of a JSON body; `line` is the record's 1-based position."""
    if not isinstance(data, list):
        raise InvalidInput(
            "'prompts' must be an array",
            [FieldError(None, "prompts", f"expected an array, got {_type_name(data)}")],
        )
    _limit_records(len(data), max_records)
    errors: list[FieldError] = []
    records = [r for i, item in enumerate(data, 1) if (r := validate_record(item, i, errors))]
    return _finish(records, errors, "the request")


def byte_lines(raw: bytes, *, final_empty: bool = True) -> Iterator[bytes]:
    """The lines of `raw` without their line ends, one at a time (never a list of them all);
    with `final_empty`, as `bytes.split` gives them: with the empty line after a last line end."""
    with io.BytesIO(raw) as f:  # shares `raw`'s buffer: no copy
        for chunk in f:
            yield chunk.removesuffix(b"\n")
    if final_empty and (raw.endswith(b"\n") or not raw):
        yield b""


def _decoded_lines(
    lines: Iterable[bytes], errors: list[FieldError], *, replace_bad: bool = False
) -> Iterator[tuple[int, str]]:
    """Decode each line as UTF-8 as it is read, reporting bad bytes by line and column (into
    `errors`); such a line is skipped, or with `replace_bad` given with U+FFFD for the bad bytes
    (so that a CSV reader's line count stays right). Streams: memory stays one line."""
    for number, chunk in enumerate(lines, 1):
        if number == 1 and chunk.startswith(b"\xef\xbb\xbf"):
            chunk = chunk[3:]
        try:
            yield number, chunk.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError as exc:
            errors.append(
                FieldError(
                    number,
                    None,
                    f"not valid UTF-8: byte 0x{chunk[exc.start]:02x} at column {exc.start + 1}",
                )
            )
            if replace_bad:
                yield number, chunk.decode("utf-8", "replace").rstrip("\r")


Progress = Callable[[int, int], None]


def parse_jsonl(
    raw: bytes, max_records: int, progress: Progress | None = None
) -> list[PromptRecord]:
    errors: list[FieldError] = []
    records: list[PromptRecord] = []
    count = 0
    total_lines = raw.count(b"\n") + 1
    for number, text in _decoded_lines(byte_lines(raw), errors):
        if progress is not None and number % 1000 == 0:
            progress(number, total_lines)
        if not text.strip():
            continue
        count += 1
        _limit_records(count, max_records)
        try:
            data = inputs.loads(text)
        except json.JSONDecodeError as exc:
            errors.append(
                FieldError(number, None, f"malformed JSON: {exc.msg} at column {exc.colno}")
            )
            continue
        except inputs.NestedTooDeep as exc:
            errors.append(FieldError(number, None, str(exc)))
            continue
        if (record := validate_record(data, number, errors)) is not None:
            records.append(record)
    return _finish(records, errors, "the file")


CSV_JSON_COLUMNS = {"messages", "metadata", "responses"}


def parse_csv(raw: bytes, max_records: int, progress: Progress | None = None) -> list[PromptRecord]:
    """CSV with a header row: `prompt` or `messages` (JSON), and optional `external_id`,
    `metadata` (JSON object), `responses` (JSON array) or `response_1`, `model_1`, ... columns."""
    errors: list[FieldError] = []
    total_lines = raw.count(b"\n") + 1
    # Lines are decoded as the reader asks for them; a bad byte is reported with its line, and
    # the rest of the file is still checked (every error at once).
    lines = _decoded_lines(byte_lines(raw, final_empty=False), errors, replace_bad=True)
    reader = csv.reader(line + "\n" for _, line in lines)
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidInput(
            "the file has no records", [FieldError(None, None, "empty file")]
        ) from None
    except csv.Error as exc:
        raise InvalidInput("malformed CSV", [FieldError(1, None, str(exc))]) from None
    header = [h.strip() for h in header]
    response_cols = {h for h in header if h.startswith(("response_", "model_"))}
    unknown = set(header) - RECORD_FIELDS - response_cols
    for name in sorted(unknown):
        errors.append(FieldError(1, name, "unknown column"))
    if not {"prompt", "messages"} & set(header):
        errors.append(FieldError(1, "prompt", "the header needs a 'prompt' or 'messages' column"))
    if errors:
        _finish([], errors, "the file")

    records: list[PromptRecord] = []
    count = 0
    while True:
        line = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            errors.append(FieldError(line, None, f"malformed CSV: {exc}"))
            break
        if progress is not None and line % 1000 == 0:
            progress(line, total_lines)
        if not any(cell.strip() for cell in row):
            continue
        count += 1
        _limit_records(count, max_records)
        if len(row) != len(header):
            errors.append(
                FieldError(line, None, f"expected {len(header)} columns, found {len(row)}")
            )
            continue
        data = _csv_row_to_record(dict(zip(header, row, strict=True)), line, errors)
        if data is not None and (record := validate_record(data, line, errors)) is not None:
            records.append(record)
    return _finish(records, errors, "the file")


def _csv_row_to_record(
    row: dict[str, str], line: int, errors: list[FieldError]
) -> dict[str, Any] | None:
    data: dict[str, Any] = {}
    ok = True
    numbered: dict[int, dict[str, str]] = {}
    for key, cell in row.items():
        if cell == "":
            continue
        if key in CSV_JSON_COLUMNS:
            try:
                data[key] = inputs.loads(cell)
            except json.JSONDecodeError as exc:
                errors.append(FieldError(line, key, f"malformed JSON in cell: {exc.msg}"))
                ok = False
            except inputs.NestedTooDeep as exc:
                errors.append(FieldError(line, key, str(exc)))
                ok = False
        elif key.startswith(("response_", "model_")):
            kind, _, index = key.partition("_")
            if not index.isdigit():
                errors.append(FieldError(line, key, "expected response_<n> or model_<n>"))
                ok = False
                continue
            numbered.setdefault(int(index), {})["text" if kind == "response" else "model"] = cell
        else:
            data[key] = cell
    if numbered:
        if "responses" in data:
            errors.append(
                FieldError(line, "responses", "use 'responses' or response_<n>, not both")
            )
            return None
        data["responses"] = [numbered[i] for i in sorted(numbered)]
    return data if ok else None


def parse_upload(
    raw: bytes,
    filename: str | None,
    content_type: str | None,
    max_records: int,
    progress: Progress | None = None,
) -> list[PromptRecord]:
    """Parse an uploaded file as JSONL or CSV, chosen by its extension or content type."""
    kind = upload_kind(filename, content_type)
    if kind == "jsonl":
        return parse_jsonl(raw, max_records, progress)
    return parse_csv(raw, max_records, progress)


def upload_kind(filename: str | None, content_type: str | None) -> str:
    name = (filename or "").lower()
    ctype = (content_type or "").split(";")[0].strip().lower()
    if name.endswith((".jsonl", ".ndjson")) or ctype in JSONL_TYPES:
        return "jsonl"
    if name.endswith(".csv") or ctype in CSV_TYPES:
        return "csv"
    raise UnsupportedMediaType(
        f"unsupported file type ({filename or 'no name'}, {content_type or 'no content type'}):"
        " upload JSONL (.jsonl) or CSV (.csv)"
    )


# --- storing ------------------------------------------------------------------------------


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


def store_prompts(
    session: Session,
    project: Project,
    records: Iterable[PromptRecord],
    *,
    source: str,
    actor_id: int | None = None,
) -> UploadResult:
    """Add validated prompts (and their responses and pairs), all or nothing.

    A record whose `external_id` already exists in the project counts as a duplicate and is
    skipped, so re-sending a file is harmless. If a concurrent upload inserts the same
    external_id first, the insert is retried once (in a savepoint) and then sees it as a
    duplicate.
    """
    records = list(records)
    for attempt in range(2):
        try:
            with session.begin_nested():
                return _store_once(session, project, records, source, actor_id)
        except IntegrityError:
            if attempt == 1:
                raise
    raise AssertionError("unreachable")


def _store_once(
    session: Session,
    project: Project,
    records: list[PromptRecord],
    source: str,
    actor_id: int | None,
) -> UploadResult:
    result = UploadResult()
    overlap = project_settings(project).overlap
    ids = [r.external_id for r in records if r.external_id is not None]
    existing: set[str] = set()
    for chunk in _chunks(ids):
        existing.update(
            session.scalars(
                select(Prompt.external_id).where(
                    Prompt.project_id == project.id, Prompt.external_id.in_(chunk)
                )
            )
        )
    fresh = [r for r in records if r.external_id is None or r.external_id not in existing]
    result.duplicates = len(records) - len(fresh)

    prompts = [
        Prompt(
            project_id=project.id,
            external_id=r.external_id,
            text=r.text,
            messages=r.messages,
            meta=r.metadata,
            source=source,
        )
        for r in fresh
    ]
    session.add_all(prompts)
    session.flush()
    responses_by_prompt: list[list[Response]] = []
    for prompt, record in zip(prompts, fresh, strict=True):
        rows = [
            Response(
                prompt_id=prompt.id,
                text=r.text,
                model_name=r.model,
                generation_params={"source": "upload"},
            )
            for r in record.responses
        ]
        responses_by_prompt.append(rows)
        session.add_all(rows)
    session.flush()
    for prompt, rows in zip(prompts, responses_by_prompt, strict=True):
        for a, b in itertools.combinations(rows, 2):
            session.add(
                ComparisonPair(
                    project_id=project.id,
                    prompt_id=prompt.id,
                    response_a_id=a.id,
                    response_b_id=b.id,
                    required_judgments=overlap,
                )
            )
            result.pairs_created += 1
        result.responses_created += len(rows)
    result.created = len(prompts)
    result.prompt_ids = [p.id for p in prompts]
    audit.record(
        session,
        "prompts.upload",
        actor_id=actor_id,
        project_id=project.id,
        source=source,
        counts=result.as_dict(),
    )
    return result


def list_prompts(
    session: Session, project: Project, offset: int, limit: int
) -> tuple[list[Prompt], int]:
    total = session.scalar(select(func.count()).where(Prompt.project_id == project.id)) or 0
    rows = session.scalars(
        select(Prompt)
        .where(Prompt.project_id == project.id)
        .order_by(Prompt.id)
        .offset(offset)
        .limit(limit)
    )
    return list(rows), total


def prompt_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A prompt as chat messages (a plain-text prompt is one user turn)."""
    if prompt.messages:
        return list(prompt.messages)
    return [{"role": "user", "content": prompt.text or ""}]
