//! The chunk file: a fixed header followed by one payload per plane
//! (docs/format.md, "Chunk file").
//!
//! ```text
//! offset  size  field
//!      0     8  magic  b"CKPTCHNK"
//!      8     2  format version (u16, = 1)
//!     10     1  filter: 0 = none, 1 = bytegroup
//!     11     1  planes n: 1 for `none`, the item size (2..=16) for `bytegroup`
//!     12     4  reserved, zero
//!     16     8  raw length (u64): bytes of the chunk before filtering
//!     24  16*n  per plane: codec (u8: 0 = raw, 1 = zstd), 7 reserved zero
//!               bytes, stored length (u64)
//! 24+16n        the plane payloads, in plane order
//! ```
//! All integers are little-endian. A zstd plane is one standard zstd frame.

use crate::bytegroup;
use crate::error::{Error, Result};
use std::borrow::Cow;

/// First eight bytes of every chunk file.
pub const MAGIC: &[u8; 8] = b"CKPTCHNK";
/// Chunk format version written by this engine.
pub const CHUNK_VERSION: u16 = 1;
/// Largest raw chunk the engine writes or accepts (bounds every allocation).
pub const MAX_RAW_LEN: u64 = 1 << 30;
/// Largest group width (`complex128` components are 8 bytes; 16 leaves room).
pub const MAX_PLANES: usize = 16;
const FIXED_HEADER: usize = 24;
/// Chunks smaller than this are not byte-grouped: the planes' header entries
/// would cost more than grouping can save.
pub const MIN_GROUPED: usize = 1024;
const PLANE_ENTRY: usize = 16;

/// How the raw bytes are rearranged before compression.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Bytes as they are.
    None,
    /// Byte planes of `n`-byte items: all first bytes, then all second bytes, ...
    ByteGroup(usize),
}

impl Filter {
    /// The filter for items of `group` bytes (1 = no grouping).
    pub fn for_group(group: usize, raw_len: usize) -> Filter {
        if (2..=MAX_PLANES).contains(&group) && raw_len % group == 0 && raw_len >= MIN_GROUPED {
            Filter::ByteGroup(group)
        } else {
            Filter::None
        }
    }
}

/// How one plane is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    Raw,
    Zstd,
}

/// Options of the encoder.
#[derive(Clone, Copy, Debug)]
pub struct EncodeOptions {
    /// zstd level (1..=22, or negative "fast" levels).
    pub level: i32,
    /// A plane is stored compressed only when it shrinks by at least this fraction.
    pub min_saving: f64,
}

impl Default for EncodeOptions {
    fn default() -> Self {
        EncodeOptions {
            level: 1,
            min_saving: 0.05,
        }
    }
}

/// The parsed header of a chunk file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub filter: Filter,
    pub raw_len: u64,
    pub planes: Vec<(Codec, u64)>,
}

impl Header {
    /// Bytes taken by the header itself.
    pub fn header_len(&self) -> usize {
        FIXED_HEADER + PLANE_ENTRY * self.planes.len()
    }

    /// Header plus payloads: the size the chunk file must have.
    pub fn file_len(&self) -> u64 {
        self.header_len() as u64 + self.planes.iter().map(|p| p.1).sum::<u64>()
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.header_len());
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&CHUNK_VERSION.to_le_bytes());
        let (code, n) = match self.filter {
            Filter::None => (0u8, 1u8),
            Filter::ByteGroup(n) => (1u8, n as u8),
        };
        out.push(code);
        out.push(n);
        out.extend_from_slice(&[0u8; 4]);
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        for (codec, stored) in &self.planes {
            out.push(match codec {
                Codec::Raw => 0,
                Codec::Zstd => 1,
            });
            out.extend_from_slice(&[0u8; 7]);
            out.extend_from_slice(&stored.to_le_bytes());
        }
        out
    }

    /// Parses and bounds-checks a header; `object` names the chunk in errors.
    pub fn parse(data: &[u8], object: &str) -> Result<Header> {
        let bad = |detail: String| Error::Format {
            object: object.to_string(),
            detail,
        };
        if data.len() < FIXED_HEADER {
            return Err(bad(format!(
                "file is {} bytes, shorter than a chunk header",
                data.len()
            )));
        }
        if &data[..8] != MAGIC {
            return Err(bad("not a ckpt chunk (bad magic)".into()));
        }
        let version = u16::from_le_bytes([data[8], data[9]]);
        if version != CHUNK_VERSION {
            return Err(bad(format!(
                "chunk format version {version} is not supported (this build reads {CHUNK_VERSION}); upgrade ckpt"
            )));
        }
        let n = data[11] as usize;
        let filter = match (data[10], n) {
            (0, 1) => Filter::None,
            (1, 2..=MAX_PLANES) => Filter::ByteGroup(n),
            (f, n) => return Err(bad(format!("unknown filter {f} with {n} planes"))),
        };
        if data[12..16] != [0u8; 4] {
            return Err(bad("reserved header bytes are not zero".into()));
        }
        let raw_len = u64::from_le_bytes(data[16..24].try_into().expect("8 bytes"));
        if raw_len > MAX_RAW_LEN {
            return Err(bad(format!(
                "raw length {raw_len} exceeds the limit {MAX_RAW_LEN}"
            )));
        }
        if raw_len % n as u64 != 0 {
            return Err(bad(format!(
                "raw length {raw_len} is not a multiple of {n} planes"
            )));
        }
        let need = FIXED_HEADER + PLANE_ENTRY * n;
        if data.len() < need {
            return Err(bad(format!(
                "file is {} bytes, shorter than its {need}-byte header",
                data.len()
            )));
        }
        let plane_raw = raw_len / n as u64;
        let mut planes = Vec::with_capacity(n);
        for i in 0..n {
            let e = &data[FIXED_HEADER + PLANE_ENTRY * i..FIXED_HEADER + PLANE_ENTRY * (i + 1)];
            let codec = match e[0] {
                0 => Codec::Raw,
                1 => Codec::Zstd,
                c => return Err(bad(format!("plane {i}: unknown codec {c}"))),
            };
            if e[1..8] != [0u8; 7] {
                return Err(bad(format!("plane {i}: reserved bytes are not zero")));
            }
            let stored = u64::from_le_bytes(e[8..16].try_into().expect("8 bytes"));
            if codec == Codec::Raw && stored != plane_raw {
                return Err(bad(format!(
                    "plane {i}: raw plane of {stored} bytes, expected {plane_raw}"
                )));
            }
            if stored > MAX_RAW_LEN * 2 {
                return Err(bad(format!(
                    "plane {i}: stored length {stored} is too large"
                )));
            }
            planes.push((codec, stored));
        }
        Ok(Header {
            filter,
            raw_len,
            planes,
        })
    }
}

/// An encoded chunk: header bytes plus payload pieces, ready to be written.
/// Raw planes of an unfiltered chunk borrow the caller's bytes (no copy).
pub struct Encoded<'a> {
    pub header: Vec<u8>,
    pub payloads: Vec<Cow<'a, [u8]>>,
    /// Size of the chunk file: header plus payloads.
    pub stored_len: u64,
}

/// Encodes `raw` with the filter for `group`-byte items. Deterministic: the
/// output depends only on the input bytes and the options.
pub fn encode<'a>(raw: &'a [u8], group: usize, opts: &EncodeOptions) -> Result<Encoded<'a>> {
    if raw.len() as u64 > MAX_RAW_LEN {
        return Err(Error::Invalid(format!(
            "chunk of {} bytes exceeds the limit {MAX_RAW_LEN}",
            raw.len()
        )));
    }
    let filter = Filter::for_group(group, raw.len());
    let planes: Vec<Cow<'a, [u8]>> = match filter {
        Filter::None => vec![Cow::Borrowed(raw)],
        Filter::ByteGroup(n) => bytegroup::split(raw, n)
            .into_iter()
            .map(Cow::Owned)
            .collect(),
    };
    let mut entries = Vec::with_capacity(planes.len());
    let mut payloads = Vec::with_capacity(planes.len());
    for plane in planes {
        match compress_plane(&plane, opts)? {
            Some(z) => {
                entries.push((Codec::Zstd, z.len() as u64));
                payloads.push(Cow::Owned(z));
            }
            None => {
                entries.push((Codec::Raw, plane.len() as u64));
                payloads.push(plane);
            }
        }
    }
    let header = Header {
        filter,
        raw_len: raw.len() as u64,
        planes: entries,
    };
    let stored_len = header.file_len();
    Ok(Encoded {
        header: header.encode(),
        payloads,
        stored_len,
    })
}

/// Compresses a plane when that saves at least `min_saving`; `None` = store raw.
/// A cheap estimate runs first so that planes of random mantissa bits are not
/// compressed in vain: the order-0 entropy of a sample and, when that says
/// "incompressible", a zstd pass over the sample to catch repeated sequences.
fn compress_plane(plane: &[u8], opts: &EncodeOptions) -> Result<Option<Vec<u8>>> {
    if plane.len() < 64 {
        return Ok(None);
    }
    let keep = 1.0 - opts.min_saving;
    let sample = sample_of(plane);
    if entropy_ratio(&sample) > keep {
        let z = zstd::bulk::compress(&sample, 1).map_err(|e| Error::Invalid(e.to_string()))?;
        if z.len() as f64 > sample.len() as f64 * keep {
            return Ok(None);
        }
    }
    let z = zstd::bulk::compress(plane, opts.level)
        .map_err(|e| Error::Invalid(format!("zstd: {e}")))?;
    if z.len() as f64 > plane.len() as f64 * keep {
        Ok(None)
    } else {
        Ok(Some(z))
    }
}

const SAMPLE_BLOCK: usize = 4096;
const SAMPLE_BLOCKS: usize = 16;

/// Up to 16 blocks of 4 KiB spread evenly over the plane (the whole plane if small).
fn sample_of(plane: &[u8]) -> Vec<u8> {
    if plane.len() <= SAMPLE_BLOCK * SAMPLE_BLOCKS {
        return plane.to_vec();
    }
    let stride = (plane.len() - SAMPLE_BLOCK) / (SAMPLE_BLOCKS - 1);
    let mut out = Vec::with_capacity(SAMPLE_BLOCK * SAMPLE_BLOCKS);
    for i in 0..SAMPLE_BLOCKS {
        let start = i * stride;
        out.extend_from_slice(&plane[start..start + SAMPLE_BLOCK]);
    }
    out
}

/// Order-0 entropy of `data` as a fraction of 8 bits per byte.
fn entropy_ratio(data: &[u8]) -> f64 {
    let mut counts = [0u64; 256];
    for &b in data {
        counts[b as usize] += 1;
    }
    let n = data.len() as f64;
    let bits: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / n;
            -p * p.log2()
        })
        .sum();
    bits / 8.0
}

/// Decodes a whole chunk file (`data` = header + payloads) into `out`, which
/// must be exactly the recorded raw length. Decompression never writes past
/// `out` (no decompression bombs). The caller verifies the hash.
pub fn decode_into(data: &[u8], object: &str, out: &mut [u8]) -> Result<()> {
    let header = Header::parse(data, object)?;
    decode_payload(&header, &data[header.header_len()..], object, out)
}

/// Decodes the payload part of a chunk whose header was parsed already.
pub fn decode_payload(header: &Header, payload: &[u8], object: &str, out: &mut [u8]) -> Result<()> {
    if out.len() as u64 != header.raw_len {
        return Err(Error::Format {
            object: object.to_string(),
            detail: format!(
                "chunk holds {} raw bytes but the manifest records {}",
                header.raw_len,
                out.len()
            ),
        });
    }
    let expected = header.file_len() - header.header_len() as u64;
    if payload.len() as u64 != expected {
        return Err(Error::Integrity {
            object: object.to_string(),
            detail: format!(
                "payload is {} bytes, the header says {expected}",
                payload.len()
            ),
        });
    }
    match header.filter {
        Filter::None => decode_planes(header, payload, object, out),
        Filter::ByteGroup(n) => {
            let mut planes = vec![0u8; out.len()];
            decode_planes(header, payload, object, &mut planes)?;
            bytegroup::merge(&planes, n, out);
            Ok(())
        }
    }
}

/// Decodes each plane into its slot of `target` (planes back to back).
fn decode_planes(header: &Header, payload: &[u8], object: &str, target: &mut [u8]) -> Result<()> {
    let plane_len = target.len() / header.planes.len();
    let mut pos = 0usize;
    for (i, (codec, stored)) in header.planes.iter().enumerate() {
        let src = &payload[pos..pos + *stored as usize];
        pos += *stored as usize;
        let dst = &mut target[i * plane_len..(i + 1) * plane_len];
        match codec {
            Codec::Raw => dst.copy_from_slice(src),
            Codec::Zstd => {
                // Exactly one frame and nothing after it, as the format says.
                match zstd::zstd_safe::find_frame_compressed_size(src) {
                    Ok(n) if n == src.len() => {}
                    _ => {
                        return Err(Error::Integrity {
                            object: object.to_string(),
                            detail: format!("plane {i} is not exactly one zstd frame"),
                        })
                    }
                }
                let got =
                    zstd::bulk::decompress_to_buffer(src, dst).map_err(|e| Error::Integrity {
                        object: object.to_string(),
                        detail: format!("plane {i}: zstd: {e}"),
                    })?;
                if got != plane_len {
                    return Err(Error::Integrity {
                        object: object.to_string(),
                        detail: format!("plane {i} decodes to {got} bytes, expected {plane_len}"),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn splitmix(x: &mut u64) -> u64 {
        *x = x.wrapping_add(0x9E3779B97F4A7C15);
        let mut z = *x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58476D1CE4E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D049BB133111EB);
        z ^ (z >> 31)
    }

    /// Random normal f32 values (Box-Muller), as weights look.
    fn floats(n: usize) -> Vec<u8> {
        let mut x = 42u64;
        let mut out = Vec::with_capacity(n * 4);
        for _ in 0..n {
            let u1 = ((splitmix(&mut x) >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let u2 = (splitmix(&mut x) >> 11) as f64 / (1u64 << 53) as f64;
            let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
            out.extend_from_slice(&((z * 0.02) as f32).to_le_bytes());
        }
        out
    }

    fn round_trip(raw: &[u8], group: usize) -> Encoded<'_> {
        let enc = encode(raw, group, &EncodeOptions::default()).unwrap();
        let mut file = enc.header.clone();
        for p in &enc.payloads {
            file.extend_from_slice(p);
        }
        assert_eq!(file.len() as u64, enc.stored_len);
        let mut out = vec![0u8; raw.len()];
        decode_into(&file, "x", &mut out).unwrap();
        assert_eq!(out, raw);
        enc
    }

    #[test]
    fn floats_compress_through_byte_planes() {
        let raw = floats(1 << 18);
        let enc = round_trip(&raw, 4);
        let h = Header::parse(&enc.header, "x").unwrap();
        assert_eq!(h.filter, Filter::ByteGroup(4));
        // the low mantissa plane is noise, the top plane (sign + exponent) compresses
        assert_eq!(h.planes[0].0, Codec::Raw);
        assert_eq!(h.planes[3].0, Codec::Zstd);
        assert!(enc.stored_len < raw.len() as u64 * 9 / 10);
    }

    #[test]
    fn zeros_and_tiny_and_odd_sizes() {
        round_trip(&[0u8; 100_000], 1);
        round_trip(&[], 4);
        round_trip(&[1, 2, 3], 4); // not a multiple of 4: no grouping
        let small = [7u8; 1020];
        let enc = round_trip(&small, 4); // below MIN_GROUPED: no grouping
        assert_eq!(
            Header::parse(&enc.header, "x").unwrap().filter,
            Filter::None
        );
        round_trip(&(0..255u8).cycle().take(70_001).collect::<Vec<_>>(), 1);
    }

    #[test]
    fn random_bytes_are_stored_raw() {
        let mut x = 7u64;
        let raw: Vec<u8> = (0..200_000).map(|_| splitmix(&mut x) as u8).collect();
        let enc = round_trip(&raw, 1);
        assert_eq!(
            Header::parse(&enc.header, "x").unwrap().planes[0].0,
            Codec::Raw
        );
    }

    #[test]
    fn damaged_payload_is_an_integrity_error_not_a_panic() {
        let raw = floats(10_000);
        let enc = encode(&raw, 4, &EncodeOptions::default()).unwrap();
        let mut file = enc.header.clone();
        for p in &enc.payloads {
            file.extend_from_slice(p);
        }
        let mut out = vec![0u8; raw.len()];
        for cut in [file.len() - 1, 30, 5] {
            assert!(decode_into(&file[..cut], "x", &mut out).is_err());
        }
        let mut flipped = file.clone();
        let last = flipped.len() - 3;
        flipped[last] ^= 0xff;
        // raw planes decode "fine" (the hash catches them); zstd planes must not panic
        let _ = decode_into(&flipped, "x", &mut out);
        let mut wrong = vec![0u8; raw.len() - 4];
        assert!(matches!(
            decode_into(&file, "x", &mut wrong),
            Err(Error::Format { .. })
        ));
    }
}
