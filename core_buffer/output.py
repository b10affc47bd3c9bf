"""Where output files may go (DESIGN.md §6): only inside the configured `output_dirs`, after resolving
`..` and symlinks. Used by writer_agent (to refuse a request early) and std_h5_writer (to refuse it for
good, right before creating the file)."""
from __future__ import annotations

import os
from typing import Iterable

from core_buffer.errors import StdDaqError

NAME_MAX = 255  # bytes in one file name on Linux file systems


class OutputPathError(StdDaqError):
    """An output_file that must not or cannot be written; the message says why, for the person asking."""


def resolve_output_path(output_file: object, output_dirs: Iterable[str], overwrite: bool = False) -> str:
    """The real path the file will be created at, or OutputPathError naming the problem.

    Checks, in this order: a non-empty absolute path without NUL bytes; its directory, with `..` and
    symlinks resolved, inside one of `output_dirs` (also resolved); that directory exists; no file, and
    never a symlink, at the path unless `overwrite` (a symlink is refused even then)."""
    if not isinstance(output_file, str) or not output_file:
        raise OutputPathError(f"output_file must be a non-empty string, got {output_file!r}")
    if "\x00" in output_file:
        raise OutputPathError("output_file contains a NUL byte")
    try:
        encoded_name = os.fsencode(os.path.basename(output_file))
        os.fsencode(output_file)
    except UnicodeEncodeError as exc:
        raise OutputPathError(f"output_file has a character no file name can hold ({exc.reason})") from None
    if len(encoded_name) > NAME_MAX:
        raise OutputPathError(f"the file name of output_file is {len(encoded_name)} bytes long; at most "
                              f"{NAME_MAX} are possible")
    if not os.path.isabs(output_file):
        raise OutputPathError(f"output_file must be an absolute path, got {output_file!r}")
    directory, name = os.path.split(output_file)
    if name in ("", ".", ".."):
        raise OutputPathError(f"output_file {output_file!r} names a directory, not a file")
    allowed = [os.path.realpath(d) for d in output_dirs]
    if not allowed:
        raise OutputPathError("no output directories are configured (config key 'output_dirs'); "
                              "this detector cannot write files")
    real_dir = os.path.realpath(directory)
    if not any(os.path.commonpath([real_dir, root]) == root for root in allowed):
        raise OutputPathError(f"output_file {output_file!r} is outside the allowed directories "
                              f"({', '.join(allowed)})")
    if not os.path.isdir(real_dir):
        raise OutputPathError(f"the directory of output_file {output_file!r} does not exist")
    path = os.path.join(real_dir, name)
    if os.path.islink(path):
        raise OutputPathError(f"output_file {output_file!r} is a symbolic link; refusing to write through it")
    if os.path.lexists(path) and not overwrite:
        raise OutputPathError(f"output_file {output_file!r} already exists (overwriting is off: "
                              "config key 'overwrite_files')")
    return path


def open_output_directory(path: str, output_dirs: Iterable[str]) -> int:
    """An open file descriptor of the directory of `path` (as returned by resolve_output_path), reached
    from the allowed directory without following any symbolic link.

    resolve_output_path checks the path; between that check and the creation, a directory on the way
    could be swapped for a symbolic link pointing elsewhere. Walking down one component at a time with
    O_NOFOLLOW pins the directory that was checked: a link that appeared meanwhile makes this fail instead
    of escaping. The file is then created relative to it, e.g. through `/proc/self/fd/<fd>/<name>` with
    O_EXCL (which never follows a link at the name either). The caller closes the descriptor."""
    directory = os.path.dirname(path)
    roots = [os.path.realpath(d) for d in output_dirs]
    root = next((r for r in roots if os.path.commonpath([directory, r]) == r), None)
    if root is None:
        raise OutputPathError(f"output_file {path!r} is outside the allowed directories ({', '.join(roots)})")
    components = [c for c in os.path.relpath(directory, root).split(os.sep) if c not in ("", ".")]
    dir_fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    for component in components:
        try:
            next_fd = os.open(component, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=dir_fd)
        except OSError as exc:
            raise OutputPathError(f"the directory {component!r} of output_file {path!r} changed while it was "
                                  f"being opened ({exc.strerror}); refusing to follow it") from None
        finally:
            os.close(dir_fd)
        dir_fd = next_fd
    return dir_fd
