"""Output parts: names, hive partition folders and the workers' pieces (etl/core/parts.py).

Pieces become output files in the writer (``etl.write.files``); ``publish`` below runs
that path on real files, so these tests also read back what a run would publish."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from etl.core.config import OutputConfig
from etl.core.errors import OutputError
from etl.core.parts import (
    HIVE_NULL,
    encode_parts,
    file_name,
    ipc_to_table,
    part_name,
    piece_key,
    renumbered,
    split_name,
    with_run_id,
)
from etl.core.records import Part
from etl.write.folder import OutputWriter


def frame() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "id": pd.array(range(12), dtype="int64"),
            "name": pd.array([f"n{i}" if i % 4 else None for i in range(12)], dtype="string"),
            "city": pd.array(["Paris", "a/b", "x=y%", None, "", "Paris"] * 2, dtype="string"),
        }
    )


def publish(parts: list[Part], out: OutputConfig) -> list[str]:
    """One chunk's pieces through the writer: the output files a run would publish."""
    writer = OutputWriter(out, "t")
    writer.chunk_done(0, 0, [writer.write(p) for p in parts])
    for folder in writer.finish_files():
        writer.close_files(folder)
    return writer.publish()


def table(part: Part) -> pa.Table:
    return ipc_to_table(part.data)


def read_piece(part: Part) -> pa.Table:
    """A piece's rows, sent as bytes or spooled as a file."""
    return ipc_to_table(Path(part.file).read_bytes() if part.file else part.data)


# ---------------------------------------------------------------------------- names


def test_names_sort_in_serial_order_through_splits_and_run_ids() -> None:
    base = part_name(1, 3, "parquet")
    assert base == "part-00001-000003.parquet"
    halves = [split_name(f"m=1/{base}", h) for h in ("00", "010", "011", "1")]
    ordered = [f"m=1/{part_name(1, 2, 'parquet')}", *halves, f"m=1/{part_name(1, 4, 'parquet')}"]
    assert sorted(ordered) == ordered
    assert with_run_id(f"m=1/{base}", "r9") == "m=1/part-r9-00001-000003.parquet"
    assert with_run_id(base, "r9") == "part-r9-00001-000003.parquet"
    assert renumbered(f"m=1/{base}", 7) == "m=1/part-00007-000003.parquet"
    assert part_name(1, 3) == "part-00001-000003.arrow"
    assert piece_key(split_name(f"m=1/{part_name(1, 3)}", "01")) == ("m=1", 1, 3, "-h01")
    assert file_name(2, "parquet") == "part-00002.parquet"


# ------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_partitioned_parts_read_back_with_hive_partitioning(tmp_path: Path, fmt: str) -> None:
    out = OutputConfig(path=tmp_path / "out", format=fmt, partition_by=["city"])
    df = frame()

    parts = encode_parts(df, out, source_index=3, chunk_index=12)
    publish(parts, out)

    assert sorted({p.relpath.split("/")[0] for p in parts}) == sorted(
        ["city=Paris", "city=a%2Fb", "city=x%3Dy%25", f"city={HIVE_NULL}"]
    )
    file_format: Any = fmt
    if fmt == "csv":
        file_format = ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(strings_can_be_null=True))
    got = ds.dataset(tmp_path / "out", format=file_format, partitioning="hive").to_table()
    got_rows = sorted(got.to_pylist(), key=lambda r: r["id"])
    expected = [
        {
            "id": r.id,
            "name": None if pd.isna(r.name) else r.name,
            "city": None if pd.isna(r.city) or r.city == "" else r.city,
        }
        for r in df.itertuples(index=False)
    ]
    assert got_rows == expected


def test_partition_columns_are_not_inside_the_files_and_rows_keep_order() -> None:
    out = OutputConfig(path=Path("out"), partition_by=["city"])
    parts = {p.relpath: p for p in encode_parts(frame(), out, source_index=3, chunk_index=12)}

    paris = table(parts["city=Paris/part-00003-000012.arrow"])

    assert paris.column_names == ["id", "name"]
    assert paris.column("id").to_pylist() == [0, 5, 6, 11]
    # null and "" both map to the default partition: one file holding both, in order
    default = parts[f"city={HIVE_NULL}/part-00003-000012.arrow"]
    assert table(default).column("id").to_pylist() == [3, 4, 9, 10]
    assert default.rows == 4


@pytest.mark.parametrize("spooled", [False, True], ids=["bytes", "spooled"])
def test_rows_in_runs_and_scattered_rows_give_the_same_pieces(tmp_path: Path, spooled: bool) -> None:
    """Input ordered by the partition key (a run per folder: sliced, not copied) and the
    same rows interleaved (copied with take) give each folder the same rows, in order."""
    months = ["01"] * 5 + ["02"] * 3 + ["03"] * 4
    ordered = pd.DataFrame({"m": months, "id": range(12), "note": [f"n{i}" * (i % 3) for i in range(12)]})
    mixed = ordered.iloc[[0, 5, 8, 1, 6, 9, 2, 7, 10, 3, 11, 4]].reset_index(drop=True)
    out = OutputConfig(path=tmp_path / "out", partition_by=["m"])

    def pieces(df: pd.DataFrame, spool: Path | None) -> dict[str, list[dict[str, Any]]]:
        got = encode_parts(df, out, source_index=0, chunk_index=0, spool=spool)
        return {p.relpath: read_piece(p).to_pylist() for p in got}

    def spool(name: str) -> Path | None:
        if not spooled:
            return None
        (tmp_path / name).mkdir()
        return tmp_path / name

    runs, scattered = pieces(ordered, spool("a")), pieces(mixed, spool("b"))
    assert runs["m=02/part-00000-000000.arrow"] == [
        {"id": 5, "note": "n5n5"},
        {"id": 6, "note": ""},
        {"id": 7, "note": "n7"},
    ]
    assert {k: sorted(v, key=lambda r: r["id"]) for k, v in scattered.items()} == runs


def test_nested_partitions_follow_the_configured_order(tmp_path: Path) -> None:
    df = pd.DataFrame({"y": [2026, 2026], "d": pd.to_datetime(["2026-01-01", "2026-02-01"]).date, "v": [1.5, 2.5]})
    out = OutputConfig(path=tmp_path / "out", format="csv", partition_by=["y", "d"])

    parts = encode_parts(df, out, source_index=0, chunk_index=1)

    assert [p.relpath for p in parts] == [
        "y=2026/d=2026-01-01/part-00000-000001.arrow",
        "y=2026/d=2026-02-01/part-00000-000001.arrow",
    ]
    assert publish(parts, out) == ["y=2026/d=2026-01-01/part-00000.csv", "y=2026/d=2026-02-01/part-00000.csv"]
    assert (tmp_path / "out/y=2026/d=2026-01-01/part-00000.csv").read_text().splitlines() == ['"v"', "1.5"]


def test_unpartitioned_part_keeps_arrow_types_and_name(tmp_path: Path) -> None:
    df = pd.DataFrame(
        {
            "n": pd.array([1, None], dtype="Int64"),
            "c": pd.Categorical(["a", "b"]),
            "t": pd.array(["2026-01-01", None], dtype="timestamp[ms][pyarrow]"),
        }
    )
    out = OutputConfig(path=tmp_path / "o")
    (only,) = encode_parts(df, out, source_index=1, chunk_index=2)
    assert only.relpath == "part-00001-000002.arrow"
    assert publish([only], out) == ["part-00000.parquet"]

    schema = pq.read_schema(tmp_path / "o/part-00000.parquet")

    assert schema.field("n").type == pa.int64()
    assert pa.types.is_dictionary(schema.field("c").type)
    assert schema.field("t").type == pa.timestamp("ms")


@pytest.mark.parametrize(("setting", "codec"), [("none", "UNCOMPRESSED"), ("zstd", "ZSTD")])
def test_parquet_compression_follows_config(tmp_path: Path, setting: str, codec: str) -> None:
    out = OutputConfig(path=tmp_path / "o", compression=setting)  # type: ignore[arg-type]
    publish(encode_parts(frame(), out, source_index=0, chunk_index=0), out)
    meta = pq.ParquetFile(tmp_path / "o/part-00000.parquet").metadata
    assert meta.row_group(0).column(0).compression == codec


def test_empty_frame_gives_no_parts() -> None:
    out = OutputConfig(path=Path("o"), partition_by=["city"])
    assert encode_parts(frame().iloc[0:0], out, source_index=0, chunk_index=0) == []


def test_missing_partition_column_names_it_and_the_columns() -> None:
    out = OutputConfig(path=Path("o"), partition_by=["town"])
    with pytest.raises(OutputError) as e:
        encode_parts(frame(), out, source_index=0, chunk_index=4, label="f.csv[chunk 4, rows 8-11]")
    assert e.value.item == "f.csv[chunk 4, rows 8-11]"
    assert "'town'" in e.value.message and "id, name, city" in e.value.message


@pytest.mark.parametrize("column", [".city", "_city"])
def test_a_partition_column_read_as_a_hidden_folder_is_an_output_error_naming_it(column: str) -> None:
    out = OutputConfig(path=Path("o"), partition_by=[column])
    df = frame().rename(columns={"city": column})
    with pytest.raises(OutputError, match=rf"names column '\{column}': folders starting with") as e:
        encode_parts(df, out, source_index=0, chunk_index=0, label="f.csv[chunk 0]")
    assert e.value.item == "f.csv[chunk 0]"


def test_partition_columns_with_dots_inside_their_names_group_by_value(tmp_path: Path) -> None:
    out = OutputConfig(path=Path("o"), partition_by=["c.ity", "a.b"])
    df = frame().rename(columns={"city": "c.ity"}).assign(**{"a.b": "k"})
    parts = {p.relpath: p for p in encode_parts(df, out, source_index=0, chunk_index=0)}
    paris = table(parts["c.ity=Paris/a.b=k/part-00000-000000.arrow"])
    assert paris.column("id").to_pylist() == [0, 5, 6, 11]


def test_pieces_spooled_by_the_worker_hold_the_bytes_it_would_have_sent_and_publish_the_same(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "sent", partition_by=["city"])
    sent = encode_parts(frame(), out, source_index=3, chunk_index=12)
    spool = tmp_path / "incoming"
    spool.mkdir()

    spooled = encode_parts(frame(), out, source_index=3, chunk_index=12, spool=spool)

    assert [(p.relpath, p.rows) for p in spooled] == [(p.relpath, p.rows) for p in sent]
    for by_file, by_bytes in zip(spooled, sent):
        assert by_file.data == b"" and Path(by_file.file).parent == spool
        assert Path(by_file.file).read_bytes() == by_bytes.data and by_file.nbytes == len(by_bytes.data)
    assert len({p.file for p in spooled}) == len(spooled)  # one file per piece, never shared

    writer = OutputWriter(OutputConfig(path=tmp_path / "filed", partition_by=["city"]), "t")
    writer.chunk_done(3, 12, [writer.write(p) for p in spooled])
    assert list(spool.iterdir()) == []  # the writer moved each file into its spool
    for folder in writer.finish_files():
        writer.close_files(folder)
    files = writer.publish()
    assert files == publish(sent, out)
    for f in files:
        assert (tmp_path / "filed" / f).read_bytes() == (tmp_path / "sent" / f).read_bytes()
    assert not any(p.name.startswith("_") for p in (tmp_path / "filed").rglob("*"))  # no spool, no incoming


def test_a_worker_that_cannot_write_its_piece_fails_the_chunk_naming_the_file(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "out")
    with pytest.raises(OutputError, match="cannot spool a chunk's rows") as e:
        encode_parts(frame(), out, source_index=0, chunk_index=0, spool=tmp_path / "missing")
    assert str(tmp_path / "missing") in str(e.value)
