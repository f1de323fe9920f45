"""The marker: one typed record with a digest of its own; every malformed field is a
corrupt checkpoint, named, never a KeyError or TypeError."""

from __future__ import annotations

import json
import math

import pytest

from dcp_engine import marker as marker_mod
from dcp_engine.marker import FileEntry, Marker, MarkerError


def sample(**kw) -> Marker:
    fields = dict(step=60, epoch=3, metrics={"loss": 0.5, "acc": math.nan}, world_size=2,
                  entries={"model": {"kind": "module"}, "n": {"kind": "object",
                                                              "encoding": "pickle"}},
                  files={"__0_0.raw": FileEntry(100, "0000abcd"), ".metadata": FileEntry(7)},
                  extra={"trainer": {"step": 60}})  # fmt: skip
    fields.update(kw)
    return Marker(**fields)


def redigest(data: dict) -> bytes:
    """A marker whose digest matches its (malformed) content: only the schema can catch it."""
    data = {k: v for k, v in data.items() if k != "digest"}
    data["digest"] = f"crc32:{marker_mod._digest(data)}"
    return json.dumps(data).encode()


def test_round_trip_is_exact():
    m = sample()
    back = Marker.from_bytes(m.to_bytes(), "x")
    assert back.step == 60 and back.epoch == 3 and back.world_size == 2
    assert back.metrics["loss"] == 0.5 and math.isnan(back.metrics["acc"])
    assert back.files == m.files and back.total_bytes == 107
    assert back.entries == m.entries and back.extra == m.extra


def test_every_single_flipped_byte_is_caught():
    """Pass: flipping any one byte of the marker (one bit per byte, every position) makes
    it corrupt: never a different marker, never another exception type."""
    raw = sample().to_bytes()
    for i in range(len(raw)):
        for bit in (0x01, 0x20):
            bad = bytearray(raw)
            bad[i] ^= bit
            try:
                got = Marker.from_bytes(bytes(bad), "m")
            except MarkerError:
                continue
            # A flip inside JSON whitespace leaves the same content: the same marker.
            assert got == Marker.from_bytes(raw, "m"), (i, bit)


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda d: d["files"]["__0_0.raw"].pop("size"), "has size None"),
        (lambda d: d.__setitem__("entries", ["model"]), "field 'entries' is list"),
        (lambda d: d["entries"].__setitem__("model", "module"), "entry 'model'"),
        (lambda d: d["metrics"].__setitem__("loss", "low"), "metric 'loss' is 'low'"),
        (lambda d: d.__setitem__("step", -1), "field 'step' is -1"),
        (lambda d: d.__setitem__("step", True), "field 'step' is True"),
        (lambda d: d.__setitem__("bytes", 5), "field 'bytes' is 5"),
        (lambda d: d["files"]["__0_0.raw"].__setitem__("crc32", "xyz"), "crc32 'xyz'"),
        (lambda d: d.__setitem__("created", "yesterday"), "field 'created'"),
        (lambda d: d.__setitem__("files", None), "field 'files' is NoneType"),
    ],
)
def test_a_malformed_field_is_a_corrupt_marker_naming_it(mutate, problem):
    data = json.loads(sample().to_bytes())
    mutate(data)
    with pytest.raises(MarkerError, match=rf"marker where/COMMITTED is corrupt: .*{problem}"):
        Marker.from_bytes(redigest(data), "where/COMMITTED")


def test_digest_mismatch_and_foreign_formats_are_corrupt():
    data = json.loads(sample().to_bytes())
    data["metrics"]["loss"] = 0.25  # changed without its digest
    with pytest.raises(MarkerError, match="its digest is"):
        Marker.from_bytes(json.dumps(data).encode(), "m")
    for raw in (b"", b"[1, 2]", b"\xff\xfe", b'{"format": "other/9"}'):
        with pytest.raises(MarkerError, match="marker m is corrupt"):
            Marker.from_bytes(raw, "m")


def test_format_1_markers_still_read_and_amended_ones_are_digested():
    """Checkpoints written before the marker digest load; an amendment writes format 2."""
    data = json.loads(sample().to_bytes())
    del data["digest"]
    data["format"] = "dcp-engine/1"
    old = Marker.from_bytes(json.dumps(data).encode(), "m")
    assert old.format == "dcp-engine/1" and old.step == 60
    new = old.amended({"val": 1.0}, {"note": "x"})
    back = Marker.from_bytes(new.to_bytes(), "m")
    assert back.format == marker_mod.FORMAT and back.metrics["val"] == 1.0
    assert back.extra == {"trainer": {"step": 60}, "note": "x"}
