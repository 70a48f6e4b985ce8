"""Import public preference data: HH-RLHF transcripts and TRL's preference format.

Each record becomes a prompt (shared by records with the same conversation), two responses, a
comparison pair that is already complete (raters never see it) and one judgment attributed to
the `source` (no rater), so reward runs can use it and rater-quality statistics never count it.

Validation is all or nothing, with line numbers, as for prompt uploads. Two things real data sets
contain are not errors but are skipped and reported: a record whose chosen and rejected answers are
identical, and one with an empty answer (HH-RLHF's test split has four).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.models import ComparisonPair, Judgment, Project, Prompt, Response
from app.services import audit, inputs
from app.services.errors import FieldError, InvalidInput, PayloadTooLarge
from app.services.prompts import MAX_REPORTED_ERRORS, ROLES, _decoded_lines, byte_lines

Format = Literal["auto", "hh-rlhf", "trl"]
FORMATS = ("auto", "hh-rlhf", "trl")
SOURCE_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,40}$")
TURN_RE = re.compile(r"\n\n(Human|Assistant): ")
ASSISTANT_MARK = "\n\nAssistant: "
HH_ROLES = {"Human": "user", "Assistant": "assistant"}
# Decompressed gzip may be at most this many times the upload limit (a zip bomb stops here).
GZIP_EXPANSION_LIMIT = 8


@dataclass
class PreferenceRecord:
    line: int
    prompt: list[dict[str, str]]
    chosen: str
    rejected: str

    def prompt_key(self) -> str:
        canonical = json.dumps(self.prompt, sort_keys=True, ensure_ascii=False)
        return "import:" + hashlib.sha256(canonical.encode()).hexdigest()[:32]


@dataclass
class ImportResult:
    created: int = 0
    duplicates: int = 0
    errors: int = 0
    prompts_created: int = 0
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "duplicates": self.duplicates,
            "errors": self.errors,
            "prompts_created": self.prompts_created,
            "skipped": self.skipped,
        }


class _Skip(Exception):
    """A record that is well formed but carries no preference to learn from."""


# --- parsing --------------------------------------------------------------------------------


def file_lines(raw: bytes, limit: int) -> Iterator[bytes]:
    """The file's lines, decompressed as they are read when it is gzip (recognised by its magic
    bytes): memory holds one line, not the decompressed file. A line longer than `limit` (the
    upload limit) or a file that decompresses to more than `GZIP_EXPANSION_LIMIT` times it is
    refused, so a compressed bomb costs neither memory nor unbounded time."""
    if not raw.startswith(b"\x1f\x8b"):
        yield from byte_lines(raw)
        return
    cap = limit * GZIP_EXPANSION_LIMIT
    total = 0
    with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
        while True:
            try:
                chunk = f.readline(limit + 1)
            except (OSError, EOFError) as exc:
                raise InvalidInput(
                    "the file is not valid gzip", [FieldError(None, None, str(exc))]
                ) from exc
            total += len(chunk)
            if total > cap:
                raise PayloadTooLarge(f"the decompressed file is larger than {cap} bytes")
            if len(chunk) > limit:
                raise PayloadTooLarge(
                    f"a line of the decompressed file is longer than {limit} bytes"
                )
            if not chunk.endswith(b"\n"):
                yield chunk  # the last line (empty when the file ends with a line end)
                return
            yield chunk[:-1]


def parse_hh_transcript(text: str) -> list[dict[str, str]]:
    """'\\n\\nHuman: …\\n\\nAssistant: …' → chat messages. Raises ValueError if not a transcript."""
    if not text.startswith("\n\nHuman: "):
        raise ValueError("a transcript must start with '\\n\\nHuman: '")
    parts = TURN_RE.split(text)
    return [{"role": HH_ROLES[parts[i]], "content": parts[i + 1]} for i in range(1, len(parts), 2)]


def split_hh_pair(chosen: str, rejected: str) -> tuple[list[dict[str, str]], str, str]:
    """The shared conversation (up to the last assistant marker they share) and both answers.

    Cutting at the longest common prefix, not at parsed turns, keeps answers intact when a
    transcript contains a turn marker without the usual blank line inside an answer.
    """
    common = 0
    for x, y in zip(chosen, rejected, strict=False):
        if x != y:
            break
        common += 1
    if chosen == rejected:
        raise _Skip("chosen and rejected are identical")
    cut = chosen.rfind(ASSISTANT_MARK, 0, common)
    if cut < 0:
        raise ValueError("chosen and rejected do not continue one conversation")
    head = chosen[:cut]
    prompt = parse_hh_transcript(head)
    if not prompt or prompt[-1]["role"] != "user":
        raise ValueError("the conversation before the answers must end with a Human turn")
    start = cut + len(ASSISTANT_MARK)
    return prompt, chosen[start:], rejected[start:]


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: expected a non-empty list of messages")
    out = []
    for i, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or m.get("role") not in ROLES
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(f"{where}[{i}]: expected {{'role': system|user|assistant, 'content'}}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _answer(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    messages = _messages(value, where)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise ValueError(f"{where}: with an explicit prompt, expected one assistant message")
    return messages[0]["content"]


# Fields a `trl` record may carry besides its comparison: those Verdict's own `trl` export writes
# (app/services/exports.py). They are read past, not stored: the import keeps the comparison.
TRL_EXPORT_FIELDS = frozenset({"id", "snapshot", "margin", "label"})


def record_from_json(data: Any, line: int, fmt: Format) -> PreferenceRecord:
    """One decoded JSON object → a preference record. ValueError names what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("expected an object with 'chosen' and 'rejected'")
    extra = set(data) - {"prompt", "chosen", "rejected"}
    if fmt == "trl":
        extra -= TRL_EXPORT_FIELDS
    if extra and fmt != "auto":
        raise ValueError(f"unknown fields: {', '.join(sorted(extra))}")
    for key in ("chosen", "rejected"):
        if key not in data:
            raise KeyError(key)
    chosen, rejected, prompt = data["chosen"], data["rejected"], data.get("prompt")
    if prompt is not None:
        if fmt == "hh-rlhf":
            raise ValueError("HH-RLHF records have no 'prompt' field (use format trl)")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else None
        messages = messages or _messages(prompt, "prompt")
        if messages[-1]["role"] != "user" or not any(m["content"].strip() for m in messages):
            raise ValueError("prompt: the last message must be a non-empty user turn")
        return PreferenceRecord(
            line, messages, _answer(chosen, "chosen"), _answer(rejected, "rejected")
        )
    if isinstance(chosen, str) and isinstance(rejected, str):
        if not (chosen.startswith("\n\nHuman: ") and rejected.startswith("\n\nHuman: ")):
            raise ValueError(
                "without 'prompt', chosen and rejected must be transcripts that start with"
                " '\\n\\nHuman: '"
            )
        messages, a, b = split_hh_pair(chosen, rejected)
        return PreferenceRecord(line, messages, a, b)
    if fmt == "hh-rlhf":
        raise ValueError("HH-RLHF 'chosen' and 'rejected' must be transcript strings")
    # TRL conversational with an implicit prompt: the shared leading turns.
    c, r = _messages(chosen, "chosen"), _messages(rejected, "rejected")
    shared = 0
    while shared < min(len(c), len(r)) - 1 and c[shared] == r[shared]:
        shared += 1
    if (
        c[:shared] != r[:shared]
        or shared == 0
        or c[shared:][0]["role"] != "assistant"
        or len(c) != shared + 1
        or len(r) != shared + 1
    ):
        raise ValueError(
            "conversational chosen/rejected must share all turns but a final assistant one"
        )
    return PreferenceRecord(line, c[:shared], c[shared]["content"], r[shared]["content"])


def parse_preferences(
    raw: bytes, fmt: Format, max_records: int, max_bytes: int
) -> tuple[list[PreferenceRecord], list[dict[str, Any]]]:
    """Parse JSONL (optionally gzip) → (records, skipped). All errors at once, or InvalidInput."""
    if fmt not in FORMATS:
        raise InvalidInput(
            f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}",
            [FieldError(None, "format", "unknown")],
        )
    errors: list[FieldError] = []  # filled by the line decoder as well
    lines = _decoded_lines(file_lines(raw, max_bytes), errors)
    records: list[PreferenceRecord] = []
    skipped: list[dict[str, Any]] = []
    count = 0
    for number, text in lines:
        if not text.strip():
            continue
        count += 1
        if count > max_records:
            raise InvalidInput(
                f"too many records: the limit is {max_records} per upload",
                [FieldError(None, None, f"more than {max_records} records")],
            )
        try:
            data = inputs.loads(text)
            record = record_from_json(data, number, fmt)
            _check_strings(record)
            if not record.chosen.strip() or not record.rejected.strip():
                raise _Skip("an answer is empty")
            if record.chosen == record.rejected:
                raise _Skip("chosen and rejected are identical")
            records.append(record)
        except json.JSONDecodeError as exc:
            errors.append(
                FieldError(number, None, f"malformed JSON: {exc.msg} at column {exc.colno}")
            )
        except KeyError as exc:
            errors.append(FieldError(number, str(exc.args[0]), "missing"))
        except _Skip as exc:
            skipped.append({"line": number, "reason": str(exc)})
        except ValueError as exc:
            errors.append(FieldError(number, None, str(exc)))
    if errors:
        raise InvalidInput(
            f"{len(errors)} error(s) in the file; nothing was stored", errors[:MAX_REPORTED_ERRORS]
        )
    if not records:
        raise InvalidInput("the file has no usable records", [FieldError(None, None, "no records")])
    return records, skipped


def _check_strings(record: PreferenceRecord) -> None:
    """ValueError naming the field if a string of the record could not be stored."""
    fields = [(f"prompt[{i}].content", m["content"]) for i, m in enumerate(record.prompt)]
    fields += [("chosen", record.chosen), ("rejected", record.rejected)]
    for name, text in fields:
        if (problem := inputs.string_problem(text)) is not None:
            raise ValueError(f"{name} {problem}")


# --- storing ----------------------------------------------------------------------------------


def store_preferences(
    session: Session,
    project: Project,
    records: list[PreferenceRecord],
    *,
    source: str,
    skipped: list[dict[str, Any]] | None = None,
    actor_id: int | None = None,
) -> ImportResult:
    """Store records as prompts, responses, complete pairs and source-attributed judgments.

    Re-importing the same file is harmless: a record whose prompt already has a pair with the
    same two answers counts as a duplicate.
    """
    if not SOURCE_RE.match(source):
        raise InvalidInput(f"source {source!r} must be 1-41 lowercase letters, digits, . _ -")
    result = ImportResult(skipped=list(skipped or []))
    label = f"import:{source}"
    keys = sorted({r.prompt_key() for r in records})
    prompts: dict[str, Prompt] = {}
    for start in range(0, len(keys), 500):
        for p in session.scalars(
            select(Prompt).where(
                Prompt.project_id == project.id, Prompt.external_id.in_(keys[start : start + 500])
            )
        ):
            prompts[p.external_id or ""] = p
    existing_pairs: set[tuple[int, str, str]] = set()
    if prompts:
        ids = [p.id for p in prompts.values()]
        texts: dict[int, str] = {}
        for start in range(0, len(ids), 500):
            for resp in session.scalars(
                select(Response).where(Response.prompt_id.in_(ids[start : start + 500]))
            ):
                texts[resp.id] = resp.text
            for pair in session.scalars(
                select(ComparisonPair).where(ComparisonPair.prompt_id.in_(ids[start : start + 500]))
            ):
                existing_pairs.add(
                    (pair.prompt_id, texts[pair.response_a_id], texts[pair.response_b_id])
                )

    for record in records:
        key = record.prompt_key()
        prompt = prompts.get(key)
        if prompt is None:
            prompt = Prompt(
                project_id=project.id,
                external_id=key,
                messages=record.prompt,
                text=None,
                meta={"imported_from": source},
                source=label,
            )
            session.add(prompt)
            session.flush()
            prompts[key] = prompt
            result.prompts_created += 1
        if (prompt.id, record.chosen, record.rejected) in existing_pairs:
            result.duplicates += 1
            continue
        chosen = Response(
            prompt_id=prompt.id,
            text=record.chosen,
            model_name=source,
            generation_params={"source": label, "role": "chosen"},
        )
        rejected = Response(
            prompt_id=prompt.id,
            text=record.rejected,
            model_name=source,
            generation_params={"source": label, "role": "rejected"},
        )
        session.add_all([chosen, rejected])
        session.flush()
        # Complete on arrival (1 of 1 judgments), so the pair never enters a rater's queue.
        pair = ComparisonPair(
            project_id=project.id,
            prompt_id=prompt.id,
            response_a_id=chosen.id,
            response_b_id=rejected.id,
            required_judgments=1,
            judgment_count=1,
        )
        session.add(pair)
        session.flush()
        session.add(
            Judgment(
                project_id=project.id,
                pair_id=pair.id,
                rater_id=None,
                choice="a",
                strength=1,
                source=label,
                extra={"line": record.line},
            )
        )
        existing_pairs.add((prompt.id, record.chosen, record.rejected))
        result.created += 1
    audit.record(
        session,
        "preferences.import",
        actor_id=actor_id,
        project_id=project.id,
        source=source,
        created=result.created,
        duplicates=result.duplicates,
        skipped=len(result.skipped),
    )
    return result
