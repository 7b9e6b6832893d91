//! Which compressed chunks are whole, as blocks of the compressed stream arrive in any order.
//!
//! The multicast carries the compressed stream in fixed-size blocks (parity works on them
//! as on any file), and a block's boundaries have nothing to do with a chunk's: one block may
//! hold the end of one chunk and the start of the next, and a chunk may span many blocks.
//! A chunk can be decoded once every block it overlaps has arrived; this core says when.
//!
//! Driving contract: [`handle_block`](ChunkAssembler::handle_block) for each block the
//! receiver stored (duplicates are harmless), then [`poll_whole`](ChunkAssembler::poll_whole)
//! until `None`; each chunk index comes out exactly once.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use super::map::{ChunkEntry, ChunkError};

/// Tracks which chunks of a compressed stream are whole.
#[derive(Debug, Clone)]
pub struct ChunkAssembler {
    block: u64,
    blocks: u64,
    /// One bit per block: received.
    received: Vec<u64>,
    /// Per chunk, its compressed range (for the search by offset).
    ranges: Vec<(u64, u64)>,
    /// Per chunk, the blocks it overlaps that have not arrived.
    missing: Vec<u32>,
    whole: VecDeque<u32>,
    pending: usize,
}

impl ChunkAssembler {
    /// An assembler for `chunks` (a validated map's, so end to end from 0) carried in blocks
    /// of `block_size` bytes of the compressed stream.
    pub fn new(chunks: &[ChunkEntry], block_size: u32) -> Result<Self, ChunkError> {
        if block_size == 0 {
            return Err(ChunkError::ZeroBlockSize);
        }
        let block = u64::from(block_size);
        let total = chunks.last().map_or(0, ChunkEntry::comp_end);
        let blocks = total.div_ceil(block);
        let ranges: Vec<(u64, u64)> = chunks
            .iter()
            .map(|c| (c.comp_offset, c.comp_end()))
            .collect();
        let missing = ranges
            .iter()
            .map(|&(s, e)| {
                // An empty chunk (never in a valid map) would otherwise count −1 blocks.
                if e <= s {
                    0
                } else {
                    ((e - 1) / block - s / block + 1) as u32
                }
            })
            .collect::<Vec<_>>();
        let mut whole = VecDeque::new();
        for (i, m) in missing.iter().enumerate() {
            if *m == 0 {
                whole.push_back(i as u32);
            }
        }
        let words = usize::try_from(blocks.div_ceil(64)).unwrap_or(usize::MAX);
        Ok(ChunkAssembler {
            block,
            blocks,
            received: vec![0; words],
            pending: ranges.len() - whole.len(),
            ranges,
            missing,
            whole,
        })
    }

    /// Blocks in the compressed stream.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Block `index` of the compressed stream has been stored.
    pub fn handle_block(&mut self, index: u64) -> Result<(), ChunkError> {
        if index >= self.blocks {
            return Err(ChunkError::BlockOutOfRange {
                index,
                blocks: self.blocks,
            });
        }
        let (word, bit) = ((index / 64) as usize, index % 64);
        if self.received[word] & (1 << bit) != 0 {
            return Ok(());
        }
        self.received[word] |= 1 << bit;
        let start = index * self.block;
        let end = start + self.block;
        let first = self.ranges.partition_point(|&(_, e)| e <= start);
        for i in first..self.ranges.len() {
            if self.ranges[i].0 >= end {
                break;
            }
            self.missing[i] -= 1;
            if self.missing[i] == 0 {
                self.whole.push_back(i as u32);
                self.pending -= 1;
            }
        }
        Ok(())
    }

    /// The next chunk that became whole (its index in the map's chunk list).
    pub fn poll_whole(&mut self) -> Option<u32> {
        self.whole.pop_front()
    }

    /// Whether every chunk has become whole (whether or not polled).
    pub fn is_complete(&self) -> bool {
        self.pending == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chunks of these compressed lengths, end to end (image fields are not used here).
    fn chunks(lens: &[u32]) -> Vec<ChunkEntry> {
        let mut at = 0;
        lens.iter()
            .map(|&l| {
                let c = ChunkEntry {
                    image_offset: 0,
                    image_len: 0,
                    comp_offset: at,
                    comp_len: l,
                    sha256: [0; 32],
                };
                at += u64::from(l);
                c
            })
            .collect()
    }

    fn drain(a: &mut ChunkAssembler) -> Vec<u32> {
        core::iter::from_fn(|| a.poll_whole()).collect()
    }

    #[test]
    fn a_chunk_is_whole_when_every_block_it_overlaps_arrived() {
        // Stream 0..250 in blocks of 100: chunk 0 = 0..50 (block 0), chunk 1 = 50..230
        // (blocks 0, 1, 2), chunk 2 = 230..250 (block 2).
        let mut a = ChunkAssembler::new(&chunks(&[50, 180, 20]), 100).unwrap();
        assert_eq!(a.blocks(), 3);
        a.handle_block(2).unwrap();
        assert_eq!(drain(&mut a), [2]);
        a.handle_block(2).unwrap(); // a duplicate counts once
        a.handle_block(0).unwrap();
        assert_eq!(drain(&mut a), [0]);
        assert!(!a.is_complete());
        a.handle_block(1).unwrap();
        assert_eq!(drain(&mut a), [1]);
        assert!(a.is_complete());
        assert_eq!(
            a.handle_block(3),
            Err(ChunkError::BlockOutOfRange {
                index: 3,
                blocks: 3
            })
        );
    }

    #[test]
    fn any_order_yields_every_chunk_once() {
        let c = chunks(&[1, 999, 1000, 1, 1, 4000, 17, 3]);
        let mut a = ChunkAssembler::new(&c, 64).unwrap();
        let n = a.blocks();
        // A fixed permutation of the blocks (stride coprime with n), each twice.
        let stride = (1..n).find(|s| gcd(*s, n) == 1 && *s > n / 3).unwrap_or(1);
        let mut got = Vec::new();
        for k in 0..2 * n {
            a.handle_block((k * stride) % n).unwrap();
            got.extend(drain(&mut a));
        }
        got.sort_unstable();
        assert_eq!(got, (0..c.len() as u32).collect::<Vec<_>>());
        assert!(a.is_complete());
    }

    fn gcd(a: u64, b: u64) -> u64 {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }

    #[test]
    fn no_chunks_is_complete_and_zero_block_size_is_refused() {
        let a = ChunkAssembler::new(&[], 1436).unwrap();
        assert!(a.is_complete());
        assert_eq!(a.blocks(), 0);
        assert_eq!(
            ChunkAssembler::new(&chunks(&[5]), 0).unwrap_err(),
            ChunkError::ZeroBlockSize
        );
    }
}
