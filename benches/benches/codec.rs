//! ferry's segment codec against raw zstd, on the same ops, in the same run.
//!
//! - `encode_compress/ferry`: `SegmentEncoder` push + seal, ferry's real path
//!   (encode, stream through zstd with its content checksum, CRC-32C, SHA-256).
//! - `encode_compress/raw_zstd`: the already-encoded ops through
//!   `zstd::bulk::compress` at the same level: the physical limit.
//! - `decompress_decode/ferry`: `decode_segment` + `into_ops`, every check on.
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
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput, measurement::WallTime};
use ferry_benches::{SEED, encode_length_delimited, pachyderm_commit_ops};
use ferry_engine::Op;
use ferry_engine::segment::{SegmentEncoder, SegmentLimits, SegmentOptions, decode_segment};

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
        assert_eq!(ferry_decode(&segment_name, &segment_object), ops);
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

fn ferry_decode(segment_name: &str, segment_object: &Bytes) -> Vec<Op> {
    decode_segment(
        segment_name,
        segment_object.clone(),
        SegmentLimits::default(),
    )
    .expect("the segment passes its checks")
    .into_ops()
    .expect("the ops decode")
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

fn main() {
    let fixture = Fixture::new();
    let mut criterion = Criterion::default().configure_from_args();
    encode_compress(&mut criterion, &fixture);
    decompress_decode(&mut criterion, &fixture);
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
    }
}
