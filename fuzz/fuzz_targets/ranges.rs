//! NACK range sets built from arbitrary operations stay canonical: pushes either succeed and
//! keep ranges sorted, disjoint and non-adjacent, or fail leaving the set unchanged; membership
//! agrees with a naive model.
#![no_main]

use std::collections::BTreeSet;

use fleetcast_wire::Ranges;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|ops: Vec<(u16, u8)>| {
    let mut r = Ranges::new();
    let mut model = BTreeSet::new();
    let mut cursor = 0u32;
    for (gap, len) in ops {
        let start = cursor.saturating_add(u32::from(gap));
        let before = r.clone();
        match r.push(start, u32::from(len)) {
            Ok(()) => {
                for b in start..start + u32::from(len) {
                    model.insert(b);
                }
                cursor = start + u32::from(len);
            }
            Err(_) => assert_eq!(r, before, "failed push changed the set"),
        }
    }
    let s = r.as_slice();
    for w in s.windows(2) {
        assert!(w[0].end() < u64::from(w[1].start), "not canonical: {w:?}");
    }
    assert_eq!(r.blocks(), model.len() as u64);
    for b in model.iter().take(1000) {
        assert!(r.contains(*b));
    }
});
