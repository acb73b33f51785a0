//! How document chunks are kept at rest: zstd with a dictionary.
//!
//! Automerge's own `save()` deflates each column of each document separately, which both costs CPU
//! (a fresh deflate state per column) and leaves everything documents share (field names, openIMIS
//! URLs, code systems) in every document. Chunks are therefore stored as uncompressed Automerge
//! bytes compressed with zstd and a dictionary trained on fieldmesh documents, which removes what
//! documents share. The dictionary ships inside the binary (`zstd-dict-v1.bin`, trained by
//! `cargo run --release -p fieldmesh-node --example train-dict`); its version is the first byte of
//! every stored chunk, so a future dictionary can be added without rewriting old data.

use std::cell::RefCell;
use std::sync::OnceLock;

use zstd::dict::{DecoderDictionary, EncoderDictionary};

use crate::StoreError;

/// Chunk stored as is.
const RAW: u8 = 0;
/// Chunk compressed with zstd and dictionary v1.
const ZSTD_DICT_V1: u8 = 1;
/// zstd level: 3 is zstd's default, a good speed/size balance for small records.
const LEVEL: i32 = 3;
/// The dictionary (empty means none: compress without).
static DICT_V1: &[u8] = include_bytes!("zstd-dict-v1.bin");

fn encoder_dict() -> &'static EncoderDictionary<'static> {
    static D: OnceLock<EncoderDictionary<'static>> = OnceLock::new();
    D.get_or_init(|| EncoderDictionary::copy(DICT_V1, LEVEL))
}

fn decoder_dict() -> &'static DecoderDictionary<'static> {
    static D: OnceLock<DecoderDictionary<'static>> = OnceLock::new();
    D.get_or_init(|| DecoderDictionary::copy(DICT_V1))
}

thread_local! {
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
}

/// Encodes a chunk for storage.
pub fn encode(bytes: &[u8]) -> Result<Vec<u8>, StoreError> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = Some(
                zstd::bulk::Compressor::with_prepared_dictionary(encoder_dict())
                    .map_err(|e| StoreError::Engine(format!("zstd: {e}")))?,
            );
        }
        let comp = c
            .as_mut()
            .ok_or_else(|| StoreError::Engine("zstd unavailable".into()))?;
        let packed = comp
            .compress(bytes)
            .map_err(|e| StoreError::Engine(format!("zstd: {e}")))?;
        let mut out = Vec::with_capacity(packed.len().min(bytes.len()) + 1);
        if packed.len() < bytes.len() {
            out.push(ZSTD_DICT_V1);
            out.extend_from_slice(&packed);
        } else {
            out.push(RAW);
            out.extend_from_slice(bytes);
        }
        Ok(out)
    })
}

/// Checks that `stored` looks like the output of [`encode`] (a known format byte).
pub fn check(stored: &[u8]) -> Result<(), StoreError> {
    match stored.first() {
        Some(&RAW | &ZSTD_DICT_V1) => Ok(()),
        Some(other) => Err(StoreError::Corrupt(format!(
            "a chunk has unknown format {other}"
        ))),
        None => Err(StoreError::Corrupt("an empty chunk".into())),
    }
}

/// Decodes a stored chunk, appending it to `out`.
pub fn decode_into(stored: &[u8], out: &mut Vec<u8>) -> Result<(), StoreError> {
    match stored.split_first() {
        Some((&RAW, rest)) => {
            out.extend_from_slice(rest);
            Ok(())
        }
        Some((&ZSTD_DICT_V1, rest)) => DECOMPRESSOR.with(|d| {
            let mut d = d.borrow_mut();
            if d.is_none() {
                *d = Some(
                    zstd::bulk::Decompressor::with_prepared_dictionary(decoder_dict())
                        .map_err(|e| StoreError::Engine(format!("zstd: {e}")))?,
                );
            }
            let dec = d
                .as_mut()
                .ok_or_else(|| StoreError::Engine("zstd unavailable".into()))?;
            let size = zstd::zstd_safe::get_frame_content_size(rest)
                .ok()
                .flatten()
                .ok_or_else(|| StoreError::Corrupt("a compressed chunk has no size".into()))?;
            if size > 64 * 1024 * 1024 {
                return Err(StoreError::Corrupt(
                    "a compressed chunk claims more than 64 MiB".into(),
                ));
            }
            let plain = dec.decompress(rest, size as usize).map_err(|e| {
                StoreError::Corrupt(format!("a compressed chunk does not decompress: {e}"))
            })?;
            out.extend_from_slice(&plain);
            Ok(())
        }),
        Some((other, _)) => Err(StoreError::Corrupt(format!(
            "a chunk has unknown format {other}"
        ))),
        None => Err(StoreError::Corrupt("an empty chunk".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for input in [&b""[..], b"x", &b"openimis ".repeat(200)] {
            let stored = encode(input).unwrap();
            let mut out = Vec::new();
            decode_into(&stored, &mut out).unwrap();
            assert_eq!(out, input);
        }
        assert!(decode_into(&[9, 1, 2], &mut Vec::new()).is_err());
        assert!(decode_into(&[1, 1, 2], &mut Vec::new()).is_err());
    }
}
