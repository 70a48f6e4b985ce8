"""Uploads and imports are parsed as streams: memory holds a line and the records, never the
decompressed file, so a small gzip that expands a hundredfold costs almost nothing to refuse."""

from __future__ import annotations

import gzip
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from app.services import imports, prompts
from app.services.errors import InvalidInput, PayloadTooLarge

MIB = 1024 * 1024


def peak_mib(call: Callable[[], Any]) -> float:
    """Peak Python allocation during `call`, in MiB (the exception it raises is swallowed)."""
    tracemalloc.start()
    try:
        call()
    except (InvalidInput, PayloadTooLarge):
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak / MIB


def test_a_gzip_that_expands_to_150_mib_is_parsed_in_a_few_mib() -> None:
    # 150 lines of 1 MiB of spaces: blank lines, so nothing to store, and 150 MiB to read.
    raw = gzip.compress((b" " * MIB + b"\n") * 150, compresslevel=1)
    assert len(raw) < 1 * MIB
    peak = peak_mib(lambda: imports.parse_preferences(raw, "auto", 50_000, 20 * MIB))
    # Before streaming this held the 150 MiB and a list of its lines (420 MB of RSS measured).
    assert peak < 12, f"peak {peak:.1f} MiB"
    with pytest.raises(InvalidInput, match="no usable records"):
        imports.parse_preferences(raw, "auto", 50_000, 20 * MIB)


def test_a_gzip_past_its_expansion_limit_or_with_an_endless_line_is_a_413() -> None:
    limit = 64 * 1024
    bomb = gzip.compress((b" " * 1000 + b"\n") * (imports.GZIP_EXPANSION_LIMIT * limit // 1000 + 2))
    with pytest.raises(PayloadTooLarge, match="decompressed file is larger than"):
        imports.parse_preferences(bomb, "auto", 50_000, limit)
    one_line = gzip.compress(b"x" * (limit + 10))
    with pytest.raises(PayloadTooLarge, match="line of the decompressed file is longer"):
        imports.parse_preferences(one_line, "auto", 50_000, limit)


def test_streamed_lines_keep_their_numbers_through_gzip_and_bad_bytes() -> None:
    good = json.dumps({"prompt": "p", "chosen": "a", "rejected": "b"}).encode()
    content = good + b"\n\n" + b'{"chosen": "\xff"}' + b"\n" + b"{oops\n" + good
    for raw in (content, gzip.compress(content)):
        with pytest.raises(InvalidInput) as caught:
            imports.parse_preferences(raw, "auto", 50_000, MIB)
        assert [(e.line, e.message[:13]) for e in caught.value.errors] == [
            (3, "not valid UTF"),
            (4, "malformed JSO"),
        ]


def test_csv_errors_after_a_bad_byte_still_carry_their_own_line() -> None:
    content = b"prompt,external_id\nfine,a\nbad \xff byte,b\nok,c\n,\nx,y,z\n"
    with pytest.raises(InvalidInput) as caught:
        prompts.parse_csv(content, 100)
    assert [(e.line, e.message.split(":")[0]) for e in caught.value.errors] == [
        (3, "not valid UTF-8"),
        (6, "expected 2 columns, found 3"),
    ]


def test_a_large_jsonl_upload_holds_its_records_not_copies_of_its_lines() -> None:
    line = json.dumps({"prompt": "q" * 1000}).encode()
    raw = b"\n".join(line.replace(b"q" * 6, f"{i:06d}".encode(), 1) for i in range(5000))
    records = prompts.parse_jsonl(raw, 50_000)
    assert len(records) == 5000
    peak = peak_mib(lambda: prompts.parse_jsonl(raw, 50_000))
    # The records are ~5 MiB of text (measured peak 1.3x the file); a list of every line and
    # of its decoded text besides them, as before streaming, is 3x.
    assert peak < 2 * len(raw) / MIB, f"peak {peak:.1f} MiB for {len(raw) / MIB:.1f} MiB"
