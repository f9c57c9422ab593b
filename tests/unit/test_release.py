"""`cotmi data fetch`'s unpack-and-verify path, on archives the tests build (no network)."""
import hashlib
import subprocess
import zipfile

import pytest

from cotmi_ds.data.release import DSS_RELEASE, Release, fetch, git_blob_sha1
from cotmi_ds.errors import UsageError
from tests.conftest import run_cotmi

FILES = {
    "cqa/cqa_test.json": b'{"id": "a", "question": "q?", "choices": ["1", "2", "3", "4", "5"], "answer": "1"}\n',
    "cqa/llm/test_CoT_0.json": b'["So the answer is (a) 1."]',
    "svamp/svamp_test.json": b'{"input": "x", "label": "( 1.0 + 2.0 )"}\n',
    "svamp/llm/test_CoT_0.json": b'["The answer is (1 + 2)."]',
}


def _zip(path, files, top="datasets/", extra=()):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(top, "") if top else None
        for name, data in files.items():
            zf.writestr(top + name, data)
        for name, data in extra:
            zf.writestr(name, data)
    return path


def _release(archive, known=("cqa/cqa_test.json", "svamp/llm/test_CoT_0.json")):
    return Release(url="unused", git_blob_sha1=git_blob_sha1(archive),
                   sha256={k: hashlib.sha256(FILES[k]).hexdigest() for k in known})


def test_git_blob_id_is_what_git_computes(tmp_path):
    f = tmp_path / "x.bin"
    f.write_bytes(b"hello\x00world\n" * 1000)
    expected = subprocess.run(["git", "hash-object", str(f)], capture_output=True, text=True, check=True).stdout.strip()
    assert git_blob_sha1(f) == expected
    assert DSS_RELEASE.git_blob_sha1 == "fb9d88a0b44c2daac1ec1639f0bdae993e7e5bcd"
    assert len(DSS_RELEASE.sha256) == 30 and all(len(v) == 64 for v in DSS_RELEASE.sha256.values())


def test_fetch_unpacks_verifies_and_reports(tmp_path, capsys):
    archive = _zip(tmp_path / "datasets.zip", FILES, extra=[("__MACOSX/datasets/._x", b"junk")])
    report = fetch(str(tmp_path / "data"), archive=str(archive), release=_release(archive))
    for name, data in FILES.items():
        assert (tmp_path / "data" / name).read_bytes() == data  # the top folder "datasets/" is stripped
    assert not (tmp_path / "data" / "__MACOSX").exists()
    assert "2 files matched their known SHA-256, 2 files have no known checksum" in report
    assert "cqa/cqa_train.json" in report and "esnli/esnli_train.json" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "datasets.zip"]


def test_archive_without_top_folder(tmp_path):
    archive = _zip(tmp_path / "flat.zip", FILES, top="")
    fetch(str(tmp_path / "data"), archive=str(archive), release=_release(archive))
    assert (tmp_path / "data" / "cqa" / "cqa_test.json").read_bytes() == FILES["cqa/cqa_test.json"]


def _fails(tmp_path, archive, release, match):
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(UsageError, match=match):
        fetch(str(tmp_path / "data"), archive=str(archive), release=release)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written


def test_wrong_blob_id(tmp_path):
    archive = _zip(tmp_path / "a.zip", FILES)
    release = Release(url="unused", git_blob_sha1="0" * 40)
    _fails(tmp_path, archive, release, rf"a\.zip: git blob id {git_blob_sha1(archive)}, expected 0{{40}}")


def test_tampered_file(tmp_path):
    archive = _zip(tmp_path / "a.zip", FILES)
    release = _release(archive)
    sums = dict(release.sha256, **{"cqa/cqa_test.json": "f" * 64})
    _fails(tmp_path, archive, Release("unused", release.git_blob_sha1, sums),
           r"a\.zip: cqa/cqa_test\.json has SHA-256 [0-9a-f]{64}, expected f{64}")


def test_known_file_missing_from_archive(tmp_path):
    archive = _zip(tmp_path / "a.zip", {k: v for k, v in FILES.items() if k != "cqa/cqa_test.json"})
    release = Release("unused", git_blob_sha1(archive), {"cqa/cqa_test.json": "a" * 64})
    _fails(tmp_path, archive, release, r"a\.zip: lacks cqa/cqa_test\.json")


@pytest.mark.parametrize("member", ["datasets/../evil.json", "/etc/evil.json"])
def test_unsafe_member_paths_are_refused(tmp_path, member):
    archive = _zip(tmp_path / "a.zip", {}, top="", extra=[(member, b"x"), ("datasets/cqa/x.json", b"y")])
    _fails(tmp_path, archive, Release("unused", git_blob_sha1(archive)), "unsafe path")


def test_not_a_zip_and_occupied_target(tmp_path):
    bad = tmp_path / "a.zip"
    bad.write_bytes(b"not a zip")
    _fails(tmp_path, bad, Release("unused", git_blob_sha1(bad)), r"a\.zip: not a zip archive")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "keep.txt").write_text("mine")
    archive = _zip(tmp_path / "b.zip", FILES)
    with pytest.raises(UsageError, match=r"--to .*data: already exists and is not an empty folder"):
        fetch(str(tmp_path / "data"), archive=str(archive), release=_release(archive))
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["keep.txt"]
    with pytest.raises(UsageError, match=r"--archive .*nope\.zip: no such file"):
        fetch(str(tmp_path / "new"), archive=str(tmp_path / "nope.zip"))


def test_cli_refuses_an_archive_that_is_not_the_release(tmp_path):
    archive = _zip(tmp_path / "datasets.zip", FILES)
    proc = run_cotmi(["data", "fetch", "--to", str(tmp_path / "data"), "--archive", str(archive)],
                     cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "expected fb9d88a0b44c2daac1ec1639f0bdae993e7e5bcd" in lines[0], proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["datasets.zip"]


def test_cli_names_an_unknown_flag(tmp_path, capsys):
    from cotmi_ds.cli import main

    with pytest.raises(SystemExit) as e:
        main(["data", "fetch", "--too", str(tmp_path / "x")])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == ("cotmi: error: unknown flag --too for `cotmi data fetch` "
                                               "(its flags: --to, --archive, --url)")
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_member_is_one_line_and_leaves_nothing(tmp_path):
    archive = _zip(tmp_path / "a.zip", FILES)
    data = bytearray(archive.read_bytes())
    at = data.index(FILES["cqa/cqa_test.json"][:20])
    data[at:at + 4] = b"XXXX"  # the stored bytes no longer match the member's CRC
    archive.write_bytes(bytes(data))
    with pytest.raises(UsageError) as e:
        fetch(str(tmp_path / "data"), archive=str(archive), release=_release(archive))
    assert "a.zip: damaged zip archive: datasets/cqa/cqa_test.json: Bad CRC-32" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def test_cli_takes_a_number_as_the_target_folder(tmp_path):
    archive = _zip(tmp_path / "datasets.zip", FILES)
    proc = run_cotmi(["data", "fetch", "--to", "123", "--archive", str(archive)], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "expected fb9d88a0b44c2daac1ec1639f0bdae993e7e5bcd" in proc.stderr.splitlines()[-1]


class _Response:
    """A server that sends ``chunks`` bytes of zeros, one read at a time, each taking ``delay`` s."""

    def __init__(self, chunks, delay=0.0):
        self.left, self.delay = chunks, delay

    def read(self, n):
        import time

        time.sleep(self.delay)
        self.left -= 1
        return b"\0" * n if self.left >= 0 else b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("release, response, message", [
    (Release("http://x/a.zip", "0", max_download_bytes=3 << 20), _Response(10), "more than 3 MiB"),
    (Release("http://x/a.zip", "0", download_deadline_s=0.2), _Response(100, delay=0.05), "not done after 0 s"),
])
def test_the_download_has_a_size_cap_and_an_overall_deadline(tmp_path, monkeypatch, release, response, message):
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: response)
    with pytest.raises(UsageError) as e:
        fetch(str(tmp_path / "data"), release=release)
    assert message in str(e.value) and "pass --archive FILE" in str(e.value)
    assert list(tmp_path.iterdir()) == []
