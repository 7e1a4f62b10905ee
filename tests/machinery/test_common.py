"""machinery/common.py: downloads against a loopback hub (conftest.py: file_server), the settings parser, the
device and dtype policy, and atomic cache files under processes that start together. Each docstring names the bug
the test would catch."""

import dataclasses
import multiprocessing
import time

import numpy as np
import pytest
import torch

import data
from machinery import common


# ----------------------------------------------------------------------------------------------------------------
# Downloads against a loopback server (conftest.py: file_server)


def test_download_resumes_after_cut(file_server, tmp_path, capsys):
    """The connection drops halfway: the second try must ask for the rest with Range and produce the exact file."""
    blob = bytes(range(256)) * 4000  # ~1 MB
    file_server.files["/f.bin"] = blob
    file_server.cut_once.add("/f.bin")
    dest = tmp_path / "f.bin"
    common.download(file_server.url + "/f.bin", dest)
    assert dest.read_bytes() == blob
    assert not (tmp_path / "f.bin.part").exists()
    assert file_server.requests[0] == ("/f.bin", None)
    assert file_server.requests[1][1].startswith("bytes=") and int(file_server.requests[1][1][6:-1]) > 0
    assert "MiB" in capsys.readouterr().err  # progress was shown


def test_download_never_leaves_partial_file_under_final_name(file_server, tmp_path):
    """Every try is cut: the final name must not exist (a later run would trust a partial file)."""
    file_server.files["/g.bin"] = b"x" * 100_000

    class AlwaysCut(set):
        def __contains__(self, item):
            return True

        def discard(self, item):
            pass

    file_server.cut_once = AlwaysCut()
    with pytest.raises(common.DownloadError, match="cannot download"):
        common.download(file_server.url + "/g.bin", tmp_path / "g.bin", retries=2)
    assert not (tmp_path / "g.bin").exists()


def test_download_checks_sha256(file_server, tmp_path):
    file_server.files["/h.bin"] = b"hello"
    with pytest.raises(common.DownloadError, match="sha256 mismatch"):
        common.download(file_server.url + "/h.bin", tmp_path / "h.bin", sha256="0" * 64)
    assert not (tmp_path / "h.bin").exists()


# ----------------------------------------------------------------------------------------------------------------
# Settings


@dataclasses.dataclass
class _Demo:
    lr: float = 1e-6  # learning rate
    flag: bool = False  # a switch
    temps: tuple[float, ...] = (0.25, 1.0)  # several values
    name: str = "x"  # text


def test_parse_settings(capsys):
    s = common.parse_settings(_Demo, ["--lr=3e-4", "--flag=true", "--temps=0.5,0.75", "--name=a=b"])
    assert (s.lr, s.flag, s.temps, s.name) == (3e-4, True, (0.5, 0.75), "a=b")
    with pytest.raises(SystemExit, match="did you mean --flag"):
        common.parse_settings(_Demo, ["--flagg=1"])
    with pytest.raises(SystemExit, match="true/false"):
        common.parse_settings(_Demo, ["--flag=yes"])
    with pytest.raises(SystemExit):
        common.parse_settings(_Demo, ["--help"])
    assert "learning rate" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------------------
# Device and dtype


def test_dtype_policy_follows_the_cpu():
    """dtype=auto is bf16 exactly on CPUs with native bf16 matmul: catches a flag test that is always true or always
    false, a pick_device that ignores it, an explicit --dtype that auto overrides, and a reason that hides the flag."""
    assert common.cpu_bf16_flag("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw\nbugs\t\t: spectre_v1") is None
    assert common.cpu_bf16_flag("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n") == "amx_bf16"
    assert common.cpu_bf16_flag("flags\t\t: fpu avx512_bf16\n") == "avx512_bf16"
    assert common.cpu_bf16_flag("model name\t: Apple M2\nFeatures\t: fp asimd bf16\n") is None  # ARM: not claimed
    device, dtype, reason = common.pick_device("cpu")
    flag = common.cpu_bf16_flag()
    assert dtype == (torch.bfloat16 if flag else torch.float32), (dtype, flag)
    assert (flag or "no native bf16") in reason, reason
    assert common.pick_device("cpu", "float32")[1] == torch.float32  # an explicit --dtype always wins


# ----------------------------------------------------------------------------------------------------------------
# Atomic cache files


def _tokenize_in_a_race(barrier, results):
    """One of several processes that tokenize into the same empty cache at the same moment (fork: shares the
    parent's DPO_CACHE). A slow writer holds each temporary file open long enough for every process to be inside
    the write at once, which is what two torchrun ranks starting together do by chance."""
    real_savez = np.savez

    def slow_savez(file, **arrays):
        time.sleep(0.3)
        real_savez(file, **arrays)

    np.savez = slow_savez
    barrier.wait()
    try:
        tok = data.tokenize_dataset("synthetic", "test", max_length=64, max_prompt_length=32)
        results.put(("ok", int(tok["chosen_ids"].sum())))
    except Exception as e:  # noqa: BLE001 -- the parent reports what each process hit
        results.put(("failed", repr(e)))


def test_processes_starting_together_on_an_empty_cache_all_succeed(tmp_path, monkeypatch):
    """Catches: every writer sharing one temporary name (`x.npz.tmp`): the first rename moves the file away and
    the other processes die with FileNotFoundError, as a fresh multi-GPU run did. All must succeed with the same
    arrays, and leave exactly one cache file and no temporary files behind."""
    monkeypatch.setenv("DPO_CACHE", str(tmp_path))
    ctx = multiprocessing.get_context("fork")
    n = 4
    barrier, results = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=_tokenize_in_a_race, args=(barrier, results)) for _ in range(n)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [status for status, _ in outcomes] == ["ok"] * n, outcomes
    assert len({checksum for _, checksum in outcomes}) == 1, outcomes
    assert [f.name for f in (tmp_path / "tokenized").iterdir()] == [
        next((tmp_path / "tokenized").glob("*.npz")).name], list((tmp_path / "tokenized").iterdir())
