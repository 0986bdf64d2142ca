//! Fuzzers of the chunk decoder and the read path (proptest; `cargo fuzz`
//! needs a nightly toolchain, these run on stable and in CI).
//!
//! Each fuzzer runs `PROPTEST_CASES` cases (default 256) with a fixed seed,
//! or, with `CKPT_FUZZ_SECONDS=N`, batches of fresh seeds for N seconds
//! (`make fuzz` runs each for 60 s; docs/reliability.md says how to run them
//! for hours). A failure prints the seed that reproduces it
//! (`CKPT_FUZZ_SEED=<seed>`).
//!
//! Properties: decoding arbitrary or mutated chunk files never panics and
//! never allocates beyond the format's limits; a mutated chunk is never
//! accepted unless it decodes to exactly the original bytes; restore never
//! writes outside its targets and refuses bad placements before writing;
//! object ids parse only from 64 lowercase hex digits.

use crate::backend::Backend;
use crate::chunk::{self, EncodeOptions, Header};
use crate::error::{Error, Result};
use crate::object_id::ObjectId;
use crate::pipeline::{self, ChunkRef, Placement};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngSeed, TestCaseError, TestCaseResult, TestRunner};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// An in-memory backend: files are byte vectors.
#[derive(Default)]
struct Mem(Mutex<HashMap<ObjectId, Vec<u8>>>);

impl Mem {
    fn with(id: ObjectId, file: Vec<u8>) -> Mem {
        let mem = Mem::default();
        mem.0.lock().unwrap().insert(id, file);
        mem
    }
}

impl Backend for Mem {
    fn stored_size(&self, id: &ObjectId) -> Result<Option<u64>> {
        Ok(self.0.lock().unwrap().get(id).map(|f| f.len() as u64))
    }
    fn put(&self, id: &ObjectId, parts: &[&[u8]]) -> Result<()> {
        self.0.lock().unwrap().insert(*id, parts.concat());
        Ok(())
    }
    fn read_at(&self, id: &ObjectId, offset: u64, buf: &mut [u8]) -> Result<(usize, u64)> {
        let files = self.0.lock().unwrap();
        let file = files
            .get(id)
            .ok_or_else(|| Error::Missing { object: id.hex() })?;
        let start = (offset as usize).min(file.len());
        let n = buf.len().min(file.len() - start);
        buf[..n].copy_from_slice(&file[start..start + n]);
        Ok((n, file.len() as u64))
    }
    fn delete(&self, id: &ObjectId) -> Result<u64> {
        Ok(self
            .0
            .lock()
            .unwrap()
            .remove(id)
            .map_or(0, |f| f.len() as u64))
    }
    fn list(&self) -> Result<Vec<(ObjectId, u64)>> {
        Ok(Vec::new())
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
}

/// Runs `test` on values of `strategy`: a fixed number of cases, or for
/// `CKPT_FUZZ_SECONDS` seconds in batches of fresh seeds.
fn fuzz<S: Strategy>(name: &str, strategy: S, test: impl Fn(S::Value) -> TestCaseResult) {
    let seconds: Option<u64> = std::env::var("CKPT_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok());
    let base: u64 = std::env::var("CKPT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            if seconds.is_some() {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            } else {
                0x5eed
            }
        });
    let cases = Config::default().cases; // PROPTEST_CASES, else 256
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let mut total = 0u64;
    for batch in 0u64.. {
        let seed = base.wrapping_add(batch);
        let config = Config {
            cases,
            rng_seed: RngSeed::Fixed(seed),
            failure_persistence: None,
            ..Config::default()
        };
        let mut runner = TestRunner::new(config);
        if let Err(e) = runner.run(&strategy, &test) {
            panic!("{name}: {e} (reproduce with CKPT_FUZZ_SEED={seed} PROPTEST_CASES={cases})");
        }
        total += u64::from(cases);
        if deadline.is_none_or(|d| Instant::now() >= d) {
            break;
        }
    }
    eprintln!("{name}: {total} cases, no failure");
}

/// Raw chunk contents of several kinds (compressible, incompressible, float-like).
fn raw_bytes() -> impl Strategy<Value = Vec<u8>> {
    (0usize..4, 0usize..20_000, any::<u64>()).prop_map(|(kind, len, seed)| {
        let mut x = seed | 1;
        (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                match kind {
                    0 => 0,
                    1 => (i % 251) as u8,
                    2 => x as u8,
                    _ => [0x3f, 0x80, (x >> 8) as u8, x as u8][i % 4], // float32-like
                }
            })
            .collect()
    })
}

#[derive(Clone, Debug)]
enum Mutation {
    Flip(usize, u8),
    Set(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    Truncate(usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 1u8..=255).prop_map(|(p, b)| Mutation::Flip(p, b)),
        (0usize..64, any::<u8>()).prop_map(|(p, b)| Mutation::Set(p, b)), // the header
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Insert(p, b)),
        any::<usize>().prop_map(Mutation::Remove),
        any::<usize>().prop_map(Mutation::Truncate),
    ]
}

fn apply(file: &mut Vec<u8>, m: &Mutation) {
    let n = file.len();
    match *m {
        Mutation::Flip(p, b) if n > 0 => file[p % n] ^= b,
        Mutation::Set(p, b) if n > 0 => file[p % n] = b,
        Mutation::Insert(p, b) => file.insert(p % (n + 1), b),
        Mutation::Remove(p) if n > 0 => {
            file.remove(p % n);
        }
        Mutation::Truncate(p) => file.truncate(p % (n + 1)),
        _ => {}
    }
}

#[test]
fn fuzz_decoding_arbitrary_bytes_never_panics() {
    // Mostly a valid fixed header (so the fuzzer gets past the magic), then anything.
    let file = (
        any::<bool>(),
        0u8..3,
        0u8..20,
        0u64..70_000,
        proptest::collection::vec(any::<u8>(), 0..600),
    )
        .prop_map(|(valid, filter, n, raw_len, rest)| {
            let mut f = Vec::new();
            if valid {
                f.extend_from_slice(chunk::MAGIC);
                f.extend_from_slice(&1u16.to_le_bytes());
                f.extend_from_slice(&[filter, n, 0, 0, 0, 0]);
                f.extend_from_slice(&raw_len.to_le_bytes());
            }
            f.extend_from_slice(&rest);
            f
        });
    fuzz("decode arbitrary bytes", file, |file| {
        if let Ok(header) = Header::parse(&file, "fuzz") {
            prop_assert!(header.raw_len <= chunk::MAX_RAW_LEN);
            if header.raw_len <= 1 << 20 {
                let mut out = vec![0u8; header.raw_len as usize];
                let _ = chunk::decode_into(&file, "fuzz", &mut out);
            }
        }
        Ok(())
    });
}

#[test]
fn fuzz_mutated_chunks_are_never_accepted_unless_intact() {
    let case = (
        raw_bytes(),
        // widths with and without the rotation flag (rotated byte groups)
        (1usize..=16, any::<bool>()).prop_map(|(g, r)| if r { g | chunk::ROTATE } else { g }),
        proptest::collection::vec(mutation(), 1..4),
    );
    fuzz("mutated chunks", case, |(raw, group, mutations)| {
        let id = ObjectId::of(&raw);
        let mut file = chunk::encode_to_vec(&raw, group, &EncodeOptions::default())
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for m in &mutations {
            apply(&mut file, m);
        }
        // The decoder alone: no panic; output of the recorded length at most.
        let mut out = vec![0u8; raw.len()];
        let _ = chunk::decode_into(&file, "fuzz", &mut out);
        // The read path: accepted only if the bytes are exactly the original ones.
        let mem = Mem::with(id, file);
        let c = ChunkRef {
            id,
            raw_len: raw.len() as u64,
        };
        let mut got = vec![0u8; raw.len()];
        let loaded = pipeline::load_chunk(&mem, &c, &mut got);
        match &loaded {
            Ok(()) => prop_assert_eq!(&got, &raw),
            Err(e) => prop_assert!(
                matches!(e, Error::Integrity { .. } | Error::Format { .. }),
                "{e:?}"
            ),
        }
        let report = pipeline::verify(&mem, &[c], Some(1)).unwrap();
        prop_assert_eq!(report[0].is_none(), loaded.is_ok());
        Ok(())
    });
}

#[test]
fn fuzz_recorded_lengths_never_size_an_allocation_before_the_header_agrees() {
    // A manifest may record any raw length for a chunk: verify must not
    // allocate it before the chunk's own header confirms it.
    let case = (raw_bytes(), 0u64..(1 << 34));
    fuzz("recorded lengths", case, |(raw, recorded)| {
        let id = ObjectId::of(&raw);
        let file = chunk::encode_to_vec(&raw, 4, &EncodeOptions::default()).unwrap();
        let mem = Mem::with(id, file);
        let c = ChunkRef {
            id,
            raw_len: recorded,
        };
        let report = pipeline::verify(&mem, &[c], Some(1)).unwrap();
        prop_assert_eq!(report[0].is_none(), recorded == raw.len() as u64);
        Ok(())
    });
}

#[test]
fn fuzz_restore_never_writes_outside_its_targets() {
    let case = (
        proptest::collection::vec(
            (0usize..3, 0u64..3000, 0u64..3000, 0usize..3, 0u64..3000),
            0..8,
        ),
        proptest::collection::vec(0usize..3000, 1..4),
    );
    let raws: Vec<Vec<u8>> = (0..3u8)
        .map(|k| {
            (0..2048u32)
                .map(|i| (i as u8) ^ k.wrapping_mul(37))
                .collect()
        })
        .collect();
    let mem = Mem::default();
    let chunks: Vec<ChunkRef> = raws
        .iter()
        .map(|r| {
            let id = ObjectId::of(r);
            mem.put(
                &id,
                &[&chunk::encode_to_vec(r, 1, &EncodeOptions::default()).unwrap()],
            )
            .unwrap();
            ChunkRef {
                id,
                raw_len: r.len() as u64,
            }
        })
        .collect();
    fuzz("restore placements", case, |(placements, lens)| {
        let placements: Vec<Placement> = placements.into_iter().map(Placement::from).collect();
        let mut buffers: Vec<Vec<u8>> = lens.iter().map(|&n| vec![0xAA; n + 64]).collect();
        let result = {
            let mut targets: Vec<&mut [u8]> = buffers
                .iter_mut()
                .zip(&lens)
                .map(|(b, &n)| &mut b[..n])
                .collect();
            pipeline::restore(&mem, &chunks, &mut targets, &placements, Some(1))
        };
        for (b, &n) in buffers.iter().zip(&lens) {
            prop_assert!(b[n..].iter().all(|&x| x == 0xAA), "wrote past a target");
        }
        match result {
            Ok(()) => {
                for p in &placements {
                    let src = &raws[p.chunk][p.chunk_offset as usize..][..p.len as usize];
                    let dst = &buffers[p.target][p.target_offset as usize..][..p.len as usize];
                    prop_assert_eq!(src, dst);
                }
            }
            Err(_) => {
                for (b, &n) in buffers.iter().zip(&lens) {
                    prop_assert!(b[..n].iter().all(|&x| x == 0xAA), "wrote before refusing");
                }
            }
        }
        Ok(())
    });
}

#[test]
fn fuzz_object_ids_parse_only_from_lowercase_hex() {
    let text = prop_oneof!["[0-9a-f]{64}", "[0-9a-fA-F./\\x00]{60,68}", any::<String>(),];
    fuzz("object ids", text, |s| {
        let valid = s.len() == 64
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        match ObjectId::parse(&s) {
            Ok(id) => {
                prop_assert!(valid);
                prop_assert_eq!(id.hex(), s);
            }
            Err(_) => prop_assert!(!valid),
        }
        Ok(())
    });
}
