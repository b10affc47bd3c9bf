"""Every decoder of outside input, fuzzed in two ways.

From valid input, mutated, so that every check of a decoder is reached and not only its first:
- real packets as the simulator builds them (std_udp_sim's ModuleSender), with header fields set to other
  values, lengths changed, packet numbers swapped or past the frame; the three entry points of the packet
  decoder (`decode`, and the receiver's fast paths `check_one` and `all_in_place`) must agree on each,
  and the test asserts that most datagrams stay valid and every kind of refusal and both answers of
  `all_in_place` occur;
- valid ModuleFrame, ImageMetadata, StoreStream and Verdict messages with one field or byte set to any
  value, or cut or extended: each decodes exactly when it breaks none of the design's rules (then it
  re-encodes to the same bytes) and is otherwise refused with FormatError naming the first rule broken;
- valid write requests, and the same with one thing broken (a key missing or wrong, the body not JSON,
  not UTF-8, not an object, too long): the valid ones parse to what they asked for, the broken ones are
  refused with a reason that names the problem.

From random bytes: whatever arrives, a decoder returns a value or raises the project's FormatError /
BadRequest, and never anything else (a daemon catches exactly those).

The number of examples per test is `EXAMPLES` (docs/reliability.md); `-s` prints the outcome counts.
"""
from __future__ import annotations

import collections
import json
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from core_buffer.config import parse_config
from core_buffer.errors import FormatError
from core_buffer.formats import (Dtype, Encoding, ImageMetadata, ModuleFrame, StoreOp, StoreStream, Verdict,
                                 WriterStatus)
from std_udp_recv.packets import MALFORMED_KINDS, PacketDecoder
from std_udp_recv.sim import ModuleSender
from writer_agent.request import MAX_BODY_BYTES, BadRequest, parse_request

EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

DETECTORS = {
    "jungfrau": {"detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16, "image_pixel_height": 512,
                 "image_pixel_width": 1024},
    "jungfrau-pulse-id": {"detector_type": "jungfrau", "n_modules": 1, "bit_depth": 16,
                          "image_pixel_height": 512, "image_pixel_width": 1024, "image_id_source": "pulse_id"},
    "jungfrau-2-interfaces": {"detector_type": "jungfrau", "n_modules": 2, "bit_depth": 16,
                              "image_pixel_height": 512, "image_pixel_width": 1024, "jungfrau_interfaces": 2},
    "eiger-8": {"detector_type": "eiger", "n_modules": 2, "bit_depth": 8, "image_pixel_height": 514,
                "image_pixel_width": 514},
    "eiger-16": {"detector_type": "eiger", "n_modules": 2, "bit_depth": 16, "image_pixel_height": 514,
                 "image_pixel_width": 514},
    "eiger-32": {"detector_type": "eiger", "n_modules": 2, "bit_depth": 32, "image_pixel_height": 514,
                 "image_pixel_width": 514},
    "gigafrost": {"detector_type": "gigafrost", "n_modules": 8, "bit_depth": 12, "image_pixel_height": 2016,
                  "image_pixel_width": 2016},
}

# Shares the mutation strategies must reach (measured shares are printed with -s and are in the doc).
MIN_VALID_SHARE = 0.5  # of packets; of messages and requests: MIN_DECODED_SHARE
MIN_DECODED_SHARE = 0.25
MIN_FAST_PATH_SHARE = 0.05  # of packet batches, for each of all_in_place's answers


def _config(kind: str):
    return parse_config({"detector_name": f"fuzz-{kind}", "start_udp_port": 50000, **DETECTORS[kind]})


def decoder_for(kind: str) -> PacketDecoder:
    config = _config(kind)
    return PacketDecoder(config, config.n_modules - 1)


def _share(part: int, whole: int) -> str:
    return f"{part}/{whole} ({part / max(whole, 1):.0%})"


# --- packets: real headers, fields mutated -------------------------------------------------------------

def _field_values(sender: ModuleSender) -> dict[str, st.SearchStrategy]:
    """Per header field, values for it: anything of its type, and as often the values that matter: those
    the simulator puts there in any packet of the frame, one off them, 0, 1 and the largest."""
    values = {}
    for name in sender.header_dtype.names:
        dtype = sender.header_dtype[name]
        if dtype.kind == "f":  # bunchid: pulse ids, and numbers that cannot be one
            values[name] = st.one_of(st.floats(), st.integers(0, 2**53).map(float),
                                     st.sampled_from([-1.0, -0.0, 0.5, 2.0**53, 2.0**63 - 1024, 2.0**63, 2.0**64,
                                                      float("inf"), float("nan")]))
            continue
        top = int(np.iinfo(dtype).max)
        seen = [int(v) for v in np.unique(sender.headers[name])]
        near = sorted({v + d for v in seen for d in (-1, 1)} - set(seen))
        step = (seen[-1] - seen[0]) // max(len(seen) - 1, 1)  # packet numbers, starting rows: the next one
        edges = {0, 1, top, seen[-1] + step, seen[-1] + 2 * step, top - top % max(step, 1)}
        values[name] = st.one_of(st.integers(0, top), st.sampled_from(seen),
                                 st.sampled_from([v for v in near if 0 <= v <= top]),
                                 st.sampled_from(sorted(v for v in edges if 0 <= v <= top)))
    return values


def _image_ids(decoder: PacketDecoder) -> st.SearchStrategy:
    if decoder.gigafrost:
        return st.integers(0, 2**32 - 1)  # frame_index is 32 bits
    if decoder.use_pulse_id:
        return st.integers(0, 2**53)  # pulse ids are doubles: integers beyond 2**53 do not exist
    return st.one_of(st.integers(0, 2**20), st.integers(0, 2**64 - 1))


# The header fields a decoder reads (mutated more often than the others, which it must ignore).
CHECKED_HEADER_FIELDS = {False: ["framenum", "packetnum", "bunchid", "row", "detectortype", "headerVersion"],
                         True: ["protocol_id", "status_flags", "frame_index", "packet_starting_row"]}


@st.composite
def _batches(draw, decoder: PacketDecoder, sender: ModuleSender, values: dict[str, st.SearchStrategy],
             max_batch: int = 32):
    """What the receiver's batch holds when it aimed at packets first, first+1, ... of one frame: the
    simulator's packets of that frame, with some packet numbers swapped for others of the frame, some
    header fields set to other values, some lengths changed and maybe a packet number past the frame's."""
    n_packets = decoder.n_packets
    image_id = draw(_image_ids(decoder))
    n = draw(st.integers(1, min(max_batch, n_packets)))
    first = draw(st.integers(0, n_packets - n))
    packets = list(range(first, first + n))
    for i in draw(st.lists(st.integers(0, n - 1), max_size=2)):  # duplicates, reordering, a late packet
        packets[i] = draw(st.integers(0, n_packets - 1))
    names = st.one_of(st.sampled_from(sender.header_dtype.names),
                      st.sampled_from(CHECKED_HEADER_FIELDS[decoder.gigafrost]))
    field_change = names.flatmap(lambda name: st.tuples(st.just(name), values[name]))
    fields = draw(st.lists(st.tuples(st.integers(0, n - 1), field_change), max_size=4))
    sizes = sorted({int(x) for x in decoder.expected_length})
    length = st.one_of(st.sampled_from(sizes), st.integers(0, decoder.max_datagram + 64),
                       st.sampled_from([0, decoder.header_bytes - 1, decoder.header_bytes,
                                        decoder.max_datagram - 1, decoder.max_datagram + 1]))
    lengths = draw(st.lists(st.tuples(st.integers(0, n - 1), length), max_size=2))
    beyond = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(n_packets, n_packets + 8)), max_size=1))
    return image_id, first, packets, fields, lengths, beyond


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_mutated_real_packets_are_judged_alike_by_decode_check_one_and_all_in_place(kind):
    """Each datagram is valid or counted once as malformed; check_one says the same of it, with the same
    image id and packet number; all_in_place says True exactly when decode finds the whole batch valid,
    of the frame and the packets aimed at, all of full length (a pulse id with a fraction, which decode
    reads as its integer part, sends the batch to the general path instead: same result, slower). An
    untouched packet of the simulator is always valid, with its id and number."""
    config = _config(kind)
    module = config.n_modules - 1
    decoder, sender = PacketDecoder(config, module), ModuleSender(config, module)
    counts = collections.Counter()

    @FUZZ
    @given(_batches(decoder, sender, _field_values(sender)))
    def check(batch):
        image_id, first, packets, fields, length_changes, beyond = batch
        n = len(packets)
        sender.build(image_id)
        headers = sender.headers[packets]  # a copy: the sender's own headers stay as built
        lengths = np.array([sender.lengths[k] for k in packets], dtype=np.uint32)  # as recvmmsg's msg_len
        for i, (name, value) in fields:
            headers[name][i] = value
        for i, length in length_changes:
            lengths[i] = length
        for i, packet in beyond:  # a packet number past the frame's last
            if decoder.gigafrost:
                headers["packet_starting_row"][i] = packet * config.stream.rows_per_packet
            else:
                headers["packetnum"][i] = packet
        touched = {i for i, _ in fields} | {i for i, _ in length_changes} | {i for i, _ in beyond}
        raw = np.ascontiguousarray(headers).view(np.uint8).reshape(n, decoder.header_bytes)
        sent_id = int(sender.headers["frame_index"][0] if decoder.gigafrost else
                      sender.headers["bunchid"][0] if decoder.use_pulse_id else sender.headers["framenum"][0])

        d = decoder.decode(raw, lengths, n)
        assert int(d.valid.sum()) + sum(d.malformed[k] for k in MALFORMED_KINDS) == n  # each counted once
        for i in range(n):
            one = decoder.check_one(raw[i].tobytes(), int(lengths[i]))
            assert one == ((int(d.image_id[i]), int(d.packet[i])) if d.valid[i] else None), i
            if i not in touched:  # the simulator's packet as it was sent
                assert d.valid[i] and (int(d.image_id[i]), int(d.packet[i])) == (sent_id, packets[i])

        decoder.bind(raw)
        fast = decoder.all_in_place(lengths, n, sent_id, first)
        expected = bool(d.valid.all() and (d.image_id == sent_id).all()
                        and (d.packet == np.arange(first, first + n)).all()
                        and (lengths == decoder.full_length).all())
        if expected and decoder.use_pulse_id:
            expected = bool((np.floor(headers["bunchid"]) == headers["bunchid"]).all())
        assert fast == expected, (fast, expected)

        counts["datagrams"] += n
        counts["valid"] += int(d.valid.sum())
        for k in MALFORMED_KINDS:
            counts[k] += d.malformed[k]
        counts["batches"] += 1
        counts[f"all_in_place {fast}"] += 1
        event(f"all_in_place {fast}")

    check()
    print(f"\npackets {kind}: valid {_share(counts['valid'], counts['datagrams'])}, "
          + ", ".join(f"{k} {counts[k]}" for k in MALFORMED_KINDS)
          + f"; batches {counts['batches']}: all_in_place True {counts['all_in_place True']}, "
            f"False {counts['all_in_place False']}")
    assert counts["valid"] >= MIN_VALID_SHARE * counts["datagrams"], counts
    assert all(counts[k] > 0 for k in MALFORMED_KINDS), counts  # every kind of refusal reached
    for answer in (True, False):
        assert counts[f"all_in_place {answer}"] >= MIN_FAST_PATH_SHARE * counts["batches"], counts


def datagrams(decoder: PacketDecoder) -> st.SearchStrategy:
    """(header bytes, datagram length) of random content: the decoder reads only a datagram's header and
    length, so the payload stays zeros. Lengths are anything up to one past the largest datagram, or
    exactly a valid one. (Nearly all of these fail the first check; the test above reaches the others.)"""
    sizes = sorted({int(n) for n in decoder.expected_length})
    length = st.one_of(st.integers(0, decoder.max_datagram + 1), st.sampled_from(sizes))
    return st.tuples(st.binary(min_size=0, max_size=decoder.header_bytes), length)


@pytest.mark.parametrize("kind", list(DETECTORS))
def test_random_datagrams_never_raise_and_are_each_counted_once(kind):
    decoder = decoder_for(kind)

    @FUZZ
    @given(st.lists(datagrams(decoder), min_size=1, max_size=64))
    def check(batch):
        n = len(batch)
        buffer = np.zeros((n, decoder.max_datagram + 1), np.uint8)
        lengths = np.zeros(n, np.int64)
        for i, (header, length) in enumerate(batch):
            buffer[i, :len(header)] = np.frombuffer(header, np.uint8)
            lengths[i] = length
        decoded = decoder.decode(buffer, lengths, n)
        n_valid = int(decoded.valid.sum())
        assert n_valid + sum(decoded.malformed[k] for k in MALFORMED_KINDS) == n  # each one counted once
        valid = np.flatnonzero(decoded.valid)
        packets = decoded.packet[valid]
        assert ((packets >= 0) & (packets < decoder.n_packets)).all()
        assert (lengths[valid] == decoder.expected_length[packets]).all()

    check()


# --- binary messages: valid ones, mutated ---------------------------------------------------------------

U16, U32, U64 = st.integers(0, 2**16 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)
IMAGE_METADATA = st.builds(ImageMetadata, id=U64, height=U64, width=U64, dtype=st.sampled_from([int(d) for d in Dtype]),
                           encoding=st.sampled_from([int(e) for e in Encoding]), source_id=U16, status=U16,
                           user_1=U64, user_2=U64)
VALID = {
    ModuleFrame: st.builds(ModuleFrame, U64, U64, U64, U64, U32, U32, U32, U16, U16, U16, U32, U64),
    ImageMetadata: IMAGE_METADATA,
    StoreStream: st.builds(StoreStream, st.sampled_from(list(StoreOp)), U32, U32, U32, U64, IMAGE_METADATA),
    Verdict: st.builds(Verdict, U64, st.booleans()),
}
# Each message's fields as numpy sees its bytes, to set one to any value of its type.
LAYOUT = {
    ModuleFrame: ModuleFrame.DTYPE,
    ImageMetadata: ImageMetadata.DTYPE,
    StoreStream: np.dtype({"names": ["op", "i_image", "n_images", "user_id", "run_id",
                                     *(f"image.{n}" for n in ImageMetadata.DTYPE.names)],
                           "formats": ["<u4", "<u4", "<u4", "<u4", "<u8",
                                       *(ImageMetadata.DTYPE.fields[n][0] for n in ImageMetadata.DTYPE.names)],
                           "offsets": [0, 4, 8, 12, 16,
                                       *(24 + ImageMetadata.DTYPE.fields[n][1] for n in ImageMetadata.DTYPE.names)],
                           "itemsize": 80}),
    Verdict: np.dtype({"names": ["image_id", "verdict"], "formats": ["<u8", "u1"], "offsets": [0, 8],
                       "itemsize": 9}),
}
# What each decoder refuses, by the words of its FormatError.
REFUSALS = {
    "size": r"must be \d+ bytes", "version": r"version \d+ is not supported", "dtype": r"dtype code \d+ is unknown",
    "encoding": r"encoding \d+ is unknown", "op": r"StoreStream op \d+ is unknown", "verdict": r"^Verdict \d+ of image",
}
# The fields each decoder checks, in the order it checks them, with their valid values (DESIGN.md §4).
_IMAGE_RULES = [("version", {ImageMetadata.VERSION}), ("dtype", {int(d) for d in Dtype}),
                ("encoding", {int(e) for e in Encoding})]
RULES = {
    ModuleFrame: [],
    ImageMetadata: _IMAGE_RULES,
    StoreStream: [("op", {int(op) for op in StoreOp}), *((f"image.{name}", ok) for name, ok in _IMAGE_RULES)],
    Verdict: [("verdict", {Verdict.INTACT, Verdict.TORN})],
}
CHECKED_FIELDS = [(message, name) for message, rules in RULES.items() for name, _ in rules]
MODULE_FRAME_PAD = slice(50, 52)  # ModuleFrame's only padding: DESIGN.md's 50 bytes of fields, then 2 bytes
#                                   before this project's acquisition (u32) and generation (u64)


def _expected_refusal(message, data: bytes) -> str | None:
    """What the decoder must refuse `data` for (the first rule broken, in its order), None if nothing."""
    if len(data) != message.SIZE:
        return "size"
    record = np.frombuffer(data, LAYOUT[message])[0]
    for name, valid in RULES[message]:
        if int(record[name]) not in valid:
            return name.removeprefix("image.")
    return None


def _field_mutations(message, names: list[str]) -> st.SearchStrategy:
    """("field", name, value): one field set to any value of its type, or to one of its valid values."""
    layout = LAYOUT[message]
    valid = dict(RULES[message])

    def values(name):
        top = int(np.iinfo(layout.fields[name][0]).max)
        if name in valid:
            return st.one_of(st.integers(0, top), st.sampled_from(sorted(valid[name])))
        return st.integers(0, top)

    return st.sampled_from(names).flatmap(lambda name: st.tuples(st.just("field"), st.just(name), values(name)))


def _mutate(message, data: bytes, mutation: tuple) -> bytes:
    kind = mutation[0]
    if kind == "field":
        record = np.frombuffer(bytearray(data), LAYOUT[message])
        record[mutation[1]] = mutation[2]
        return record.tobytes()
    if kind == "byte":
        return data[:mutation[1]] + bytes([mutation[2]]) + data[mutation[1] + 1:]
    if kind == "size":
        return (data + bytes(mutation[1]))[:mutation[1]]
    return data


def _decode_as_expected(message, value, mutation) -> str:
    """Encode a valid value, mutate it, decode: the outcome must be what the rules say. A valid message
    decodes to its value; a mutated one decodes exactly when it breaks no rule, and then re-encodes to
    the same bytes (ModuleFrame: the same bytes but for zeros in its 2 padding bytes, whatever they
    held); otherwise FormatError names the first rule broken. Returns the outcome."""
    data = value.encode()
    assert len(data) == message.SIZE and message.decode(data) == value
    mutated = _mutate(message, data, mutation)
    expected = _expected_refusal(message, mutated)
    try:
        decoded = message.decode(mutated)
    except FormatError as exc:
        assert expected is not None and re.search(REFUSALS[expected], str(exc)), (expected, str(exc))
        return expected
    assert expected is None, (expected, mutation)
    again = decoded.encode()
    if message is ModuleFrame:
        pad = MODULE_FRAME_PAD
        assert again[:pad.start] == mutated[:pad.start] and again[pad.stop:] == mutated[pad.stop:]
        assert again[pad] == bytes(pad.stop - pad.start)
    else:
        assert again == mutated
    if mutation == ("none",):
        assert decoded == value
    return "decoded"


@pytest.mark.parametrize("message", [ModuleFrame, ImageMetadata, StoreStream, Verdict])
def test_mutated_valid_messages_decode_exactly_when_they_break_no_rule(message):
    """Valid messages with nothing changed, one field set to any value, one byte set to any value, or cut
    or extended: see _decode_as_expected."""
    counts = collections.Counter()
    size = message.SIZE

    @FUZZ
    @given(VALID[message], st.one_of(
        st.just(("none",)), _field_mutations(message, list(LAYOUT[message].names)),
        st.tuples(st.just("byte"), st.integers(0, size - 1), st.integers(0, 255)),
        st.tuples(st.just("size"), st.integers(0, 2 * size).filter(lambda n: n != size))))
    def check(value, mutation):
        counts[_decode_as_expected(message, value, mutation)] += 1

    check()
    total = sum(counts.values())
    print(f"\n{message.__name__}: decoded {_share(counts['decoded'], total)}, refused "
          + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "decoded"))
    assert counts["decoded"] >= MIN_DECODED_SHARE * total and counts["size"] > 0, counts


@pytest.mark.parametrize("message,name", CHECKED_FIELDS, ids=[f"{m.__name__}-{n}" for m, n in CHECKED_FIELDS])
def test_each_checked_message_field_is_refused_exactly_when_invalid(message, name):
    """One checked field set to any value or to a valid one: both outcomes occur, each as the rules say."""
    counts = collections.Counter()

    @settings(FUZZ, max_examples=EXAMPLES // 5)
    @given(VALID[message], _field_mutations(message, [name]))
    def check(value, mutation):
        counts[_decode_as_expected(message, value, mutation)] += 1

    check()
    assert counts["decoded"] > 0 and counts[name.removeprefix("image.")] > 0, counts


def _decode_or_format_error(decode, data: bytes):
    try:
        return decode(data)
    except FormatError:
        return None


@pytest.mark.parametrize("message", [ModuleFrame, ImageMetadata, StoreStream, Verdict])
def test_binary_message_decoders_return_or_raise_format_error_on_random_bytes(message):
    size = message.SIZE

    @FUZZ
    @given(st.one_of(st.binary(max_size=2 * size), st.binary(min_size=size, max_size=size)))
    def check(data):
        decoded = _decode_or_format_error(message.decode, data)
        if decoded is not None:
            assert len(data) == size
            assert message.decode(decoded.encode()) == decoded  # what decodes, re-encodes to the same value

    check()


@FUZZ
@given(st.one_of(st.binary(max_size=4 * Verdict.SIZE),
                 st.lists(st.binary(min_size=Verdict.SIZE, max_size=Verdict.SIZE), max_size=4).map(b"".join)))
def test_the_verdict_message_decoder_returns_or_raises_format_error(data):
    decoded = _decode_or_format_error(Verdict.decode_many, data)
    if decoded is not None:
        assert len(data) == len(decoded) * Verdict.SIZE
        assert Verdict.encode_many(decoded) == data


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
                    max_leaves=12)


@FUZZ
@given(st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode()),
                 st.dictionaries(st.sampled_from(["run_id", "state", "output_file", "n_written", "n_missing",
                                                  "error", "x"]), JSON, max_size=7).map(
                     lambda v: json.dumps(v).encode())))
def test_the_writer_status_decoder_returns_or_raises_format_error(data):
    _decode_or_format_error(WriterStatus.decode, data)


# --- write requests: valid ones, mutated -----------------------------------------------------------------

MAX_IMAGES = 1000
# File names: any characters a name can hold (no "/", no NUL, no lone surrogate), up to 40 of them.
NAMES = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1,
                max_size=40).filter(lambda s: s not in (".", "..", "exists.h5", "sub"))
NOT_AN_INT = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=10),
                       st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                            max_size=2))


def _valid_requests(out: str) -> st.SearchStrategy:
    return st.fixed_dictionaries(
        {"output_file": st.one_of(NAMES.map(lambda n: f"{out}/{n}"), NAMES.map(lambda n: f"{out}/sub/{n}"),
                                  NAMES.map(lambda n: f"{out}/sub/../{n}")),
         "n_images": st.integers(1, MAX_IMAGES)},
        optional={"run_id": U64, "user_id": U32, "note": JSON})


def _bad_values(out: str) -> dict[str, st.SearchStrategy]:
    """Per key, values that are wrong for it: other types, numbers out of range, paths that must not be
    written (relative, outside, in a missing directory, an existing file, a directory, a NUL byte, a name
    too long for the file system, a character no file name can hold)."""
    return {
        "n_images": st.one_of(NOT_AN_INT, st.integers(-(2**70), 0), st.integers(MAX_IMAGES + 1, 2**70)),
        "run_id": st.one_of(NOT_AN_INT, st.integers(-(2**70), -1), st.integers(2**64, 2**70)),
        "user_id": st.one_of(NOT_AN_INT, st.integers(-(2**70), -1), st.integers(2**32, 2**70)),
        "output_file": st.one_of(
            NOT_AN_INT.filter(lambda v: not isinstance(v, str)), st.just(""), NAMES,
            NAMES.map(lambda n: f"{out}/../{n}"), NAMES.map(lambda n: f"/etc/{n}"),
            NAMES.map(lambda n: f"{out}/missing/{n}"), st.just(f"{out}/exists.h5"), st.just(f"{out}/sub"),
            st.just(f"{out}/"), NAMES.map(lambda n: f"{out}/{n}\x00.h5"), st.just(f"{out}/{'x' * 256}"),
            NAMES.map(lambda n: f"{out}/{n}\ud800")),
    }


# A valid request with one thing broken, and the words its refusal must contain: the key's name, or what
# is wrong with the body.
BREAKS = {
    "nothing": None,
    "missing output_file": "output_file", "missing n_images": "n_images",
    "bad output_file": "output_file", "bad n_images": "n_images", "bad run_id": "run_id", "bad user_id": "user_id",
    "body truncated": "not JSON", "body not UTF-8": "not UTF-8", "body not an object": "must be a JSON object",
    "body too long": "bytes; at most",
}


@st.composite
def _requests(draw, out: str, broken: str):
    """(body bytes, the valid request it came from) with `broken` (a key of BREAKS) done to it."""
    request = draw(_valid_requests(out))
    body = dict(request)
    kind, _, what = broken.partition(" ")
    if kind == "missing":
        del body[what]
    elif kind == "bad":
        body[what] = draw(_bad_values(out)[what])
    data = json.dumps(body).encode()
    if broken == "body truncated":
        data = data[:draw(st.integers(0, len(data) - 1))]
    elif broken == "body not UTF-8":
        at = draw(st.integers(0, len(data)))
        data = data[:at] + b"\xff" + data[at:]
    elif broken == "body not an object":
        data = json.dumps([body]).encode()
    elif broken == "body too long":
        data = json.dumps({**body, "note": "y" * MAX_BODY_BYTES}).encode()
    return data, request


@pytest.fixture(scope="module")
def request_dir(tmp_path_factory) -> str:
    """An allowed output directory with a subdirectory `sub` and an existing file `exists.h5`."""
    out = str(tmp_path_factory.mktemp("requests"))
    os.mkdir(os.path.join(out, "sub"))
    open(os.path.join(out, "exists.h5"), "wb").close()
    return out


@pytest.mark.parametrize("broken", list(BREAKS))
def test_valid_write_requests_parse_and_broken_ones_are_refused_naming_the_problem(request_dir, broken):
    """A valid request (any file name a file system takes, `sub/..` in the path, optional keys) parses to
    exactly what it asked for, the path resolved. The same with one thing broken is refused with
    BadRequest, and the reason names the key that is missing or wrong, or what is wrong with the body."""
    out = request_dir
    real_out = os.path.realpath(out)

    @settings(FUZZ, max_examples=EXAMPLES // 5)
    @given(_requests(out, broken))
    def check(case):
        data, request = case
        try:
            parsed = parse_request("r1", data, output_dirs=(out,), overwrite=False, max_images=MAX_IMAGES)
        except BadRequest as exc:
            assert BREAKS[broken] is not None and BREAKS[broken] in str(exc), (broken, str(exc), data[:200])
            return
        assert BREAKS[broken] is None, (broken, data[:200])
        assert parsed.n_images == request["n_images"]
        assert parsed.run_id == request.get("run_id", parsed.run_id) and parsed.user_id == request.get("user_id", 0)
        assert parsed.output_file == os.path.realpath(request["output_file"])  # sub/.. resolved
        assert parsed.output_file.startswith(real_out + "/")
        assert parsed.body == request  # every key travels on, as it came

    check()


@FUZZ
@given(st.one_of(st.binary(max_size=300), JSON.map(lambda v: json.dumps(v).encode()),
                 st.fixed_dictionaries({"output_file": JSON | st.text(), "n_images": JSON},
                                       optional={"run_id": JSON, "user_id": JSON, "extra": JSON}).map(
                     lambda v: json.dumps(v).encode())))
def test_random_write_requests_parse_or_raise_bad_request(tmp_path_factory, body):
    out = str(tmp_path_factory.getbasetemp())
    try:
        request = parse_request("r1", body, output_dirs=(out,), overwrite=False, max_images=1000)
    except BadRequest as exc:
        assert str(exc)  # a reason a person can read
        return
    assert 1 <= request.n_images <= 1000 and request.output_file.startswith(out)
