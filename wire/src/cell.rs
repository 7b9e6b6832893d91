//! Which gateway of a cell a device belongs with: rendezvous (highest random weight)
//! hashing, computed the same way by every gateway and every agent.
//!
//! Each (gateway, device) pair gets a weight; a device goes to the gateway of highest weight
//! among those it can reach, and its second choice is the next highest. The answer needs no
//! coordination, does not depend on the order gateways are listed in, and a gateway's
//! leaving moves only its own devices (spread over the others, each to its own second
//! choice), so a dead gateway's agents do not all land on one neighbour.
//!
//! Agents weigh the gateways by the addresses they list (`gateway = "a:7300,b:7300"`), the
//! same strings the gateways advertise (`cell.advertise`).

/// The weight of `gateway` for `device`: a 64-bit FNV-1a of the gateway's name and the
/// device id, finished with a murmur3 mix so that names differing in one byte still spread.
pub fn weight(gateway: &str, device: u64) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in gateway.bytes().chain(device.to_le_bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Which of `gateways` should hold `device`: the one of highest [`weight`] (ties, which need
/// equal hashes of different names, go to the greater name). `None` if there are none.
pub fn rendezvous<'a>(device: u64, gateways: &[&'a str]) -> Option<&'a str> {
    gateways
        .iter()
        .max_by_key(|g| (weight(g, device), **g))
        .copied()
}

/// The indices of `gateways` in the order `device` tries them: its first choice, then its
/// second, and so on.
#[cfg(feature = "alloc")]
pub fn preference(device: u64, gateways: &[&str]) -> alloc::vec::Vec<usize> {
    let mut order: alloc::vec::Vec<usize> = (0..gateways.len()).collect();
    order.sort_by_key(|&i| core::cmp::Reverse((weight(gateways[i], device), gateways[i])));
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendezvous_balances_and_moves_only_the_leavers_devices() {
        let three = ["gw-a", "gw-b", "gw-c"];
        let two = ["gw-a", "gw-c"];
        let mut counts = [0usize; 3];
        let mut moved_wrongly = 0;
        for dev in 0..30_000u64 {
            let owner = rendezvous(dev, &three).unwrap();
            counts[three.iter().position(|g| *g == owner).unwrap()] += 1;
            let after = rendezvous(dev, &two).unwrap();
            if owner != "gw-b" && after != owner {
                moved_wrongly += 1;
            }
        }
        // Each within 5% of a third (10,000 ± 500).
        for c in counts {
            assert!((9_500..=10_500).contains(&c), "{counts:?}");
        }
        assert_eq!(moved_wrongly, 0, "only gw-b's devices move when it leaves");
        // The order the gateways are listed in does not matter.
        let shuffled = ["gw-c", "gw-a", "gw-b"];
        assert!((0..1000).all(|d| rendezvous(d, &three) == rendezvous(d, &shuffled)));
        assert_eq!(rendezvous(7, &[]), None);
    }

    #[test]
    fn the_preference_order_starts_with_the_rendezvous_choice_and_spreads_the_second() {
        let gws = ["10.0.0.1:7300", "10.0.0.2:7300", "10.0.0.3:7300"];
        let mut second = [0usize; 3];
        for dev in 0..9_000u64 {
            let order = preference(dev, &gws);
            assert_eq!(order.len(), 3);
            assert_eq!(gws[order[0]], rendezvous(dev, &gws).unwrap());
            // Without the first choice, the second is the rendezvous choice of the rest.
            let rest: Vec<&str> = gws
                .iter()
                .copied()
                .filter(|g| *g != gws[order[0]])
                .collect();
            assert_eq!(gws[order[1]], rendezvous(dev, &rest).unwrap());
            if order[0] == 0 {
                second[order[1]] += 1;
            }
        }
        // gw 0's devices fall back to the other two about evenly.
        assert!(second[1] > 1_200 && second[2] > 1_200, "{second:?}");
    }
}
