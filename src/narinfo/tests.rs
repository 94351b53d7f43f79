use super::*;
use data_encoding::BASE64;

const DATA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data/narinfo");
const CACHE_NIXOS_ORG: &str = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=";
const STORE: &str = "/nix/store";

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{DATA}/{name}")).expect("test data file")
}

fn hydra_keys() -> TrustedKeys {
    TrustedKeys::new(vec![PublicKey::parse(&read("test-hydra-1.pub")).expect("key")])
}

fn vectors() -> Vec<(String, String)> {
    let mut out = Vec::new();
    for dir in [DATA.to_owned(), format!("{DATA}/upstream"), format!("{DATA}/nix-2.26")] {
        for e in std::fs::read_dir(&dir).expect("data dir") {
            let p = e.expect("entry").path();
            if p.extension().is_some_and(|x| x == "narinfo") {
                out.push((p.display().to_string(), std::fs::read_to_string(&p).expect("read")));
            }
        }
    }
    assert!(out.len() >= 8, "expected the committed vectors, found {}", out.len());
    out
}

#[test]
fn every_vector_parses_verifies_and_round_trips() {
    let keys = TrustedKeys::new(vec![
        PublicKey::parse(&read("test-hydra-1.pub")).expect("key"),
        PublicKey::parse(CACHE_NIXOS_ORG).expect("key"),
    ]);
    for (name, text) in vectors() {
        let info = NarInfo::parse(STORE, &text).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(info.is_trusted(&keys), "{name}: signature does not verify");
        // Rendering and reparsing keeps everything a signature covers.
        let again = NarInfo::parse(STORE, &info.render()).expect("reparse");
        assert_eq!(again, info, "{name}");
        assert!(again.is_trusted(&keys));
        // The file name is the store hash.
        let stem = name
            .rsplit('/')
            .next()
            .and_then(|n| n.strip_suffix(".narinfo"))
            .expect("stem");
        assert_eq!(info.store_path.hash().as_str(), stem);
    }
}

#[test]
fn fingerprint_matches_what_nix_signs() {
    let info = NarInfo::parse(STORE, &read("upstream/syd87l2rxw8cbsxmxl853h0r6pdwhwjr.narinfo")).expect("parse");
    assert_eq!(
        info.fingerprint(),
        "1;/nix/store/syd87l2rxw8cbsxmxl853h0r6pdwhwjr-curl-7.82.0-bin;\
         sha256:1b4sb93wp679q4zx9k1ignby1yna3z7c4c2ri3wphylbc2dwsys0;196040;\
         /nix/store/0jqd0rlxzra1rs38rdxl43yh6rxchgc6-curl-7.82.0,\
         /nix/store/6w8g7njm4mck5dmjxws0z1xnrxvl81xa-glibc-2.34-115,\
         /nix/store/j5jxw3iy7bbz4a57fh9g2xm2gxmyal8h-zlib-1.2.12,\
         /nix/store/yxvjs9drzsphm9pcf42a4byzj1kb9m7k-openssl-1.1.1n"
    );
}

#[test]
fn our_signature_equals_nix_signature() {
    // ed25519 is deterministic: signing the fingerprint with the same key must give the very
    // signature that `nix copy --to file://?secret-key=` wrote.
    let sk = SecretKey::parse(&read("test-hydra-1.sec")).expect("secret key");
    assert_eq!(sk.public().to_string(), read("test-hydra-1.pub").trim());
    let info = NarInfo::parse(STORE, &read("yvh90pjzcqqmp86sfvgqh3ravrarfipn.narinfo")).expect("parse");
    assert_eq!(info.sigs, vec![sk.sign(&info.fingerprint())]);
}

#[test]
fn multiple_signatures_and_ca_are_kept() {
    let info = NarInfo::parse(STORE, &read("gzz7namzfw32b7ija8nlbw7zaf82v26a.narinfo")).expect("parse");
    assert_eq!(info.sigs.len(), 2);
    assert!(info.ca.as_deref().is_some_and(|c| c.starts_with("fixed:r:sha256:")));
    let other_only = TrustedKeys::new(vec![PublicKey::parse(&read("other-key-1.pub")).expect("key")]);
    assert!(info.is_trusted(&other_only));
    assert!(info.is_trusted(&hydra_keys()));
    assert!(!info.is_trusted(&TrustedKeys::default()));
}

/// Each case: a transformation of a valid, signed narinfo, and whether it must still verify.
#[test]
fn tampered_narinfo_does_not_verify() {
    let text = read("yvh90pjzcqqmp86sfvgqh3ravrarfipn.narinfo");
    let sig_line = text.lines().find(|l| l.starts_with("Sig: ")).expect("sig").to_owned();
    let sig = sig_line.trim_start_matches("Sig: test-hydra-1:").to_owned();
    let cases: Vec<(&str, String)> = vec![
        (
            "wrong key name",
            text.replace("Sig: test-hydra-1:", "Sig: test-hydra-2:"),
        ),
        ("bad base64", text.replace(&sig, "!!!not-base64!!!")),
        ("truncated signature", text.replace(&sig, &sig[..sig.len() - 8])),
        ("flipped signature byte", text.replace(&sig, &flip_b64(&sig))),
        (
            "altered reference",
            text.replace(
                "References: 581ignzmizxbizqrv7qp6bdy2dc3xng0-lnc-b",
                "References: 581ignzmizxbizqrv7qp6bdy2dc3xng1-lnc-b",
            ),
        ),
        (
            "dropped reference",
            text.replace("References: 581ignzmizxbizqrv7qp6bdy2dc3xng0-lnc-b", "References: "),
        ),
        (
            "altered NarHash",
            text.replace(
                "NarHash: sha256:0w4qc5jjz09mr80sp0p2nkvmjrmznpj59b64w0rw4dfqns9py2qd",
                "NarHash: sha256:1w4qc5jjz09mr80sp0p2nkvmjrmznpj59b64w0rw4dfqns9py2qd",
            ),
        ),
        ("altered NarSize", text.replace("NarSize: 528", "NarSize: 529")),
        ("other store path", text.replace("-lnc-a", "-lnc-x")),
    ];
    let keys = hydra_keys();
    for (what, t) in cases {
        assert_ne!(t, text, "{what}: the case changed nothing");
        if let Ok(info) = NarInfo::parse(STORE, &t) {
            assert!(!info.is_trusted(&keys), "{what}: must not verify");
        }
    }
    // Fields the signature does not cover may change (URL, compression, FileHash).
    let t = text.replace("Compression: xz", "Compression: none");
    assert!(NarInfo::parse(STORE, &t).expect("parse").is_trusted(&keys));
}

fn flip_b64(s: &str) -> String {
    let mut bytes = BASE64.decode(s.as_bytes()).expect("b64");
    bytes[10] ^= 1;
    BASE64.encode(&bytes)
}

#[test]
fn malformed_narinfo_is_rejected() {
    let good = read("yvh90pjzcqqmp86sfvgqh3ravrarfipn.narinfo");
    let drop = |field: &str| {
        good.lines()
            .filter(|l| !l.starts_with(field))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let huge = format!("{good}X-Pad: {}\n", "a".repeat(MAX_NARINFO_BYTES));
    let cases: Vec<(&str, String, ParseError)> = vec![
        (
            "duplicate NarHash",
            format!("{good}NarHash: sha256:0w4qc5jjz09mr80sp0p2nkvmjrmznpj59b64w0rw4dfqns9py2qd\n"),
            ParseError::Duplicate("NarHash"),
        ),
        (
            "duplicate StorePath",
            format!("{good}StorePath: /nix/store/581ignzmizxbizqrv7qp6bdy2dc3xng0-lnc-b\n"),
            ParseError::Duplicate("StorePath"),
        ),
        ("missing NarHash", drop("NarHash"), ParseError::Missing("NarHash")),
        ("missing StorePath", drop("StorePath"), ParseError::Missing("StorePath")),
        ("missing URL", drop("URL"), ParseError::Missing("URL")),
        ("missing NarSize", drop("NarSize"), ParseError::Missing("NarSize")),
        ("huge", huge.clone(), ParseError::TooLarge(huge.len())),
        (
            "no colon",
            format!("{good}garbage line\n"),
            ParseError::Line(good.lines().count() + 1),
        ),
        (
            "zero NarSize",
            good.replace("NarSize: 528", "NarSize: 0"),
            ParseError::Value {
                field: "NarSize",
                value: "0".into(),
            },
        ),
        (
            "negative NarSize",
            good.replace("NarSize: 528", "NarSize: -1"),
            ParseError::Value {
                field: "NarSize",
                value: "-1".into(),
            },
        ),
    ];
    for (what, text, want) in cases {
        assert_eq!(NarInfo::parse(STORE, &text), Err(want), "{what}");
    }
    for (what, text) in [
        (
            "path outside the store",
            good.replace("StorePath: /nix/store/", "StorePath: /etc/store/"),
        ),
        ("traversal in StorePath", good.replace("-lnc-a", "-../../etc")),
        (
            "bad hash alphabet",
            good.replace("yvh90pjzcqqmp86sfvgqh3ravrarfipn", "yvh90pjzcqqmp86sfvgqh3ravrarfipe"),
        ),
        ("short NarHash", good.replace("sha256:0w4qc5jjz", "sha256:0w4")),
        (
            "bad reference",
            good.replace("581ignzmizxbizqrv7qp6bdy2dc3xng0-lnc-b", "../lnc-b"),
        ),
        (
            "md5 NarHash",
            good.replace(
                "sha256:0w4qc5jjz09mr80sp0p2nkvmjrmznpj59b64w0rw4dfqns9py2qd",
                "md5:00000000000000000000000000",
            ),
        ),
    ] {
        assert!(NarInfo::parse(STORE, &text).is_err(), "{what} must be rejected");
    }
}

#[test]
fn store_path_hash_rules() {
    for (s, ok) in [
        ("yvh90pjzcqqmp86sfvgqh3ravrarfipn", true),
        ("yvh90pjzcqqmp86sfvgqh3ravrarfip", false),   // short
        ("yvh90pjzcqqmp86sfvgqh3ravrarfipnn", false), // long
        ("yvh90pjzcqqmp86sfvgqh3ravrarfipe", false),  // 'e' is not nix32
        ("YVH90PJZCQQMP86SFVGQH3RAVRARFIPN", false),  // upper case
        ("../../../../../../../../etc/pass", false),
        ("%2e%2e%2fetc%2fpasswdaaaaaaaaaaa", false),
        ("", false),
    ] {
        assert_eq!(StorePathHash::parse(s).is_ok(), ok, "{s:?}");
    }
}

#[test]
fn nar_hash_forms_agree() {
    let nix32 = NarHash::parse("sha256:0w4qc5jjz09mr80sp0p2nkvmjrmznpj59b64w0rw4dfqns9py2qd").expect("nix32");
    let sri = NarHash::parse("sha256-DQt/k7bYNcIz4MSsVOS1v2ZZ97TigqsByjWBL2VhmHA=").expect("sri");
    assert_eq!(nix32, sri);
    let hex = data_encoding::HEXLOWER.encode(nix32.digest());
    assert_eq!(NarHash::parse(&hex).expect("bare base16"), nix32);
    assert_eq!(NarHash::parse(&format!("sha256:{hex}")).expect("base16"), nix32);
    assert_eq!(NarHash::parse_nix32(&nix32.to_nix32()).expect("url form"), nix32);
    assert!(NarHash::parse_nix32(&format!("{}/", &nix32.to_nix32()[..51])).is_err());
}

#[test]
fn key_parsing_rejects_bad_keys() {
    assert!(PublicKey::parse(CACHE_NIXOS_ORG).is_ok());
    for bad in [
        "",
        "no-colon",
        ":6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY=",
        "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShj",
        "cache.nixos.org-1:not base64",
    ] {
        assert!(PublicKey::parse(bad).is_err(), "{bad:?}");
    }
}

/// Issue #25: parsing dropped one `\r` before each `\n` (`str::lines`), so a value ending in
/// `\r` came back without it after render and parse: the Sig and CA values the proxy re-renders
/// for Nix changed. Lines end at `\n` only now, as in Nix. Each case: a value as the narinfo
/// holds it (built, or parsed from text), which must survive render then parse.
#[test]
fn render_then_parse_keeps_carriage_returns() {
    let good = NarInfo::parse(STORE, &read("gzz7namzfw32b7ija8nlbw7zaf82v26a.narinfo")).expect("parse");
    let sig = good.sigs[0].clone();
    let built = |sig: &str, ca: &str| NarInfo {
        sigs: vec![sig.to_owned(), good.sigs[1].clone()],
        ca: Some(ca.to_owned()),
        ..good.clone()
    };
    let ca = good.ca.clone().expect("ca");
    for (what, info) in [
        ("a Sig ending in \\r", built(&format!("{sig}\r"), &ca)),
        ("a CA ending in \\r", built(&sig, &format!("{ca}\r"))),
        ("both, twice", built(&format!("{sig}\r\r"), &format!("{ca}\r\r"))),
        ("a lone \\r", built("\r", "\r")),
    ] {
        let again = NarInfo::parse(STORE, &info.render()).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(again, info, "{what}");
    }
    // From text: what parses comes back the same after render and parse.
    let text = read("gzz7namzfw32b7ija8nlbw7zaf82v26a.narinfo").replace("\nSig: ", "\nSig: \r\r");
    let parsed = NarInfo::parse(STORE, &text).expect("parse");
    assert_eq!(NarInfo::parse(STORE, &parsed.render()).expect("reparse"), parsed);
    // A line ending in `\r\n` keeps the `\r` in its value, as Nix reads it: a StorePath or
    // NarSize with one does not parse (Nix rejects those too).
    assert!(NarInfo::parse(
        STORE,
        &read("gzz7namzfw32b7ija8nlbw7zaf82v26a.narinfo").replace('\n', "\r\n")
    )
    .is_err());
}

proptest::proptest! {
    /// For any narinfo text that parses (free-form values of every printable byte, `\r` and
    /// tab included), render then parse gives the same narinfo.
    #[test]
    fn any_narinfo_that_parses_round_trips(
        url in "[ -~\r\t]{1,30}",
        compression in "[ -~\r]{0,10}",
        file_hash in "[ -~\r]{0,30}",
        sigs in proptest::collection::vec("[ -~\r\t]{0,40}", 0..4),
        ca in "[ -~\r]{0,30}",
        deriver in proptest::option::of("[0-9a-z]{32}-[a-z.\r]{1,10}"),
        unknown in "[ -~\r]{0,20}",
    ) {
        let mut text = format!(
            "StorePath: /nix/store/yvh90pjzcqqmp86sfvgqh3ravrarfipn-lnc-a\nURL: {url}\nCompression: {compression}\n\
             FileHash: {file_hash}\nNarHash: sha256:0w4qc5jjz09mr80sp0p2nkvmjrmznpj59b64w0rw4dfqns9py2qd\n\
             NarSize: 528\nReferences: 581ignzmizxbizqrv7qp6bdy2dc3xng0-lnc-b\nX-Unknown: {unknown}\nCA: {ca}\n"
        );
        for s in &sigs {
            text.push_str(&format!("Sig: {s}\n"));
        }
        if let Some(d) = &deriver {
            text.push_str(&format!("Deriver: {d}\n"));
        }
        if let Ok(info) = NarInfo::parse(STORE, &text) {
            let again = NarInfo::parse(STORE, &info.render());
            proptest::prop_assert_eq!(again, Ok(info));
        }
    }
}
