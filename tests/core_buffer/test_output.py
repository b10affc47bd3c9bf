"""Output path policy: only inside the allowed directories after resolving .. and symlinks."""
import os

import pytest

from core_buffer import parse_config
from core_buffer.output import OutputPathError, open_output_directory, resolve_output_path


@pytest.fixture
def roots(tmp_path):
    allowed = tmp_path / "data"
    allowed.mkdir()
    (allowed / "sub").mkdir()
    outside = tmp_path / "etc"
    outside.mkdir()
    return allowed, outside


def test_a_path_inside_an_allowed_directory_resolves(roots):
    allowed, _ = roots
    assert resolve_output_path(f"{allowed}/sub/../run.h5", [str(allowed)]) == f"{allowed}/run.h5"


@pytest.mark.parametrize("make_path,message", [
    (lambda a, o: 5, "must be a non-empty string, got 5"),
    (lambda a, o: "", "must be a non-empty string"),
    (lambda a, o: "run.h5", "must be an absolute path, got 'run.h5'"),
    (lambda a, o: f"{a}/x\x00.h5", "contains a NUL byte"),
    (lambda a, o: f"{a}/", "names a directory"),
    (lambda a, o: f"{a}/../etc/run.h5", "is outside the allowed directories"),
    (lambda a, o: f"{o}/run.h5", "is outside the allowed directories"),
    (lambda a, o: f"{a}/missing/run.h5", "does not exist"),
    (lambda a, o: f"{a}/\ud800.h5", "a character no file name can hold"),
    (lambda a, o: f"{a}/{'x' * 253}.h5", "256 bytes long; at most 255"),
])
def test_each_bad_path_gets_its_own_reason(roots, make_path, message):
    allowed, outside = roots
    with pytest.raises(OutputPathError, match=message):
        resolve_output_path(make_path(allowed, outside), [str(allowed)])


def test_a_symlinked_directory_pointing_outside_is_refused(roots):
    allowed, outside = roots
    os.symlink(outside, allowed / "escape")
    with pytest.raises(OutputPathError, match="outside the allowed directories"):
        resolve_output_path(f"{allowed}/escape/run.h5", [str(allowed)])


def test_existing_files_and_symlinks(roots):
    allowed, outside = roots
    (allowed / "old.h5").write_bytes(b"x")
    with pytest.raises(OutputPathError, match="already exists .*'overwrite_files'"):
        resolve_output_path(f"{allowed}/old.h5", [str(allowed)])
    assert resolve_output_path(f"{allowed}/old.h5", [str(allowed)], overwrite=True) == f"{allowed}/old.h5"
    os.symlink(outside / "target.h5", allowed / "link.h5")
    with pytest.raises(OutputPathError, match="is a symbolic link"):
        resolve_output_path(f"{allowed}/link.h5", [str(allowed)], overwrite=True)


def test_no_configured_directory_refuses_everything(roots):
    allowed, _ = roots
    with pytest.raises(OutputPathError, match="config key 'output_dirs'"):
        resolve_output_path(f"{allowed}/run.h5", [])


def test_output_keys_in_the_config():
    config = parse_config({"detector_name": "d", "detector_type": "eiger", "n_modules": 1, "bit_depth": 8,
                           "image_pixel_height": 256, "image_pixel_width": 512, "start_udp_port": 9000,
                           "output_dirs": ["/data"], "file_mode": "0600"})
    assert config.output_dirs == ("/data",)
    assert config.file_mode == 0o600 and config.overwrite_files is False


def test_a_file_created_in_the_opened_directory_is_the_checked_file(roots):
    import h5py

    allowed, _ = roots
    path = resolve_output_path(f"{allowed}/sub/run.h5", [str(allowed)])
    dir_fd = open_output_directory(path, [str(allowed)])
    try:
        with h5py.File(f"/proc/self/fd/{dir_fd}/run.h5", "x") as f:  # how the writer creates it
            f["x"] = [1, 2, 3]
    finally:
        os.close(dir_fd)
    with h5py.File(path, "r") as f:
        assert list(f["x"][:]) == [1, 2, 3]


def test_a_directory_swapped_for_a_symlink_after_the_check_is_not_followed(roots):
    """The race resolve_output_path cannot close alone: `sub` becomes a link to outside after the check."""
    allowed, outside = roots
    path = resolve_output_path(f"{allowed}/sub/run.h5", [str(allowed)])
    os.rename(allowed / "sub", allowed / "sub.old")
    os.symlink(outside, allowed / "sub")
    with pytest.raises(OutputPathError, match="'sub' .* changed while it was being opened"):
        open_output_directory(path, [str(allowed)])
    assert list(outside.iterdir()) == []


def test_a_file_swapped_for_a_symlink_after_the_check_is_not_written_through(roots):
    import h5py

    allowed, outside = roots
    target = outside / "precious"
    target.write_bytes(b"keep me")
    path = resolve_output_path(f"{allowed}/new.h5", [str(allowed)])
    dir_fd = open_output_directory(path, [str(allowed)])
    try:
        os.symlink(target, path)  # appears between the check and the create
        with pytest.raises(FileExistsError):
            h5py.File(f"/proc/self/fd/{dir_fd}/new.h5", "x")
    finally:
        os.close(dir_fd)
    assert target.read_bytes() == b"keep me"
