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
