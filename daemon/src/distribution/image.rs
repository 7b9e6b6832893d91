//! An image push's target and map, checked before its task exists: the map file of
//! `fleetcast image prepare` decodes (every rule of `wire::image::ImageMap`), fits an announce,
//! and describes the pushed file (its stream is exactly the file's length), so no device
//! ever receives a map that contradicts the bytes it is sent.

use std::io;
use std::path::Path;

use fleetcast_store as store;
use fleetcast_wire::image::{ImageMap, MapError};
use fleetcast_wire::msg::limits::{MAX_IMAGE_MAP, MAX_PATH};

use crate::admin::PushImage;

/// Why an image push cannot go out as asked.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// No target named.
    #[error("an image push needs a target (a file path, KIND=ID or slot=a|b|inactive)")]
    NoTarget,
    /// The target is longer than an announce carries.
    #[error("the target is {len} bytes; at most {MAX_PATH}")]
    TargetTooLong {
        /// Its length.
        len: usize,
    },
    /// The map file cannot be read.
    #[error("cannot read the image map {path}: {source}")]
    Read {
        /// The map file.
        path: String,
        /// Cause.
        source: io::Error,
    },
    /// The map file is larger than an announce carries.
    #[error("the image map {path} is {len} bytes, more than an announce carries ({MAX_IMAGE_MAP}); prepare it with a larger chunk span (--chunk), or push the image raw")]
    MapTooLarge {
        /// The map file.
        path: String,
        /// Its length.
        len: usize,
    },
    /// The map does not decode.
    #[error("the image map {path} is not valid: {why}")]
    Decode {
        /// The map file.
        path: String,
        /// The rule it breaks.
        why: MapError,
    },
    /// The pushed file is not the stream the map describes.
    #[error("the image map {path} describes a stream of {map_says} bytes; the pushed file has {file} (push the map's own .sparse or .zst file)")]
    StreamMismatch {
        /// The map file.
        path: String,
        /// The stream length the map says.
        map_says: u64,
        /// The pushed file's length.
        file: u64,
    },
}

/// The task's image record for `image`, pushing a file of `stream_len` bytes.
pub fn task_image(image: &PushImage, stream_len: u64) -> Result<store::TaskImage, ImageError> {
    let target = image.target.trim();
    if target.is_empty() {
        return Err(ImageError::NoTarget);
    }
    if target.len() > MAX_PATH {
        return Err(ImageError::TargetTooLong { len: target.len() });
    }
    let Some(path) = &image.map else {
        return Ok(store::TaskImage {
            target: target.into(),
            map: Vec::new(),
            image_size: stream_len,
        });
    };
    let bytes = std::fs::read(Path::new(path)).map_err(|source| ImageError::Read {
        path: path.clone(),
        source,
    })?;
    if bytes.len() > MAX_IMAGE_MAP {
        return Err(ImageError::MapTooLarge {
            path: path.clone(),
            len: bytes.len(),
        });
    }
    let map = ImageMap::decode(&bytes).map_err(|why| ImageError::Decode {
        path: path.clone(),
        why,
    })?;
    if map.wire_bytes() != stream_len {
        return Err(ImageError::StreamMismatch {
            path: path.clone(),
            map_says: map.wire_bytes(),
            file: stream_len,
        });
    }
    Ok(store::TaskImage {
        target: target.into(),
        map: bytes,
        image_size: map.image_size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetcast_wire::image::{Compression, Extent};

    fn map_file(dir: &Path) -> (String, ImageMap) {
        let map = ImageMap {
            block_size: 4096,
            image_size: 1 << 20,
            image_sha256: [7; 32],
            extents: vec![Extent {
                offset: 8192,
                len: 4096,
            }],
            compression: Compression::None,
        };
        let mut bytes = Vec::new();
        map.encode(&mut bytes).unwrap();
        let p = dir.join("x.map");
        std::fs::write(&p, bytes).unwrap();
        (p.display().to_string(), map)
    }

    #[test]
    fn a_map_is_taken_only_for_the_stream_it_describes() {
        let dir = tempfile::tempdir().unwrap();
        let (path, map) = map_file(dir.path());
        let push = PushImage {
            target: " partlabel=rootfs-b ".into(),
            map: Some(path.clone()),
        };
        let t = task_image(&push, 4096).unwrap();
        assert_eq!(t.target, "partlabel=rootfs-b");
        assert_eq!(t.image_size, map.image_size);
        assert_eq!(ImageMap::decode(&t.map).unwrap(), map);
        let e = task_image(&push, 5000).unwrap_err();
        assert!(matches!(
            e,
            ImageError::StreamMismatch {
                map_says: 4096,
                file: 5000,
                ..
            }
        ));
        // A damaged map is refused by its CRC, naming the file.
        let mut bytes = std::fs::read(&path).unwrap();
        bytes[20] ^= 1;
        std::fs::write(&path, bytes).unwrap();
        let e = task_image(&push, 4096).unwrap_err().to_string();
        assert!(
            e.starts_with(&format!("the image map {path} is not valid")),
            "{e}"
        );
    }

    #[test]
    fn a_raw_image_is_its_stream_and_a_target_is_required() {
        let raw = PushImage {
            target: "slot=inactive".into(),
            map: None,
        };
        let t = task_image(&raw, 123).unwrap();
        assert_eq!((t.map.len(), t.image_size), (0, 123));
        let none = PushImage {
            target: "  ".into(),
            map: None,
        };
        assert!(matches!(task_image(&none, 1), Err(ImageError::NoTarget)));
        let missing = PushImage {
            target: "/srv/x".into(),
            map: Some("/nonexistent/fleetcast.map".into()),
        };
        assert!(matches!(
            task_image(&missing, 1),
            Err(ImageError::Read { .. })
        ));
    }
}
