"""Output parts and the output folder: real files in tmp_path, real crashed processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from etl.core.config import OutputConfig
from etl.core.errors import OutputError
from etl.core.records import Part
from etl.write.folder import OutputWriter

pytestmark = pytest.mark.timeout(30)

ROOT = Path(__file__).resolve().parents[2]


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def part(relpath: str, text: str = "x") -> Part:
    return Part(relpath, text.encode(), 1)


# --------------------------------------------------------------------------- writer


def previous_output(target: Path) -> dict[str, bytes]:
    """A published folder from an earlier run, returned as its snapshot."""
    (target / "city=Paris").mkdir(parents=True)
    (target / "city=Paris" / "part-old-00000-000000.parquet").write_bytes(b"old paris")
    (target / "part-old-00001-000000.parquet").write_bytes(b"old root")
    return snapshot(target)


def siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.iterdir() if p.name.startswith(f".{target.name}."))


def test_overwrite_publish_replaces_the_previous_output(tmp_path: Path) -> None:
    target = tmp_path / "out"
    previous_output(target)
    writer = OutputWriter(OutputConfig(path=target), "run2")
    writer.write(part("city=Rome/part-00000-000000.parquet", "rome"))
    writer.write(part("part-00001-000000.parquet", "root"))
    writer.write_rejects(part("part-00001-000000.jsonl", "bad row"))

    published = writer.publish()

    assert published == [
        "_rejected/part-00001-000000.jsonl",
        "city=Rome/part-00000-000000.parquet",
        "part-00001-000000.parquet",
    ]
    assert snapshot(target) == {p: t.encode() for p, t in zip(published, ["bad row", "rome", "root"])}
    assert siblings(target) == []


def test_discard_leaves_previous_output_byte_for_byte(tmp_path: Path) -> None:
    target = tmp_path / "out"
    before = previous_output(target)
    writer = OutputWriter(OutputConfig(path=target), "run2")
    writer.write(part("city=Paris/part-00000-000000.parquet", "new paris"))

    writer.discard()

    assert snapshot(target) == before
    assert siblings(target) == []
    with pytest.raises(OutputError, match="after publish or discard"):
        writer.publish()


def test_overwrite_with_no_parts_publishes_an_empty_folder(tmp_path: Path) -> None:
    target = tmp_path / "out"
    previous_output(target)
    assert OutputWriter(OutputConfig(path=target), "run2").publish() == []
    assert target.is_dir() and snapshot(target) == {}


def test_append_adds_run_named_parts_beside_previous_ones(tmp_path: Path) -> None:
    target = tmp_path / "out"
    before = previous_output(target)
    out = OutputConfig(path=target, mode="append")
    writer = OutputWriter(out, "run2")
    writer.write(part("city=Paris/part-00000-000003.parquet", "paris"))
    writer.write(part("city=Rome/part-00000-000004.parquet", "rome"))
    writer.write_rejects(part("part-00000-000004.jsonl", "bad"))

    published = writer.publish()

    assert published == [
        "_rejected/part-run2-00000-000004.jsonl",
        "city=Paris/part-run2-00000-000003.parquet",
        "city=Rome/part-run2-00000-000004.parquet",
    ]
    after = snapshot(target)
    assert {k: after[k] for k in before} == before
    assert set(after) == set(before) | set(published)
    assert siblings(target) == []


def test_append_into_a_missing_folder_creates_it(tmp_path: Path) -> None:
    target = tmp_path / "new" / "out"
    writer = OutputWriter(OutputConfig(path=target, mode="append"), "r1")
    writer.write(part("part-00000-000000.csv"))
    assert writer.publish() == ["part-r1-00000-000000.csv"]
    assert snapshot(target) == {"part-r1-00000-000000.csv": b"x"}


def test_append_never_overwrites_an_existing_part(tmp_path: Path) -> None:
    target = tmp_path / "out"
    out = OutputConfig(path=target, mode="append")
    first = OutputWriter(out, "same")
    first.write(part("part-00000-000000.csv", "first"))
    first.publish()
    before = snapshot(target)
    again = OutputWriter(out, "same")
    again.write(part("part-00000-000000.csv", "second"))

    with pytest.raises(OutputError, match="would overwrite 1 existing part"):
        again.publish()
    again.discard()

    assert snapshot(target) == before


def blocked_append(tmp_path: Path) -> tuple[Path, OutputConfig, OutputWriter, dict[str, bytes]]:
    """An append whose second move fails: a file sits where the 'city=Rome' folder goes."""
    target = tmp_path / "out"
    previous_output(target)
    (target / "city=Rome").write_bytes(b"not a folder")
    before = snapshot(target)
    out = OutputConfig(path=target, mode="append")
    writer = OutputWriter(out, "run2")
    writer.write(part("city=Berlin/part-00000-000000.parquet"))
    writer.write(part("city=Rome/part-00000-000001.parquet"))
    return target, out, writer, before


def test_failed_append_takes_back_the_parts_it_moved(tmp_path: Path) -> None:
    target, _, writer, before = blocked_append(tmp_path)

    with pytest.raises(OutputError, match="cannot append parts"):
        writer.publish()

    assert snapshot(target) == before  # taken back by publish itself
    assert not (target / "city=Berlin").exists()
    writer.discard()
    assert siblings(target) == []


def test_write_is_thread_safe(tmp_path: Path) -> None:
    target = tmp_path / "out"
    writer = OutputWriter(OutputConfig(path=target, partition_by=["k"]), "r1")
    names = [f"k={i % 5}/part-00000-{i:06d}.parquet" for i in range(200)]

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda n: writer.write(part(n, n)), names))
    writer.publish()

    assert snapshot(target) == {n: n.encode() for n in names}


@pytest.mark.parametrize("relpath", ["../escape.parquet", "/abs/part.parquet", "a/../../b"])
def test_part_paths_cannot_leave_the_output_folder(tmp_path: Path, relpath: str) -> None:
    writer = OutputWriter(OutputConfig(path=tmp_path / "out"), "r1")
    with pytest.raises(OutputError, match="stay inside the output folder"):
        writer.write(part(relpath))


# -------------------------------------------------------------- crashes, leftovers

CRASHING_RUN = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from etl.core.config import OutputConfig
    from etl.core.records import Part
    from etl.write.folder import OutputWriter

    target, mode, event, nth = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    writer = OutputWriter(OutputConfig(path=Path(target), mode=mode), "crashed")
    writer.write(Part("city=Berlin/part-00000-000000.parquet", b"berlin", 1))
    writer.write(Part("city=Rome/part-00000-000001.parquet", b"rome", 1))
    seen = 0

    def die(name, args):
        global seen
        if name == event:
            seen += 1
            if seen == nth:
                os._exit(9)  # the process dies right before this operation

    sys.addaudithook(die)
    writer.publish()
    """
)


def crash_during_publish(target: Path, mode: str, event: str, nth: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, str(target), mode, event, str(nth)],
        env=env,
        capture_output=True,
        timeout=20,
    )
    assert done.returncode == 9, done.stderr.decode()


def test_clean_leftovers_restores_output_after_crash_between_renames(tmp_path: Path) -> None:
    target = tmp_path / "out"
    before = previous_output(target)
    crash_during_publish(target, "overwrite", "os.rename", 2)  # target already moved aside
    assert not target.exists()

    handled = OutputWriter.clean_leftovers(OutputConfig(path=target))

    assert snapshot(target) == before
    assert siblings(target) == []
    assert sorted(p.name for p in handled) == [".out.old-crashed", ".out.tmp-crashed"]


def test_clean_leftovers_removes_old_copy_after_crash_past_the_swap(tmp_path: Path) -> None:
    target = tmp_path / "out"
    previous_output(target)
    crash_during_publish(target, "overwrite", "shutil.rmtree", 1)  # new output in place

    OutputWriter.clean_leftovers(OutputConfig(path=target))

    assert snapshot(target) == {
        "city=Berlin/part-00000-000000.parquet": b"berlin",
        "city=Rome/part-00000-000001.parquet": b"rome",
    }
    assert siblings(target) == []


def test_clean_leftovers_takes_back_a_half_done_append(tmp_path: Path) -> None:
    target = tmp_path / "out"
    before = previous_output(target)
    # renames: the saved part list, Berlin's part, then (never reached) Rome's part
    crash_during_publish(target, "append", "os.rename", 3)
    assert (target / "city=Berlin" / "part-crashed-00000-000000.parquet").exists()
    assert not (target / "city=Rome" / "part-crashed-00000-000001.parquet").exists()

    OutputWriter.clean_leftovers(OutputConfig(path=target, mode="append"))

    assert snapshot(target) == before
    assert not (target / "city=Berlin").exists() and not (target / "city=Rome").exists()
    assert siblings(target) == []


def test_clean_leftovers_removes_temp_folder_of_a_run_that_died_writing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    before = previous_output(target)
    OutputWriter(OutputConfig(path=target), "dead").write(part("part-00000-000000.parquet"))

    handled = OutputWriter.clean_leftovers(OutputConfig(path=target))

    assert [p.name for p in handled] == [".out.tmp-dead"]
    assert snapshot(target) == before and siblings(target) == []


def test_a_resumed_run_drops_pieces_workers_wrote_that_the_dead_run_never_spooled(tmp_path: Path) -> None:
    out = OutputConfig(path=tmp_path / "out")
    dead = OutputWriter(out, "dead")
    orphan = dead.incoming() / "0123abcd.arrow"  # a worker wrote it; the parent died before taking it
    orphan.write_bytes(b"half a chunk")

    resumed = OutputWriter(out, "next", adopt=dead.tmp)

    assert not orphan.exists() and list(resumed.incoming().iterdir()) == []
    for folder in resumed.finish_files():
        resumed.close_files(folder)
    assert resumed.publish() == []
