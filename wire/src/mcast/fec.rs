//! Forward error correction over block groups: the [`Fec`] trait the cores and drivers speak,
//! and [`ReedSolomon`] (feature `fec`), its implementation on `reed-solomon-simd`.
//!
//! A file's blocks are cut into groups of K ([`super::SenderConfig::fec_group`]); the last
//! group may hold fewer (`k ≤ K`). A code defines M parity symbols per group
//! ([`super::SenderConfig::fec_parity`]), each as long as a block; any `k` of the group's `k`
//! data blocks and M symbols rebuild the group (an MDS code). The sender multicasts *fresh*
//! symbols (indices never sent before), so one symbol heals a different lost block at every
//! receiver that lacks one block of the group.
//!
//! Invariants of every implementation:
//! - Buffers are the caller's: `encode` and `decode` write only into the slices they are given
//!   and never keep them.
//! - Deterministic: the same inputs give the same symbols (sender and receivers must agree).
//! - Never panics on any input: bad geometry or lengths are [`FecError`]s.

use core::fmt;

/// Why an [`Fec`] call failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FecError {
    /// The code does not support this many data blocks and parity symbols.
    Unsupported,
    /// Buffers differ in length, are empty, or their count does not match the geometry.
    Shape,
    /// Fewer than `k` data blocks and symbols in all: nothing can be rebuilt.
    NotEnough,
    /// A parity index is out of range or given twice.
    BadIndex,
    /// The codec failed for a reason of its own.
    Codec,
}

impl fmt::Display for FecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FecError::Unsupported => "unsupported FEC geometry",
            FecError::Shape => "FEC buffers have the wrong shape",
            FecError::NotEnough => "not enough blocks and parity symbols to decode",
            FecError::BadIndex => "parity index out of range or repeated",
            FecError::Codec => "FEC codec failure",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FecError {}

/// An erasure code over one group of equal-length blocks.
pub trait Fec {
    /// Computes parity symbols `0..parity.len()` of the group `data` (its `k` blocks, equal
    /// lengths, the last zero-padded by the caller) into `parity` (as many buffers as the code
    /// defines symbols per group, M, each as long as a block).
    fn encode(&mut self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), FecError>;

    /// Rebuilds a group's missing blocks. `data` has one entry per block of the group:
    /// `Some(bytes)` for a block present, `None` for one missing; `m` is the code's M;
    /// `parity` lists received symbols as `(index, bytes)`. The missing blocks are written
    /// into `out`, one buffer per `None`, in increasing block order.
    fn decode(
        &mut self,
        data: &[Option<&[u8]>],
        m: usize,
        parity: &[(usize, &[u8])],
        out: &mut [&mut [u8]],
    ) -> Result<(), FecError>;
}

/// The checks every [`Fec::decode`] implementation needs first: equal non-zero lengths, one
/// output per missing block, distinct in-range indices, enough symbols. Returns the block
/// length.
pub fn check_decode(
    data: &[Option<&[u8]>],
    m: usize,
    parity: &[(usize, &[u8])],
    out: &[&mut [u8]],
) -> Result<usize, FecError> {
    let len = data
        .iter()
        .flatten()
        .map(|d| d.len())
        .chain(parity.iter().map(|p| p.1.len()))
        .chain(out.iter().map(|o| o.len()))
        .next()
        .ok_or(FecError::Shape)?;
    let missing = data.iter().filter(|d| d.is_none()).count();
    let same = |l: usize| l == len;
    if len == 0
        || out.len() != missing
        || !data.iter().flatten().all(|d| same(d.len()))
        || !parity.iter().all(|p| same(p.1.len()))
        || !out.iter().all(|o| same(o.len()))
    {
        return Err(FecError::Shape);
    }
    for (i, (idx, _)) in parity.iter().enumerate() {
        if *idx >= m || parity[..i].iter().any(|(j, _)| j == idx) {
            return Err(FecError::BadIndex);
        }
    }
    if parity.len() < missing {
        return Err(FecError::NotEnough);
    }
    Ok(len)
}

#[cfg(feature = "fec")]
pub use rs::ReedSolomon;

#[cfg(feature = "fec")]
mod rs {
    use alloc::vec::Vec;

    use reed_solomon_simd::{ReedSolomonDecoder, ReedSolomonEncoder};

    use super::{check_decode, Fec, FecError};

    /// Reed–Solomon over GF(2^16) in O(n log n) (Leopard-RS, via `reed-solomon-simd`):
    /// symbol `i` of a group is recovery shard `i` of an (original `k`, recovery M) code over
    /// its blocks. Blocks of odd length are padded with one zero byte internally (the codec
    /// needs even shards). Keeps its encoder, decoder and scratch between calls.
    #[derive(Default)]
    pub struct ReedSolomon {
        enc: Option<ReedSolomonEncoder>,
        dec: Option<ReedSolomonDecoder>,
        scratch: Vec<u8>,
    }

    impl core::fmt::Debug for ReedSolomon {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("ReedSolomon").finish_non_exhaustive()
        }
    }

    impl ReedSolomon {
        /// A codec with no working space yet (allocated on first use, then reused).
        pub fn new() -> Self {
            Self::default()
        }

        /// Whether the code supports `k` data blocks with `m` parity symbols.
        pub fn supports(k: usize, m: usize) -> bool {
            k > 0 && m > 0 && ReedSolomonEncoder::supports(k, m)
        }
    }

    /// `s`, or `s` copied into `scratch` with one zero byte appended when its length is odd.
    fn even<'a>(s: &'a [u8], scratch: &'a mut Vec<u8>) -> &'a [u8] {
        if s.len() % 2 == 0 {
            return s;
        }
        scratch.clear();
        scratch.extend_from_slice(s);
        scratch.push(0);
        scratch
    }

    impl Fec for ReedSolomon {
        fn encode(&mut self, data: &[&[u8]], parity: &mut [&mut [u8]]) -> Result<(), FecError> {
            let (k, m) = (data.len(), parity.len());
            let len = data.first().map_or(0, |d| d.len());
            if len == 0
                || !data.iter().all(|d| d.len() == len)
                || !parity.iter().all(|p| p.len() == len)
            {
                return Err(FecError::Shape);
            }
            if !Self::supports(k, m) {
                return Err(FecError::Unsupported);
            }
            let shard = len + len % 2;
            let enc = match &mut self.enc {
                Some(e) => {
                    e.reset(k, m, shard).map_err(|_| FecError::Unsupported)?;
                    e
                }
                None => self.enc.insert(
                    ReedSolomonEncoder::new(k, m, shard).map_err(|_| FecError::Unsupported)?,
                ),
            };
            for d in data {
                enc.add_original_shard(even(d, &mut self.scratch))
                    .map_err(|_| FecError::Codec)?;
            }
            let result = enc.encode().map_err(|_| FecError::Codec)?;
            for (i, p) in parity.iter_mut().enumerate() {
                let r = result.recovery(i).ok_or(FecError::Codec)?;
                p.copy_from_slice(&r[..len]);
            }
            Ok(())
        }

        fn decode(
            &mut self,
            data: &[Option<&[u8]>],
            m: usize,
            parity: &[(usize, &[u8])],
            out: &mut [&mut [u8]],
        ) -> Result<(), FecError> {
            let len = check_decode(data, m, parity, out)?;
            if out.is_empty() {
                return Ok(());
            }
            let k = data.len();
            if !Self::supports(k, m) {
                return Err(FecError::Unsupported);
            }
            let shard = len + len % 2;
            let dec = match &mut self.dec {
                Some(d) => {
                    d.reset(k, m, shard).map_err(|_| FecError::Unsupported)?;
                    d
                }
                None => self.dec.insert(
                    ReedSolomonDecoder::new(k, m, shard).map_err(|_| FecError::Unsupported)?,
                ),
            };
            for (i, d) in data.iter().enumerate() {
                if let Some(d) = d {
                    dec.add_original_shard(i, even(d, &mut self.scratch))
                        .map_err(|_| FecError::Codec)?;
                }
            }
            for &(i, p) in parity {
                dec.add_recovery_shard(i, even(p, &mut self.scratch))
                    .map_err(|_| FecError::Codec)?;
            }
            let result = dec.decode().map_err(|_| FecError::Codec)?;
            let missing = data
                .iter()
                .enumerate()
                .filter(|(_, d)| d.is_none())
                .map(|(i, _)| i);
            for (o, i) in out.iter_mut().zip(missing) {
                let r = result.restored_original(i).ok_or(FecError::Codec)?;
                o.copy_from_slice(&r[..len]);
            }
            Ok(())
        }
    }
}

#[cfg(all(test, feature = "fec"))]
mod tests {
    use alloc::vec;
    use alloc::vec::Vec;

    use proptest::prelude::*;

    use super::*;

    fn group(k: usize, len: usize, seed: u64) -> Vec<Vec<u8>> {
        let mut rng = super::super::Prng::new(seed);
        (0..k)
            .map(|_| (0..len).map(|_| rng.next_u64() as u8).collect())
            .collect()
    }

    fn encode(k: usize, m: usize, len: usize, seed: u64) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
        let data = group(k, len, seed);
        let mut parity = vec![vec![0u8; len]; m];
        let refs: Vec<&[u8]> = data.iter().map(|d| &d[..]).collect();
        let mut outs: Vec<&mut [u8]> = parity.iter_mut().map(|p| &mut p[..]).collect();
        ReedSolomon::new().encode(&refs, &mut outs).unwrap();
        (data, parity)
    }

    /// Drops the data blocks in `lost`, decodes with the parity symbols in `use_parity`.
    fn recover(
        rs: &mut ReedSolomon,
        data: &[Vec<u8>],
        parity: &[Vec<u8>],
        lost: &[usize],
        use_parity: &[usize],
    ) -> Result<Vec<Vec<u8>>, FecError> {
        let len = data[0].len();
        let view: Vec<Option<&[u8]>> = data
            .iter()
            .enumerate()
            .map(|(i, d)| (!lost.contains(&i)).then_some(&d[..]))
            .collect();
        let syms: Vec<(usize, &[u8])> = use_parity.iter().map(|&i| (i, &parity[i][..])).collect();
        let mut got = vec![vec![0u8; len]; view.iter().filter(|v| v.is_none()).count()];
        let mut outs: Vec<&mut [u8]> = got.iter_mut().map(|g| &mut g[..]).collect();
        rs.decode(&view, parity.len(), &syms, &mut outs)?;
        Ok(got)
    }

    #[test]
    fn any_k_of_k_plus_m_recovers_exhaustively_for_a_small_code() {
        // k = 4, m = 3: every subset of 4 of the 7 symbols.
        let (k, m) = (4, 3);
        let (data, parity) = encode(k, m, 10, 1);
        let mut rs = ReedSolomon::new();
        for mask in 0u32..(1 << (k + m)) {
            if mask.count_ones() as usize != k {
                continue;
            }
            let lost: Vec<usize> = (0..k).filter(|i| mask & (1 << i) == 0).collect();
            let used: Vec<usize> = (0..m).filter(|j| mask & (1 << (k + j)) != 0).collect();
            let got = recover(&mut rs, &data, &parity, &lost, &used).unwrap();
            let want: Vec<Vec<u8>> = lost.iter().map(|&i| data[i].clone()).collect();
            assert_eq!(got, want, "mask {mask:#b}");
        }
    }

    #[test]
    fn too_few_symbols_bad_indices_and_shapes_are_errors() {
        let (data, parity) = encode(5, 2, 8, 2);
        let mut rs = ReedSolomon::new();
        assert_eq!(
            recover(&mut rs, &data, &parity, &[0, 1], &[1]),
            Err(FecError::NotEnough)
        );
        let view = [None, Some(&data[1][..])];
        let mut out = [0u8; 8];
        assert_eq!(
            rs.decode(&view, 2, &[(2, &parity[0][..])], &mut [&mut out[..]]),
            Err(FecError::BadIndex),
            "index 2 of a 2-symbol code"
        );
        assert_eq!(
            recover(&mut rs, &data, &parity, &[0, 1], &[1, 1]),
            Err(FecError::BadIndex)
        );
        let short = [0u8; 7];
        let view = [Some(&data[0][..]), None];
        let mut out = [0u8; 8];
        assert_eq!(
            rs.decode(&view, 2, &[(0, &short[..])], &mut [&mut out[..]]),
            Err(FecError::Shape)
        );
        assert_eq!(rs.encode(&[], &mut []), Err(FecError::Shape));
        let d = [0u8; 4];
        assert_eq!(
            rs.encode(&[&d[..]], &mut []),
            Err(FecError::Unsupported),
            "m = 0"
        );
        // Nothing missing: nothing to do.
        assert_eq!(recover(&mut rs, &data, &parity, &[], &[]), Ok(vec![]));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]
        /// Any k of the k + m symbols rebuild the group, for odd and even block lengths and a
        /// last group shorter than the others.
        #[test]
        fn any_k_of_k_plus_m_recovers(k in 1usize..40, m in 1usize..24, len in 1usize..70,
                                      seed: u64, pick: u64) {
            let (data, parity) = encode(k, m, len, seed);
            let mut rng = super::super::Prng::new(pick);
            // Lose up to m data blocks, chosen at random; use that many random symbols.
            let lose = rng.up_to(m.min(k) as u64) as usize;
            let mut lost: Vec<usize> = Vec::new();
            while lost.len() < lose {
                let i = rng.up_to(k as u64 - 1) as usize;
                if !lost.contains(&i) { lost.push(i); }
            }
            lost.sort_unstable();
            let mut used: Vec<usize> = Vec::new();
            while used.len() < lose {
                let j = rng.up_to(m as u64 - 1) as usize;
                if !used.contains(&j) { used.push(j); }
            }
            let got = recover(&mut ReedSolomon::new(), &data, &parity, &lost, &used).unwrap();
            let want: Vec<Vec<u8>> = lost.iter().map(|&i| data[i].clone()).collect();
            prop_assert_eq!(got, want);
        }
    }
}
