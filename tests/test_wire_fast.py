"""The fast frames (zeotwist/wire/loadframes.py and commitframes.py, built
by zeotwist/wire/boxlayout.py) are exactly what AMP's own serializer makes
of the declarations in zeotwist/wire/commands.py, and their readers agree
with AMP's parser and the declarations' own parsing, in both directions."""
import pytest
from twisted.protocols import amp

from zeotwist.wire import commands as C
from zeotwist.wire import boxlayout, commitframes, loadframes

OID, TID, START, END = b"\0" * 7 + b"\1", b"\x03" * 8, b"\x01" * 8, b"\x02" * 8


def amp_frame(command, values: dict, tag_key: bytes, tag: bytes, response=False) -> bytes:
    """What AMP itself sends for ``command`` with ``values``."""
    make = command.makeResponse if response else command.makeArguments
    box = amp.AmpBox(make(dict(values), None))
    if tag_key is not None:
        box[tag_key] = tag
    if not response:
        box[amp.COMMAND] = command.commandName
    return box.serialize()


def parse_one(frame: bytes) -> amp.AmpBox:
    boxes = amp.parseString(frame)
    assert len(boxes) == 1
    return boxes[0]


@pytest.mark.parametrize("tag", [b"1", b"ff", b"a" * 40])
def test_load_before_request_is_amps_own(tag):
    frame = loadframes.load_before_request(tag, OID, TID)
    assert frame == amp_frame(C.LoadBefore, {"oid": OID, "tid": TID}, amp.ASK, tag)
    box = parse_one(frame)
    assert loadframes.read_load_before_request(box) == (tag, OID, TID)
    assert C.LoadBefore.parseArguments(box, None) == {"oid": OID, "tid": TID}


def test_a_load_before_request_is_matched_in_the_bytes_where_amp_reads_that_box():
    frame = loadframes.load_before_request(b"t1f", OID, TID)
    other = amp_frame(C.LoadBefore, {"oid": OID, "tid": TID}, amp.ASK, b"9")
    buf = other + frame + frame[:-1]
    assert loadframes.match_load_before_request(buf, len(other)) == (
        b"t1f", OID, TID, len(other) + len(frame))
    assert loadframes.match_load_before_request(buf, len(other) + len(frame)) is None   # not whole
    assert loadframes.match_load_before_request(buf, 0) == (b"9", OID, TID, len(other))
    # anything else is left to AMP's parser: another command, other keys, other sizes
    assert loadframes.match_load_before_request(commitframes.store_data(b"x", False), 0) is None
    assert loadframes.match_load_before_request(frame.replace(b"LoadBefore", b"LoadBeforf"), 0) is None
    box = parse_one(frame)
    box[b"oid"] = OID + b"x"                  # 9 bytes: AMP's path refuses it
    assert loadframes.match_load_before_request(box.serialize(), 0) is None
    extra = amp.AmpBox(parse_one(frame), more=b"1").serialize()
    assert loadframes.match_load_before_request(extra, 0) is None


@pytest.mark.parametrize("record", [None, (b"", START, None), (b"record", START, None),
                                    (b"record", START, END), (b"x" * boxlayout.MAX_VALUE, START, END)])
def test_a_load_before_answer_is_matched_in_the_bytes_where_amp_reads_that_box(record):
    frame = loadframes.load_before_answer(b"t7", record)
    assert loadframes.match_load_before_answer(b"ab" + frame + frame, 2) == (b"t7", record,
                                                                       2 + len(frame))
    for cut in range(len(frame)):                      # not whole yet: AMP's parser waits
        assert loadframes.match_load_before_answer(frame[:cut], 0) is None
    assert loadframes.read_load_before_answer(parse_one(frame), None) == record


def test_other_answers_are_left_to_amps_parser():
    prefetched = loadframes.load_before_answer(b"t7", (b"record", START, None), b"p" * 10)
    assert loadframes.match_load_before_answer(prefetched, 0) is None
    long = loadframes.load_before_answer(b"t7", (b"x" * (boxlayout.MAX_VALUE + 1), START, None),
                                   long_values=True)
    assert loadframes.match_load_before_answer(long, 0) is None
    other = amp_frame(C.LastTransaction, {"tid": TID}, amp.ANSWER, b"t7", response=True)
    assert loadframes.match_load_before_answer(other, 0) is None
    assert loadframes.match_load_before_answer(loadframes.load_before_request(b"t7", OID, TID), 0) is None


RECORDS = [
    None,
    (b"", START, None),
    (b"record", START, None),
    (b"record", START, END),
    (b"x" * boxlayout.MAX_VALUE, START, END),
]


@pytest.mark.parametrize("record", RECORDS, ids=["missing", "empty", "current", "replaced", "64k"])
def test_load_before_answer_is_amps_own(record):
    tag = b"7f"
    frame = loadframes.load_before_answer(tag, record)
    if record is None:
        values = {"found": False}
    else:
        data, start, end = record
        values = {"found": True, "data": data, "start": start, "end": end}
    assert frame == amp_frame(C.LoadBefore, values, amp.ANSWER, tag, response=True)
    box = parse_one(frame)
    assert box[amp.ANSWER] == tag
    del box[amp.ANSWER]
    assert loadframes.read_load_before_answer(amp.AmpBox(box), None) == record
    parsed = C.LoadBefore.parseResponse(amp.AmpBox(box), None)
    assert parsed["found"] is (record is not None)
    if record is not None:
        assert (parsed["data"], parsed["start"], parsed["end"]) == record


@pytest.mark.parametrize("record", RECORDS[1:4], ids=["empty", "current", "replaced"])
@pytest.mark.parametrize("prefetched", [b"", b"p" * 100, b"q" * 60_000])
def test_load_before_answer_with_prefetch_is_amps_own(record, prefetched):
    tag = b"7f"
    frame = loadframes.load_before_answer(tag, record, prefetched)
    data, start, end = record
    values = {"found": True, "data": data, "start": start, "end": end, "prefetch": prefetched}
    assert frame == amp_frame(C.LoadBefore, values, amp.ANSWER, tag, response=True)
    box = parse_one(frame)
    del box[amp.ANSWER]
    assert loadframes.read_load_before_answer(amp.AmpBox(box), None) == record
    assert C.LoadBefore.parseResponse(amp.AmpBox(box), None)["prefetch"] == prefetched


def test_a_record_over_one_value_takes_amps_path_and_still_reads():
    data = b"y" * (boxlayout.MAX_VALUE + 10)
    assert loadframes.load_before_answer(b"1", (data, START, None)) is None
    box = parse_one(amp_frame(C.LoadBefore, {"found": True, "data": data, "start": START},
                              amp.ANSWER, b"1", response=True))
    assert loadframes.read_load_before_answer(box, None) == (data, START, None)


@pytest.mark.parametrize("box", [
    {b"_ask": b"1", b"_command": b"LoadBefore", b"oid": OID},                   # tid missing
    {b"_ask": b"1", b"_command": b"LoadBefore", b"oid": OID[:7], b"tid": TID},  # short oid
    {b"_ask": b"1", b"_command": b"LoadSerial", b"oid": OID, b"tid": TID},      # other command
    {b"_ask": b"1", b"_command": b"LoadBefore", b"oid": OID, b"xxx": TID},      # other key
])
def test_unusual_load_requests_are_left_to_amp(box):
    assert loadframes.read_load_before_request(amp.AmpBox(box)) is None


def test_a_malformed_answer_raises():
    with pytest.raises(ValueError):
        loadframes.read_load_before_answer(amp.AmpBox({b"found": b"True", b"data": b"",
                                                 b"start": b"short"}), None)


@pytest.mark.parametrize("number,data", [(0, b""), (3, b"chunk"), (123456, b"z" * C.BLOB_CHUNK)])
def test_store_blob_chunk_is_amps_own(number, data):
    frame = commitframes.store_blob_chunk(number, data)
    assert frame == amp_frame(C.StoreBlobChunk, {"blob": number, "data": data}, None, None)
    box = parse_one(frame)
    assert commitframes.read_store_blob_chunk(box) == (number, data)
    assert C.StoreBlobChunk.parseArguments(box, None) == {"blob": number, "data": data}


@pytest.mark.parametrize("box", [
    {b"_command": b"StoreBlobChunk", b"blob": b"-1", b"data": b""},
    {b"_command": b"StoreBlobChunk", b"blob": b"12345678901", b"data": b""},
    {b"_command": b"StoreBlobChunk", b"blob": b"1"},
    {b"_command": b"StoreBlobShared", b"blob": b"1", b"data": b""},
    {b"_command": b"StoreBlobChunk", b"blob": b"1", b"data": b"", b"_ask": b"1"},
])
def test_unusual_chunks_are_left_to_amp(box):
    assert commitframes.read_store_blob_chunk(amp.AmpBox(box)) is None


def test_a_declaration_that_no_longer_fits_fails_loudly():
    fields = boxlayout.box_fields(C.LoadBefore.arguments, amp.ASK, {amp.COMMAND: b"LoadBefore"})
    pieces, slots = boxlayout.box_template(fields)
    with pytest.raises(TypeError, match="out of step"):
        boxlayout.expect_slots(slots, amp.ASK, b"tid", b"oid")
    with pytest.raises(TypeError, match="not declared"):
        boxlayout.box_fields(C.LoadBefore.arguments, amp.ASK, {b"serial": b"x"})


@pytest.mark.parametrize("count", [0, 1, 3, boxlayout.MAX_VALUE // 8])
def test_invalidate_is_amps_own(count):
    oids = [i.to_bytes(8, "big") for i in range(count)]
    frame = commitframes.invalidate(TID, oids)
    assert frame == amp_frame(C.Invalidate, {"tid": TID, "oids": oids}, None, None)
    assert C.Invalidate.parseArguments(parse_one(frame), None) == {"tid": TID, "oids": oids}


def test_an_invalidation_over_one_value_takes_amps_path():
    oids = [b"\0" * 8] * (boxlayout.MAX_VALUE // 8 + 1)
    assert commitframes.invalidate(TID, oids) is None
    split = parse_one(amp_frame(C.Invalidate, {"tid": TID, "oids": oids}, None, None))
    assert commitframes.read_invalidate(split) is None          # AMP's split form: AMP's parser


@pytest.mark.parametrize("count", [0, 1, 3])
def test_a_plain_invalidation_is_read_as_amp_parses_it(count):
    oids = [i.to_bytes(8, "big") for i in range(count)]
    box = parse_one(commitframes.invalidate(TID, oids))
    assert commitframes.read_invalidate(box) == (TID, oids)
    for bad in ({b"tid": b"short"}, {b"oids": b"1234567"}, {b"_command": b"Other"},
                {b"extra": b""}):
        assert commitframes.read_invalidate(amp.AmpBox(box, **{k.decode(): v for k, v in bad.items()})) \
            is None


@pytest.mark.parametrize("user,description,extension", [
    (b"", b"", b""), (b"jim", b"a commit", b"\x80\x03}q\x00."),
    (b"u" * boxlayout.MAX_VALUE, b"d", b"e" * boxlayout.MAX_VALUE)])
def test_tpc_begin_is_amps_own(user, description, extension):
    frame = commitframes.tpc_begin(user, description, extension)
    values = {"user": user, "description": description, "extension": extension}
    assert frame == amp_frame(C.TpcBegin, values, None, None)
    box = parse_one(frame)
    assert commitframes.read_tpc_begin(box) == (user, description, extension)
    assert C.TpcBegin.parseArguments(box, None) == dict(values, tid=None, status=None)


def test_unusual_tpc_begins_are_left_to_amp():
    assert commitframes.tpc_begin(b"u" * (boxlayout.MAX_VALUE + 1), b"", b"") is None
    restore = amp_frame(C.TpcBegin, {"user": b"", "description": b"", "extension": b"",
                                     "tid": TID, "status": "p"}, None, None)
    assert commitframes.read_tpc_begin(parse_one(restore)) is None
    split = amp_frame(C.TpcBegin, {"user": b"u" * (boxlayout.MAX_VALUE + 1), "description": b"",
                                   "extension": b""}, None, None)
    assert commitframes.read_tpc_begin(parse_one(split)) is None
    assert commitframes.read_tpc_begin(amp.AmpBox({b"_command": b"TpcBegin", b"user": b"",
                                           b"description": b"", b"tid": TID})) is None


@pytest.mark.parametrize("tag", [b"1", b"a" * 20])
def test_vote_and_finish_questions_are_amps_own(tag):
    frame = commitframes.vote_request(tag)
    assert frame == amp_frame(C.Vote, {"can_resolve": True}, amp.ASK, tag)
    assert C.Vote.parseArguments(parse_one(frame), None) == {"can_resolve": True}
    assert commitframes.finish_request(tag) == amp_frame(C.Finish, {}, amp.ASK, tag)


@pytest.mark.parametrize("resolved", [[], [OID], [OID, TID]])
def test_vote_and_finish_answers_are_amps_own(resolved):
    tag = b"t12"
    frame = commitframes.vote_answer(tag, resolved)
    values = {"resolved": resolved, "conflicts": b""}
    assert frame == amp_frame(C.Vote, values, amp.ANSWER, tag, response=True)
    box = parse_one(frame)
    assert commitframes.read_vote_answer(box) == values
    assert C.Vote.parseResponse(box, None) == dict(values, to_resolve=None, current=None)
    frame = commitframes.finish_answer(tag, TID)
    assert frame == amp_frame(C.Finish, {"tid": TID}, amp.ANSWER, tag, response=True)
    assert commitframes.read_finish_answer(parse_one(frame)) == {"tid": TID}


@pytest.mark.parametrize("resolved", [[], [OID], [OID, TID]])
def test_vote_and_finish_answers_matched_byte_for_byte(resolved):
    """What a committing thread reads of its own answers (threadreads):
    the same values as the box path, None for anything else."""
    vote, finish = commitframes.vote_answer(b"t12", resolved), commitframes.finish_answer(b"t12", TID)
    assert commitframes.match_vote_answer(vote, b"t12") == {"resolved": resolved, "conflicts": b""}
    assert commitframes.match_finish_answer(finish, b"t12") == {"tid": TID}
    for frame, match in ((vote, commitframes.match_vote_answer), (finish, commitframes.match_finish_answer)):
        assert match(frame, b"t13") is None and match(frame, b"t1") is None   # another tag
        assert all(match(frame[:i], b"t12") is None for i in range(len(frame)))
        assert match(frame + frame[:3], b"t12") is None
    assert commitframes.match_finish_answer(vote, b"t12") is None
    assert commitframes.match_vote_answer(finish, b"t12") is None
    conflicts = amp_frame(C.Vote, {"resolved": [], "conflicts": OID + TID + START},
                          amp.ANSWER, b"t12", response=True)
    assert commitframes.match_vote_answer(conflicts, b"t12") is None
    ragged = commitframes.vote_answer(b"t12", [OID])
    ragged = ragged[:-12] + b"\x00\x07" + ragged[-10:-3] + ragged[-2:]
    assert commitframes.match_vote_answer(ragged, b"t12") is None


def test_unusual_vote_and_finish_answers_are_left_to_amp():
    assert commitframes.vote_answer(b"t1", [OID] * (boxlayout.MAX_VALUE // 8 + 1)) is None
    conflicts = amp_frame(C.Vote, {"resolved": [], "conflicts": OID + TID + START},
                          amp.ANSWER, b"t1", response=True)
    assert commitframes.read_vote_answer(parse_one(conflicts)) is None
    current = amp_frame(C.Vote, {"resolved": [], "conflicts": b"", "current": b"x"},
                        amp.ANSWER, b"t1", response=True)
    assert commitframes.read_vote_answer(parse_one(current)) is None
    ragged = amp.AmpBox({amp.ANSWER: b"t1", b"resolved": b"1234567", b"conflicts": b""})
    assert commitframes.read_vote_answer(ragged) is None          # AMP's path refuses it
    assert commitframes.read_finish_answer(amp.AmpBox({amp.ANSWER: b"t1", b"tid": b"short"})) is None
    assert commitframes.read_finish_answer(amp.AmpBox({amp.ERROR: b"t1", b"tid": TID})) is None
