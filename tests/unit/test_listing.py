"""``nsdf-run images``: the bare listing answered without the settings models (``_listing.py``)
says exactly what the click command says, and any change to the settings since they were
last validated sends it back to the click command (which reports a bad setting)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Tuple

import pytest

from nsdf_hpc.cache import ImageCache

REPO = Path(__file__).resolve().parents[2]


def _publish(cache: ImageCache, runtime: str, digest: str, source: str, payload: bytes) -> str:
    work = cache.workdir(runtime, digest)
    Path(work, "image.sif").write_bytes(payload)
    entry = cache.publish(work, runtime, digest, {"source": source, "location": "image.sif",
                                                   "relative": True, "platform": "linux/amd64"},
                          main_file="image.sif")
    return entry.path


@pytest.fixture
def env(tmp_path: Path) -> Dict[str, str]:
    cache = ImageCache(str(tmp_path / "cache"))
    cache.ensure_dirs()
    _publish(cache, "apptainer", "sha256:" + "a" * 64, "nsdf/one:v1.0.0", b"x" * 3000)
    broken = _publish(cache, "charliecloud", "sha256:" + "b" * 64, "127.0.0.1:5000/two:latest", b"y" * 10)
    Path(broken, "image.sif").write_bytes(b"changed size")
    (tmp_path / "user.toml").write_text("")
    return {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "LANG": "C.UTF-8",
            "NSDF_HPC_CACHE": str(tmp_path / "cache"), "NSDF_HPC_SITE_CONFIG": str(tmp_path / "site.toml"),
            "NSDF_HPC_CONFIG": str(tmp_path / "user.toml")}


def _images(env: Dict[str, str], *args: str, **extra: str) -> Tuple[int, str, str, bool]:
    """(status, stdout, stderr, whether pydantic was imported)."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "nsdf_hpc", "images", *args],
                       env={**env, **extra}, cwd=REPO, capture_output=True, text=True, timeout=60)
    imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    errors = "".join(line + "\n" for line in r.stderr.splitlines() if not line.startswith("import time:"))
    return r.returncode, r.stdout, errors, "pydantic" in imported


def test_the_bare_listing_says_what_the_click_command_says(env: Dict[str, str], tmp_path: Path) -> None:
    Path(env["NSDF_HPC_CONFIG"]).write_text('nsdf_registry = "docker.io"\n')
    first = _images(env)                     # no stamp yet: the click command, which writes it
    assert first[0] == 0 and first[3], first
    fast = _images(env)
    assert fast[0] == 0 and not fast[3], fast
    assert fast[1] == first[1] == _images(env, NSDF_HPC_NO_FAST_PATH="1")[1]
    lines = fast[1].splitlines()
    assert lines[0].startswith("RUNTIME") and len(lines) == 3
    assert "nsdf/one:v1.0.0" in lines[1] and "2.9 KiB" in lines[1] and "[BROKEN]" not in lines[1]
    assert lines[2].endswith("127.0.0.1:5000/two:latest  [BROKEN]")
    fast_json, slow_json = _images(env, "--json"), _images(env, "--json", NSDF_HPC_NO_FAST_PATH="1")
    assert not fast_json[3] and slow_json[3] and fast_json[1] == slow_json[1]
    assert [(r["runtime"], r["ok"]) for r in json.loads(fast_json[1])] == [("apptainer", True), ("charliecloud", False)]
    # an option the fast path does not take goes to click
    assert _images(env, "--verify")[3]


def test_a_setting_changed_since_it_was_validated_goes_back_to_the_click_command(env: Dict[str, str]) -> None:
    user = Path(env["NSDF_HPC_CONFIG"])
    user.write_text("probe_timeout = 5.0\n")
    assert _images(env)[0] == 0 and not _images(env)[3]
    user.write_text('probe_timeout = "soon"\n')    # invalid: an error, as for every other command
    status, out, err, slow = _images(env)
    assert (status, out, slow) == (2, "", True) and "invalid setting probe_timeout" in err, err
    user.write_text("probe_timeout = 6.0\n")
    assert _images(env)[3] and not _images(env)[3]     # valid again: validated once, then fast
    user.write_text("probe_timeout = 7.0\n")          # an edit of the same size, at once
    assert _images(env)[3]
    # another cache (an NSDF_HPC_* variable) is validated again before it is listed fast
    other = _images(env, NSDF_HPC_CACHE=str(Path(env["NSDF_HPC_CACHE"]).parent / "empty"))
    assert other[3] and other[1].startswith("no cached images in ")


def test_a_reader_that_goes_away_ends_the_listing_quietly(env: Dict[str, str]) -> None:
    """``nsdf-run images | head``: a closed pipe ends both paths with click's status 1 and
    nothing on stderr."""
    for fast in (False, True):   # the click command (which writes the stamp), then the fast path
        r, w = os.pipe()
        os.close(r)              # the reader is gone before the first write: EPIPE every time
        try:
            p = subprocess.run([sys.executable, "-X", "importtime", "-m", "nsdf_hpc", "images"], env=env,
                               cwd=REPO, stdout=w, stderr=subprocess.PIPE, text=True, timeout=60)
        finally:
            os.close(w)
        lines = p.stderr.splitlines()
        assert ("pydantic" in p.stderr) is not fast
        assert p.returncode == 1 and [x for x in lines if not x.startswith("import time:")] == [], p.stderr


def test_a_cache_dir_made_of_variables_follows_them(env: Dict[str, str], tmp_path: Path) -> None:
    """``cache_dir = "$SCRATCH/cache"`` in a home shared by two clusters: the stamp holds the
    expanded directory, so it is only used while the variables it came from are the same."""
    env = {k: v for k, v in env.items() if k != "NSDF_HPC_CACHE"}
    Path(env["NSDF_HPC_CONFIG"]).write_text('cache_dir = "${SCRATCH}/cache"  # $SCRATCH: per cluster\n')
    first = _images(env, SCRATCH=str(tmp_path))
    assert first[3] and "nsdf/one:v1.0.0" in first[1]
    again = _images(env, SCRATCH=str(tmp_path))
    assert not again[3] and again[1] == first[1]
    other = _images(env, SCRATCH=str(tmp_path / "elsewhere"))
    assert other[3] and other[1] == f"no cached images in {tmp_path / 'elsewhere' / 'cache'}\n"


def test_a_fifo_for_a_config_file_is_an_error_not_a_hang(env: Dict[str, str], tmp_path: Path) -> None:
    assert _images(env)[0] == 0                          # a stamp for the settings as they are
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    status, out, err, _ = _images(env, NSDF_HPC_CONFIG=str(fifo))   # _images has a 60 s timeout
    assert (status, out) == (2, "") and "is not a file" in err, err


def test_ctrl_c_during_a_slow_listing_says_so_and_exits_130(env: Dict[str, str]) -> None:
    """A listing that re-hashes a big image (its mtime changed) on a slow filesystem: Ctrl-C
    ends it as it ends the click path, with one line and 130, no traceback."""
    import signal
    import time
    cache = ImageCache(env["NSDF_HPC_CACHE"])
    big = Path(_publish(cache, "apptainer", "sha256:" + "c" * 64, "big:latest", b""), "image.sif")
    with open(big, "r+b") as fh:                         # 4 GiB, sparse: its hash takes seconds
        fh.truncate(4 << 30)
    entry = json.loads((big.parent / "entry.json").read_text())
    entry["files"]["image.sif"]["size"] = 4 << 30        # the size recorded, the mtime not:
    (big.parent / "entry.json").write_text(json.dumps(entry))   # check() hashes it
    assert _images(env, "--json", NSDF_HPC_NO_FAST_PATH="1")[0] == 0   # writes the stamp
    for _ in range(3):                                   # a signal's moment: more than once
        p = subprocess.Popen([sys.executable, "-m", "nsdf_hpc", "images"], env=env, cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
        assert (p.returncode, out, err) == (130, "", "\nnsdf-run: interrupted by SIGINT\n")
