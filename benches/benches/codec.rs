//! ferry's segment codec against raw zstd, on the same ops, in the same run.
//!
//! - `encode_compress/ferry`: `SegmentEncoder` push + seal, ferry's real path
//!   (encode, stream through zstd with its content checksum, CRC-32C, SHA-256).
//! - `encode_compress/raw_zstd`: the already-encoded ops through
//!   `zstd::bulk::compress` at the same level: the physical limit.
//! - `decompress_decode/ferry`: `decode_segment` + every op decoded and
//!   handed on one at a time, as a restore does, every check on.
//! - `decompress_decode/raw_zstd`: `zstd::bulk::decompress` of the raw frame.
//!
//! Throughput is in uncompressed encoded op bytes for all four. Once criterion
//! is done, each pair is timed again here, interleaved, and the ratio
//! ferry / raw_zstd is printed. Nothing is asserted on times: the machines
//! are shared and noisy.
//!
//! `decompress_decode/ferry` allocates about 17 MB per segment (the inflated
//! payload, the `Vec<Op>`, four strings per op); with glibc's malloc that
//! crosses the trim threshold, so the heap shrinks and grows again, and is
//! faulted back in, on every iteration. Try
//! `GLIBC_TUNABLES=glibc.malloc.trim_threshold=1073741824` to see how much
//! of its time that is.

use std::hint::black_box;

/// The allocator the `ferry` binary uses, so the bench measures what it runs.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use ferry_benches::{SEED, encode_length_delimited, pachyderm_commit_ops};
use ferry_engine::Op;
use std::sync::Arc;

use ferry_engine::adapters::Extraction;
use ferry_engine::backup::{ExtractOptions, RestoreOptions, read_backup, write_backup};
use ferry_engine::manifest::{Manifest, SourceInfo};
use ferry_engine::progress::Progress;
use ferry_engine::segment::{SegmentEncoder, SegmentLimits, SegmentOptions, decode_segment};
use ferry_engine::store::BackupStore;
use futures::TryStreamExt;

/// The ratio ferry should reach against raw zstd, printed beside each one.
const TARGET_RATIO: f64 = 0.60;

/// Rounds of each pair in the ratio timing after criterion, and iterations
/// of one path per round.
const RATIO_ROUNDS: usize = 4;
const RATIO_BLOCK: usize = 5;

const STREAM_ID: &str = "bench";

/// The data every bench runs on, built and checked once.
struct Fixture {
    ops: Vec<Op>,
    options: SegmentOptions,
    /// The ops as a segment's payload holds them.
    encoded: Vec<u8>,
    /// The segment ferry writes for `ops`.
    segment_name: String,
    segment_object: Bytes,
    /// `encoded` compressed by zstd alone.
    raw_frame: Vec<u8>,
}

impl Fixture {
    fn new() -> Self {
        let options = SegmentOptions::default();
        let ops = pachyderm_commit_ops(options.target_uncompressed_bytes, SEED);
        let encoded = encode_length_delimited(&ops);
        let sealed = ferry_encode(&ops, options);
        let segment_name = sealed.name.to_string();
        let segment_object = sealed.to_bytes();
        let raw_frame = raw_compress(&encoded, options.compression_level);

        // The benches must measure a working path: what ferry writes reads
        // back as the same ops, and raw zstd round-trips the same bytes.
        assert_eq!(sealed.header.uncompressed_bytes, encoded.len() as u64);
        let decoded: Vec<Op> = decode_segment(
            &segment_name,
            segment_object.clone(),
            SegmentLimits::default(),
        )
        .expect("the segment passes its checks")
        .into_ops()
        .expect("the ops decode");
        assert_eq!(decoded, ops, "ferry gives back the ops it was given");
        assert_eq!(ferry_decode(&segment_name, &segment_object), ops.len());
        assert_eq!(raw_decompress(&raw_frame, encoded.len()), encoded);

        println!(
            "data: {} ops, {} bytes encoded; ferry segment {} bytes ({:.2}x), raw zstd frame {} bytes ({:.2}x), level {}",
            ops.len(),
            encoded.len(),
            segment_object.len(),
            encoded.len() as f64 / segment_object.len() as f64,
            raw_frame.len(),
            encoded.len() as f64 / raw_frame.len() as f64,
            options.compression_level,
        );
        Self {
            ops,
            options,
            encoded,
            segment_name,
            segment_object,
            raw_frame,
        }
    }

    fn throughput(&self) -> Throughput {
        Throughput::Bytes(self.encoded.len() as u64)
    }
}

fn ferry_encode(ops: &[Op], options: SegmentOptions) -> ferry_engine::segment::SealedSegment {
    let mut encoder = SegmentEncoder::new(STREAM_ID, options).expect("a zstd encoder starts");
    for op in ops {
        encoder.push(op).expect("an op compresses");
    }
    encoder.seal().expect("the segment seals")
}

/// Checks and inflates the segment, then decodes every op and hands it on,
/// as a restore does (it batches them 1024 at a time for the sink).
fn ferry_decode(segment_name: &str, segment_object: &Bytes) -> usize {
    decode_segment(
        segment_name,
        segment_object.clone(),
        SegmentLimits::default(),
    )
    .expect("the segment passes its checks")
    .ops()
    .fold(0, |count, op| {
        black_box(op.expect("the op decodes"));
        count + 1
    })
}

/// A backup of several segments in an in-memory store, read back as a
/// restore reads it: segments fetched and checked (CRC-32C, zstd, header
/// against the manifest, SHA-256) on a blocking thread a couple ahead, while
/// the ops of the current one are decoded and handed on.
struct RestoreFixture {
    runtime: tokio::runtime::Runtime,
    store: BackupStore,
    manifest: Arc<Manifest>,
    /// Each segment's encoded ops compressed by zstd alone.
    raw_frames: Vec<(Vec<u8>, usize)>,
}

impl RestoreFixture {
    const SEGMENTS: usize = 8;

    fn new() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime starts");
        let options = SegmentOptions::default();
        let ops = pachyderm_commit_ops(options.target_uncompressed_bytes * Self::SEGMENTS, SEED);
        let store = BackupStore::open("memory://", true).expect("a memory store opens");
        let batches: Vec<ferry_engine::Result<Vec<Op>>> =
            ops.chunks(1024).map(|chunk| Ok(chunk.to_vec())).collect();
        let extraction = Extraction {
            info: SourceInfo {
                platform: "bench".to_owned(),
                ..SourceInfo::default()
            },
            ops: Box::pin(futures::stream::iter(batches)),
        };
        let manifest = runtime
            .block_on(write_backup(
                &store,
                extraction,
                ExtractOptions::default(),
                Arc::new(Progress::default()),
            ))
            .expect("the backup is written");
        let raw_frames = manifest
            .segments
            .iter()
            .map(|entry| {
                let encoded = encode_length_delimited(
                    &ops[entry.first_seq as usize - 1..entry.last_seq as usize],
                );
                (
                    raw_compress(&encoded, options.compression_level),
                    encoded.len(),
                )
            })
            .collect();
        let fixture = Self {
            runtime,
            store,
            manifest: Arc::new(manifest),
            raw_frames,
        };
        assert_eq!(
            fixture.ferry_read(),
            ops.len() as u64,
            "the restore path reads every op back"
        );
        fixture
    }

    fn ferry_read(&self) -> u64 {
        self.runtime.block_on(async {
            read_backup(
                self.store.clone(),
                self.manifest.clone(),
                RestoreOptions::default(),
            )
            .try_fold(0u64, |count, batch| async move {
                Ok(count + black_box(batch).len() as u64)
            })
            .await
            .expect("the backup reads back")
        })
    }

    fn raw_read(&self) -> usize {
        self.raw_frames
            .iter()
            .map(|(frame, length)| raw_decompress(frame, *length).len())
            .sum()
    }

    fn throughput(&self) -> Throughput {
        Throughput::Bytes(self.manifest.totals.uncompressed_bytes)
    }
}

fn raw_compress(encoded: &[u8], level: i32) -> Vec<u8> {
    zstd::bulk::compress(encoded, level).expect("zstd compresses")
}

fn raw_decompress(frame: &[u8], capacity: usize) -> Vec<u8> {
    zstd::bulk::decompress(frame, capacity).expect("zstd decompresses")
}

/// Few, long samples: each iteration handles a whole 8 MiB segment, and the
/// whole bench should stay within a couple of minutes on a small machine.
fn configure(group: &mut BenchmarkGroup<'_, WallTime>, fixture: &Fixture) {
    group
        .throughput(fixture.throughput())
        .sampling_mode(SamplingMode::Flat)
        .sample_size(20)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(8));
}

fn encode_compress(criterion: &mut Criterion, fixture: &Fixture) {
    let mut group = criterion.benchmark_group("encode_compress");
    configure(&mut group, fixture);
    group.bench_function("ferry", |bencher| {
        bencher.iter(|| ferry_encode(black_box(&fixture.ops), fixture.options));
    });
    group.bench_function("raw_zstd", |bencher| {
        bencher.iter(|| {
            raw_compress(
                black_box(&fixture.encoded),
                fixture.options.compression_level,
            )
        });
    });
    group.finish();
}

fn decompress_decode(criterion: &mut Criterion, fixture: &Fixture) {
    let mut group = criterion.benchmark_group("decompress_decode");
    configure(&mut group, fixture);
    group.bench_function("ferry", |bencher| {
        bencher.iter(|| ferry_decode(&fixture.segment_name, black_box(&fixture.segment_object)));
    });
    group.bench_function("raw_zstd", |bencher| {
        bencher.iter(|| raw_decompress(black_box(&fixture.raw_frame), fixture.encoded.len()));
    });
    group.finish();
}

fn restore_read(criterion: &mut Criterion, fixture: &RestoreFixture) {
    let mut group = criterion.benchmark_group("restore_read");
    group
        .throughput(fixture.throughput())
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(10));
    group.bench_function("ferry", |bencher| bencher.iter(|| fixture.ferry_read()));
    group.bench_function("raw_zstd", |bencher| bencher.iter(|| fixture.raw_read()));
    group.finish();
}

/// The median time of each of two paths, run in alternating blocks of
/// `RATIO_BLOCK` iterations so that a noisy neighbour slows both alike, while
/// each path still runs back to back as it does under criterion (and in a
/// restore): the first iteration of a block only warms up and is not counted.
fn median_pair<A, B>(
    mut ferry: impl FnMut() -> A,
    mut raw: impl FnMut() -> B,
) -> (Duration, Duration) {
    fn block<T>(path: &mut impl FnMut() -> T, times: &mut Vec<Duration>) {
        black_box(path());
        for _ in 1..RATIO_BLOCK {
            let start = Instant::now();
            black_box(path());
            times.push(start.elapsed());
        }
    }
    let mut ferry_times = Vec::new();
    let mut raw_times = Vec::new();
    for _ in 0..RATIO_ROUNDS {
        block(&mut ferry, &mut ferry_times);
        block(&mut raw, &mut raw_times);
    }
    (median(&mut ferry_times), median(&mut raw_times))
}

fn median(times: &mut [Duration]) -> Duration {
    times.sort_unstable();
    times[times.len() / 2]
}

fn print_ratio(label: &str, bytes: usize, ferry: Duration, raw: Duration) {
    let megabytes_per_second = |time: Duration| bytes as f64 / time.as_secs_f64() / 1e6;
    let ratio = raw.as_secs_f64() / ferry.as_secs_f64();
    println!(
        "ratio {label} ferry/raw_zstd = {ratio:.2} (target >= {TARGET_RATIO:.2}); ferry {:.0} MB/s, raw_zstd {:.0} MB/s, median of {} runs",
        megabytes_per_second(ferry),
        megabytes_per_second(raw),
        RATIO_ROUNDS * (RATIO_BLOCK - 1),
    );
}

fn print_ratios(fixture: &Fixture) {
    let bytes = fixture.encoded.len();
    let (ferry, raw) = median_pair(
        || ferry_encode(&fixture.ops, fixture.options),
        || raw_compress(&fixture.encoded, fixture.options.compression_level),
    );
    print_ratio("encode+compress", bytes, ferry, raw);
    let (ferry, raw) = median_pair(
        || ferry_decode(&fixture.segment_name, &fixture.segment_object),
        || raw_decompress(&fixture.raw_frame, bytes),
    );
    print_ratio("decompress+decode", bytes, ferry, raw);
}

fn print_restore_ratio(fixture: &RestoreFixture) {
    let (ferry, raw) = median_pair(|| fixture.ferry_read(), || fixture.raw_read());
    print_ratio(
        "restore read path (8 segments, pipelined on 2 threads; raw zstd on 1)",
        fixture.manifest.totals.uncompressed_bytes as usize,
        ferry,
        raw,
    );
}

fn main() {
    let fixture = Fixture::new();
    let mut criterion = Criterion::default().configure_from_args();
    encode_compress(&mut criterion, &fixture);
    decompress_decode(&mut criterion, &fixture);
    let restore_fixture = RestoreFixture::new();
    restore_read(&mut criterion, &restore_fixture);
    criterion.final_summary();

    // `cargo bench` passes `--bench`; `cargo test --benches` does not, and
    // only wants to know that each bench runs once. `--list` and
    // `--profile-time` (a profiler attached) want no extra work either.
    let arguments: Vec<String> = std::env::args().collect();
    let has = |flag: &str| {
        arguments.iter().any(|argument| {
            argument == flag
                || argument
                    .strip_prefix(flag)
                    .is_some_and(|rest| rest.starts_with('='))
        })
    };
    let benchmarking = has("--bench") && !has("--list") && !has("--profile-time");
    if benchmarking {
        print_ratios(&fixture);
        print_restore_ratio(&restore_fixture);
    }
}
