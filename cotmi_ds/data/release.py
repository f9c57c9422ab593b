"""`cotmi data fetch`: download the DSS release archive, check it, unpack it in DSS's layout.

The URL and every checksum live here, in ``DSS_RELEASE``. The archive is checked against its git
blob id (``sha1(b"blob <size>\\0" + bytes)``, what git records for it in the DSS repository); the
unpacked files whose SHA-256 we know (recorded in ``DSS_RELEASE`` from a checked copy) are checked
file by file. The folder appears only when everything
checked out: the archive is unpacked into a temporary folder beside it and renamed at the end.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from cotmi_ds.data.datasets import DSS_DATASETS
from cotmi_ds.errors import UsageError


@dataclass(frozen=True)
class Release:
    url: str
    git_blob_sha1: str
    sha256: dict[str, str] = field(default_factory=dict)  # path inside the data root -> SHA-256
    max_unpacked_bytes: int = 8 << 30  # refuse archives that unpack to more (zip bombs)
    max_download_bytes: int = 2 << 30  # far beyond the release archive: a server sending more is not it
    download_deadline_s: float = 1800.0  # for the whole download (a stalled or crawling server)


DSS_RELEASE = Release(
    # google-research/distilling-step-by-step, commit "Added datasets" (2023-07-06).
    url="https://github.com/google-research/distilling-step-by-step/raw/"
        "ef944263c9ddfd40a9888557f3e7d17513fd1a7e/datasets.zip",
    git_blob_sha1="fb9d88a0b44c2daac1ec1639f0bdae993e7e5bcd",
    sha256={
        "anli1/anli1_test.json": "fe494327269367e1ac4342fd72969a6270f51fd90cef0bc47a364a1d452762e7",
        "anli1/anli1_valid.json": "743faf5a43b687e34f5482166106e4c86a9f8f013078364a62caa055f8504704",
        "anli1/llm/test_CoT_0.json": "49e312c60501f8d374f9d8f7ba7bf86601bc736e667eedb9087793f274a1a0f1",
        "anli1/llm/valid_CoT_0.json": "ac3576f6caba189a7c00d1982bb2521518e5247b5aa2b347c483c874451ab935",
        "cqa/cqa_test.json": "caf4f47b8afac62a80f0517e1af3eba2af11de0c7c6f3baf3742fb6390d99dfb",
        "cqa/cqa_train.json": "09601f7b3239eb4c0a3be16c4b897d0c30905e9bc38cf36c77831d98bd37d9fb",
        "cqa/llm/test_CoT_0.json": "02860e4fa44b4c1f08ed29513abf74f433345e534c51418448b40869ed752a01",
        "cqa/llm/test_CoT_1.json": "44f1fc36088d5beed937c204ae43ca09d74fd0ea6a784fa89207b7e88c37fb15",
        "cqa/llm/train_CoT_0.json": "632167edcb645336a0ff1194fe87a1821fefdb02515679d178b167619903fff1",
        "cqa/llm/train_CoT_1.json": "8d14f619696c2bf3f0989d3a47ee8120f047af4eddaf23eb64610941cb453796",
        "cqa/llm/train_CoT_2.json": "25e559368c7e69dba359245395463a669f2fcef91a3b7b89613ff41bed0fbd8f",
        "cqa/llm/train_CoT_3.json": "db2a50477c463dd84a4b7ee2dedae323ff8746f20ca0c4a4619c03e04140ddf5",
        "cqa/llm/train_CoT_4.json": "52ccbf961db874a47968599f8411372a39f280f91413df7d90bcbcea291b9836",
        "cqa/llm/train_CoT_5.json": "0d238b1c5c4be3630bf14c15a176985b4a2e7bcf5fa5a93d24e9d89ccde06974",
        "cqa/llm/train_CoT_6.json": "af81b051cefa61be0b513f9e002b9eeab7160c18731732b59138fede91fccee4",
        "cqa/llm/train_CoT_7.json": "0cd6eba4d2449fb295d66e3dd9998ab59f6246820ca07e0fd1cc61dfcc3e6b3d",
        "cqa/llm/train_CoT_8.json": "02c156f92540f7b2469d252c814a2a87dad47616f828db3e7e236edd72f21b61",
        "cqa/llm/train_CoT_9.json": "7448c4cd5a9416ccb1e0c021e2b3bf2e697dc70173ff6f08d5b64b56d5fe8038",
        "esnli/esnli_test.json": "2307b4f6f6aea3940b2f1e12e792b86bad2b9fa73ef7032ffa41ce9a21976b9b",
        "esnli/esnli_valid.json": "4952f52d3dedfcafcdea691e4cde21a3db1e6dbed1f1622bb314c418cc27e6a6",
        "esnli/llm/test_CoT_0.json": "58051c39aa914699c956281bf56f9bc4b65601f4fe6685b2868226f04ef738ac",
        "esnli/llm/test_CoT_1.json": "2bf21b5ce8feb5177e9f121f237756ea045eaf0a5fa364c4a17d1de665141eed",
        "esnli/llm/valid_CoT_0.json": "3398e706895422fa17ae2ed3022890d7c5009207d5c831713b605e15af5b5c52",
        "esnli/llm/valid_CoT_1.json": "f14d62ae2a81b8b33293cd9e8fe02b28b781d8628f4b92393c862f8903e8a122",
        "svamp/SVAMP.json": "5be77703a6d891ae476d7c082787ad361392aa02453b132516cdd5f4e7934e3e",
        "svamp/llm/test_CoT_0.json": "fd536719c09b0cc97bfeee5775b212f8e4541ffe012bcd99c893a99e7e46df37",
        "svamp/llm/train_CoT_0.json": "9aa813b5653131e53bfe0477fa2cb3f90fb3d1b7a5226433218cb7b85998f094",
        "svamp/llm/train_CoT_1.json": "db0131252436d0487ff8642d94abad23636c080258da60097d5c6f15b1e32639",
        "svamp/svamp_test.json": "b73cba2c53b1e9b1c8aa512a8928c12d0524d1acba560f8c526756185044054c",
        "svamp/svamp_train.json": "641fc0f69864e1376fc2e29675affd15fa641f3b40279dcd6a595f3780f4e721",
    },
)

_CHUNK = 1 << 20
_SKIP = ("__MACOSX/",)  # resource forks a macOS zip tool adds


def git_blob_sha1(path: Path) -> str:
    """The id git gives the file's content: sha1 of ``b"blob <size>\\0"`` + the bytes."""
    h = hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def download(url: str, dest: Path, release: Release = DSS_RELEASE) -> None:
    """``url`` into ``dest``, within the release's overall deadline and size cap (each read also
    times out after 60 s)."""
    print(f"downloading {url}", flush=True)
    deadline = time.monotonic() + release.download_deadline_s
    hint = "; download it by hand and pass --archive FILE"
    try:
        with urllib.request.urlopen(url, timeout=60) as response, dest.open("wb") as out:
            size = 0
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > release.max_download_bytes:
                    raise UsageError(f"could not download {url}: more than {release.max_download_bytes >> 20} "
                                     f"MiB, larger than the release can be{hint}")
                if time.monotonic() > deadline:
                    raise UsageError(f"could not download {url}: not done after "
                                     f"{release.download_deadline_s:.0f} s{hint}")
                out.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        raise UsageError(f"could not download {url} ({getattr(e, 'reason', e)}){hint}") from None


def _member_path(name: str, strip: str) -> PurePosixPath | None:
    """The member's path inside the data root, or None for a folder or a file to skip. Absolute
    paths and ``..`` are refused: an archive may not write outside the folder."""
    if name.endswith("/") or name.startswith(_SKIP) or PurePosixPath(name).name == ".DS_Store":
        return None
    path = PurePosixPath(name[len(strip):] if strip and name.startswith(strip) else name)
    if path.is_absolute() or ".." in path.parts or not path.parts or "\\" in name:
        raise UsageError(f"archive member {name!r}: unsafe path (absolute or with '..'); refusing to unpack")
    return path


def unpack_and_verify(archive: Path, dest: Path, release: Release = DSS_RELEASE) -> dict:
    """Check ``archive``'s blob id, unpack it into ``dest`` (which must not exist or be empty)
    checking every known SHA-256, and return what was found. Nothing is left behind on failure."""
    blob = git_blob_sha1(archive)
    if blob != release.git_blob_sha1:
        raise UsageError(f"{archive}: git blob id {blob}, expected {release.git_blob_sha1} "
                         "(a different or damaged download)")
    try:
        zf = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as e:
        raise UsageError(f"{archive}: not a zip archive ({e})") from None
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with zf:
            infos = [i for i in zf.infolist() if not i.is_dir() and not i.filename.startswith(_SKIP)]
            if sum(i.file_size for i in infos) > release.max_unpacked_bytes:
                raise UsageError(f"{archive}: unpacks to more than {release.max_unpacked_bytes >> 30} GiB; refusing")
            # DSS's zip holds a top folder `datasets/`; the data root is what is inside it.
            tops = {i.filename.split("/", 1)[0] for i in infos}
            top = tops.pop() if len(tops) == 1 else None
            strip = f"{top}/" if top and top not in DSS_DATASETS and all("/" in i.filename for i in infos) else ""
            checked, unchecked = [], []
            for info in infos:
                rel = _member_path(info.filename, strip)
                if rel is None:
                    continue
                target = tmp.joinpath(*rel.parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                try:
                    digest = _extract(zf, info, target)
                except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
                    raise UsageError(f"{archive}: damaged zip archive: {info.filename}: {e}") from None
                expected = release.sha256.get(str(rel))
                if expected is None:
                    unchecked.append(str(rel))
                elif digest.hexdigest() != expected:
                    raise UsageError(f"{archive}: {rel} has SHA-256 {digest.hexdigest()}, expected {expected}")
                else:
                    checked.append(str(rel))
        absent = sorted(set(release.sha256) - set(checked))
        if absent:
            raise UsageError(f"{archive}: lacks {absent[0]}" + (f" and {len(absent) - 1} more known files"
                                                                  if len(absent) > 1 else ""))
        if dest.exists():
            dest.rmdir()  # empty (checked by the caller); rename needs it gone
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    missing_inputs = [str(b.gold_file(Path(), s)) for b in DSS_DATASETS.values() for s in b.file_splits
                      if not b.gold_file(dest, s).is_file()]
    return {"checked": len(checked), "unchecked": len(unchecked), "missing_inputs": missing_inputs}


def _extract(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path):
    digest = hashlib.sha256()
    with zf.open(info) as src, target.open("wb") as out:
        while chunk := src.read(_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest


def fetch(to: str, archive: str | None = None, url: str | None = None, release: Release = DSS_RELEASE) -> str:
    """Download (or take ``archive``), verify and unpack into ``to``; returns the report."""
    dest = Path(to).expanduser()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UsageError(f"--to {to}: already exists and is not an empty folder; choose a new one")
    if not dest.parent.is_dir():
        raise UsageError(f"--to {to}: the folder {dest.parent} does not exist")
    if archive is not None:
        if not Path(archive).is_file():
            raise UsageError(f"--archive {archive}: no such file")
        report = unpack_and_verify(Path(archive), dest, release)
    else:
        tmp_zip = dest.with_name(f".{dest.name}.download-{os.getpid()}.zip")
        try:
            download(url or release.url, tmp_zip, release)
            report = unpack_and_verify(tmp_zip, dest, release)
        finally:
            tmp_zip.unlink(missing_ok=True)
    lines = [f"unpacked into {dest}: {report['checked']} files matched their known SHA-256, "
             f"{report['unchecked']} files have no known checksum (the archive as a whole matched its git blob id)"]
    if report["missing_inputs"]:
        lines.append("not in the archive: " + ", ".join(report["missing_inputs"])
                     + " (training inputs that DSS builds from HF datasets: see docs/datasets.md, 'Getting the data')")
    return "\n".join(lines)
