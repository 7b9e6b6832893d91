//! The received-block record's range encoding (`Ranges::decode_record`, which the agent keeps in
//! its `.rec` files) never panics on any bytes, and what it accepts is canonical: encoding the
//! decoded set again gives exactly the bytes it consumed.
#![no_main]

use fleetcast_wire::codec::{Counter, Reader, SliceWriter};
use fleetcast_wire::Ranges;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = Reader::new(data);
    let Ok(ranges) = Ranges::decode_record(&mut r) else {
        return;
    };
    let used = data.len() - r.remaining();
    let mut c = Counter::default();
    ranges.encode_record(&mut c).expect("a decoded set encodes");
    assert_eq!(c.0, used, "length not conserved");
    let mut buf = vec![0u8; used];
    let mut w = SliceWriter::new(&mut buf);
    ranges.encode_record(&mut w).expect("a decoded set encodes");
    assert_eq!(&buf[..], &data[..used], "not canonical");
});
