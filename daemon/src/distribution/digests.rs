//! The gateway's side of data authentication by digest (`fleetcast_wire::mcast::digest` has
//! the rules): every block's digest, computed once when a task is prepared (or re-created
//! after a restart), the Merkle tree over the manifests, and the `Manifest` datagrams built
//! from them.
//!
//! Memory per task: 16 bytes per block (1.1% of the file at MTU 1500, 0.18% at 9000) and
//! about 64 bytes per manifest for the tree (under a byte per block).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;

use fleetcast_wire::mcast::digest::{
    block_digest, DigestError, ManifestGeometry, MerkleTree, Sha256, DIGEST_LEN,
};
use fleetcast_wire::{DigestRoot, Manifest, Message};

/// SHA-256 from `ring`, for the digest rules.
#[derive(Debug, Default, Clone, Copy)]
pub struct RingSha;

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

/// A task's block digests, grouped into manifests, and their Merkle tree.
#[derive(Debug, Clone)]
pub struct BlockDigests {
    geom: ManifestGeometry,
    digests: Vec<[u8; DIGEST_LEN]>,
    tree: MerkleTree,
}

/// Why a task's digests could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum DigestsError {
    /// Reading the file failed.
    #[error("reading the file: {0}")]
    Io(#[from] io::Error),
    /// The block size leaves no room for a manifest (blocks too small for this file).
    #[error("{0}")]
    Geometry(#[from] DigestError),
    /// The file is not as long as the task says (it changed).
    #[error("the file is {got} bytes, not {want}")]
    Length {
        /// Bytes read.
        got: u64,
        /// Bytes the task has.
        want: u64,
    },
}

/// A builder fed the file's bytes in order, block by block.
struct Builder {
    block_size: usize,
    digests: Vec<[u8; DIGEST_LEN]>,
    sha: RingSha,
}

impl Builder {
    fn new(size: u64, block_size: u32) -> Builder {
        let n = size.div_ceil(u64::from(block_size.max(1))) as usize;
        Builder {
            block_size: block_size.max(1) as usize,
            digests: Vec::with_capacity(n),
            sha: RingSha,
        }
    }

    /// Whole blocks of `bytes` (the last one of the file may be short).
    fn blocks(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(self.block_size) {
            let b = self.digests.len() as u32;
            self.digests.push(block_digest(&mut self.sha, b, chunk));
        }
    }

    fn finish(mut self, block_size: u32) -> Result<BlockDigests, DigestsError> {
        let geom = ManifestGeometry::choose(self.digests.len() as u32, block_size)?;
        let tree = MerkleTree::build(&mut self.sha, &geom, &self.digests);
        Ok(BlockDigests {
            geom,
            digests: self.digests,
            tree,
        })
    }
}

impl BlockDigests {
    /// The digests of `bytes` (a task's mapping) in blocks of `block_size`.
    pub fn of_bytes(bytes: &[u8], block_size: u32) -> Result<BlockDigests, DigestsError> {
        let mut b = Builder::new(bytes.len() as u64, block_size);
        b.blocks(bytes);
        b.finish(block_size)
    }

    /// The digests of the file at `path` (`size` bytes) in blocks of `block_size`, read in
    /// one pass, with the SHA-256 of the whole file when `whole` (a push whose digest is not
    /// cached): off the loop, on the push's hashing thread.
    pub fn of_file(
        path: &Path,
        size: u64,
        block_size: u32,
        whole: bool,
    ) -> Result<(Option<[u8; 32]>, BlockDigests), DigestsError> {
        let mut f = File::open(path)?;
        let mut ctx = whole.then(|| ring::digest::Context::new(&ring::digest::SHA256));
        let mut b = Builder::new(size, block_size);
        // A whole number of blocks per read, about 1 MiB.
        let bs = block_size.max(1) as usize;
        let mut buf = vec![0u8; bs * (1usize << 20).div_ceil(bs)];
        let mut total = 0u64;
        loop {
            let mut filled = 0;
            while filled < buf.len() {
                match f.read(&mut buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e.into()),
                }
            }
            if filled == 0 {
                break;
            }
            total += filled as u64;
            if let Some(c) = ctx.as_mut() {
                c.update(&buf[..filled]);
            }
            b.blocks(&buf[..filled]);
        }
        if total != size {
            return Err(DigestsError::Length {
                got: total,
                want: size,
            });
        }
        let whole = ctx.map(|c| {
            let mut out = [0u8; 32];
            out.copy_from_slice(c.finish().as_ref());
            out
        });
        Ok((whole, b.finish(block_size)?))
    }

    /// The grouping into manifests.
    pub fn geometry(&self) -> &ManifestGeometry {
        &self.geom
    }

    /// What the `Announce` carries.
    pub fn root(&self) -> DigestRoot {
        DigestRoot {
            root: self.tree.root(),
            // At most `MAX_PER_MANIFEST` (128) by the geometry's construction.
            per_manifest: self.geom.per_manifest() as u16,
        }
    }

    /// Writes the `Manifest` datagram of manifest `m` of `session` into `out` (replacing its
    /// contents); `scratch` is reused for the path.
    pub fn manifest_datagram(
        &self,
        session: u32,
        m: u32,
        scratch: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Option<()> {
        let r = self.geom.blocks_of(m);
        let digests = self.digests.get(r.start as usize..r.end as usize)?;
        scratch.clear();
        self.tree.path_into(m, scratch);
        let msg = Message::Manifest(Manifest {
            session,
            index: m,
            digests: digests.as_flattened(),
            path: scratch,
        });
        out.clear();
        msg.emit_to_vec(out).ok().map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_wire::mcast::digest::{DigestBook, ManifestVerdict};

    #[test]
    fn manifests_of_a_file_verify_against_its_root_and_name_its_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f.bin");
        let data: Vec<u8> = (0..250_000u32).map(|i| (i * 31 % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let bs = 1436;
        let (whole, d) = BlockDigests::of_file(&p, data.len() as u64, bs, true).unwrap();
        let m = BlockDigests::of_bytes(&data, bs).unwrap();
        assert_eq!(whole, Some(crate::pki::sha256(&data)));
        assert_eq!(d.root(), m.root());
        assert!(
            BlockDigests::of_file(&p, 7, bs, false).is_err(),
            "length checked"
        );
        let root = d.root();
        let mut book = DigestBook::new(*d.geometry(), root.root, 1 << 20);
        let (mut scratch, mut out) = (Vec::new(), Vec::new());
        for i in 0..d.geometry().n_manifests() {
            d.manifest_datagram(9, i, &mut scratch, &mut out).unwrap();
            assert!(out.len() <= 20 + bs as usize, "fits a data datagram");
            let man = Manifest::parse(&out).unwrap();
            assert_eq!((man.session, man.index), (9, i));
            let v = book.handle_manifest(&mut RingSha, i, man.digests, man.path, |_| false);
            assert_eq!(v, Ok(ManifestVerdict::New));
        }
        use fleetcast_wire::mcast::digest::Check;
        let chunk = |b: usize| &data[b * bs as usize..((b + 1) * bs as usize).min(data.len())];
        assert_eq!(book.check(&mut RingSha, 3, chunk(3)), Check::Verified);
        assert_eq!(book.check(&mut RingSha, 3, chunk(4)), Check::Mismatch);
        let last = d.geometry().n_blocks() - 1;
        assert_eq!(
            book.check(&mut RingSha, last, chunk(last as usize)),
            Check::Verified
        );
    }
}
