"""Decompressed streams and the bytes each chunk carries: real compressed files in tmp_path."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from etl.core.config import ReadConfig
from etl.core.errors import DataError
from etl.core.records import Source, StagedFile
from etl.read.formats import read_chunks
from etl.read.streams import COMPRESSION_BY_SUFFIX, Consumed, compression, file_size, is_blank, open_stream, where
from tests.read.files import (
    PARSE_WHERE,
    compress,
    staged,
    tricky_csv_bytes,
)

pytestmark = pytest.mark.timeout(30)


@PARSE_WHERE
def test_truncated_gzip_is_a_data_error_naming_the_file(tmp_path: Path, parse: str) -> None:
    data = gzip.compress(tricky_csv_bytes(2000))
    path = tmp_path / "cut.csv.gz"
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(DataError) as e:
        list(read_chunks(staged(path, "csv"), ReadConfig(chunk_rows=100, parse=parse)))  # type: ignore[arg-type]

    assert e.value.item.startswith("cut.csv.gz")
    assert str(path) in e.value.message
    assert "ended before the end-of-stream marker" in e.value.message  # ISA-L's gzip


@pytest.mark.parametrize("suffix", ["", ".gz", ".zst", ".bz2"])
def test_open_stream_decompresses_and_consumed_counts_the_file_as_stored(tmp_path: Path, suffix: str) -> None:
    text = tricky_csv_bytes(3000)
    path = tmp_path / f"t.csv{suffix}"
    path.write_bytes(compress(text, suffix))
    size = path.stat().st_size
    consumed = Consumed(size)
    taken = []
    with open_stream(staged(path, "csv"), consumed) as stream:
        got = b""
        while block := stream.read(1 << 14):
            got += block
            taken.append(consumed.take())
        assert got == text
    taken.append(consumed.take())  # closed: the rest of the file, if any
    assert all(n >= 0 for n in taken) and sum(taken) == size  # counted once, as stored
    assert consumed.take() == 0


def test_the_codec_comes_from_the_staged_name_then_the_source_name(tmp_path: Path) -> None:
    path = tmp_path / "download.bin"  # staged under a name without the extension
    path.write_bytes(gzip.compress(b"a\n1\n"))
    src = StagedFile(Source(0, "https://h.example/a.csv.gz", "a.csv.gz", "csv"), path, path.stat().st_size)
    assert compression(src) == "gzip" and COMPRESSION_BY_SUFFIX[".zstd"] == "zstd"
    with open_stream(src) as stream:
        assert stream.read() == b"a\n1\n"
    assert where(src) == f"https://h.example/a.csv.gz (staged as {path})"
    assert where(staged(path, "csv")) == str(path)


def test_consumed_reach_is_capped_at_the_file_size() -> None:
    consumed = Consumed(100)
    consumed.reach(40)
    assert consumed.take() == 40
    consumed.reach(250)  # a share of rows rounded up never counts past the file
    assert consumed.take() == 60 and consumed.take() == 0


def test_is_blank_and_file_size(tmp_path: Path) -> None:
    blank = tmp_path / "blank.csv.gz"
    blank.write_bytes(gzip.compress(b"\n  \r\n"))
    text = tmp_path / "text.csv.gz"
    text.write_bytes(gzip.compress(b"\n a\n"))
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(gzip.compress(b"\n" * 1000)[:15])
    assert is_blank(staged(blank, "csv")) and not is_blank(staged(text, "csv")) and not is_blank(staged(broken, "csv"))
    gone = staged(text, "csv")
    text.unlink()
    with pytest.raises(DataError, match=f"cannot open staged file {text}") as info:
        file_size(gone)
    assert info.value.item == "text.csv.gz"
