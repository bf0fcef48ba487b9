//! What a version migration chain costs a restore: N Mystic v3 keys
//! (default 50,000, about 200-byte JSON values) restored into an empty etcd
//! as they are, and restored through the example Mystic chain (v3 -> v4:
//! names lowercased, environments dropped, runs moved to `/v4/runs/`),
//! from the same backup in the same run. The chain alone, in this process
//! on the same ops with no etcd, says whether the filters or etcd set the
//! pace.
//!
//! `cargo build --release -p ferry-cli -p ferry-benches --bin ferry --bin chain-restore
//! && target/release/chain-restore [KEYS]` (needs `etcd`). It prints keys
//! per second for each and the ratio; it asserts nothing.

use std::path::PathBuf;
use std::time::Instant;

use bytes::Bytes;
use ferry_benches::run::{count_under, extract, print_rates, put_in_txns, restore};
use ferry_engine::Op;
use ferry_engine::migrations::chain::Chain;
use ferry_engine::migrations::profile::Profile;
use ferry_tests::etcd::EtcdServer;

const VALUE_BYTES: usize = 200;

/// The `index`th key and value: a tenth environments (dropped by v4), a
/// fifth users, three tenths pipelines (with an environment), two fifths
/// runs (naming a pipeline). Names carry capitals, so v4 rewrites them.
fn mystic_pair(index: usize) -> (Vec<u8>, Vec<u8>) {
    let (key, mut value) = match index % 10 {
        0 => (
            format!("/mystic/environments/Env-{index:08}"),
            format!(
                r#"{{"python":"3.{}","packages":["torch","numpy"]"#,
                index % 12
            ),
        ),
        1 | 2 => (
            format!("/mystic/users/User-{index:08}"),
            format!(r#"{{"name":"User-{index:08}","email":"user{index}@example.com""#),
        ),
        3..=5 => (
            format!("/mystic/pipelines/Pipeline-{index:08}"),
            format!(
                r#"{{"name":"Pipeline-{index:08}","environment":"Env-{:08}","gpu":{}"#,
                index / 10 * 10,
                index.is_multiple_of(2)
            ),
        ),
        _ => (
            format!("/mystic/v3/runs/run-{index:08}"),
            format!(
                r#"{{"pipeline":"Pipeline-{:08}","state":"done""#,
                index / 10 * 10 + 3
            ),
        ),
    };
    let note = VALUE_BYTES.saturating_sub(value.len() + 12);
    value.push_str(&format!(r#","note":"{}"}}"#, "x".repeat(note)));
    (key.into_bytes(), value.into_bytes())
}

fn mystic_profile() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/profiles/mystic")
}

#[tokio::main]
async fn main() {
    let keys: usize = std::env::args()
        .nth(1)
        .map_or(50_000, |keys| keys.parse().expect("KEYS is a number"));
    let source = EtcdServer::start().expect("etcd");
    put_in_txns(&source, keys, 4, mystic_pair).await;
    assert_eq!(count_under(&source, b"/mystic/").await as usize, keys);

    let store = tempfile::tempdir().expect("temp dir");
    let store_url = format!("file://{}", store.path().display());
    extract(&source, &store_url);
    drop(source);

    let plain_target = EtcdServer::start().expect("etcd");
    let plain = restore(&store_url, &plain_target, &[]);
    assert_eq!(count_under(&plain_target, b"/mystic/").await as usize, keys);
    drop(plain_target);

    let profile = mystic_profile();
    let profile_dir = profile.to_str().expect("a UTF-8 path");
    let chain_target = EtcdServer::start().expect("etcd");
    let through_chain = restore(
        &store_url,
        &chain_target,
        &[
            "--migrations",
            profile_dir,
            "--from-version",
            "v3",
            "--to-version",
            "v4",
        ],
    );
    let landed = count_under(&chain_target, b"/mystic/").await as usize;
    let environments = keys.div_ceil(10);
    assert_eq!(landed, keys - environments, "v4 drops the environments");
    drop(chain_target);

    // The chain alone: the same ops, in batches as a segment hands them on.
    let ops: Vec<Op> = (0..keys)
        .map(|index| {
            let (key, value) = mystic_pair(index);
            Op {
                seq: index as u64 + 1,
                kind: Bytes::from_static(b"etcd.kv"),
                method: Bytes::from_static(b"Put"),
                key: key.into(),
                body: value.into(),
                ..Op::default()
            }
        })
        .collect();
    let mut chain = Chain::new(
        Profile::load(&profile).expect("the Mystic profile"),
        "v3",
        "v4",
    )
    .expect("a chain from v3 to v4");
    let started = Instant::now();
    let mut handed_on = 0;
    for batch in ops.chunks(1000) {
        handed_on += chain
            .transform_batch(batch.to_vec())
            .expect("the chain takes every op")
            .len();
    }
    let chain_alone = started.elapsed();
    assert_eq!(handed_on, keys - environments);

    println!("keys: {keys} Mystic v3 keys, about {VALUE_BYTES}-byte JSON values");
    let rows = [
        ("ferry restore, as it is", plain),
        ("ferry restore through the v3 -> v4 chain", through_chain),
        ("the chain alone, in process (no etcd)", chain_alone),
    ];
    print_rates(keys, &rows);
    println!(
        "ratio restore through the chain / restore as it is = {:.2}",
        plain.as_secs_f64() / through_chain.as_secs_f64()
    );
}
