//! A transfer's data authentication by digest, the agent's side
//! (`fleetcast_wire::mcast::digest` has the rules): manifests checked against the announce's
//! Merkle root, every block checked against its digest before it is written, blocks whose
//! manifest is missing held in a bounded buffer
//! ([`fleetcast_wire::mcast::digest::DEFAULT_PENDING_BYTES`], 2 MiB) until it comes.
//!
//! Memory: 16 bytes per block of each manifest verified and not yet complete (a manifest's
//! digests go once all its blocks are written), a byte and a counter per manifest, and at
//! most 2 MiB of held blocks.

use fleetcast_wire::mcast::digest::{
    Check, DigestBook, DigestError, ManifestGeometry, ManifestVerdict, Sha256,
    DEFAULT_PENDING_BYTES,
};
use fleetcast_wire::{Announce, Manifest};

/// SHA-256 from `ring`.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct RingSha;

impl Sha256 for RingSha {
    fn sha256(&mut self, parts: &[&[u8]]) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for p in parts {
            ctx.update(p);
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

/// What to do with a block that passed the framing checks (CRC, session, length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Its digest matches (or the announce authenticates nothing): write it.
    Write,
    /// Its digest does not match: drop it and count it.
    Forged,
    /// Its manifest is missing: a copy waits in the buffer.
    Held,
    /// Its manifest is missing and the buffer cannot take it: it stays missing (NACKed).
    NotHeld,
}

/// The digests of one transfer (none when the announce authenticates nothing).
#[derive(Debug)]
pub(crate) struct Verifier {
    book: Option<DigestBook>,
    sha: RingSha,
}

impl Verifier {
    /// The verifier the announce asks for.
    pub(crate) fn new(a: &Announce<'_>, n_blocks: u32) -> Result<Verifier, DigestError> {
        let book = match a.digests {
            None => None,
            Some(d) => {
                let geom = ManifestGeometry::new(n_blocks, u32::from(d.per_manifest))?;
                Some(DigestBook::new(geom, d.root, DEFAULT_PENDING_BYTES))
            }
        };
        Ok(Verifier { book, sha: RingSha })
    }

    /// Whether blocks are checked: then a copy made only of checked blocks needs no
    /// whole-file check.
    pub(crate) fn checks(&self) -> bool {
        self.book.is_some()
    }

    /// What to do with `payload`, received as block `block` (not yet held by the core).
    pub(crate) fn block(&mut self, block: u32, payload: &[u8]) -> Verdict {
        let Some(book) = &mut self.book else {
            return Verdict::Write;
        };
        match book.check(&mut self.sha, block, payload) {
            Check::Verified => Verdict::Write,
            Check::Mismatch => Verdict::Forged,
            Check::Unknown if book.hold(block, payload) => Verdict::Held,
            Check::Unknown => Verdict::NotHeld,
        }
    }

    /// Whether `payload` is block `block`, for a block rebuilt from parity: `None` when its
    /// manifest is missing.
    pub(crate) fn rebuilt(&mut self, block: u32, payload: &[u8]) -> Option<bool> {
        let Some(book) = &mut self.book else {
            return Some(true);
        };
        match book.check(&mut self.sha, block, payload) {
            Check::Verified => Some(true),
            Check::Mismatch => Some(false),
            Check::Unknown => None,
        }
    }

    /// Keeps a rebuilt block whose manifest is missing; whether it was kept.
    pub(crate) fn hold(&mut self, block: u32, payload: &[u8]) -> bool {
        self.book.as_mut().is_some_and(|b| b.hold(block, payload))
    }

    /// Block `block` (checked) is written.
    pub(crate) fn written(&mut self, block: u32) {
        if let Some(b) = &mut self.book {
            b.written(block);
        }
    }

    /// A manifest datagram: checked against the root (`Err`: forged or corrupted). When it is
    /// new, the blocks held for it come back, still to be checked with
    /// [`Verifier::block`] (each was only a candidate).
    pub(crate) fn manifest(
        &mut self,
        m: &Manifest<'_>,
        have: impl Fn(u32) -> bool,
    ) -> Result<Vec<(u32, Vec<u8>)>, DigestError> {
        let Some(book) = &mut self.book else {
            return Ok(Vec::new());
        };
        match book.handle_manifest(&mut self.sha, m.index, m.digests, m.path, have)? {
            ManifestVerdict::New => Ok(book.take_held(m.index)),
            ManifestVerdict::Known => Ok(Vec::new()),
        }
    }
}
