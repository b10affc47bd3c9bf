"""FrameBuffer and ImageBuffer over real POSIX shared memory, shared with real second processes."""
import contextlib
import os
import stat
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest

from core_buffer import (
    BufferLayoutError,
    BufferMissingError,
    FrameBuffer,
    ImageBuffer,
    ImageLostError,
    ImageMetadata,
    ModuleFrame,
)
from core_buffer.formats import INVALID_ID
from core_buffer.ringbuffer import PAGE, SHM_DIR, unlink


@contextlib.contextmanager
def removed_at_end(buffer):
    """The buffer, closed and its segment removed when the block ends (services never remove segments;
    the tests do)."""
    try:
        yield buffer
    finally:
        buffer.close()
        buffer.unlink()


def run_python(code: str, timeout: float = 30) -> str:
    """Run `code` in a new interpreter (a real second process) and return its stdout."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_frame_buffer_slots_are_page_aligned_and_hold_modules_contiguously(make_config):
    _, config = make_config(n_modules=3, image_pixel_height=1536)
    with removed_at_end(FrameBuffer.for_config(config)) as buf:
        assert buf.created
        for slot in (0, 5):
            data = buf.slot_data(slot)
            assert data.ctypes.data % PAGE == 0
            assert data.nbytes == 3 * 1024 * 1024
            assert buf.module_data(slot, 2).ctypes.data == data.ctypes.data + 2 * 1024 * 1024
        assert buf.metas(0).shape == (3,)
        assert (buf.metas(7)["id"] == INVALID_ID).all()


def test_segments_get_the_configured_permissions(make_config):
    _, config = make_config(shm_mode="0600")
    with removed_at_end(FrameBuffer.for_config(config)):
        mode = stat.S_IMODE(os.stat(f"{SHM_DIR}/std-daq-{config.detector_name}-frames").st_mode)
    assert mode == 0o600


def test_a_second_process_reads_frames_the_first_wrote(make_config):
    path, config = make_config(n_modules=2, image_pixel_height=1024)
    with removed_at_end(FrameBuffer.for_config(config)) as buf:
        for module in range(2):
            data = buf.begin_frame(41, module)
            data[:] = np.arange(data.size, dtype=np.uint64).astype(np.uint8) + module
            buf.commit_frame(ModuleFrame(id=41, pulse_id=1000 + module, n_recv_packets=128, n_packets=128,
                                         module_id=module))
        out = run_python(f"""
            import hashlib
            from core_buffer import FrameBuffer, load_config
            buf = FrameBuffer.for_config(load_config({str(path)!r}))
            assert not buf.created
            for module in range(2):
                meta = buf.read_frame_meta(41, module)
                print(meta.pulse_id, meta.n_recv_packets, hashlib.sha1(buf.frame_data(41, module)).hexdigest())
            buf.close()
        """)
        import hashlib

        expected = [f"{1000 + m} 128 {hashlib.sha1(buf.frame_data(41, m)).hexdigest()}" for m in range(2)]
    assert out.split("\n")[:2] == expected


def test_a_reader_detects_that_the_writer_lapped_it(make_config):
    path, config = make_config(image_buffer_slots=4)
    shape = config.image_shape
    with removed_at_end(ImageBuffer.for_config(config)) as buf:
        image = buf.begin_image(2)
        image.view(np.uint16)[: shape[0] * shape[1]] = 7
        buf.commit_image(ImageMetadata(id=2, height=shape[0], width=shape[1], user_1=0))
        reader = f"""
            import numpy as np
            from core_buffer import ImageBuffer, ImageLostError, load_config
            buf = ImageBuffer.for_config(load_config({str(path)!r}))
            out = np.empty({shape}, np.uint16)
            try:
                meta = buf.copy_image(2, out)
                print("ok", meta.id, int(out.min()), int(out.max()))
            except ImageLostError as exc:
                print("lost", exc.wanted_id, exc.found_id)
            buf.close()
        """
        assert run_python(reader).split() == ["ok", "2", "7", "7"]
        # The writer laps the reader: id 6 lands in the slot of id 2 (4 slots).
        buf.begin_image(6)[:] = 9
        buf.commit_image(ImageMetadata(id=6, height=shape[0], width=shape[1], user_1=1))
        assert run_python(reader).split() == ["lost", "2", "6"]


def test_a_copy_overwritten_while_it_is_read_is_reported_lost(make_config):
    _, config = make_config(image_buffer_slots=4)
    with removed_at_end(ImageBuffer.for_config(config)) as buf:
        buf.begin_image(1)
        buf.commit_image(ImageMetadata(id=1, height=512, width=1024))
        out = np.empty((512, 1024), np.uint16)
        assert buf.copy_image(1, out).id == 1
        buf.begin_image(5)  # a writer starts on the slot: the id becomes invalid before data changes
        with pytest.raises(ImageLostError) as info:
            buf.copy_image(1, out)
        assert info.value.found_id == INVALID_ID


def test_a_commit_stores_every_field_and_the_id_and_an_encoded_one_the_same(make_config):
    _, config = make_config(image_buffer_slots=4)
    with removed_at_end(ImageBuffer.for_config(config)) as buf:
        meta = ImageMetadata(id=2**40 + 6, height=512, width=1024, status=2, user_1=77, user_2=9)
        buf.begin_image(meta.id)
        buf.commit_image(meta)
        assert buf.read_meta(meta.id) == meta
        other = ImageMetadata(id=meta.id + 4, height=512, width=1024, encoding=1, source_id=3, user_1=78)
        buf.commit_encoded(other.encode())  # the same slot, without begin_image
        assert buf.read_meta(other.id) == other and not buf.still_holds(meta.id)
        with pytest.raises(ValueError, match="56 B, got 55"):
            buf.commit_encoded(other.encode()[:-1])


def test_attaching_with_another_layout_names_both_layouts(make_config):
    path, config = make_config(frame_buffer_slots=8)
    with removed_at_end(FrameBuffer.for_config(config)):
        _, other = make_config(frame_buffer_slots=16)
        with pytest.raises(BufferLayoutError) as info:
            FrameBuffer.for_config(other)
    message = str(info.value)
    assert "has layout [8 slots x 1 modules, 64 B meta + 1048576 B data per module, version 1]" in message
    assert "this process expects [16 slots x 1 modules" in message
    assert f"std-daq buffers rm std-daq-{config.detector_name}-frames" in message


def test_attach_only_fails_clearly_when_the_segment_is_missing(make_config):
    _, config = make_config()
    with pytest.raises(BufferMissingError, match=f"std-daq-{config.detector_name}-images does not exist"):
        ImageBuffer.for_config(config, create=False)


def test_a_segment_that_was_never_initialised_is_refused_with_the_cleanup_command(make_config, monkeypatch):
    import posix_ipc

    from core_buffer import ringbuffer

    _, config = make_config()
    name = f"std-daq-{config.detector_name}-images"
    shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, size=PAGE * 4)
    shm.close_fd()
    monkeypatch.setattr(ringbuffer, "ATTACH_WAIT_S", 0.2)
    try:
        with pytest.raises(BufferLayoutError, match=f"never initialised.*std-daq buffers rm {name}"):
            ImageBuffer.for_config(config)
    finally:
        unlink(name)


def test_only_the_creator_needs_room_in_dev_shm(make_config, monkeypatch):
    """A service attaching to a large existing segment must not be refused because the segment itself
    fills /dev/shm; a creator that does not fit is refused and leaves no segment behind."""
    from core_buffer import RingBufferError, ringbuffer

    _, config = make_config()
    name = f"std-daq-{config.detector_name}-images"
    owner = ImageBuffer.for_config(config)
    full = os.statvfs_result((4096, 4096, 1000, 0, 0, 1000, 0, 0, 0, 255))  # no block free
    monkeypatch.setattr(ringbuffer.os, "statvfs", lambda path: full)
    attached = ImageBuffer.for_config(config)
    assert attached.layout == owner.layout
    attached.close()
    owner.close()
    owner.unlink()
    with pytest.raises(RingBufferError, match=f"{name} needs .* MiB but .* free"):
        ImageBuffer.for_config(config)
    assert name not in os.listdir(SHM_DIR)


def test_processes_racing_to_create_end_up_sharing_one_segment(make_config):
    path, config = make_config(frame_buffer_slots=64, n_modules=4, image_pixel_height=2048)
    code = f"""
        from core_buffer import FrameBuffer, ModuleFrame, load_config
        import sys
        buf = FrameBuffer.for_config(load_config({str(path)!r}))
        module = int(sys.argv[1])
        buf.begin_frame(3, module)[:] = module + 1
        buf.commit_frame(ModuleFrame(id=3, module_id=module, n_packets=128, n_recv_packets=128))
        print(int(buf.created))
        buf.close()
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(m)], stdout=subprocess.PIPE,
                              text=True) for m in range(4)]
    created = [int(p.communicate(timeout=60)[0]) for p in procs]
    assert sum(created) == 1
    with removed_at_end(FrameBuffer.for_config(config)) as buf:
        for module in range(4):
            assert buf.read_frame_meta(3, module).module_id == module
            assert (buf.frame_data(3, module) == module + 1).all()


def test_image_views_are_zero_copy(make_config):
    _, config = make_config()
    with removed_at_end(ImageBuffer.for_config(config)) as buf:
        view = buf.image_view(3, np.uint16, config.image_shape)
        view[10, 20] = 1234
        assert buf.slot_data(3).view(np.uint16)[10 * 1024 + 20] == 1234
        del view


@pytest.mark.parametrize("kind", [FrameBuffer, ImageBuffer])
def test_a_new_segment_has_every_page_in_memory_right_after_creation(make_config, kind):
    """Fresh shared memory is sparse (tmpfs allocates a page at its first touch); the creator touches every
    page so that no hot path pays that fault."""
    _, config = make_config(n_modules=2, image_pixel_height=1024, frame_buffer_slots=6, image_buffer_slots=6)
    buf = kind.for_config(config)
    try:
        assert buf.created
        allocated = os.stat(f"{SHM_DIR}/{buf.name}").st_blocks * 512
        assert allocated >= buf.layout.total_bytes
    finally:
        buf.close()
        buf.unlink()


def test_a_world_writable_segment_is_refused_when_attaching(make_config):
    from core_buffer import RingBufferError

    path, config = make_config()
    name = f"std-daq-{config.detector_name}-frames"
    owner = FrameBuffer.for_config(config)
    try:
        os.chmod(f"{SHM_DIR}/{name}", 0o666)  # widened by someone else
        for create in (False, True):  # a service attaches whether or not it may create
            with pytest.raises(RingBufferError, match=f"{name} is writable by every user \\(mode 0666\\); "
                                                      f"refusing.*std-daq buffers rm {name}"):
                FrameBuffer.for_config(config, create=create)
        os.chmod(f"{SHM_DIR}/{name}", 0o660)
        FrameBuffer.for_config(config, create=False).close()  # and with its mode back, it is used again
    finally:
        owner.close()
        owner.unlink()


def test_a_buffer_is_never_created_writable_by_every_user():
    from core_buffer.ringbuffer import BufferLayout

    layout = BufferLayout(2, 1, ModuleFrame.SIZE, 4096)
    name = f"std-daq-t{uuid.uuid4().hex[:10]}-frames"
    try:
        with pytest.raises(ValueError, match="mode 0662 would let anyone on the host write"):
            FrameBuffer(name, layout, mode=0o662)
        assert name not in os.listdir(SHM_DIR)
    finally:
        unlink(name)  # only there if the refusal failed


def test_an_image_of_the_same_id_written_again_is_told_apart_by_its_sequence_number(make_config):
    # Acquisition A published id 5 with sequence 4; acquisition B numbered from 1 again and wrote its own
    # id 5 (sequence 9) into the same slot. Only the sequence number tells them apart.
    _, config = make_config(image_buffer_slots=8)
    h, w = config.image_shape
    with removed_at_end(ImageBuffer.for_config(config)) as buf:
        buf.begin_image(5).view(np.uint16)[:h * w] = 111
        buf.commit_image(ImageMetadata(id=5, height=h, width=w, user_1=4))
        assert buf.holds(5, 4) and not buf.holds(5, 9) and not buf.holds(13, 4)
        buf.begin_image(5).view(np.uint16)[:h * w] = 222
        buf.commit_image(ImageMetadata(id=5, height=h, width=w, user_1=9))
        assert buf.still_holds(5)  # the id alone cannot see it
        assert not buf.holds(5, 4) and buf.holds(5, 9)
        out = np.empty((h, w), np.uint16)
        with pytest.raises(ImageLostError, match="another image with that id"):
            buf.copy_image(5, out, sequence=4)
        assert buf.copy_image(5, out, sequence=9).user_1 == 9 and (out == 222).all()


def test_a_frame_of_the_same_id_written_again_is_told_apart_by_its_generation(make_config):
    _, config = make_config(n_modules=2, image_pixel_height=1024, frame_buffer_slots=8)
    with removed_at_end(FrameBuffer.for_config(config)) as buf:
        first = ModuleFrame(id=3, module_id=1, acquisition=7, generation=1000)
        buf.begin_frame(3, 1)
        buf.commit_frame(first)
        assert buf.read_frame_meta(3, 1) == first  # every field, the reserved ones too, stored in the slot
        assert buf.holds(3, 1, 1000) and not buf.holds(3, 0, 1000)
        buf.begin_frame(3, 1)
        assert not buf.holds(3, 1, 1000)  # being written: the id is invalid
        buf.commit_frame(ModuleFrame(id=3, module_id=1, acquisition=8, generation=2000))
        assert buf.still_holds(3, 1) and not buf.holds(3, 1, 1000) and buf.holds(3, 1, 2000)


# -- issue 20 (3): a full /dev/shm is an error naming the segment, never a SIGBUS ----------------------------
# These run in a private mount namespace with a /dev/shm of its own, a tmpfs of 8 MiB, so that the host's is
# never filled; the namespace, its tmpfs and whatever is in it go when the child exits. Buffers of 6 MiB
# (and a header page): one fits, two do not.

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_IN_SMALL_SHM = r'''
import json, os, subprocess, sys
SHM = "/dev/shm"

CREATE = """
import sys
from core_buffer import RingBufferError
from core_buffer.formats import ModuleFrame
from core_buffer.ringbuffer import BufferLayout, FrameBuffer, RingBuffer
if "--check-passed" in sys.argv:
    # Stands for what the free-space check cannot see: another creator (or program) that took the room
    # after this one was checked. The segment and /dev/shm are the real ones.
    RingBuffer._check_free_space = lambda self: None
layout = BufferLayout(6, 1, ModuleFrame.SIZE, 2**20 - 4096)
print("ready", flush=True)
if "--race" in sys.argv:
    sys.stdin.readline()  # released together with the other racer
for name in [a for a in sys.argv[1:] if not a.startswith("--")]:
    try:
        buf = FrameBuffer(name, layout)
    except RingBufferError as exc:
        print("error", exc, flush=True)
    else:
        for slot in range(layout.n_slots):
            buf.begin_frame(slot, 0)[:] = 1  # every data page: a page without memory would be a SIGBUS
        print("created", name, flush=True)
"""

ATTACH = """
import errno, os, sys, posix_ipc
from core_buffer import RingBufferError
from core_buffer.formats import ModuleFrame
from core_buffer.ringbuffer import BufferLayout, FrameBuffer
name = sys.argv[1]
layout = BufferLayout(6, 1, ModuleFrame.SIZE, 2**20 - 4096)
# A complete header over a segment whose other pages have no memory behind them (made by hand or enlarged
# by someone: never by std-daq's creator), and a /dev/shm that has no room left for them.
shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=layout.total_bytes)
os.pwrite(shm.fd, layout.header(), 0)
shm.close_fd()
with open("/dev/shm/filler", "wb", buffering=0) as filler:
    try:
        while True:
            filler.write(bytes(65536))
    except OSError as exc:
        assert exc.errno == errno.ENOSPC, exc
print("ready", flush=True)
try:
    buf = FrameBuffer(name, layout, create=False)
except RingBufferError as exc:
    print("error", exc, flush=True)
else:
    for slot in range(layout.n_slots):
        buf.begin_frame(slot, 0)[:] = 1
    print("attached", name, flush=True)
"""


def run(code, *args):
    return subprocess.Popen([sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(procs):
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        results.append({"rc": proc.returncode, "out": out.splitlines(), "err": err[-2000:]})
    return results


def empty_shm():
    for name in os.listdir(SHM):
        os.unlink(os.path.join(SHM, name))


report = {"size": os.statvfs(SHM).f_blocks * os.statvfs(SHM).f_frsize}
scenario = sys.argv[1]
rounds = []
for i in range(int(sys.argv[2])):
    if scenario == "race":
        procs = [run(CREATE, f"std-daq-race{i}-{k}-frames", "--race", *sys.argv[3:]) for k in "ab"]
        for proc in procs:
            proc.stdout.readline()  # imported, about to wait
        for proc in procs:
            proc.stdin.write("go\n")
            proc.stdin.flush()
    elif scenario == "attach":
        procs = [run(ATTACH, "std-daq-held-frames")]
    else:
        procs = [run(CREATE, "std-daq-first-frames", "std-daq-second-frames", *sys.argv[3:])]
    results = finish(procs)
    rounds.append({"procs": results, "left": sorted(os.listdir(SHM))})  # what is left in this /dev/shm
    empty_shm()
report["rounds"] = rounds
print(json.dumps(report))
'''


def in_small_dev_shm(scenario: str, rounds: int, *args: str) -> list[dict]:
    """Run a scenario of _IN_SMALL_SHM in a private mount namespace with an 8 MiB /dev/shm; its rounds."""
    import json
    import shutil

    from tests.conftest import skip_or_fail

    if os.geteuid() != 0:
        skip_or_fail("a private /dev/shm needs root (a mount namespace and a tmpfs mount)")
    if shutil.which("unshare") is None:
        skip_or_fail("a private /dev/shm needs unshare(1) (util-linux)")
    cannot_mount = 97
    result = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs -o size=8m,mode=1777 tmpfs {SHM_DIR} || exit {cannot_mount}; exec "$0" -c "$@"',
         sys.executable, _IN_SMALL_SHM, scenario, str(rounds), *args],
        capture_output=True, text=True, timeout=120, cwd=_REPO)
    if result.returncode == cannot_mount or result.stderr.startswith("unshare:"):
        skip_or_fail(f"cannot make a private /dev/shm here: {result.stderr.strip()[-500:]}")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["size"] == 8 * 2**20  # the private one, not the host's
    return report["rounds"]


def _no_signal(proc: dict) -> None:
    import signal

    assert proc["rc"] not in (-signal.SIGBUS, 128 + signal.SIGBUS), f"killed by SIGBUS:\n{proc['err']}"
    assert proc["rc"] == 0, proc["err"]


def _says_no_room(line: str, name: str) -> None:
    """The error names the segment, its size and the free space of /dev/shm."""
    assert line.startswith(f"error shared-memory segment {name} needs 6"), line
    assert re.search(r"needs 6(\.0)? MiB.*/dev/shm has \d+(\.\d)? MiB free", line), line


import re  # noqa: E402 - used by the helpers above only


@pytest.mark.parametrize("check_passed", [False, True], ids=["checked", "check-passed-for-both"])
def test_a_second_buffer_that_does_not_fit_in_dev_shm_is_an_error_not_a_sigbus(check_passed):
    """One process creates two 6 MiB buffers in an 8 MiB /dev/shm, one after the other. The second is an
    error naming it, its size and the free space, and leaves nothing behind; the first is whole. With the
    free-space check passed for both (as when two creators check at the same moment), the room is only
    found missing when the pages are taken: that used to be a SIGBUS (MADV_POPULATE_WRITE's EFAULT taken
    for "not supported", then every page touched) and a segment without its magic."""
    (round_,) = in_small_dev_shm("sequence", 1, *(["--check-passed"] if check_passed else []))
    (proc,) = round_["procs"]
    _no_signal(proc)
    assert proc["out"][0] == "ready" and proc["out"][1] == "created std-daq-first-frames", proc
    _says_no_room(proc["out"][2], "std-daq-second-frames")
    if check_passed:
        assert "reserving its memory failed: No space left on device" in proc["out"][2]
        assert "free of 8.0 MiB" in proc["out"][2]
    assert round_["left"] == ["std-daq-first-frames"]  # no half-made second segment


def test_two_processes_racing_for_room_in_dev_shm_get_an_error_and_no_signal():
    """Two processes, released at the same moment, each create a 6 MiB buffer in an 8 MiB /dev/shm: one
    gets it, the other a clear error, and no half-made segment is left. Before the fix both usually died
    of SIGBUS and left two segments without their magic (a restart then waited for them and blamed a dead
    creator). Three rounds, since a race may go either way."""
    for round_ in in_small_dev_shm("race", 3):
        for proc in round_["procs"]:
            _no_signal(proc)
        lines = [proc["out"][0] for proc in round_["procs"]]  # the driver read their "ready"
        created = [line.split()[1] for line in lines if line.startswith("created ")]
        errors = [line for line in lines if line.startswith("error ")]
        assert len(created) == 1 and len(errors) == 1, lines  # std-daq creators take turns: one always fits
        _says_no_room(errors[0], errors[0].split()[3])
        assert round_["left"] == created, round_


def test_an_attacher_to_a_segment_without_memory_behind_it_gets_an_error_not_a_sigbus():
    """A segment whose header is complete but whose other pages have no memory behind them, in a full
    /dev/shm: attaching is an error naming the segment, its size and the free space (it used to swallow
    MADV_POPULATE_WRITE's EFAULT and die of SIGBUS at its first write). The attacher removes nothing."""
    (round_,) = in_small_dev_shm("attach", 1)
    (proc,) = round_["procs"]
    _no_signal(proc)
    line = proc["out"][1]
    assert line.startswith("error shared-memory segment std-daq-held-frames (6.0 MiB) cannot be mapped"), line
    assert "Bad address" in line and re.search(r"/dev/shm has 0(\.0)? MiB free of 8\.0 MiB", line), line
    assert round_["left"] == ["filler", "std-daq-held-frames"]


# -- issue 20 (7): an attacher waits for a creator that is alive, however long it takes ----------------------

_SLOW_CREATOR = """
import os, signal, sys, time
from core_buffer import FrameBuffer, load_config
from core_buffer.ringbuffer import RingBuffer
initialise = RingBuffer._initialise

def slow(self, *args, **kwargs):  # a creator faulting in a multi-GB segment, or dying meanwhile
    print("initialising", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(float(sys.argv[2]))
    return initialise(self, *args, **kwargs)

RingBuffer._initialise = slow
buf = FrameBuffer.for_config(load_config(sys.argv[1]))
print("created", int(buf.created), flush=True)
buf.close()
"""


def _end(proc: subprocess.Popen) -> None:
    """Kill a child if it still runs, reap it and close its pipes."""
    proc.kill()
    proc.communicate(timeout=30)


def _start_creator(path, how: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CREATOR, str(path), how], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline() == "initialising\n"  # the segment exists, without its magic
    return proc


def test_an_attacher_waits_past_attach_wait_s_for_a_live_creator_that_is_slow_to_initialise(
        make_config, monkeypatch, caplog):
    """A creator that takes longer than ATTACH_WAIT_S to initialise its segment (a 16M Jungfrau's 16 GiB
    FrameBuffer takes seconds to fault in) is waited for while it is alive: the attacher then attaches.
    It used to give up after ATTACH_WAIT_S, say the creator died and advise `std-daq buffers rm` of the
    very segment the live creator was making."""
    import logging

    from core_buffer import ringbuffer

    path, config = make_config()
    monkeypatch.setattr(ringbuffer, "ATTACH_WAIT_S", 0.3)  # the creator takes 2 s: seven times that
    caplog.set_level(logging.INFO, logger="core_buffer.ringbuffer")
    creator = _start_creator(path, "2")
    try:
        buf = FrameBuffer.for_config(config)
        try:
            assert not buf.created and buf.layout.n_slots == 8
            buf.begin_frame(3, 0)[:] = 7
            buf.commit_frame(ModuleFrame(id=3, module_id=0, n_packets=128, n_recv_packets=128))
            assert buf.read_frame_meta(3, 0).id == 3
        finally:
            buf.close()
        assert creator.communicate(timeout=30)[0] == "created 1\n"
        assert f"waiting for its creator (pid {creator.pid}) to finish initialising" in caplog.text
    finally:
        _end(creator)
        unlink(f"std-daq-{config.detector_name}-frames")


@pytest.mark.parametrize("holder", ["creator", "mapper"])
def test_an_attacher_that_gives_up_on_a_live_holder_does_not_advise_removing_the_segment(
        make_config, monkeypatch, holder):
    """An attacher that stops waiting for a segment still held by a live process (its creator, locking it,
    or a process that maps it without the lock: an older std-daq's creator still faulting it in) names
    that process and warns against removing the segment instead of advising `std-daq buffers rm`."""
    import posix_ipc

    from core_buffer import ringbuffer

    path, config = make_config()
    name = f"std-daq-{config.detector_name}-frames"
    monkeypatch.setattr(ringbuffer, "ATTACH_WAIT_S", 0.3)
    monkeypatch.setattr(ringbuffer, "ATTACH_CREATOR_WAIT_S", 1.5)
    if holder == "creator":
        proc = _start_creator(path, "30")
    else:
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
            import mmap, sys, posix_ipc
            shm = posix_ipc.SharedMemory("/{name}", posix_ipc.O_CREX, mode=0o600, size={PAGE * 64})
            held = mmap.mmap(shm.fd, shm.size)
            print("mapped", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline() == "mapped\n"
    try:
        with pytest.raises(BufferLayoutError) as info:
            FrameBuffer.for_config(config)
        message = str(info.value)
        assert f"{name} has not been initialised after 2 s" in message
        assert f"{proc.pid}" in message and "do not remove the segment while that process runs" in message
        assert "buffers rm" not in message
        assert name in os.listdir(SHM_DIR)  # and nobody removed it
    finally:
        _end(proc)
        unlink(name)


def test_a_segment_whose_creator_died_while_initialising_it_is_reported_as_such(make_config, monkeypatch):
    """A creator killed while it initialises its segment leaves it without the magic and, gone with it,
    without its lock: an attacher says so after ATTACH_WAIT_S (it does not wait for ATTACH_CREATOR_WAIT_S)
    and, since no process holds the segment, gives the command that removes it."""
    import signal

    from core_buffer import ringbuffer

    path, config = make_config()
    name = f"std-daq-{config.detector_name}-frames"
    monkeypatch.setattr(ringbuffer, "ATTACH_WAIT_S", 0.3)
    monkeypatch.setattr(ringbuffer, "ATTACH_CREATOR_WAIT_S", 60)  # would fail the test by its message
    creator = _start_creator(path, "die")
    try:
        assert creator.wait(timeout=30) == -signal.SIGKILL
        with pytest.raises(BufferLayoutError) as info:
            FrameBuffer.for_config(config)
        message = str(info.value)
        assert "never initialised: its creator died" in message
        assert f"no process holds it; if no std-daq service of this detector is starting, remove it with: " \
               f"std-daq buffers rm {name}" in message
    finally:
        _end(creator)
        unlink(name)
