//! The seed corpus of each target: honest inputs made by the crate's own encoders (and a
//! daemon written the way the protocol says), so mutations start next to what real peers send.
//! `fuzz/seeds/TARGET/` holds them as files (written by the ignored test
//! `fuzzing::tests::write_the_seed_corpus`), for CI and libFuzzer alike.

use super::daemon::Daemon;
use super::target::Target;
use crate::beacon::identity::Identity;
use crate::beacon::wire::{self, Beacon, Kind, NodeId};
use crate::summary;

fn beacon(kind: Kind, seq: u32) -> Beacon {
    Beacon {
        kind,
        flags: wire::FLAG_NAR_NONE | wire::FLAG_NAR_ZSTD,
        node: NodeId([0x5a; 16]),
        port: 8380,
        interval_ms: 5000,
        seq,
        hostname: Some("host-a".into()),
        summary: Some(42),
        commitment: Some([0x11; 16]),
        proof: None,
    }
}

/// A NAR string: length (u64 LE), bytes, zero padding to 8.
fn nar_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s);
    out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
}

fn nar(parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        nar_str(&mut out, p);
    }
    out
}

/// A daemon of protocol 1.38 through its handshake.
fn handshake() -> Daemon {
    let mut d = Daemon::default();
    d.u64(0x6478_696f);
    d.u64((1 << 8) | 38);
    d.strings(&[]);
    d.string("nix-daemon 2.26.3");
    d.u64(1);
    d.u64(0x616c_7473);
    d
}

const NARINFO: &str = "StorePath: /nix/store/yvh90pjzcqqmp86sfvgqh3ravrarfipn-lnc-a\nURL: nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz\n\
Compression: xz\nFileHash: sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3\nFileSize: 4029176\n\
NarHash: sha256:0w4qc5jjz09mr80sp0p2nkvmjrmznpj59b64w0rw4dfqns9py2qd\nNarSize: 528\n\
References: 581ignzmizxbizqrv7qp6bdy2dc3xng0-lnc-b yvh90pjzcqqmp86sfvgqh3ravrarfipn-lnc-a\n\
Deriver: 5x5f6q5q3vnxjbdm8ifyzrz0ryyyxzpv-lnc-a.drv\n\
Sig: cache.nixos.org-1:TsTTb3WGTZKphvYdBHXwo6weVILmTytUjLB+vcX89fOjjRicCHmKA4RCPMVLkj6TMJ4GMX3HPVWRdPBGFcm9Ag==\n";

/// The seeds of `target`.
pub fn seeds(target: Target) -> Vec<Vec<u8>> {
    match target {
        Target::BeaconDecode => {
            let mut signed = wire::encode(&Beacon {
                commitment: None,
                summary: None,
                ..beacon(Kind::Goodbye, 9)
            });
            Identity::generate().sign_datagram(&mut signed);
            vec![
                wire::encode(&beacon(Kind::Announce, 1)),
                wire::encode(&Beacon {
                    hostname: None,
                    summary: None,
                    commitment: None,
                    ..beacon(Kind::Query, 2)
                }),
                wire::encode(&Beacon {
                    commitment: None,
                    proof: Some([0x22; 16]),
                    ..beacon(Kind::Goodbye, 3)
                }),
                signed,
            ]
        }
        Target::NarFramer => {
            let file = nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents", b"hello\n", b")"]);
            let tree = nar(&[
                b"nix-archive-1", b"(", b"type", b"directory", b"entry", b"(", b"name", b"bin", b"node", b"(", b"type",
                b"regular", b"executable", b"", b"contents", b"#!/bin/sh\n", b")", b")", b"entry", b"(", b"name", b"lib",
                b"node", b"(", b"type", b"symlink", b"target", b"bin", b")", b")", b")",
            ]);
            let mut split = vec![40u8];
            split.extend_from_slice(&file);
            vec![file, tree, split]
        }
        Target::Daemon => {
            let info = {
                let mut d = handshake();
                d.u64(0x616c_7473);
                d.u64(1);
                d.string("5x5f6q5q3vnxjbdm8ifyzrz0ryyyxzpv-lnc-a.drv");
                d.string("0d3cb2c9c7a3e2a1b1f0e7d6c5b4a3928170615243342516071829304a5b6c7d");
                d.strings(&["/nix/store/581ignzmizxbizqrv7qp6bdy2dc3xng0-lnc-b".into()]);
                d.u64(1_700_000_000);
                d.u64(528);
                d.u64(0);
                d.strings(&["cache.nixos.org-1:abc".into()]);
                d.string("");
                // Then the path from a hash part, then every valid path.
                d.u64(0x616c_7473);
                d.string("/nix/store/581ignzmizxbizqrv7qp6bdy2dc3xng0-lnc-b");
                d.u64(0x616c_7473);
                d.strings(&["/nix/store/581ignzmizxbizqrv7qp6bdy2dc3xng0-lnc-b".into()]);
                d.0
            };
            let nar_stream = {
                let mut d = handshake();
                d.u64(0x616c_7473);
                d.0.extend_from_slice(&nar(&[b"nix-archive-1", b"(", b"type", b"regular", b"contents", b"hi", b")"]));
                d.0
            };
            let error = {
                let mut d = handshake();
                d.u64(0x6378_7470);
                d.string("Error");
                d.u64(0);
                d.string("Error");
                d.string("\x1b[31;1merror:\x1b[0m path is not valid");
                d.u64(0);
                d.u64(0);
                d.0
            };
            // Mode 72: path info, hash part, all valid paths; 6: a NAR; 1: a round trip.
            vec![
                [&[72u8][..], &info].concat(),
                [&[6u8][..], &nar_stream].concat(),
                [&[0u8][..], &error].concat(),
                [&[1u8][..], b"\x11\x02\x05abcde\x02\x01\x07message\x09deriver\x20nar-hash\x02\x03ref\x03re2".as_slice()].concat(),
            ]
        }
        Target::Summary => {
            let keys: Vec<u64> = (1..200u64).map(|k| k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
            vec![
                summary::encode_full(7, &keys).map(|b| b.to_vec()).unwrap_or_default(),
                summary::encode_full(1, &[]).map(|b| b.to_vec()).unwrap_or_default(),
                summary::encode_delta(7, 9, &keys[..5]).to_vec(),
            ]
        }
        Target::Identity => vec![
            b"nonce=000102030405060708090a0b0c0d0e0f&to=10.0.0.1\n\x05\x00\x40A".to_vec(),
            b"nonce=000102030405060708090A0B0C0D0E0F&to=fe80::1%25eth0".to_vec(),
            b"to=%3A%3Affff%3A10.0.0.1&nonce=ffffffffffffffffffffffffffffffff\n".to_vec(),
            b"nonce=00000000000000000000000000000000&to=10.0.0.9".to_vec(),
        ],
        Target::PeerTable => {
            // [op, source, time step, length] + bytes: announces of two ids from two
            // addresses, a goodbye and its replay, a proof, pex, an expiry.
            let step = |op: u8, src: u8, dt: u8, p: &[u8]| [&[op, src, dt, p.len() as u8][..], p].concat();
            vec![
                [
                    step(1, 0, 2, &[0, 0, 1, 0, 0, 1, 3, 10]),
                    step(1, 0, 2, &[1, 0, 1, 0, 0, 0, 0, 10]),
                    step(2, 1, 2, &[0, 0, 2, 0, 0, 0, 0, 10]),
                    step(3, 0, 2, &[0, 0, 3]),
                    step(1, 0, 2, &[0, 0, 2, 0, 0, 0, 0, 10]),
                    step(5, 1, 2, &[1]),
                    step(4, 2, 2, &[2, 0, 0, 0, 0, 0, 0, 10]),
                    step(6, 0, 255, &[]),
                ]
                .concat(),
                [
                    step(1, 6, 1, &[6, 1, 1, 1, 0, 0, 0, 20]),
                    step(1, 7, 1, &[6, 1, 2, 1, 0, 0, 0, 20]),
                    step(3, 6, 1, &[6, 1, 5]),
                    step(0, 3, 1, &wire::encode(&beacon(Kind::Announce, 4))),
                    step(7, 3, 1, &[0]),
                ]
                .concat(),
                // Four ids at one address, a fifth elsewhere that then announces from there
                // too (issue #25: it skipped admission, five entries listed the address).
                [
                    step(1, 0, 2, &[0, 0, 1, 0, 0, 0, 0, 40]),
                    step(1, 0, 2, &[1, 0, 1, 0, 0, 0, 0, 40]),
                    step(1, 0, 2, &[2, 0, 1, 0, 0, 0, 0, 40]),
                    step(1, 0, 2, &[3, 0, 1, 0, 0, 0, 0, 40]),
                    step(1, 1, 2, &[4, 0, 1, 0, 0, 0, 0, 40]),
                    step(7, 0, 2, &[0]),
                    step(2, 0, 2, &[4, 0, 2, 0, 0, 0, 0, 40]),
                ]
                .concat(),
            ]
        }
        Target::Narinfo => vec![
            NARINFO.as_bytes().to_vec(),
            NARINFO.replace("Sig: ", "Sig:\t").replace("\nNarSize", "\r\nNarSize").into_bytes(),
            [NARINFO, "CA: fixed:r:sha256:1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3\r\nX-Other: 1\n"]
                .concat()
                .into_bytes(),
        ],
        Target::Config => vec![
            b"listen = [\"[::]:8380\", \"0.0.0.0:8390\"]\nupstream = \"https://cache.nixos.org\"\nspool-max-mib = 1024\n"
                .to_vec(),
            b"pass-through-proven-peers = false\nno-beacon = true\nannounce-interval = \"2s\"\n".to_vec(),
            b"peer = [\"10.0.0.2\", \"host.lan:8380\"]\ntrusted-public-key = \"cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=\"\nlog-format = \"json\"\n".to_vec(),
        ],
    }
}
