#!/usr/bin/env python3
"""Writes beacons.txt: beacon test vectors made straight from proto/beacon.md, independently of
the Rust codec (which the vectors then check). Run: python3 proto/vectors/gen.py
(needs the `cryptography` package for the Ed25519 signatures; Ed25519 is deterministic, so the
vectors come out the same every run)."""
import hashlib
import os
import struct
import sys

N = bytes.fromhex("00112233445566778899aabbccddeeff")


def hdr(kind=1, flags=1, node=N, port=8380, interval=5000, seq=1, magic=b"LNCB", ver=1):
    return magic + bytes([ver, kind]) + struct.pack(">H", flags) + node + struct.pack(">HII", port, interval, seq)


def ext(t, v):
    return bytes([t, len(v)]) + v


def padded_to(total):
    """An announce padded with unknown extensions to exactly `total` bytes."""
    b = hdr() + ext(7, b"x" * 255)
    rest = total - len(b) - 2
    assert 0 <= rest <= 255
    b += ext(7, b"y" * rest)
    assert len(b) == total
    return b


S = bytes(range(16))  # a goodbye secret
C = hashlib.sha256(S).digest()[:16]  # its commitment


# A keyed node (proto/beacon.md, "Identity"): its node id is the first 16 bytes of sha256 of its
# Ed25519 public key; a goodbye carries the key (extension 5) and, last, a signature (extension 6)
# over "local-nix-cache goodbye v1\0" followed by every byte before the signature extension.
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey  # noqa: E402
from cryptography.hazmat.primitives import serialization  # noqa: E402

SK = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
PK = SK.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
K = hashlib.sha256(PK).digest()[:16]  # the keyed node id
OTHER = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
GOODBYE_CONTEXT = b"local-nix-cache goodbye v1\0"


def signed_goodbye(signer=SK, node=K):
    b = hdr(kind=3, node=node, port=0, seq=12) + ext(5, PK)
    return b + ext(6, signer.sign(GOODBYE_CONTEXT + b))


def fields(**kw):
    d = dict(type="announce", node=N.hex(), port=8380, flags="0x0001", interval_ms=5000, seq=1, hostname="-",
             summary="-", commitment="-", proof="-")
    d.update(kw)
    return d


VALID = [
    ("announce, minimal", hdr(), fields()),
    ("announce with hostname", hdr(flags=0x0005, seq=42) + ext(1, b"laptop-7"), fields(flags="0x0005", seq=42, hostname="laptop-7")),
    ("query from the peers tool (port 0)", hdr(kind=2, flags=0, port=0, seq=0), fields(type="query", port=0, flags="0x0000", seq=0)),
    ("goodbye", hdr(kind=3, seq=4294967295), fields(type="goodbye", seq=4294967295)),
    ("unknown extensions and flag bits are ignored (newer sender)",
     hdr(flags=0x8001) + ext(9, b"\x01\x02\x03") + ext(1, b"h") + ext(200, b""),
     fields(flags="0x8001", hostname="h", canonical="no")),
    ("shortest interval, lowest port", hdr(interval=100, port=1), fields(port=1, interval_ms=100)),
    ("longest interval, highest port", hdr(interval=3600000, port=65535), fields(port=65535, interval_ms=3600000)),
    ("exactly 512 bytes", padded_to(512), fields(canonical="no")),
    ("announce with summary version and goodbye commitment",
     hdr(flags=0x0007) + ext(1, b"h") + ext(2, struct.pack(">Q", 2**40 + 7)) + ext(3, C),
     fields(flags="0x0007", hostname="h", summary=2**40 + 7, commitment=C.hex())),
    ("goodbye with its proof", hdr(kind=3, seq=9) + ext(4, S), fields(type="goodbye", seq=9, proof=S.hex())),
    ("announce of a keyed node (its commitment is its node id)",
     hdr(node=K, flags=0x0007) + ext(1, b"h") + ext(3, K),
     fields(node=K.hex(), flags="0x0007", hostname="h", commitment=K.hex())),
    ("goodbye signed by the key of its node", signed_goodbye(),
     fields(type="goodbye", node=K.hex(), port=0, seq=12, key=PK.hex(), signed="yes", canonical="no")),
    ("goodbye signed by another key than its node's", signed_goodbye(signer=OTHER),
     fields(type="goodbye", node=K.hex(), port=0, seq=12, key=PK.hex(), signed="no", canonical="no")),
]

INVALID = [
    ("empty", b"", "too-short"),
    ("one byte short of a header", hdr()[:33], "too-short"),
    ("513 bytes", padded_to(513), "too-long"),
    ("bad magic", hdr(magic=b"LNCX"), "magic"),
    ("an HTTP request, not a beacon", b"GET / HTTP/1.1\r\nHost: example.org\r\n\r\n", "magic"),
    ("version 2", hdr(ver=2), "version"),
    ("version 0", hdr(ver=0), "version"),
    ("type 0", hdr(kind=0), "type"),
    ("type 4", hdr(kind=4), "type"),
    ("announce with port 0", hdr(port=0), "port"),
    ("interval 0", hdr(interval=0), "interval"),
    ("interval 99 ms", hdr(interval=99), "interval"),
    ("interval over an hour", hdr(interval=3600001), "interval"),
    ("extension header cut", hdr() + b"\x01", "truncated"),
    ("extension value cut", (hdr() + ext(1, b"laptop"))[:-2], "truncated"),
    ("empty hostname", hdr() + ext(1, b""), "hostname"),
    ("hostname not UTF-8", hdr() + ext(1, b"\xff\xfe"), "hostname"),
    ("hostname of 65 bytes", hdr() + ext(1, b"a" * 65), "hostname"),
    ("summary version of 7 bytes", hdr() + ext(2, b"\x00" * 7), "extension-length"),
    ("commitment of 15 bytes", hdr() + ext(3, C[:15]), "extension-length"),
    ("proof of 17 bytes", hdr(kind=3) + ext(4, S + b"\x00"), "extension-length"),
    ("key of 31 bytes", hdr(kind=3) + ext(5, PK[:31]), "extension-length"),
    ("signature of 63 bytes", hdr(kind=3) + ext(5, PK) + ext(6, b"\x00" * 63), "extension-length"),
]


def hexlines(b):
    h = b.hex()
    return [f"hex: {h[i:i + 64]}" for i in range(0, len(h), 64)] or ["hex:"]


def write_corpus(directory):
    """Every vector as one file, to seed the fuzzer (fuzz/README.md)."""
    os.makedirs(directory, exist_ok=True)
    for i, (_, b, _) in enumerate(VALID + INVALID):
        with open(os.path.join(directory, f"vector-{i:02}"), "wb") as f:
            f.write(b)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--corpus":
        write_corpus(sys.argv[2])
        return
    out = [
        "# Beacon test vectors (proto/beacon.md), written by gen.py. Blocks of `key: value` lines,",
        "# blank-line separated; hex lines concatenate. Valid vectors list the decoded fields;",
        "# `canonical: no` marks datagrams that decode but that the encoder would not produce",
        "# (unknown extensions). Invalid vectors give the error kind: too-short, too-long, magic,",
        "# version, type, port, interval, truncated, hostname, extension-length.",
        "",
    ]
    for name, b, d in VALID:
        out += [f"name: {name}", *hexlines(b), *(f"{k}: {v}" for k, v in d.items()), ""]
    for name, b, e in INVALID:
        out += [f"name: {name}", *hexlines(b), f"error: {e}", ""]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "beacons.txt")
    with open(path, "w") as f:
        f.write("\n".join(out))


if __name__ == "__main__":
    main()
