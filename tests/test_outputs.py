"""What slimkit may write, and how: replacing only its own outputs, locks, leftovers of killed writers, umask,
interrupts, real file-system failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from slimkit import SlimkitError, load, new_model, save
from slimkit.cli import main
from slimkit.io import host_tag
from slimkit.outputs import OUTPUT_MARKER, output_kind
from slimkit.modelfile import pack, unpack

CLI = [sys.executable, "-m", "slimkit"]


def model_dir(path: Path) -> Path:
    torch.manual_seed(0)
    return save(new_model("lenet300", input_shape=[1, 8, 8], num_classes=10, data="digits"), path)


def test_same_kind_outputs_are_replaced_and_others_need_overwrite(tmp_path):
    source = model_dir(tmp_path / "m")
    pack(source, tmp_path / "m.slim")
    first = (tmp_path / "m.slim").read_bytes()
    pack(source, tmp_path / "m.slim")  # slimkit's own .slim: replaced without asking
    assert (tmp_path / "m.slim").read_bytes() == first
    unpack(tmp_path / "m.slim", tmp_path / "u")
    unpack(tmp_path / "m.slim", tmp_path / "u")  # slimkit's own model directory: replaced atomically
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(SlimkitError, match="files slimkit did not write"):
        unpack(tmp_path / "m.slim", tmp_path / "theirs")
    pack(source, tmp_path / "other.slim")
    with pytest.raises(SlimkitError, match="holds a slimkit .slim file"):
        unpack(tmp_path / "m.slim", tmp_path / "other.slim")  # a model directory is not written over a .slim
    unpack(tmp_path / "m.slim", tmp_path / "theirs", overwrite=True)  # asked for: the folder is replaced whole
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["model.safetensors", "slimkit.json"]
    (tmp_path / "empty").mkdir()
    save(load(source), tmp_path / "empty")  # an empty folder holds nothing to lose


def test_runs_need_resume_or_overwrite_and_overwrite_keeps_foreign_files(tmp_path):
    out = tmp_path / "run"
    args = ["train", "--model", "lenet300", "--epochs", "1", "--no-progress", "--out", str(out)]
    assert main(args) == 0
    assert output_kind(out) == "train" and json.loads((out / OUTPUT_MARKER).read_text())["kind"] == "train"
    (out / "my-notes.txt").write_text("keep me")
    assert main(args) == 2  # an earlier run: continue it or start over, never silently replaced
    assert main([*args, "--resume"]) == 0
    before = (out / "checkpoint" / "last.pt").stat().st_mtime_ns
    assert main([*args, "--overwrite"]) == 0  # starts over: the earlier run's results go, the user's file stays
    assert (out / "checkpoint" / "last.pt").stat().st_mtime_ns != before
    assert (out / "my-notes.txt").read_text() == "keep me"


def test_a_failed_run_leaves_no_empty_run_folder(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"model: {{path: {tmp_path / 'missing'}}}\n")
    assert main(["run", str(recipe), "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_a_second_writer_of_the_same_output_is_refused(tmp_path):
    out = tmp_path / "run"
    first = subprocess.Popen([*CLI, "train", "--model", "lenet300", "--epochs", "400", "--no-progress", "--out",
                              str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (out / "checkpoint" / "last.pt").exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        second = subprocess.run([*CLI, "train", "--model", "lenet300", "--epochs", "1", "--out", str(out),
                                 "--overwrite"], capture_output=True, text=True)
        assert first.poll() is None, "the first writer finished too early to be raced"
        assert second.returncode == 2 and f"being written by another slimkit process (pid {first.pid}" in second.stderr
    finally:
        first.kill()
        first.wait()
    # the first writer died holding the lock: the lock is stale now, and the next writer replaces it
    assert (tmp_path / ".run.slimkit-lock").exists()
    assert main(["train", "--model", "lenet300", "--epochs", "1", "--no-progress", "--out", str(out),
                 "--resume"]) == 0
    assert not (tmp_path / ".run.slimkit-lock").exists()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_leftovers_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    source = model_dir(tmp_path / "m")
    pid = _dead_pid()
    leftover_file = tmp_path / f".m.slim.slimkit-{host_tag()}-{pid}-0badf00d.tmp"
    leftover_file.write_bytes(b"half a file")
    leftover_dir = tmp_path / f".u.slimkit-{host_tag()}-{pid}-0badf00d"
    leftover_dir.mkdir()
    (leftover_dir / "model.safetensors").write_bytes(b"half")
    foreign = tmp_path / ".m.slim.backup.tmp"  # not slimkit's naming: never touched
    foreign.write_bytes(b"mine")
    pack(source, tmp_path / "m.slim")
    unpack(tmp_path / "m.slim", tmp_path / "u")
    assert not leftover_file.exists() and not leftover_dir.exists() and foreign.read_bytes() == b"mine"


def test_a_directory_moved_aside_by_a_killed_writer_is_put_back(tmp_path):
    """A writer replacing a model directory moves the old one aside, then renames the new one in; killed in
    between, the old one is restored by the next write to that path instead of being removed."""
    from slimkit.io import remove_stale_temps

    original = (model_dir(tmp_path / "m") / "model.safetensors").read_bytes()
    aside = tmp_path / f".m.slimkit-{host_tag()}-{_dead_pid()}-0badf00d-old"
    os.rename(tmp_path / "m", aside)
    remove_stale_temps(tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").read_bytes() == original and not aside.exists()
    load(tmp_path / "m")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, umask):
    code = ("import os, torch, slimkit; os.umask(%d); torch.manual_seed(0);"
            "m = slimkit.new_model('lenet300'); slimkit.save(m, 'dir'); slimkit.save(m, 'one.slim')" % umask)
    subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True)
    modes = {p.name: p.stat().st_mode & 0o777 for p in [tmp_path / "dir", *(tmp_path / "dir").iterdir(),
                                                        tmp_path / "one.slim"]}
    assert modes == {"dir": 0o777 & ~umask, "model.safetensors": 0o666 & ~umask, "slimkit.json": 0o666 & ~umask,
                     "one.slim": 0o666 & ~umask}


def test_ctrl_c_names_what_stopped_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.Popen([*CLI, "train", "--model", "lenet300", "--epochs", "150", "--no-progress", "--out",
                             str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "checkpoint" / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert err.strip() == (f"interrupted: slimkit train stopped; its finished stages and last checkpointed epoch are "
                           f"kept in {out}: run the same command with --resume to continue")
    resumed = subprocess.run([*CLI, "train", "--model", "lenet300", "--epochs", "150", "--no-progress", "--out",
                              str(out), "--resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert len(json.loads((out / "metrics.json").read_text())["history"]) == 150


def test_a_real_file_size_limit_is_a_named_error_with_no_partial_output(tmp_path):
    """Writing past RLIMIT_FSIZE fails in the kernel (EFBIG), as a full disk does (ENOSPC)."""
    model_dir(tmp_path / "m")
    limit = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
             "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000));"
             "from slimkit.cli import main; raise SystemExit(main(['unpack', 'm.slim', '--out', 'u']))")
    pack(tmp_path / "m", tmp_path / "m.slim")
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = subprocess.run([sys.executable, "-c", limit], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot write u: File too large") and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no partial directory, no temporary, no lock


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_folder_is_a_named_error(tmp_path):
    source = model_dir(tmp_path / "m")
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        with pytest.raises(SlimkitError, match="Permission denied"):
            pack(source, locked / "m.slim")
    finally:
        locked.chmod(0o755)
    assert list(locked.iterdir()) == []


def test_hand_edited_weights_load_with_no_verify_and_save_records_the_new_digest(tmp_path):
    source = model_dir(tmp_path / "m")
    weights = source / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0x01  # a deliberate edit of the last weight
    weights.write_bytes(bytes(blob))
    with pytest.raises(SlimkitError, match="is damaged"):
        load(source)
    edited = load(source, verify=False)
    assert main(["--no-verify", "analyze", str(source), "--no-latency", "--json"]) == 0
    save(edited, tmp_path / "resealed")
    assert torch.equal(load(tmp_path / "resealed").fc3.bias, edited.fc3.bias)


def test_directories_written_before_digests_still_load(tmp_path):
    source = model_dir(tmp_path / "m")
    meta = json.loads((source / "slimkit.json").read_text())
    del meta["files"]
    (source / "slimkit.json").write_text(json.dumps(meta))
    reference = load(tmp_path / "m")
    assert isinstance(reference, torch.nn.Module)
