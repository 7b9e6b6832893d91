//! Repair choice per FEC group, by measured need (issue 8: "choose per block by measured
//! need"). Pure: the sender hands it a round's requests and gets back what to send.
//!
//! For each group, over the devices that still need something there after the *credit* (the
//! group's parity symbols queued or sent too recently to be reflected in a NACK):
//! - one device: unicast its blocks (the last straggler costs no one else's link);
//! - every device misses the same few blocks (the union is no larger than the parity it
//!   would take): re-multicast the union;
//! - otherwise: `need + margin` fresh parity symbols, `need` being the most any one device
//!   lacks, since one symbol heals a *different* block at every device; when the group's
//!   fresh symbols run out, re-multicast the union instead.
//!
//! Cost: O(R log R) for R requested ranges in all; no per-block state.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use super::{push_span, union};
use crate::ranges::Ranges;

/// What one round asks for, per group.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// `(group, symbols)` to multicast as fresh parity.
    pub(crate) parity: Vec<(u32, u32)>,
    /// Blocks to re-multicast.
    pub(crate) multicast: Ranges,
    /// Blocks to unicast, per device.
    pub(crate) unicast: BTreeMap<u64, Ranges>,
}

/// The knobs and per-group facts the planner reads.
pub(crate) struct Inputs<'a> {
    /// Blocks per group (K > 0).
    pub(crate) k: u32,
    /// Extra symbols beyond the largest need.
    pub(crate) margin: u32,
    /// Symbols of the group already queued or recently sent.
    pub(crate) credit: &'a dyn Fn(u32) -> u32,
    /// Fresh symbols the group has left.
    pub(crate) fresh: &'a dyn Fn(u32) -> u32,
}

/// Plans the repairs for `wanted` (device, missing blocks) of one round.
pub(crate) fn plan(wanted: &[(u64, Ranges)], inp: &Inputs<'_>) -> Plan {
    let k = u64::from(inp.k.max(1));
    // (group, device index, start, end): every requested range split at group edges.
    let mut spans: Vec<(u64, usize, u64, u64)> = Vec::new();
    for (d, (_, req)) in wanted.iter().enumerate() {
        for r in req.as_slice() {
            let (mut s, e) = (u64::from(r.start), r.end());
            while s < e {
                let g = s / k;
                let end = e.min((g + 1) * k);
                spans.push((g, d, s, end));
                s = end;
            }
        }
    }
    // Stable: within a group, devices and their ranges stay in order.
    spans.sort_by_key(|s| s.0);
    let mut out = Plan::default();
    let mut i = 0;
    while i < spans.len() {
        let g = spans[i].0;
        let mut j = i;
        while j < spans.len() && spans[j].0 == g {
            j += 1;
        }
        plan_group(g as u32, &spans[i..j], wanted, inp, &mut out);
        i = j;
    }
    out
}

fn plan_group(
    g: u32,
    spans: &[(u64, usize, u64, u64)],
    wanted: &[(u64, Ranges)],
    inp: &Inputs<'_>,
    out: &mut Plan,
) {
    let credit = u64::from((inp.credit)(g));
    // Per device: its count; keep only devices short after the credit.
    let mut need = 0u64;
    let mut needy: Vec<(usize, usize)> = Vec::new();
    let mut a = 0;
    while a < spans.len() {
        let d = spans[a].1;
        let mut m = 0;
        let mut b = a;
        while b < spans.len() && spans[b].1 == d {
            m += spans[b].3 - spans[b].2;
            b += 1;
        }
        if m > credit {
            needy.push((a, b));
            need = need.max(m - credit);
        }
        a = b;
    }
    if needy.is_empty() {
        return;
    }
    if let [(a, b)] = needy[..] {
        // The last straggler: unicast what it lacks beyond the credit, lowest blocks first.
        let d = spans[a].1;
        let mut left = need;
        let mut own = Ranges::new();
        for &(_, _, s, e) in &spans[a..b] {
            let take = (e - s).min(left);
            push_span(&mut own, s, s + take);
            left -= take;
        }
        let entry = out.unicast.entry(wanted[d].0).or_default();
        *entry = union(entry, &own);
        return;
    }
    let mut edges: Vec<(u64, u64)> = needy
        .iter()
        .flat_map(|&(a, b)| spans[a..b].iter().map(|s| (s.2, s.3)))
        .collect();
    edges.sort_unstable();
    let mut all = Ranges::new();
    let mut cur: Option<(u64, u64)> = None;
    for (s, e) in edges {
        cur = match cur {
            Some((cs, ce)) if s <= ce => Some((cs, ce.max(e))),
            Some((cs, ce)) => {
                push_span(&mut all, cs, ce);
                Some((s, e))
            }
            None => Some((s, e)),
        };
    }
    if let Some((cs, ce)) = cur {
        push_span(&mut all, cs, ce);
    }
    let symbols = need + u64::from(inp.margin);
    if all.blocks() <= symbols || u64::from((inp.fresh)(g)) < symbols {
        out.multicast = union(&out.multicast, &all);
    } else {
        out.parity.push((g, symbols as u32));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rs(list: &[(u32, u32)]) -> Ranges {
        let mut r = Ranges::new();
        for &(s, l) in list {
            r.push(s, l).unwrap();
        }
        r
    }

    fn run(wanted: &[(u64, Ranges)], credit: u32, fresh: u32) -> Plan {
        plan(
            wanted,
            &Inputs {
                k: 10,
                margin: 1,
                credit: &|_| credit,
                fresh: &|_| fresh,
            },
        )
    }

    #[test]
    fn different_losses_get_parity_same_losses_multicast_one_device_unicast() {
        let wanted = [
            // Group 0: devices miss different blocks (1, 2 and 3 blocks): parity 3 + 1.
            // Group 1: both miss block 15 only: re-multicast it.
            // Group 2: only device 2 misses anything: unicast.
            (1, rs(&[(2, 1), (15, 1)])),
            (2, rs(&[(4, 2), (15, 1), (21, 2)])),
            (3, rs(&[(6, 3)])),
        ];
        let p = run(&wanted, 0, 100);
        assert_eq!(p.parity, [(0, 4)]);
        assert_eq!(p.multicast, rs(&[(15, 1)]));
        assert_eq!(
            p.unicast.into_iter().collect::<Vec<_>>(),
            [(2, rs(&[(21, 2)]))]
        );
    }

    #[test]
    fn credit_and_exhausted_symbols_change_the_choice() {
        let wanted = [(1, rs(&[(0, 1), (5, 1)])), (2, rs(&[(1, 3)]))];
        // Union 5 blocks, need 3 + 1 = 4 symbols: parity.
        assert_eq!(run(&wanted, 0, 100).parity, [(0, 4)]);
        // Two symbols already on their way: device 1 is covered; device 2 lacks one more,
        // and alone it gets the lowest of its blocks by unicast.
        let p = run(&wanted, 2, 100);
        assert!(p.parity.is_empty() && p.multicast.is_empty());
        assert_eq!(
            p.unicast.into_iter().collect::<Vec<_>>(),
            [(2, rs(&[(1, 1)]))]
        );
        // Only 3 fresh symbols left: re-multicast the union instead.
        let p = run(&wanted, 0, 3);
        assert!(p.parity.is_empty());
        assert_eq!(p.multicast, rs(&[(0, 4), (5, 1)]));
    }

    #[test]
    fn ranges_spanning_groups_are_split() {
        // Device 1 misses 8..13 (groups 0 and 1), device 2 misses 9 and 12.
        let wanted = [(1, rs(&[(8, 5)])), (2, rs(&[(9, 1), (12, 1)]))];
        let p = run(&wanted, 0, 100);
        // Group 0: union {8, 9} = 2 blocks <= need 2 + 1: multicast. Group 1: union
        // {10, 11, 12} = 3 <= need 3 + 1: multicast.
        assert!(p.parity.is_empty());
        assert_eq!(p.multicast, rs(&[(8, 5)]));
    }
}
