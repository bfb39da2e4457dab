"""The stage's copy-in and write-back (``_stage``): what a sandbox leaves in its staged work directory reaches the
host sanitized, and nothing in the host directory can redirect the write-back."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from stitchwork.isolation import _stage


def tree(root: Path) -> dict[str, str]:
    """``relative path -> kind:content`` of everything under ``root`` (symlinks not followed)."""
    found = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if path.is_symlink():
            found[relative] = "link:" + os.readlink(path)
        elif path.is_dir():
            found[relative] = "dir"
        elif path.is_file():
            found[relative] = "file:" + path.read_text()
        else:
            found[relative] = "other"
    return found


@pytest.fixture
def staged(tmp_path: Path) -> Path:
    path = tmp_path / "staged"
    path.mkdir()
    return path


@pytest.fixture
def host(tmp_path: Path) -> Path:
    path = tmp_path / "host"
    path.mkdir()
    return path


def test_the_host_directory_ends_equal_to_the_staged_one(staged: Path, host: Path) -> None:
    (host / "deleted.txt").write_text("gone after the run")
    (host / "old-dir").mkdir()
    (host / "old-dir" / "inner").write_text("gone too")
    (host / "kept.txt").write_text("before")
    (staged / "kept.txt").write_text("after")
    (staged / "new").mkdir()
    (staged / "new" / "file.txt").write_text("created")
    (staged / "link").symlink_to("new/file.txt")

    report = _stage.commit(str(staged), str(host))

    assert tree(host) == tree(staged)
    assert report.removed == 2 and report.written >= 3


def test_setuid_setgid_and_sticky_bits_are_stripped(staged: Path, host: Path) -> None:
    evil = staged / "evil"
    evil.write_bytes(b"\x7fELF")
    evil.chmod(0o6755)
    shared = staged / "shared"
    shared.mkdir()
    shared.chmod(0o3777)

    _stage.commit(str(staged), str(host))

    assert stat.S_IMODE((host / "evil").stat().st_mode) == 0o755
    assert stat.S_IMODE((host / "shared").stat().st_mode) == 0o777


def test_an_unchanged_file_keeps_its_mode_fixed_without_being_rewritten(staged: Path, host: Path) -> None:
    (host / "same.txt").write_text("same")
    os.link(host / "same.txt", host.parent / "witness")  # a hard link shows whether the inode was replaced
    _stage.copy_in(str(host), str(staged / "copy"), uid=os.getuid(), gid=os.getgid())
    (staged / "copy" / "same.txt").chmod(0o4600)

    _stage.commit(str(staged / "copy"), str(host))

    assert (host / "same.txt").stat().st_ino == (host.parent / "witness").stat().st_ino
    assert stat.S_IMODE((host / "same.txt").stat().st_mode) == 0o600


def test_special_files_are_skipped_and_reported(staged: Path, host: Path) -> None:
    os.mkfifo(staged / "fifo")

    report = _stage.commit(str(staged), str(host))

    assert not (host / "fifo").exists()
    assert any(entry.endswith("/fifo") for entry in report.skipped)


def test_a_symlink_in_the_host_directory_is_replaced_not_followed(staged: Path, host: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "passwd").write_text("the host's own file")
    (host / "etc").symlink_to(outside)  # left there by an earlier run
    (host / "file").symlink_to(outside / "passwd")
    (staged / "etc").mkdir()
    (staged / "etc" / "passwd").write_text("owned")
    (staged / "file").write_text("owned too")

    _stage.commit(str(staged), str(host))

    assert (outside / "passwd").read_text() == "the host's own file"
    assert not (host / "etc").is_symlink() and (host / "etc" / "passwd").read_text() == "owned"
    assert not (host / "file").is_symlink() and (host / "file").read_text() == "owned too"


def test_a_file_replaces_a_directory_and_a_directory_replaces_a_file(staged: Path, host: Path) -> None:
    (host / "was-dir").mkdir()
    (host / "was-dir" / "x").write_text("x")
    (host / "was-file").write_text("y")
    (staged / "was-dir").write_text("now a file")
    (staged / "was-file").mkdir()

    _stage.commit(str(staged), str(host))

    assert tree(host) == {"was-dir": "file:now a file", "was-file": "dir"}


def test_nesting_past_the_depth_cap_is_skipped_not_a_crash(staged: Path, host: Path) -> None:
    deep = staged
    for _ in range(_stage.MAX_DEPTH + 5):
        deep = deep / "d"
    deep.mkdir(parents=True)

    report = _stage.commit(str(staged), str(host))

    assert any("nested too deep" in entry for entry in report.skipped)


def test_copy_in_keeps_symlinks_strips_special_bits_and_skips_devices(host: Path, staged: Path) -> None:
    (host / "a.txt").write_text("a")
    (host / "a.txt").chmod(0o4644)
    (host / "sub").mkdir()
    (host / "sub" / "b.txt").write_text("b")
    (host / "to-etc").symlink_to("/etc/passwd")
    os.mkfifo(host / "fifo")

    _stage.copy_in(str(host), str(staged / "work"), uid=os.getuid(), gid=os.getgid())

    copied = staged / "work"
    assert tree(copied) == {"a.txt": "file:a", "sub": "dir", "sub/b.txt": "file:b", "to-etc": "link:/etc/passwd"}
    assert stat.S_IMODE((copied / "a.txt").stat().st_mode) == 0o644


def test_copy_in_gives_the_copy_to_the_sandbox_user(host: Path, staged: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("changing owners needs root")
    (host / "f").write_text("f")
    (host / "d").mkdir()

    _stage.copy_in(str(host), str(staged / "work"), uid=65534, gid=65534)

    for path in (staged / "work", staged / "work" / "f", staged / "work" / "d"):
        assert (path.stat().st_uid, path.stat().st_gid) == (65534, 65534), path


def test_a_missing_host_directory_is_a_stage_error(staged: Path, tmp_path: Path) -> None:
    with pytest.raises(_stage.StageError, match="cannot stage"):
        _stage.copy_in(str(tmp_path / "missing"), str(staged / "work"), uid=0, gid=0)
    with pytest.raises(_stage.StageError, match="cannot write back"):
        _stage.commit(str(staged), str(tmp_path / "missing"))


# -- the quota's tmpfs ---------------------------------------------------------------------------------------------


def test_the_quota_tmpfs_is_nosuid_nodev_sized_and_private(tmp_path: Path) -> None:
    """Mounted in a child with a mount namespace of its own: the flags, the size and that the host never sees it.

    (bwrap adds ``nosuid`` to its own binds; this pins the stage's mount, which ``gvisor://`` and ``wasm://`` rely on.)
    """
    point = tmp_path / "stage"
    point.mkdir()
    read_r, read_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            os.close(read_r)
            _stage.private_mounts()
            _stage.mount_tmpfs(str(point), 4 * 1024 * 1024)
            line = next(row for row in Path("/proc/self/mountinfo").read_text().splitlines()
                        if row.split()[4] == str(point))  # fmt: skip
            info = os.statvfs(point)
            os.write(read_w, f"{line.split()[5]} {info.f_blocks * info.f_frsize}".encode())
            code = 0
        except BaseException as exc:
            os.write(read_w, f"error {exc}".encode())
        finally:
            os._exit(code)
    os.close(read_w)
    with os.fdopen(read_r, "rb") as pipe:
        report = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    if report.startswith("error"):
        pytest.skip(f"no mount namespace for this user here: {report}")
    flags, size = report.split()
    assert {"nosuid", "nodev"} <= set(flags.split(",")), flags
    assert int(size) == 4 * 1024 * 1024
    assert os.waitstatus_to_exitcode(status) == 0
    assert not any(row.split()[4] == str(point) for row in Path("/proc/self/mountinfo").read_text().splitlines())
