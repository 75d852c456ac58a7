"""Per-record checksums of an offload artifact's experts.bin, and `moeopt verify`.

Opening an offload artifact checks every file's sha256 except experts.bin's, whose records are each
checked against their crc32 when read: a start reads no expert record, a damaged record is refused in
one line when (and only when) a step needs it, and `moeopt verify` checks every byte on demand. An
artifact written before the checksums still opens, with the whole file hashed at the start as before.
Runs on the committed tiny artifacts (scripts/tiny_artifact.py): no torch, a second or two.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from moeopt.errors import BadInputError, VerificationError
from moeopt.runtime import OffloadSession, cache_source, read_manifest
from moeopt.runtime.expert_store import ExpertStore
from moeopt.runtime.offload_format import OffloadIndex
from moeopt.runtime.packed_frames import frame_pool, frame_views
from moeopt.runtime.verify import check_artifact
from tests.test_cli import run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFLOAD = FIXTURES / "tiny-artifact-offload"
RESIDENT = FIXTURES / "tiny-artifact"
PROMPTS = [[5], [17], [3], [9], [42], [100]]  # one-token prompts: few experts per run, so some stay unread


def _copy(tmp_path: Path, src: Path = OFFLOAD) -> tuple[Path, OffloadIndex]:
    art = tmp_path / src.name
    shutil.copytree(src, art)
    return art, OffloadIndex.from_manifest(read_manifest(art, verify=False))


def _flip(art: Path, index: OffloadIndex, key: tuple[int, int], at: float = 0.5) -> None:
    """Flip one byte inside record `key` (at that fraction of its expert bytes)."""
    rec = index.experts[key]
    pos = rec.offset + int(at * (index.formats[rec.format].expert_bytes - 1))
    with (art / index.file).open("r+b") as f:
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x40]))


def _read(store: ExpertStore, index: OffloadIndex, key: tuple[int, int]) -> None:
    fmt = index.formats[index.experts[key].format]
    store.read_into(*key, frame_views(fmt, frame_pool(fmt, 1, None), 0, None))


def _one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def test_every_record_has_a_crc32_and_a_flipped_byte_fails_only_its_own_read(tmp_path: Path) -> None:
    art, index = _copy(tmp_path)
    assert index.checksummed and len(index.experts) == 6
    for key in sorted(index.experts):
        for at in (0.0, 0.5, 1.0):  # first, middle and last byte of the record
            _flip(art, index, key, at)
            with ExpertStore(art, index) as store:
                assert not store.reads  # opening reads no record
                for other in sorted(index.experts):
                    if other != key:
                        _read(store, index, other)
                with pytest.raises(BadInputError, match=rf"corrupted: layer {key[0]} slot {key[1]} .*crc32") as e:
                    _read(store, index, key)
                assert "moeopt verify" in _one_line(e)
                assert store.reads[key] == 1 and sum(store.reads.values()) == len(index.experts)
            _flip(art, index, key, at)  # flipped back: the record reads again
            with ExpertStore(art, index) as store:
                _read(store, index, key)


def _unread_record(art: Path, index: OffloadIndex) -> tuple[list[int], tuple[int, int], np.ndarray]:
    """A one-token prompt, a cold expert that decoding it for a few tokens never reads, and the tokens."""
    for prompt in PROMPTS:
        with OffloadSession(art, source=cache_source(index.cold_bytes(), "lru")) as sess:
            out = sess.generate(np.array([prompt], dtype=np.int64), 4, stop_tokens=())
            read = set(sess.source.store.reads)
        unread = sorted(set(index.experts) - read)
        if read and unread:
            return prompt, unread[0], out.sequences
    raise AssertionError("every prompt read every record; pick other prompts")


def test_start_reads_no_record_and_a_damaged_one_fails_when_first_needed(tmp_path: Path) -> None:
    art, index = _copy(tmp_path)
    prompt, key, want = _unread_record(art, index)
    _flip(art, index, key)
    # verify=True (the default): every other file's sha256 is checked, experts.bin's is not
    with OffloadSession(art, source=cache_source(index.cold_bytes(), "lru")) as sess:
        assert not sess.source.store.reads  # opening read no expert record
        got = sess.generate(np.array([prompt], dtype=np.int64), 4, stop_tokens=())
        assert np.array_equal(got.sequences, want)  # a few tokens decode as on the sound file
        assert key not in sess.source.store.reads
        with pytest.raises(BadInputError, match=rf"corrupted: layer {key[0]} slot {key[1]} ") as e:
            sess.source.acquire(*key[:1], [key[1]])  # the first step that needs it
        _one_line(e)
    with pytest.raises(BadInputError, match=rf"layer {key[0]} slot {key[1]} .*crc32") as e:
        OffloadSession(art)  # the default source reads every record when it opens
    _one_line(e)


def test_verify_command_checks_every_byte(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli("verify", str(OFFLOAD), capsys=capsys)
    assert code == 0 and err == "" and len(out.splitlines()) == 1, (out, err)
    assert "ok: 11 files" in out and "6 expert records match their crc32" in out
    code, out, _ = run_cli("verify", str(RESIDENT), capsys=capsys)
    assert code == 0 and "ok: 5 files" in out and "expert records" not in out

    art, index = _copy(tmp_path)
    key = sorted(index.experts)[-1]
    _flip(art, index, key)
    code, out, err = run_cli("verify", str(art), capsys=capsys)
    lines = out.splitlines()
    assert code == 2 and len(err.strip().splitlines()) == 1 and "2 problems found" in err, (out, err)
    assert lines == [f"{art / 'experts.bin'}: layer {key[0]} slot {key[1]} (record at byte "
                     f"{index.experts[key].offset}): crc32 differs from the manifest",
                     f"{art / 'experts.bin'}: sha256 differs from the manifest"]
    with pytest.raises(VerificationError, match=r"crc32 differs .*\(and 1 more problems\)"):
        check_artifact(art)  # what the lowering runs on what it has just written

    res = tmp_path / RESIDENT.name
    shutil.copytree(RESIDENT, res)
    data = res / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[len(blob) // 2] ^= 1
    data.write_bytes(bytes(blob))
    (res / "tokenizer.json").unlink()
    code, out, err = run_cli("verify", str(res), capsys=capsys)
    assert code == 2 and sorted(out.splitlines()) == [f"{data}: sha256 differs from the manifest",
                                                      f"{res / 'tokenizer.json'}: missing"], out


def test_an_artifact_without_checksums_hashes_its_expert_file_at_the_start(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Written before per-record checksums: no crc32 in the index. It opens, and experts.bin is hashed
    whole when it does, as it was then; `moeopt verify` passes it and says what it could not check."""
    art, _ = _copy(tmp_path)
    manifest = json.loads((art / "manifest.json").read_text())
    for e in manifest["offload"]["experts"]:
        del e["crc32"]
    (art / "manifest.json").write_text(json.dumps(manifest, indent=1))  # the manifest lists every file but itself
    index = OffloadIndex.from_manifest(manifest)
    assert not index.checksummed
    OffloadSession(art, source=cache_source(index.cold_bytes(), "lru")).close()
    code, out, _ = run_cli("verify", str(art), capsys=capsys)
    assert code == 0 and "6 expert records have no crc32" in out, out
    _flip(art, index, sorted(index.experts)[0])
    with pytest.raises(BadInputError, match=r"experts\.bin: corrupted \(sha256"):
        OffloadSession(art, source=cache_source(index.cold_bytes(), "lru"))
    with ExpertStore(art, index) as store:  # nothing to check a read against: the start's hash is the check
        _read(store, index, sorted(index.experts)[0])


def _cached_bytes(path: Path) -> int:
    """Bytes of `path` in the page cache (util-linux fincore)."""
    res = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True)
    return int(res.stdout.split()[0])


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_a_store_that_does_not_keep_the_page_cache_leaves_no_expert_pages(tmp_path: Path) -> None:
    """page_cache=False: each record's pages leave the page cache once read, so an expert is in memory
    once (its frame), not twice; the default keeps them (a re-read is then a memory copy)."""
    art, index = _copy(tmp_path)
    path = art / index.file
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # the copy's dirty pages cannot be dropped
        for keep in (False, True):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert _cached_bytes(path) == 0
            with ExpertStore(art, index, page_cache=keep) as store:
                for key in sorted(index.experts):
                    _read(store, index, key)
            assert _cached_bytes(path) == (index.file_bytes if keep else 0), keep
    finally:
        os.close(fd)


def test_verify_runs_without_torch() -> None:
    """The device install has no torch: `moeopt verify` is a runtime command."""
    from tests.test_runtime_install import no_torch

    res = no_torch("verify", str(OFFLOAD))
    assert res.returncode == 0 and "6 expert records match their crc32" in res.stdout, res.stderr


@pytest.mark.skipif(shutil.which("fincore") is None, reason="needs util-linux fincore")
def test_moeopt_run_no_page_cache_leaves_no_expert_pages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`moeopt run --no-page-cache` reaches the store: under a memory limit that counts the page cache
    (bench/offload_large.py), the expert file's cached pages pushed out the runtime's own pages and a
    decode step read more than its experts from disk. The default still keeps them."""
    art, index = _copy(tmp_path)
    path = art / index.file
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        for flag, cached in (("--no-page-cache", False), ("--page-cache", True)):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert _cached_bytes(path) == 0
            code, _out, err = run_cli("run", str(art), "--ids", "1,2,3", "--max-new-tokens", "4", "--budget",
                                     str(index.cold_bytes()), "--policy", "lru", flag, capsys=capsys)
            assert code == 0, err
            assert (_cached_bytes(path) > 0) == cached, (flag, _cached_bytes(path))
    finally:
        os.close(fd)
