"""std_udp_sim's packets against DESIGN.md §2 and DETECTORS.md, read with offsets and bit positions written
out here (struct format strings, shifts and masks), not with the project's header dtypes or decoder; and
the simulator's command line."""
from __future__ import annotations

import struct
import subprocess

import numpy as np
import pytest
import zmq

from core_buffer.formats import ModuleFrame
from core_buffer.ipc import make_socket, module_frames_address
from core_buffer.pattern import frame_bytes, frame_pattern
from std_udp_recv.receiver import UdpReceiver
from std_udp_recv.sim import HostError, ModuleSender, Simulator
from std_udp_recv.sim_cli import build_parser

EIGER_500K = dict(detector_type="eiger", n_modules=4, image_pixel_height=514, image_pixel_width=1030)


def sls_header(datagram: bytes) -> dict[str, int | float]:
    """The 48-byte SLS header, field by field at its DESIGN.md §2 offset."""
    d = datagram
    return {
        "framenum": struct.unpack_from("<Q", d, 0)[0],
        "exptime": struct.unpack_from("<I", d, 8)[0],
        "packetnum": struct.unpack_from("<I", d, 12)[0],
        "bunchid": struct.unpack_from("<d", d, 16)[0],
        "timestamp": struct.unpack_from("<Q", d, 24)[0],
        "moduleID": struct.unpack_from("<H", d, 32)[0],
        "row": struct.unpack_from("<H", d, 34)[0],
        "column": struct.unpack_from("<H", d, 36)[0],
        "reserved": struct.unpack_from("<H", d, 38)[0],
        "debug": struct.unpack_from("<I", d, 40)[0],
        "roundRobin": struct.unpack_from("<H", d, 44)[0],
        "detectortype": d[46],
        "headerVersion": d[47],
    }


def gf_header(datagram: bytes) -> dict[str, int]:
    """The 32-byte Gigafrost header, field by field at its DESIGN.md §2 offset."""
    d = datagram
    return {
        "protocol_id": d[0],
        "quadrant_row_length_in_blocks": d[1],
        "quadrant_rows_low": d[2],
        "status_flags": d[3],
        "scan_id": struct.unpack_from("<I", d, 4)[0],
        "frame_index": struct.unpack_from("<I", d, 8)[0],
        "image_status_flags": struct.unpack_from("<H", d, 12)[0],
        "packet_starting_row": struct.unpack_from("<H", d, 14)[0],
        "image_timing": struct.unpack_from("<Q", d, 16)[0],
        "sync_time": struct.unpack_from("<I", d, 24)[0],
        "scan_time": struct.unpack_from("<I", d, 28)[0],
    }


def datagrams(config, module: int, image_id: int) -> list[bytes]:
    sender = ModuleSender(config, module)
    sender.build(image_id)
    return [bytes(sender.datagram(k)) for k in range(len(sender.lengths))]


@pytest.mark.parametrize("interfaces", [1, 2])
def test_jungfrau_packets_carry_the_sls_header_and_4_rows_each(make_config, interfaces):
    _, config = make_config(n_modules=4, image_pixel_height=2048 // interfaces, jungfrau_interfaces=interfaces)
    n_packets = 128 // interfaces
    for module in (0, 3):
        sent = datagrams(config, module, 0x1_0000_0007)  # an id above 32 bits
        assert len(sent) == n_packets
        pixels = frame_pattern(config.stream, module, 0x1_0000_0007)
        for k, d in enumerate(sent):
            assert len(d) == 8240
            h = sls_header(d)
            assert (h["framenum"], h["packetnum"], h["bunchid"]) == (0x1_0000_0007, k, float(0x1_0000_0007))
            assert (h["detectortype"], h["headerVersion"]) == (3, 2)
            # one interface: modules stacked, row = module; two: row = the half of the module (DETECTORS.md)
            assert (h["row"], h["column"], h["moduleID"]) == (module % 2 if interfaces == 2 else module, 0, module)
            words = np.frombuffer(d, "<u2", offset=48)
            assert np.array_equal(words, pixels[4 * k:4 * k + 4].reshape(-1))  # 8192 B = 4 rows of 1024 px
        first_row = np.frombuffer(sent[0], "<u2", count=1024, offset=48)
        assert list(first_row[:4]) == [0x07, 0x00, 0x00, 0x00]  # the id stamp, one byte per pixel
        gains = {int(w) >> 14 for d in sent for w in np.frombuffer(d, "<u2", offset=48)}
        assert gains == {0, 1, 2, 3}  # every value of bits 15..14, the invalid 2 included


@pytest.mark.parametrize("bit_depth,n_packets", [(8, 32), (16, 64), (32, 128)])
def test_eiger_packets_carry_the_sls_header_and_the_ports_place(make_config, bit_depth, n_packets):
    _, config = make_config(bit_depth=bit_depth, **EIGER_500K)
    for module, place in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):  # top left, top right, bottom ...
        sent = datagrams(config, module, 41)
        assert len(sent) == n_packets
        data = b"".join(d[48:] for d in sent)
        assert data == frame_bytes(config.stream, module, 41).tobytes()
        assert len(data) == 256 * 512 * bit_depth // 8
        for k, d in enumerate(sent):
            h = sls_header(d)
            assert len(d) == 4144
            assert (h["framenum"], h["packetnum"], h["detectortype"], h["headerVersion"]) == (41, k, 1, 2)
            assert (h["row"], h["column"]) == place


def test_eiger_row_and_column_follow_module_positions(make_config):
    # Two streams on top of each other, the lower one flipped; then a 2 x 2 layout given out of order.
    _, stacked = make_config(detector_type="eiger", n_modules=2, image_pixel_height=514, image_pixel_width=514,
                             module_positions={"0": [0, 0, 513, 255], "1": [0, 513, 513, 258]})
    assert [sls_header(datagrams(stacked, m, 1)[0])[f] for m in (0, 1) for f in ("row", "column")] == [0, 0, 1, 0]
    _, shuffled = make_config(bit_depth=16, module_positions={
        "0": [516, 513, 1029, 258], "1": [0, 0, 513, 255], "2": [516, 0, 1029, 255], "3": [0, 513, 513, 258]},
        **EIGER_500K)
    places = [(sls_header(datagrams(shuffled, m, 1)[0])["row"], sls_header(datagrams(shuffled, m, 1)[0])["column"])
              for m in range(4)]
    assert places == [(1, 1), (0, 0), (0, 1), (1, 0)]


def unpack_12bit_literally(payload: bytes, n: int) -> list[int]:
    """Pixel i in bits 12i .. 12i+11 of the little-endian byte string (DETECTORS.md)."""
    value = int.from_bytes(payload, "little")
    return [(value >> (12 * i)) & 0xFFF for i in range(n)]


@pytest.mark.parametrize("height,width,rows,n_packets,last_rows", [
    (2016, 2016, 4, 126, 4),  # DETECTORS.md's example: stream 1008 x 504, 4 rows, 6048 B, 126 packets
    (1024, 480, 20, 13, 16),  # stream 240 x 256: 12 packets of 20 rows, the last of 16
])
def test_gigafrost_packets_carry_the_gf_header(make_config, height, width, rows, n_packets, last_rows):
    _, config = make_config(detector_type="gigafrost", n_modules=8, bit_depth=12, image_pixel_height=height,
                            image_pixel_width=width)
    stream_width = width // 2
    quadrant_rows = height // 2
    for module in range(8):
        sent = datagrams(config, module, 0x1234_5678)
        assert len(sent) == n_packets
        pixels = frame_pattern(config.stream, module, 0x1234_5678)
        for k, d in enumerate(sent):
            n_rows = last_rows if k == n_packets - 1 else rows
            assert len(d) == 32 + stream_width * n_rows * 3 // 2  # 1.5 bytes per pixel, no padding here
            h = gf_header(d)
            assert h["protocol_id"] == 0xCB
            assert h["quadrant_row_length_in_blocks"] == stream_width // 12
            flags = h["status_flags"]
            assert (flags >> 6, (flags >> 5) & 1) == (module // 2, module % 2)  # quadrant, link
            assert h["quadrant_rows_low"] | (flags & 0b11) << 8 == quadrant_rows  # 10 bits over two fields
            assert h["frame_index"] == 0x1234_5678
            assert h["packet_starting_row"] == k * rows
            assert h["image_status_flags"] >> 15 == 0  # not do-not-store
            if k in (0, n_packets - 1):
                first = pixels[k * rows].tolist()
                assert unpack_12bit_literally(d[32:32 + stream_width * 3 // 2], stream_width) == first
        assert unpack_12bit_literally(sent[0][32:38], 4) == [0x78, 0x56, 0x34, 0x12]  # the id stamp


def test_simulator_resolves_a_host_name_once(make_config):
    _, config = make_config()
    receiver = UdpReceiver(config, 0)
    pull = make_socket(zmq.Context.instance(), zmq.PULL, hwm=100)
    pull.connect(module_frames_address(config, 0))
    sim = Simulator(config, host="localhost")
    try:
        assert sim.senders[0].address == ("127.0.0.1", config.udp_port(0))
        sim.send_image(9)
        while receiver.counters.frames < 1 and receiver.batch.wait(5):
            receiver.poll(0.01)
        assert pull.poll(5000) and ModuleFrame.decode(pull.recv()).n_recv_packets == 128
    finally:
        sim.close()
        pull.close()
        receiver.close()
    with pytest.raises(HostError, match="no-such-host.invalid"):
        Simulator(config, host="no-such-host.invalid")


def test_simulator_cli_names_a_host_it_cannot_resolve(make_config):
    path, _ = make_config()
    result = subprocess.run(["std_udp_sim", str(path), "--n-images", "1", "--host", "no-such-host.invalid"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "std_udp_sim: --host: cannot resolve host 'no-such-host.invalid'" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv,modules", [
    (["--modules", "0", "1"], [[0], [1]]),
    (["--modules", "0,1"], [[0, 1]]),
    (["--modules", "0,1", "3"], [[0, 1], [3]]),
])
def test_simulator_cli_takes_modules_comma_or_space_separated(argv, modules):
    assert build_parser().parse_args(["config.json", *argv]).modules == modules


def test_simulator_cli_sends_the_space_separated_modules(make_config):
    path, _ = make_config(n_modules=3, image_pixel_height=1536)
    result = subprocess.run(["std_udp_sim", str(path), "--n-images", "1", "--rate", "0", "--modules", "0", "2"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "sent 1 images, 256 packets to 2 modules" in result.stdout
