"""Expanding [sources] into the list of files: globs, ranges, listing files, names, formats."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from etl.core.config import JobConfig, load_job
from etl.core.errors import ConfigError
from etl.download.sources import expand_ranges, expand_sources

SHA = "ab" * 32
MD5 = "cd" * 16


def job(tmp_path: Path, download: dict[str, Any] | None = None, **sources: Any) -> JobConfig:
    return JobConfig.model_validate(
        {
            "job": {"name": "t"},
            "sources": sources,
            "download": download or {},
            "output": {"path": str(tmp_path / "out")},
            "base_dir": str(tmp_path),
            "file": str(tmp_path / "job.toml"),
        }
    )


def touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("id\n1\n")


# -------------------------------------------------------------------- globs, paths


def test_globs_expand_sorted_relative_to_the_job_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    touch(data / "b.csv", data / "a.csv", data / "sub/c.csv", data / "x.txt")
    sources = expand_sources(job(tmp_path, urls=["data/*.csv", "data/**/c.csv"]))
    assert [s.url for s in sources] == [
        str(tmp_path / "data/a.csv"),
        str(tmp_path / "data/b.csv"),
        str(tmp_path / "data/sub/c.csv"),
    ]
    assert [s.index for s in sources] == [0, 1, 2]
    assert [s.name for s in sources] == ["a.csv", "b.csv", "c.csv"]
    assert not any(s.is_remote for s in sources)


def test_glob_matching_nothing_names_key_and_pattern(tmp_path: Path) -> None:
    touch(tmp_path / "a.csv")
    with pytest.raises(ConfigError) as info:
        expand_sources(job(tmp_path, urls=["a.csv", "nothing/*.csv"]))
    assert info.value.item == "sources.urls[1]"
    assert str(tmp_path / "nothing/*.csv") in str(info.value) and "matches no files" in str(info.value)


def test_missing_local_file_is_an_error_naming_the_path(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        expand_sources(job(tmp_path, urls=["gone.csv"]))
    assert str(tmp_path / "gone.csv") in str(info.value) and info.value.item == "sources.urls[0]"


def test_file_urls_become_local_paths(tmp_path: Path) -> None:
    touch(tmp_path / "my data.csv")
    [src] = expand_sources(job(tmp_path, urls=[(tmp_path / "my data.csv").as_uri()]))
    assert src.url == str(tmp_path / "my data.csv") and not src.is_remote


# -------------------------------------------------------------------------- ranges


def test_ranges_keep_zero_padding_and_multiply_in_order() -> None:
    assert expand_ranges("part-{000..002}.csv") == ["part-000.csv", "part-001.csv", "part-002.csv"]
    assert expand_ranges("y{8..10}") == ["y8", "y9", "y10"]
    assert expand_ranges("{1..2}-{01..02}") == ["1-01", "1-02", "2-01", "2-02"]
    assert expand_ranges("plain.csv") == ["plain.csv"]


def test_ranges_in_urls_and_local_paths(tmp_path: Path) -> None:
    touch(tmp_path / "d/p-1.csv", tmp_path / "d/p-2.csv")
    urls = ["https://h.example/y={2025..2026}/m-{01..02}.csv", "d/p-{1..2}.csv"]
    sources = expand_sources(job(tmp_path, urls=urls))
    assert [s.url for s in sources[:4]] == [
        "https://h.example/y=2025/m-01.csv",
        "https://h.example/y=2025/m-02.csv",
        "https://h.example/y=2026/m-01.csv",
        "https://h.example/y=2026/m-02.csv",
    ]
    assert [s.url for s in sources[4:]] == [str(tmp_path / "d/p-1.csv"), str(tmp_path / "d/p-2.csv")]


def test_a_huge_range_is_refused_before_it_is_built(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expand to 100000000 names, more than the limit"):
        expand_sources(job(tmp_path, urls=["https://h.example/{0..9999}/{0..9999}.csv"]))


def test_upper_case_scheme_and_bracketed_file_names(tmp_path: Path) -> None:
    touch(tmp_path / "data[1].csv")
    remote, local = expand_sources(job(tmp_path, urls=["HTTPS://h.example/a.csv", "data[1].csv"]))
    assert remote.url == "https://h.example/a.csv" and remote.is_remote
    assert local.url == str(tmp_path / "data[1].csv")


def test_backwards_range_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"\{9\.\.1\} runs backwards") as info:
        expand_sources(job(tmp_path, urls=["https://h.example/{9..1}.csv"]))
    assert info.value.item == "sources.urls[0]"


# ----------------------------------------------------------------------- urls_file


def test_urls_file_reads_checksums_and_skips_comments(tmp_path: Path) -> None:
    touch(tmp_path / "lists/local.csv")
    listing = tmp_path / "lists/urls.txt"
    listing.write_text(
        "# nightly export\n\n"
        f"https://h.example/a.csv   {SHA.upper()}\n"
        f"https://h.example/b.jsonl md5:{MD5}  # trailing comment\n"
        "local.csv\n"
    )
    sources = expand_sources(job(tmp_path, urls_file=str(listing)))
    assert [(s.url, s.sha256, s.md5) for s in sources] == [
        ("https://h.example/a.csv", SHA, None),
        ("https://h.example/b.jsonl", None, MD5),
        (str(tmp_path / "lists/local.csv"), None, None),  # relative to the listing file
    ]
    assert [s.format for s in sources] == ["csv", "jsonl", "csv"]


@pytest.mark.parametrize(
    ("line", "complaint"),
    [("https://h.example/a.csv deadbeef", "'deadbeef'"), ("https://h.example/a.csv x y", "3 fields")],
)
def test_bad_urls_file_line_names_file_and_line_number(tmp_path: Path, line: str, complaint: str) -> None:
    listing = tmp_path / "urls.txt"
    listing.write_text(f"https://h.example/ok.csv\n# note\n{line}\n")
    with pytest.raises(ConfigError) as info:
        expand_sources(job(tmp_path, urls_file=str(listing)))
    assert f"{listing}:3" in str(info.value) and complaint in str(info.value)


def test_missing_urls_file_via_job_file(tmp_path: Path) -> None:
    toml = '[job]\nname="t"\n[sources]\nurls_file="urls.txt"\n[output]\npath="out"\n'
    (tmp_path / "job.toml").write_text(toml)
    with pytest.raises(ConfigError) as info:
        expand_sources(load_job(tmp_path / "job.toml"))
    assert str(tmp_path / "urls.txt") in str(info.value) and "does not exist" in str(info.value)


# ------------------------------------------------------------------ files entries


def test_files_entries_carry_checksums_and_headers(tmp_path: Path) -> None:
    [src] = expand_sources(
        job(
            tmp_path,
            files=[
                {"url": "https://h.example/a.parquet", "sha256": SHA.upper(), "headers": {"X-Api-Key": "k"}},
            ],
        )
    )
    assert (src.sha256, src.headers, src.format) == (SHA, (("X-Api-Key", "k"),), "parquet")


def test_a_checksum_cannot_cover_a_glob_of_several_files(tmp_path: Path) -> None:
    touch(tmp_path / "a.csv", tmp_path / "b.csv")
    with pytest.raises(ConfigError, match="expands to 2 files") as info:
        expand_sources(job(tmp_path, files=[{"url": "*.csv", "sha256": SHA}]))
    assert info.value.item == "sources.files[0].url"


def test_url_credentials_and_authorization_header_together_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="credentials in the URL and an Authorization header") as info:
        expand_sources(
            job(tmp_path, {"headers": {"authorization": "Bearer t0ken"}}, urls=["https://u:pw@h.example/a.csv"])
        )
    assert "pw" not in str(info.value) and "t0ken" not in str(info.value)


@pytest.mark.parametrize(
    "url", ["http://alice:pw-999@[::1/x.csv", "https://alice:pw-999@h.example:99999/a.csv", "http:///a.csv"]
)
def test_an_unparseable_url_is_a_config_error_naming_the_key_without_its_secret(tmp_path: Path, url: str) -> None:
    with pytest.raises(ConfigError, match="not a valid URL") as info:
        expand_sources(job(tmp_path, urls=["https://h.example/ok.csv", url]))
    assert info.value.item == "sources.urls[1]" and "pw-999" not in str(info.value)
    listing = tmp_path / "urls.txt"
    listing.write_text("https://h.example/ok.csv\n" + url + "\n")
    with pytest.raises(ConfigError, match="not a valid URL") as info:
        expand_sources(job(tmp_path, urls_file=str(listing)))
    assert str(listing) + ":2" in str(info.value) and "pw-999" not in str(info.value)


# --------------------------------------------------------------- names, formats


def test_duplicate_urls_are_an_error_naming_both_places(tmp_path: Path) -> None:
    touch(tmp_path / "a.csv")
    with pytest.raises(ConfigError) as info:
        expand_sources(job(tmp_path, urls=["*.csv"], files=[{"url": "a.csv"}]))
    assert info.value.item == "sources.files[0].url" and "sources.urls[0]" in str(info.value)


def test_same_file_name_gets_a_hash_prefix(tmp_path: Path) -> None:
    sources = expand_sources(
        job(
            tmp_path, urls=["https://a.example/x/data.csv", "https://b.example/data.csv", "https://a.example/other.csv"]
        )
    )
    names = [s.name for s in sources]
    assert len(set(names)) == 3 and names[2] == "other.csv"
    assert all(n.endswith("-data.csv") and len(n) == len("12345678-data.csv") for n in names[:2])
    assert names == [s.name for s in expand_sources(job(tmp_path, urls=[s.url for s in sources]))]  # stable


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.csv.gz", "csv"),
        ("a.ndjson.zst", "jsonl"),
        ("a.JSONL.bz2", "jsonl"),
        ("a.pq", "parquet"),
        ("a.parquet.zstd", "parquet"),
        ("a.csv?x=1", "csv"),
    ],
)
def test_format_from_extension(tmp_path: Path, name: str, fmt: str) -> None:
    [src] = expand_sources(job(tmp_path, urls=[f"https://h.example/{name}"]))
    assert src.format == fmt


def test_unknown_extension_lists_the_known_ones_unless_format_is_set(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        expand_sources(job(tmp_path, urls=["https://h.example/a.xlsx"]))
    assert "'a.xlsx'" in str(info.value) and info.value.item == "sources.urls[0]"
    known = ".csv, .jsonl, .ndjson, .parquet, .pq, each optionally followed by .gz, .zst, .zstd, .bz2"
    assert known in str(info.value)
    [src] = expand_sources(job(tmp_path, urls=["https://h.example/a.xlsx"], format="csv"))
    assert src.format == "csv"


def test_no_sources_at_all_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no sources"):
        expand_sources(job(tmp_path))
