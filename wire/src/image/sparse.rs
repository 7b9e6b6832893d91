//! The sparse map: which blocks of an image hold data. A pure scanner takes the image's bytes
//! in order (and, from a driver that asked the file system, the runs it knows are holes) and
//! gives the data extents; [`chunk_plan`] cuts those extents into the compressed form's
//! chunks.
//!
//! A block is *data* when any byte of it is not zero; the image's last block may be short
//! (an image whose size is not a multiple of the block size), and an extent that holds it
//! ends at the image's end, not at the block's.

use alloc::vec::Vec;

use super::map::{MapError, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};

/// A run of image bytes: `len` bytes from `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First byte, from the image's start.
    pub offset: u64,
    /// Bytes in the run (never 0 in a map).
    pub len: u64,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.len)
    }
}

/// The data bytes of a list of extents (what a sparse image costs on the wire uncompressed).
pub fn data_bytes(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.len).sum()
}

/// The chunks of the compressed form: every extent cut at the multiples of `span` (image
/// offsets), so chunk `k` of an extent never crosses `(k + 1) · span`. Cutting at fixed image
/// offsets rather than every `span` bytes from the extent's start makes a chunk's place a
/// function of the image alone (two prepares of one image cut it the same), and no chunk is
/// longer than `span`. `span` 0 is treated as 1 (the map's decoder refuses it before this is
/// reached).
pub fn chunk_plan(extents: &[Extent], span: u32) -> Vec<Extent> {
    let mut out = Vec::new();
    for_each_chunk(extents, span, |c| out.push(c));
    out
}

/// How many chunks [`chunk_plan`] would cut, counted without building them: a map's decoder
/// compares this with the chunks it read before it builds the plan, so an extent of 2⁶⁰
/// bytes in a tiny map costs arithmetic, not memory.
pub fn chunk_count(extents: &[Extent], span: u32) -> u64 {
    let span = u64::from(span.max(1));
    extents
        .iter()
        .filter(|e| e.len > 0)
        .map(|e| (e.end() - 1) / span - e.offset / span + 1)
        .fold(0u64, u64::saturating_add)
}

fn for_each_chunk(extents: &[Extent], span: u32, mut f: impl FnMut(Extent)) {
    let span = u64::from(span.max(1));
    for e in extents {
        let mut at = e.offset;
        while at < e.end() {
            let boundary = (at / span + 1).saturating_mul(span);
            let end = boundary.min(e.end());
            f(Extent {
                offset: at,
                len: end - at,
            });
            at = end;
        }
    }
}

/// Builds the sparse map of an image from its bytes, fed in order.
///
/// Driving contract: call [`feed`](Self::feed) with the image's bytes and
/// [`skip_zeros`](Self::skip_zeros) for runs the driver knows to be zero without reading
/// them (`SEEK_HOLE`), in image order, any lengths, then [`finish`](Self::finish). The image's
/// size is the total fed and skipped. Feeding a hole's zeros instead of skipping them gives
/// the same map; skipping is only faster.
#[derive(Debug, Clone)]
pub struct SparseScanner {
    block: u64,
    pos: u64,
    /// Whether the block `pos` is in has held a non-zero byte so far.
    cur_data: bool,
    extents: Vec<Extent>,
}

impl SparseScanner {
    /// A scanner at `block_size` (a power of two from [`MIN_BLOCK_SIZE`] to
    /// [`MAX_BLOCK_SIZE`]: the map's own rule, so every map a scanner makes encodes).
    pub fn new(block_size: u32) -> Result<Self, MapError> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(MapError::BlockSize(block_size));
        }
        Ok(SparseScanner {
            block: u64::from(block_size),
            pos: 0,
            cur_data: false,
            extents: Vec::new(),
        })
    }

    /// Image bytes taken so far (fed and skipped).
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The next bytes of the image.
    pub fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let room = self.room();
            let n = usize::try_from(room).map_or(bytes.len(), |r| r.min(bytes.len()));
            let (piece, rest) = bytes.split_at(n);
            // An OR over the whole piece rather than `any(|b| b != 0)`: the fold has no early
            // exit, so it vectorises, and pieces are at most one block.
            let data = piece.iter().fold(0u8, |a, &b| a | b) != 0;
            self.advance(n as u64, data);
            bytes = rest;
        }
    }

    /// The next `len` bytes of the image are zeros (a hole the file system reported).
    pub fn skip_zeros(&mut self, mut len: u64) {
        // Finish the block in progress, then jump whole blocks (zero blocks record nothing),
        // then start the last partial one.
        let first = self.room().min(len);
        self.advance(first, false);
        len -= first;
        let whole = len - len % self.block;
        self.pos = self.pos.saturating_add(whole);
        self.advance(len - whole, false);
    }

    /// The data extents, in order; the image's size is [`position`](Self::position).
    pub fn finish(mut self) -> Vec<Extent> {
        let start = self.pos - self.pos % self.block;
        if self.cur_data && start < self.pos {
            self.commit(start, self.pos);
        }
        self.extents
    }

    /// Bytes left in the block `pos` is in.
    fn room(&self) -> u64 {
        self.block - self.pos % self.block
    }

    /// Takes `n` bytes within the current block (`n` ≤ [`room`](Self::room)).
    fn advance(&mut self, n: u64, data: bool) {
        if n == 0 {
            return;
        }
        self.cur_data |= data;
        self.pos = self.pos.saturating_add(n);
        if self.pos % self.block == 0 {
            if self.cur_data {
                self.commit(self.pos - self.block, self.pos);
            }
            self.cur_data = false;
        }
    }

    fn commit(&mut self, start: u64, end: u64) {
        match self.extents.last_mut() {
            Some(last) if last.end() == start => last.len += end - start,
            _ => self.extents.push(Extent {
                offset: start,
                len: end - start,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn ext(offset: u64, len: u64) -> Extent {
        Extent { offset, len }
    }

    fn scan(image: &[u8], block: u32, piece: usize) -> Vec<Extent> {
        let mut s = SparseScanner::new(block).unwrap();
        for p in image.chunks(piece) {
            s.feed(p);
        }
        assert_eq!(s.position(), image.len() as u64);
        s.finish()
    }

    #[test]
    fn zero_image_has_no_extents() {
        assert_eq!(scan(&[0; 10_000], 512, 777), vec![]);
        assert_eq!(scan(&[], 512, 1), vec![]);
    }

    #[test]
    fn data_blocks_become_aligned_merged_extents_whatever_the_pieces() {
        let mut img = vec![0u8; 8192 + 100];
        img[0] = 1; // block 0
        img[1023] = 1; // block 1 (touches 0: one extent)
        img[4096 + 7] = 9; // block 8
        img[8192 + 99] = 5; // the short last block
        let want = vec![ext(0, 1024), ext(4096, 512), ext(8192, 100)];
        for piece in [1, 3, 511, 512, 513, 4096, 100_000] {
            assert_eq!(scan(&img, 512, piece), want, "piece {piece}");
        }
    }

    #[test]
    fn skipped_holes_give_the_same_map_as_fed_zeros() {
        let mut img = vec![0u8; 20_000];
        img[100] = 1;
        img[12_000..12_010].fill(3);
        let fed = scan(&img, 1024, 4096);
        let mut s = SparseScanner::new(1024).unwrap();
        s.feed(&img[..200]);
        s.skip_zeros(11_000 - 200); // ends inside a block
        s.feed(&img[11_000..12_500]);
        s.skip_zeros(20_000 - 12_500);
        assert_eq!(s.position(), 20_000);
        assert_eq!(s.finish(), fed);
        assert_eq!(fed, vec![ext(0, 1024), ext(11_264, 1024)]);
    }

    #[test]
    fn a_bad_block_size_is_refused() {
        for b in [0, 100, 256, 3000, 4 << 20] {
            assert_eq!(
                SparseScanner::new(b).unwrap_err(),
                MapError::BlockSize(b),
                "{b}"
            );
        }
    }

    #[test]
    fn chunks_cut_extents_at_span_multiples() {
        let extents = [ext(0, 100), ext(1000, 2500), ext(5000, 10)];
        assert_eq!(
            chunk_plan(&extents, 1024),
            vec![
                ext(0, 100),
                ext(1000, 24),
                ext(1024, 1024),
                ext(2048, 1024),
                ext(3072, 428),
                ext(5000, 10),
            ]
        );
        assert_eq!(
            data_bytes(&chunk_plan(&extents, 1024)),
            data_bytes(&extents)
        );
    }
}
