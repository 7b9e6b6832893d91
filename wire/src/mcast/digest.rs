//! Data authentication by digest: the rules, sans-IO (issue 17).
//!
//! The gateway computes a [`DIGEST_LEN`]-byte digest of every block ([`block_digest`]: the
//! first 16 bytes of SHA-256 over a domain byte, the block index and the payload), groups the
//! digests of `per_manifest` consecutive blocks into a *manifest* ([`ManifestGeometry`]) and
//! builds a Merkle tree over the manifests ([`MerkleTree`]). Only the tree's root travels over
//! an authenticated channel (the `Announce`, inside the device's TLS session or a standalone
//! transfer's PSK-tagged announce). A `Manifest` datagram ([`crate::Manifest`]) carries one
//! manifest and its Merkle path; a receiver trusts its digests only once the path leads to the
//! root ([`verify_path`]), and writes a block only once its digest matches ([`DigestBook`]).
//! So `Data`, `Repair` and `Parity` need no tag, and a receiver that knows everything about
//! the task (root included) still cannot forge a block for the others: that would take a
//! second preimage of SHA-256 truncated to 128 bits.
//!
//! # Invariants
//! - Hashing is the driver's ([`Sha256`]): no cryptography library in this crate.
//! - Domain separation: a leaf hashes `0x00 ‖ index u32 ‖ digests`, a node `0x01 ‖ left ‖
//!   right`, a block `0x02 ‖ block u32 ‖ payload`, so no value of one kind verifies as another.
//! - The tree is unbalanced in the RFC 6962 way without its split rule: each level pairs nodes
//!   left to right and a last, unpaired node is carried up unchanged. A path therefore holds
//!   exactly one sibling per level where the node has one ([`path_len`]), a function of the
//!   manifest count and index alone; a path of any other length is refused.
//! - [`DigestBook`] holds the digests of manifests whose blocks are not all written yet, and
//!   at most [`DigestBook::limit`] bytes of blocks waiting for their manifest; nothing
//!   unverified ever leaves it as verified.
//! - No input panics: indexes, counts and lengths are checked before use.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::ops::Range;
use core::time::Duration;

use super::Dest;
use crate::time::Instant;

/// Bytes of one block digest.
pub const DIGEST_LEN: usize = 16;
/// Bytes of one Merkle node (a full SHA-256).
pub const NODE_LEN: usize = 32;
/// Most block digests one manifest carries. It bounds how many blocks a receiver may have to
/// hold while their manifest is missing (at MTU 9000, 128 blocks of 8,936 bytes: 1.1 MiB); at
/// MTU 1500 the datagram is the tighter bound (70 digests for 64 MiB, 58 for 4 GiB).
pub const MAX_PER_MANIFEST: u32 = 128;
/// Most Merkle path entries a manifest may carry: 2³² blocks in manifests of one need 32.
pub const MAX_PATH: usize = 32;
/// The fixed part of a manifest body: session, index, digest count, path count.
pub const MANIFEST_FIXED: usize = 4 + 4 + 2 + 1;
/// Room a manifest body may always take, even when blocks are smaller than this (a manifest
/// is never larger than a data datagram of the same task otherwise).
const MIN_MANIFEST_ROOM: usize = 1024;
/// Default bound of [`DigestBook`]'s buffer of blocks waiting for their manifest: about two
/// manifests of jumbo blocks, 20 of Ethernet-MTU blocks.
pub const DEFAULT_PENDING_BYTES: usize = 2 << 20;
/// The least distance past the highest manifest verified so far at which a block may be held
/// while its manifest is missing (the window is as many manifests as the buffer holds
/// whole, when that is more). In a first pass manifests go out ahead of their blocks, so a
/// block whose manifest is missing is nearly always just past the highest verified (its
/// copies were lost): holding only those keeps a forger's junk for the rest of the file out
/// of the buffer.
pub const PENDING_WINDOW: u32 = 2;
/// How often a manifest is sent again to one destination alongside repairs of its blocks.
pub const DEFAULT_MANIFEST_REPEAT: Duration = Duration::from_millis(200);

/// SHA-256 as the driver provides it (fleetcast's drivers use `ring`).
pub trait Sha256 {
    /// SHA-256 of the concatenation of `parts`.
    fn sha256(&mut self, parts: &[&[u8]]) -> [u8; 32];
}

/// The digest of block `block` whose bytes are `payload`.
pub fn block_digest(h: &mut dyn Sha256, block: u32, payload: &[u8]) -> [u8; DIGEST_LEN] {
    let full = h.sha256(&[&[2], &block.to_be_bytes(), payload]);
    let mut out = [0u8; DIGEST_LEN];
    out.copy_from_slice(&full[..DIGEST_LEN]);
    out
}

/// The leaf of manifest `index` listing `digests` (their bytes back to back).
pub fn leaf_hash(h: &mut dyn Sha256, index: u32, digests: &[u8]) -> [u8; NODE_LEN] {
    h.sha256(&[&[0], &index.to_be_bytes(), digests])
}

fn node_hash(h: &mut dyn Sha256, left: &[u8; NODE_LEN], right: &[u8; NODE_LEN]) -> [u8; NODE_LEN] {
    h.sha256(&[&[1], left, right])
}

/// Why a digest geometry or a manifest was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum DigestError {
    /// No digest count fits a manifest in the room the block size gives (blocks too small
    /// for a file this large), or the count is 0 or above [`MAX_PER_MANIFEST`].
    Geometry,
    /// The manifest's index is past the file's last manifest.
    Index,
    /// Not as many digests as the manifest's blocks.
    Count,
    /// The path is not as long as the tree says.
    PathLength,
    /// The path does not lead to the root: a forged or corrupted manifest.
    Root,
}

impl core::fmt::Display for DigestError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            DigestError::Geometry => "no manifest size fits the block size",
            DigestError::Index => "manifest index past the file",
            DigestError::Count => "manifest digest count does not match its blocks",
            DigestError::PathLength => "Merkle path of the wrong length",
            DigestError::Root => "Merkle path does not lead to the root",
        })
    }
}

#[cfg(feature = "std")]
impl std::error::Error for DigestError {}

/// How a file's blocks are grouped into manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestGeometry {
    n_blocks: u32,
    per_manifest: u32,
}

impl ManifestGeometry {
    /// The geometry of `n_blocks` blocks in manifests of `per_manifest` digests.
    pub fn new(n_blocks: u32, per_manifest: u32) -> Result<Self, DigestError> {
        if per_manifest == 0 || per_manifest > MAX_PER_MANIFEST {
            return Err(DigestError::Geometry);
        }
        Ok(ManifestGeometry {
            n_blocks,
            per_manifest,
        })
    }

    /// The largest manifest (at most [`MAX_PER_MANIFEST`] digests) whose datagram, path
    /// included, is no larger than a data datagram of `block_size` bytes (or 1 KiB of body
    /// for smaller blocks): a manifest fits wherever the task's blocks do.
    pub fn choose(n_blocks: u32, block_size: u32) -> Result<Self, DigestError> {
        // The data body is 8 header bytes and the block: the manifest body gets as much.
        let room = (block_size as usize + 8).max(MIN_MANIFEST_ROOM);
        let mut per = MAX_PER_MANIFEST;
        // Fewer digests per manifest means more manifests and a longer path: shrink until
        // stable (each step only shrinks `per`, so this ends).
        loop {
            let g = ManifestGeometry::new(n_blocks, per)?;
            let fixed = MANIFEST_FIXED + NODE_LEN * g.max_path();
            let fit = room.saturating_sub(fixed) / DIGEST_LEN;
            if fit >= per as usize {
                return Ok(g);
            }
            if fit == 0 {
                return Err(DigestError::Geometry);
            }
            per = fit as u32;
        }
    }

    /// Blocks in the file.
    pub fn n_blocks(&self) -> u32 {
        self.n_blocks
    }

    /// Digests per manifest (the last manifest may hold fewer).
    pub fn per_manifest(&self) -> u32 {
        self.per_manifest
    }

    /// Manifests in the file (one for an empty file's no block, so the tree has a leaf).
    pub fn n_manifests(&self) -> u32 {
        self.n_blocks.div_ceil(self.per_manifest).max(1)
    }

    /// The manifest listing `block`.
    pub fn manifest_of(&self, block: u32) -> u32 {
        block / self.per_manifest
    }

    /// The blocks manifest `m` lists.
    pub fn blocks_of(&self, m: u32) -> Range<u32> {
        let start = (u64::from(m) * u64::from(self.per_manifest)).min(u64::from(self.n_blocks));
        let end = (start + u64::from(self.per_manifest)).min(u64::from(self.n_blocks));
        start as u32..end as u32
    }

    /// The longest path of the tree (the depth of its deepest leaf).
    pub fn max_path(&self) -> usize {
        let mut n = self.n_manifests();
        let mut d = 0;
        while n > 1 {
            n = n.div_ceil(2);
            d += 1;
        }
        d
    }
}

/// Siblings on the path of leaf `index` of a tree of `n` leaves.
pub fn path_len(n: u32, index: u32) -> usize {
    let (mut n, mut i, mut len) = (n, index, 0);
    while n > 1 {
        if i ^ 1 < n {
            len += 1;
        }
        i /= 2;
        n = n.div_ceil(2);
    }
    len
}

/// Whether `path` (siblings from the leaf up, [`NODE_LEN`] bytes each) leads from `leaf`,
/// leaf `index` of `n`, to `root`.
pub fn verify_path(
    h: &mut dyn Sha256,
    root: &[u8; NODE_LEN],
    n: u32,
    index: u32,
    leaf: [u8; NODE_LEN],
    path: &[u8],
) -> Result<(), DigestError> {
    if index >= n {
        return Err(DigestError::Index);
    }
    if path.len() != NODE_LEN * path_len(n, index) {
        return Err(DigestError::PathLength);
    }
    let (mut n, mut i, mut node) = (n, index, leaf);
    let mut sibs = path.chunks_exact(NODE_LEN);
    while n > 1 {
        if i ^ 1 < n {
            let mut s = [0u8; NODE_LEN];
            s.copy_from_slice(sibs.next().ok_or(DigestError::PathLength)?);
            node = if i % 2 == 0 {
                node_hash(h, &node, &s)
            } else {
                node_hash(h, &s, &node)
            };
        }
        i /= 2;
        n = n.div_ceil(2);
    }
    // Not secret: the root is known to every receiver; a plain comparison is enough.
    if node == *root {
        Ok(())
    } else {
        Err(DigestError::Root)
    }
}

/// The Merkle tree over a file's manifests (the gateway's): every level, leaves first. It
/// holds about 64 bytes per manifest (two nodes), well under a byte per block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MerkleTree {
    levels: Vec<Vec<[u8; NODE_LEN]>>,
}

impl MerkleTree {
    /// The tree over `digests` (one per block, in block order) grouped as `geom` says.
    pub fn build(
        h: &mut dyn Sha256,
        geom: &ManifestGeometry,
        digests: &[[u8; DIGEST_LEN]],
    ) -> Self {
        let leaves: Vec<[u8; NODE_LEN]> = (0..geom.n_manifests())
            .map(|m| {
                let r = geom.blocks_of(m);
                let ds = digests.get(r.start as usize..r.end as usize).unwrap_or(&[]);
                leaf_hash(h, m, ds.as_flattened())
            })
            .collect();
        let mut levels = vec![leaves];
        while levels.last().is_some_and(|l| l.len() > 1) {
            let below = levels.last().expect("checked above");
            let up: Vec<[u8; NODE_LEN]> = below
                .chunks(2)
                .map(|p| match p {
                    [l, r] => node_hash(h, l, r),
                    [only] => *only,
                    _ => unreachable!("chunks of 2"),
                })
                .collect();
            levels.push(up);
        }
        MerkleTree { levels }
    }

    /// The root.
    pub fn root(&self) -> [u8; NODE_LEN] {
        self.levels
            .last()
            .and_then(|l| l.first())
            .copied()
            .unwrap_or([0; NODE_LEN])
    }

    /// Appends the path of leaf `index` to `out` (siblings from the leaf up).
    pub fn path_into(&self, index: u32, out: &mut Vec<u8>) {
        let mut i = index as usize;
        for level in &self.levels[..self.levels.len().saturating_sub(1)] {
            if let Some(s) = level.get(i ^ 1) {
                out.extend_from_slice(s);
            }
            i /= 2;
        }
    }
}

/// When the sender sends a manifest (the gateway's driver asks before every block and
/// parity symbol it sends; the schedule says which manifests go first, to the same
/// destination):
/// - to the group in the first pass, twice before its blocks: a first copy one manifest-span
///   ahead (just before the first block of the previous manifest), a second just before its
///   own first block (manifest 0, which has no span ahead of it, gets its second copy after
///   half its blocks). A receiver whose socket overflows loses a run of datagrams; with the
///   two copies a span apart one run rarely takes both before the blocks arrive (measured:
///   copies half a span apart, the second after the blocks had started, left receivers
///   holding or dropping whole manifests' blocks at 1% loss);
/// - with the first repair or parity symbol over it after the first pass, always: a
///   receiver that lost both copies holds its blocks, or had to drop them, and NACKs them as
///   missing; the rate limit would otherwise keep the manifest from the very repair that
///   asks for it;
/// - after that, and to each unicast destination, with a block of it at most once per
///   [`ManifestSchedule::repeat`].
///
/// Every decision is made once per datagram: the driver keeps what the kernel refused with
/// its manifests (it does not ask again), and a block behind the first pass's frontier is a
/// repair.
#[derive(Debug, Clone)]
pub struct ManifestSchedule {
    geom: ManifestGeometry,
    repeat: Duration,
    /// One past the highest block sent to the group so far: blocks below it are repairs.
    frontier: u32,
    /// Per manifest, to the group.
    group: Vec<GroupCopies>,
    /// Per unicast device, when each manifest last went to it.
    unicast: alloc::collections::BTreeMap<u64, Vec<Option<Instant>>>,
}

/// What the group got of one manifest.
#[derive(Debug, Clone, Copy, Default)]
struct GroupCopies {
    /// First-pass copies sent (0 to 2).
    copies: u8,
    /// Whether the first copy went a span ahead of the blocks (then the second goes with the
    /// first block; else after half of them).
    ahead: bool,
    /// Whether a copy went with a repair or parity already.
    repaired: bool,
    /// When it last went to the group.
    last: Option<Instant>,
}

impl ManifestSchedule {
    /// A schedule for `geom`, repeating a manifest at most every `repeat` per destination.
    pub fn new(geom: ManifestGeometry, repeat: Duration) -> Self {
        ManifestSchedule {
            geom,
            repeat,
            frontier: 0,
            group: vec![GroupCopies::default(); geom.n_manifests() as usize],
            unicast: alloc::collections::BTreeMap::new(),
        }
    }

    /// The minimum time between two copies of a manifest to one destination after the
    /// first pass's two.
    pub fn repeat(&self) -> Duration {
        self.repeat
    }

    /// The manifests to send to `dest` just before `block`, in order (appended to `out`).
    pub fn for_block(&mut self, now: Instant, dest: Dest, block: u32, out: &mut Vec<u32>) {
        if block >= self.geom.n_blocks() {
            return;
        }
        let m = self.geom.manifest_of(block);
        match dest {
            Dest::Group if block >= self.frontier => {
                self.frontier = block + 1;
                let start = self.geom.blocks_of(m).start;
                let half = self.geom.blocks_of(m).len().div_ceil(2) as u32;
                let c = &mut self.group[m as usize];
                let due = match c.copies {
                    0 => true,
                    1 if c.ahead => true,
                    1 => block - start >= half,
                    _ => false,
                };
                if due {
                    c.copies += 1;
                    c.last = Some(now);
                    out.push(m);
                }
                // The next manifest's first copy, a span ahead of its blocks.
                if let Some(next) = self.group.get_mut(m as usize + 1) {
                    if next.copies == 0 {
                        *next = GroupCopies {
                            copies: 1,
                            ahead: true,
                            repaired: false,
                            last: Some(now),
                        };
                        out.push(m + 1);
                    }
                }
            }
            Dest::Group => {
                if self.repair_due(now, m) {
                    out.push(m);
                }
            }
            Dest::Unicast(dev) => {
                if self.unicast_due(now, dev, m) {
                    out.push(m);
                }
            }
        }
    }

    /// The manifests of blocks `span` to send to the group with a parity symbol over them
    /// (a repair of each, for the schedule). Appends to `out`.
    pub fn for_span(&mut self, now: Instant, span: Range<u32>, out: &mut Vec<u32>) {
        if span.is_empty() || span.start >= self.geom.n_blocks() {
            return;
        }
        let last_block = span.end.min(self.geom.n_blocks()) - 1;
        for m in self.geom.manifest_of(span.start)..=self.geom.manifest_of(last_block) {
            if self.repair_due(now, m) {
                out.push(m);
            }
        }
    }

    /// Whether manifest `m` goes with a repair to the group now: the first time always,
    /// then at most once per `repeat`.
    fn repair_due(&mut self, now: Instant, m: u32) -> bool {
        let repeat = self.repeat;
        let Some(c) = self.group.get_mut(m as usize) else {
            return false;
        };
        let due = !c.repaired || c.last.is_none_or(|t| now >= t + repeat);
        if due {
            c.repaired = true;
            c.copies = c.copies.max(2);
            c.last = Some(now);
        }
        due
    }

    fn unicast_due(&mut self, now: Instant, dev: u64, m: u32) -> bool {
        let n = self.geom.n_manifests() as usize;
        let sent = self.unicast.entry(dev).or_insert_with(|| vec![None; n]);
        let Some(last) = sent.get_mut(m as usize) else {
            return false;
        };
        let due = last.is_none_or(|t| now >= t + self.repeat);
        if due {
            *last = Some(now);
        }
        due
    }
}

/// What [`DigestBook::check`] says of a block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// Its digest matches: write it.
    Verified,
    /// Its digest does not match: drop it (forged or corrupted).
    Mismatch,
    /// Its manifest has not been verified yet: hold it ([`DigestBook::hold`]) or drop it.
    Unknown,
}

/// What [`DigestBook::handle_manifest`] made of a manifest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestVerdict {
    /// Verified and new: its held blocks are ready ([`DigestBook::take_held`]).
    New,
    /// Known already (or its blocks are all written): nothing to do, nothing hashed.
    Known,
}

/// Counters of a [`DigestBook`], for logs and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BookStats {
    /// Manifests verified against the root.
    pub manifests: u64,
    /// Blocks held while their manifest was missing.
    pub held: u64,
    /// Blocks not held: buffer full, or their manifest too far ahead.
    pub not_held: u64,
}

/// The receiver's digests and its bounded buffer of blocks waiting for their manifest.
///
/// Memory: [`DIGEST_LEN`] bytes per block of each manifest verified and not yet finished
/// (released by [`DigestBook::written`] once all its blocks are written), one byte and a
/// counter per manifest, and at most [`DigestBook::limit`] bytes of held blocks (plus a small
/// entry each).
#[derive(Debug)]
pub struct DigestBook {
    geom: ManifestGeometry,
    root: [u8; NODE_LEN],
    /// Per manifest: its digests while some of its blocks are still to be written.
    digests: Vec<Option<Box<[[u8; DIGEST_LEN]]>>>,
    /// Per manifest: 0 not verified, 1 verified (digests held), 2 finished (every block
    /// written: digests released).
    state: Vec<u8>,
    /// Per verified manifest: its blocks not written yet.
    remaining: Vec<u32>,
    /// Highest manifest verified so far.
    highest: Option<u32>,
    /// Blocks waiting for their manifest: (block, payload).
    held: Vec<(u32, Vec<u8>)>,
    held_bytes: usize,
    limit: usize,
    stats: BookStats,
}

impl DigestBook {
    /// A book for a file of `geom` under `root`, holding at most `limit` bytes of blocks
    /// whose manifest is missing.
    pub fn new(geom: ManifestGeometry, root: [u8; NODE_LEN], limit: usize) -> Self {
        let n = geom.n_manifests() as usize;
        DigestBook {
            geom,
            root,
            digests: (0..n).map(|_| None).collect(),
            state: vec![0; n],
            remaining: vec![0; n],
            highest: None,
            held: Vec::new(),
            held_bytes: 0,
            limit,
            stats: BookStats::default(),
        }
    }

    /// The geometry.
    pub fn geometry(&self) -> &ManifestGeometry {
        &self.geom
    }

    /// The bound of the buffer of held blocks, in payload bytes.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Counters.
    pub fn stats(&self) -> &BookStats {
        &self.stats
    }

    /// A manifest datagram's contents: checked against the root unless it is known already.
    /// `have(b)` says whether block `b` is written already (a resumed transfer's blocks).
    pub fn handle_manifest(
        &mut self,
        h: &mut dyn Sha256,
        index: u32,
        digests: &[u8],
        path: &[u8],
        have: impl Fn(u32) -> bool,
    ) -> Result<ManifestVerdict, DigestError> {
        let m = index as usize;
        match self.state.get(m) {
            None => return Err(DigestError::Index),
            Some(0) => {}
            Some(_) => return Ok(ManifestVerdict::Known),
        }
        let blocks = self.geom.blocks_of(index);
        if digests.len() != blocks.len() * DIGEST_LEN {
            return Err(DigestError::Count);
        }
        let leaf = leaf_hash(h, index, digests);
        verify_path(h, &self.root, self.geom.n_manifests(), index, leaf, path)?;
        self.stats.manifests += 1;
        self.highest = Some(self.highest.map_or(index, |x| x.max(index)));
        let remaining = blocks.filter(|&b| !have(b)).count() as u32;
        if remaining == 0 {
            self.state[m] = 2;
            return Ok(ManifestVerdict::Known);
        }
        let list: Box<[[u8; DIGEST_LEN]]> = digests
            .chunks_exact(DIGEST_LEN)
            .map(|c| {
                let mut d = [0u8; DIGEST_LEN];
                d.copy_from_slice(c);
                d
            })
            .collect();
        self.digests[m] = Some(list);
        self.state[m] = 1;
        self.remaining[m] = remaining;
        Ok(ManifestVerdict::New)
    }

    /// Whether `payload` is block `block`.
    pub fn check(&self, h: &mut dyn Sha256, block: u32, payload: &[u8]) -> Check {
        if block >= self.geom.n_blocks() {
            return Check::Mismatch;
        }
        let m = self.geom.manifest_of(block);
        let Some(Some(list)) = self.digests.get(m as usize) else {
            return Check::Unknown;
        };
        let i = (block - self.geom.blocks_of(m).start) as usize;
        match list.get(i) {
            Some(d) if *d == block_digest(h, block, payload) => Check::Verified,
            _ => Check::Mismatch,
        }
    }

    /// Keeps a copy of block `block` (whose manifest is missing) until its manifest
    /// arrives, if the buffer has room and the manifest is within the window (see
    /// [`PENDING_WINDOW`]) past the highest verified one. Returns whether it is kept (an
    /// identical copy held already counts); a block not kept is simply not received (the
    /// receiver core NACKs it in due time).
    pub fn hold(&mut self, block: u32, payload: &[u8]) -> bool {
        let m = self.geom.manifest_of(block);
        // As many manifests past the highest verified as the buffer could hold whole, at
        // least [`PENDING_WINDOW`]: a receiver whose socket overflowed loses a run of
        // manifests with their blocks, and the blocks after the run must still be held
        // until their manifest's second copy (measured: a window of 2 dropped up to 128
        // blocks per receiver in a 64 MiB push at 1% loss).
        let whole = (self.geom.per_manifest() as usize).saturating_mul(payload.len().max(1));
        let window = PENDING_WINDOW.max((self.limit / whole.max(1)) as u32);
        let near = self
            .highest
            .map_or(m < window, |x| m <= x.saturating_add(window));
        // The same copy again (a repair of a held block) takes no more room; a different
        // one is another candidate (either may be forged: both wait for the manifest).
        if self
            .held
            .iter()
            .any(|(b, p)| *b == block && p[..] == *payload)
        {
            return true;
        }
        if block >= self.geom.n_blocks()
            || !near
            || self.state.get(m as usize) != Some(&0)
            || self.held_bytes + payload.len() > self.limit
        {
            self.stats.not_held += 1;
            return false;
        }
        self.held_bytes += payload.len();
        self.held.push((block, payload.to_vec()));
        self.stats.held += 1;
        true
    }

    /// Takes the held blocks of manifest `m` out of the buffer (to [`DigestBook::check`]
    /// each: a held block is only a candidate).
    pub fn take_held(&mut self, m: u32) -> Vec<(u32, Vec<u8>)> {
        let r = self.geom.blocks_of(m);
        let (mine, rest): (Vec<_>, Vec<_>) = core::mem::take(&mut self.held)
            .into_iter()
            .partition(|(b, _)| r.contains(b));
        self.held = rest;
        self.held_bytes = self.held.iter().map(|(_, p)| p.len()).sum();
        mine
    }

    /// Bytes of blocks held now.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// Block `block` (verified) is written: once its manifest's blocks all are, the
    /// manifest's digests are released.
    pub fn written(&mut self, block: u32) {
        let m = self.geom.manifest_of(block) as usize;
        if self.state.get(m) != Some(&1) {
            return;
        }
        self.remaining[m] = self.remaining[m].saturating_sub(1);
        if self.remaining[m] == 0 {
            self.state[m] = 2;
            self.digests[m] = None;
        }
    }

    /// A verified block was un-written (a rebuilt group the driver discarded): its
    /// manifest's digests must stay. Only a manifest still held can take the block back;
    /// a released one is verified again from its next copy.
    pub fn unwritten(&mut self, block: u32) {
        let m = self.geom.manifest_of(block) as usize;
        if let Some(1) = self.state.get(m) {
            self.remaining[m] += 1;
        } else if let Some(2) = self.state.get(m) {
            // Its digests were released: forget the manifest, so its next copy is taken.
            self.state[m] = 0;
            self.remaining[m] = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic stand-in for SHA-256 (tests need only that different inputs give
    /// different outputs): FNV-1a stretched to 32 bytes.
    struct Toy;
    impl Sha256 for Toy {
        fn sha256(&mut self, parts: &[&[u8]]) -> [u8; 32] {
            let mut out = [0u8; 32];
            for (lane, chunk) in out.chunks_mut(8).enumerate() {
                let mut x: u64 = 0xcbf2_9ce4_8422_2325 ^ lane as u64;
                for p in parts {
                    for &b in *p {
                        x = (x ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
                    }
                    x = (x ^ 0xff).wrapping_mul(0x0100_0000_01b3);
                }
                chunk.copy_from_slice(&x.to_be_bytes());
            }
            out
        }
    }

    fn digests(n: u32) -> Vec<[u8; DIGEST_LEN]> {
        (0..n)
            .map(|b| block_digest(&mut Toy, b, &b.to_le_bytes()))
            .collect()
    }

    #[test]
    fn every_path_of_every_shape_verifies_and_nothing_else_does() {
        for n_blocks in [1u32, 2, 3, 5, 8, 13, 64, 65, 100] {
            let geom = ManifestGeometry::new(n_blocks, 4).unwrap();
            let ds = digests(n_blocks);
            let tree = MerkleTree::build(&mut Toy, &geom, &ds);
            let n = geom.n_manifests();
            for m in 0..n {
                let r = geom.blocks_of(m);
                let list = ds[r.start as usize..r.end as usize].as_flattened();
                let mut path = Vec::new();
                tree.path_into(m, &mut path);
                assert_eq!(path.len(), NODE_LEN * path_len(n, m));
                assert!(path_len(n, m) <= geom.max_path());
                let leaf = leaf_hash(&mut Toy, m, list);
                assert_eq!(
                    verify_path(&mut Toy, &tree.root(), n, m, leaf, &path),
                    Ok(())
                );
                // Another index, a changed digest, a short path: refused.
                let mut bad = list.to_vec();
                bad[0] ^= 1;
                let forged = leaf_hash(&mut Toy, m, &bad);
                assert_eq!(
                    verify_path(&mut Toy, &tree.root(), n, m, forged, &path),
                    Err(DigestError::Root)
                );
                if !path.is_empty() {
                    assert_eq!(
                        verify_path(&mut Toy, &tree.root(), n, m, leaf, &path[NODE_LEN..]),
                        Err(DigestError::PathLength)
                    );
                }
                assert_eq!(
                    verify_path(&mut Toy, &tree.root(), n, n, leaf, &path),
                    Err(DigestError::Index)
                );
            }
        }
    }

    #[test]
    fn the_chosen_manifest_fits_a_data_datagram() {
        // Blocks of 1,436 bytes (MTU 1500 before version 5): 64 digests up to a few GiB,
        // fewer for larger files.
        for (blocks, bs) in [
            (1u32, 1436u32),
            (4_700, 1436),
            (3_000_000, 1436),
            (u32::MAX, 1436),
            (500_000, 8936),
            (10, 100),
        ] {
            let g = ManifestGeometry::choose(blocks, bs).unwrap();
            let body =
                MANIFEST_FIXED + DIGEST_LEN * g.per_manifest() as usize + NODE_LEN * g.max_path();
            assert!(
                body <= (bs as usize + 8).max(MIN_MANIFEST_ROOM),
                "{blocks} × {bs}: {g:?}"
            );
            assert!(g.per_manifest() <= MAX_PER_MANIFEST);
        }
        assert_eq!(
            ManifestGeometry::choose(4_700, 1436)
                .unwrap()
                .per_manifest(),
            77
        );
        assert_eq!(
            ManifestGeometry::choose(500_000, 8936)
                .unwrap()
                .per_manifest(),
            128
        );
        // The figures docs/wire.md gives for MTU 1500's blocks of 1,444 bytes.
        let per = |bytes: u64| {
            let n = bytes.div_ceil(1444) as u32;
            ManifestGeometry::choose(n, 1444).unwrap().per_manifest()
        };
        assert_eq!((per(64 << 20), per(4 << 30)), (70, 58));
        assert_eq!(ManifestGeometry::new(10, 0), Err(DigestError::Geometry));
    }

    #[test]
    fn blocks_wait_for_their_manifest_within_the_bound_and_only_verified_ones_come_out() {
        let geom = ManifestGeometry::new(40, 4).unwrap();
        let ds = digests(40);
        let tree = MerkleTree::build(&mut Toy, &geom, &ds);
        let mut book = DigestBook::new(geom, tree.root(), 12);
        let payload = |b: u32| b.to_le_bytes();
        assert_eq!(book.check(&mut Toy, 1, &payload(1)), Check::Unknown);
        // Manifest 0 and 1 are near the start: held; manifest 5 is too far ahead.
        assert!(book.hold(1, &payload(1)));
        assert!(
            book.hold(2, b"forg"),
            "a forgery is held too: only a candidate"
        );
        assert!(!book.hold(20, &payload(20)), "too far ahead");
        assert!(book.hold(5, &payload(5)));
        assert!(!book.hold(6, &payload(6)), "12 bytes: full");
        assert_eq!(book.stats().not_held, 2);
        let manifest = |m: u32| {
            let r = geom.blocks_of(m);
            let mut path = Vec::new();
            tree.path_into(m, &mut path);
            (
                ds[r.start as usize..r.end as usize].as_flattened().to_vec(),
                path,
            )
        };
        let (list, path) = manifest(0);
        let mut bad = list.clone();
        bad[3] ^= 0x80;
        assert_eq!(
            book.handle_manifest(&mut Toy, 0, &bad, &path, |_| false),
            Err(DigestError::Root)
        );
        assert_eq!(
            book.handle_manifest(&mut Toy, 0, &list[16..], &path, |_| false),
            Err(DigestError::Count)
        );
        assert_eq!(
            book.handle_manifest(&mut Toy, 0, &list, &path, |_| false),
            Ok(ManifestVerdict::New)
        );
        assert_eq!(
            book.handle_manifest(&mut Toy, 0, &list, &path, |_| false),
            Ok(ManifestVerdict::Known)
        );
        let held = book.take_held(0);
        assert_eq!(held.len(), 2);
        assert_eq!(book.held_bytes(), 4, "block 5 stays for manifest 1");
        let verdicts: Vec<Check> = held
            .iter()
            .map(|(b, p)| book.check(&mut Toy, *b, p))
            .collect();
        assert_eq!(verdicts, [Check::Verified, Check::Mismatch]);
        // Every block written: the digests go.
        for b in 0..4 {
            assert_eq!(book.check(&mut Toy, b, &payload(b)), Check::Verified);
            book.written(b);
        }
        assert_eq!(book.check(&mut Toy, 0, &payload(0)), Check::Unknown);
        // A released manifest is not hashed again...
        assert_eq!(
            book.handle_manifest(&mut Toy, 0, &bad, &path, |_| false),
            Ok(ManifestVerdict::Known)
        );
        // ...unless a block of it was un-written: then its next copy is verified again.
        book.unwritten(2);
        assert_eq!(
            book.handle_manifest(&mut Toy, 0, &list, &path, |b| b != 2),
            Ok(ManifestVerdict::New)
        );
        assert_eq!(book.check(&mut Toy, 2, &payload(2)), Check::Verified);
        // Blocks a resumed transfer holds do not keep a manifest's digests.
        let (list3, path3) = manifest(3);
        assert_eq!(
            book.handle_manifest(&mut Toy, 3, &list3, &path3, |_| true),
            Ok(ManifestVerdict::Known)
        );
        assert_eq!(
            book.handle_manifest(&mut Toy, 99, &list3, &path3, |_| true),
            Err(DigestError::Index)
        );
    }

    #[test]
    fn manifests_go_a_span_ahead_of_their_blocks_twice_then_with_the_first_repair() {
        let geom = ManifestGeometry::new(20, 8).unwrap();
        let mut s = ManifestSchedule::new(geom, Duration::from_millis(200));
        let t0 = Instant::ZERO;
        let sent: Vec<Vec<u32>> = (0..20)
            .map(|b| {
                let mut out = Vec::new();
                s.for_block(t0, Dest::Group, b, &mut out);
                out
            })
            .collect();
        // Manifest 0 before block 0 and after 4 of its 8 blocks; manifest 1's first copy
        // with block 0 (a span ahead), its second before block 8, with manifest 2's first.
        assert_eq!(sent[0], [0, 1]);
        assert_eq!(sent[4], [0]);
        assert_eq!(sent[8], [1, 2]);
        assert_eq!(sent[16], [2]);
        assert_eq!(sent.iter().flatten().count(), 6);
        // The first repair of block 3 carries manifest 0 at once, the next one 200 ms later.
        let mut out = Vec::new();
        s.for_block(t0, Dest::Group, 3, &mut out);
        assert_eq!(out, [0]);
        s.for_block(t0, Dest::Group, 2, &mut out);
        assert_eq!(out, [0], "rate-limited");
        let later = t0 + Duration::from_millis(200);
        s.for_block(later, Dest::Group, 3, &mut out);
        assert_eq!(out, [0, 0]);
        // Unicast: per device, rate-limited.
        out.clear();
        s.for_block(t0, Dest::Unicast(7), 9, &mut out);
        s.for_block(t0, Dest::Unicast(7), 10, &mut out);
        s.for_block(t0, Dest::Unicast(8), 10, &mut out);
        assert_eq!(out, [1, 1]);
        // Parity over blocks 0..20: manifests 1 and 2 (never repaired) at once; manifest 0
        // (repaired at `later`) not yet.
        out.clear();
        s.for_span(later, 0..20, &mut out);
        assert_eq!(out, [1, 2]);
        s.for_span(later, 0..20, &mut out);
        assert_eq!(out, [1, 2]);
        s.for_block(t0, Dest::Group, 99, &mut out);
        assert_eq!(out, [1, 2]);
    }
    /// A group rebuilt from a forged symbol is taken back: its rebuilt blocks are missing
    /// again (and NACKed), and a completion the decode reported is withdrawn.
    #[cfg(feature = "fec")]
    #[test]
    fn a_rebuilt_group_the_driver_rejects_is_missing_again() {
        use crate::mcast::{Fec, McastReceiver, ReceiverConfig, ReceiverEvent, ReedSolomon};
        let bs = 8usize;
        let cfg = ReceiverConfig {
            fec_group: 4,
            ..ReceiverConfig::new(1, 2, 4 * bs as u64, bs as u32, 3)
        };
        let t0 = Instant::ZERO;
        let mut rx = McastReceiver::new(cfg, None, t0).unwrap();
        for b in 0..3 {
            rx.handle_block(t0, b);
        }
        let blocks: Vec<Vec<u8>> = (0..4u8).map(|b| vec![b; bs]).collect();
        let data: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
        let mut sym = vec![0u8; bs];
        ReedSolomon::default()
            .encode(&data, &mut [&mut sym[..]])
            .unwrap();
        sym[0] ^= 0xFF; // forged
        let p = crate::Parity {
            session: 1,
            group: 0,
            group_size: 4,
            parity_count: 1,
            index: 0,
            payload: &sym,
        };
        rx.handle_parity(t0, &p);
        let job = rx.poll_decode().expect("decodable");
        let mut buf = vec![0u8; job.buf_len()];
        let rebuilt = rx
            .decode(t0, &mut ReedSolomon::default(), 0, &mut buf)
            .unwrap();
        assert!(rx.is_complete());
        rx.discard_rebuilt(t0, &rebuilt);
        assert!(!rx.is_complete() && !rx.has(3) && rx.has(2));
        assert_eq!(rx.blocks_received(), 3);
        assert_ne!(rx.poll_event(), Some(ReceiverEvent::Complete));
        assert!(rx.poll_timeout().is_some(), "a NACK is armed");
    }
}
