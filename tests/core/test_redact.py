"""Secret redaction: what a log line or error message may say about a source's URL and headers."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest

from etl.core.redact import _secret_values, is_secret_header, redact_headers, redact_url


def test_userinfo_is_hidden_and_host_path_kept() -> None:
    url = redact_url("https://alice:s3cr3t-pw@data.example.com:8443/trips/a.csv.gz")
    assert url == "https://***@data.example.com:8443/trips/a.csv.gz"
    assert "alice" not in url and "s3cr3t-pw" not in url


def test_username_only_userinfo_is_hidden_too() -> None:
    assert redact_url("ftp://bob@host/x") == "ftp://***@host/x"


@pytest.mark.parametrize(
    "param",
    ["token", "access_token", "api_key", "X-Amz-Signature", "X-Amz-Credential", "client_secret", "password", "sig_KEY"],
)
def test_secret_looking_query_values_are_hidden(param: str) -> None:
    url = redact_url(f"https://h/a.csv?page=2&{param}=hunter2value&fmt=csv")
    assert "hunter2value" not in url
    pairs = dict(parse_qsl(urlsplit(url).query))
    assert pairs == {"page": "2", param: "***", "fmt": "csv"}


def test_url_without_secrets_is_left_exactly_as_it_was() -> None:
    for url in (
        "https://h.example/data/a.csv?page=2&fmt=csv%20x",
        "/srv/data/trips.csv",
        "s3://bucket/key.csv",
        "http://h:8080/p;params?q=1#frag",
    ):
        assert redact_url(url) == url


def test_query_and_fragment_kept_around_a_redacted_value() -> None:
    url = redact_url("https://u:p@h/x.csv?token=abc&keep=1#part")
    assert url == "https://***@h/x.csv?token=***&keep=1#part"


@pytest.mark.parametrize(
    "name",
    [
        "Authorization",
        "authorization",
        "Cookie",
        "Proxy-Authorization",
        "X-Api-Key",
        "X-Auth-Token",
        "X-Client-Secret",
        "My-Password",
        "Some-Key-Id",
    ],
)
def test_secret_headers_are_recognised(name: str) -> None:
    assert is_secret_header(name)


@pytest.mark.parametrize("name", ["Accept", "User-Agent", "Range", "If-None-Match", "Content-Type"])
def test_ordinary_headers_are_not_secret(name: str) -> None:
    assert not is_secret_header(name)


def test_redact_headers_hides_only_secret_values_and_keeps_names() -> None:
    headers = {"Authorization": "Bearer abc.def", "Accept": "text/csv", "X-Api-Key": "k-123", "Range": "bytes=0-"}
    out = redact_headers(headers)
    assert out == {"Authorization": "***", "Accept": "text/csv", "X-Api-Key": "***", "Range": "bytes=0-"}
    assert headers["Authorization"] == "Bearer abc.def"  # the caller's mapping is not changed


def test_secret_values_lists_every_secret_of_a_source_longest_first() -> None:
    found = _secret_values(
        "https://alice:pw-long@h/x?token=tok123&page=2", {"Authorization": "Bearer abcdefgh", "Accept": "text/csv"}
    )
    assert set(found) == {"alice", "pw-long", "tok123", "Bearer abcdefgh"}
    assert [len(s) for s in found] == sorted((len(s) for s in found), reverse=True)
    assert "2" not in found and "text/csv" not in found


def test_secret_values_skips_strings_too_short_to_scrub_safely() -> None:
    assert _secret_values("https://ab:c@h/x?key=", {"Cookie": "z"}) == []


def test_a_url_too_broken_to_parse_is_still_redacted() -> None:
    assert redact_url("http://alice:pw-999@[::1/x.csv?a=1&token=abc&b=2") == "http://***@[::1/x.csv?a=1&token=***&b=2"
