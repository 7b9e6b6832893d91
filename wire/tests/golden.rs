//! Golden vectors: every message kind's sample, emitted, must equal the bytes checked in under
//! `tests/golden/`, and those bytes must parse back to the sample. A format change therefore
//! shows up as a diff of these files. To re-bless after a deliberate change (and a version
//! bump, see docs/wire.md): `FLEETCAST_BLESS=1 cargo test -p fleetcast-wire --test golden`.

use std::fmt::Write as _;
use std::path::PathBuf;

use fleetcast_wire::msg::samples;
use fleetcast_wire::{Frame, Kind, Message};

fn path(kind: Kind) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(format!("{kind:?}.hex").to_lowercase())
}

/// Hex, 16 bytes a line, so diffs point at the changed bytes.
fn to_hex(bytes: &[u8]) -> String {
    let mut s = String::new();
    for line in bytes.chunks(16) {
        for (i, b) in line.iter().enumerate() {
            if i > 0 {
                s.push(' ');
            }
            write!(s, "{b:02x}").unwrap();
        }
        s.push('\n');
    }
    s
}

fn from_hex(s: &str) -> Vec<u8> {
    s.split_whitespace()
        .map(|h| u8::from_str_radix(h, 16).expect("hex byte"))
        .collect()
}

#[test]
fn samples_match_golden_vectors() {
    let bless = std::env::var_os("FLEETCAST_BLESS").is_some();
    for m in samples::all() {
        let mut bytes = Vec::new();
        m.emit_to_vec(&mut bytes).unwrap();
        let p = path(m.kind());
        if bless {
            std::fs::write(&p, to_hex(&bytes)).unwrap();
            continue;
        }
        let golden = std::fs::read_to_string(&p)
            .unwrap_or_else(|e| panic!("{}: {e} (bless with FLEETCAST_BLESS=1)", p.display()));
        let golden = from_hex(&golden);
        assert_eq!(
            to_hex(&bytes),
            to_hex(&golden),
            "{:?} encoding changed",
            m.kind()
        );
        let (frame, rest) = Frame::parse_prefix(&golden, u32::MAX).unwrap();
        assert!(rest.is_empty());
        assert_eq!(Message::parse(&frame).unwrap(), m);
    }
}

#[test]
fn golden_header_fields_are_as_specified() {
    // docs/wire.md: magic 0xFC, version 6, kind byte, flags 0, body length, CRC32.
    let golden = from_hex(&std::fs::read_to_string(path(Kind::ResultAck)).unwrap());
    assert_eq!(&golden[..8], &[0xFC, 0x06, 0x12, 0x00, 0, 0, 0, 8]);
    assert_eq!(&golden[12..], &7u64.to_be_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&golden[..8]);
    h.update(&golden[12..]);
    assert_eq!(&golden[8..12], &h.finalize().to_be_bytes());
}
