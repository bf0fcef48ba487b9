//! Writes realistic ops as JSON Lines to stdout, streaming, until at least
//! the given number of bytes: the input of `benches/extract-memory.sh`.
//!
//! `pachyderm-jsonl BYTES [SEED]`

use std::io::{BufWriter, Write};

use ferry_benches::{PachydermCommits, SEED};

fn main() -> std::io::Result<()> {
    let mut arguments = std::env::args().skip(1);
    let usage = || std::io::Error::other("usage: pachyderm-jsonl BYTES [SEED]");
    let target: u64 = arguments
        .next()
        .and_then(|bytes| bytes.parse().ok())
        .ok_or_else(usage)?;
    let seed: u64 = match arguments.next() {
        Some(seed) => seed.parse().map_err(|_| usage())?,
        None => SEED,
    };
    let mut out = BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let mut written = 0u64;
    for op in PachydermCommits::new(seed) {
        if written >= target {
            break;
        }
        let key = std::str::from_utf8(&op.key).expect("generated keys are text");
        let body = std::str::from_utf8(&op.body).expect("generated values are JSON");
        let line = format!(
            "{{\"kind\":\"etcd.kv\",\"position\":{},\"platform_version\":\"1.13\",\"key\":\"{key}\",\"method\":\"Put\",\"body\":{body}}}\n",
            op.position
        );
        out.write_all(line.as_bytes())?;
        written += line.len() as u64;
    }
    out.flush()
}
