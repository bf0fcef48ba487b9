//! The end-to-end variant of the conformance suite
//! (`ferry_engine::conformance`): the `ferry` binary itself, killed with
//! SIGKILL, against any adapter's planes.

use std::time::Duration;

use ferry_engine::conformance::{Change, Planes};

use crate::plane::{ferry, ferry_command};

/// `ferry extract` of a plane holding `items` keys into a file store, then
/// `ferry restore` of it into an empty plane, killed with SIGKILL after
/// varying waits until a run finishes by itself (at most 40 runs) and run
/// once more to the end: the target must hold what the source held, and
/// some kill must have landed mid-restore (part of the data in, not all),
/// or the test proves nothing and says so. `restore_args` are the
/// adapter's own flags (small transactions make more of them to land in).
pub async fn restore_survives_kill_9(planes: &dyn Planes, items: usize, restore_args: &[&str]) {
    let source = planes.start().await;
    let target = planes.start().await;
    let keys: Vec<Change> = (0..items)
        .map(|index| Change::Put {
            key: format!("/conformance/kill/{index:06}").into_bytes(),
            value: format!("item {index} {}", "x".repeat(index % 300)).into_bytes(),
        })
        .collect();
    for changes in keys.chunks(50) {
        source
            .write(changes)
            .await
            .expect("the source takes writes");
    }
    let want = source.read_all().await;
    assert_eq!(want.len(), items);
    let dir = tempfile::tempdir().expect("temp dir");
    let store = format!("file://{}", dir.path().display());
    let extracted = ferry(&[
        "extract",
        "--source",
        &source.url(),
        "--to",
        &store,
        "--quiet",
    ]);
    assert!(
        extracted.status.success(),
        "extract: {}",
        String::from_utf8_lossy(&extracted.stderr)
    );
    let restore = |quiet: bool| {
        let mut args = vec!["restore", "--from", &store, "--target", &*target.url()]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        args.extend(restore_args.iter().map(|arg| (*arg).to_owned()));
        if quiet {
            args.push("--quiet".to_owned());
        }
        args
    };
    let mut left_by_kills = Vec::new();
    for round in 0..40u64 {
        let mut child = ferry_command()
            .args(restore(true))
            .spawn()
            .expect("restore starts");
        // Before, during and after the writes; longer on a slow machine
        // whose runs die before their first write.
        let before_any = left_by_kills.iter().take_while(|&&left| left == 0).count() as u64;
        tokio::time::sleep(Duration::from_millis(
            30 + round * 37 % 300 + 100 * before_any,
        ))
        .await;
        if let Some(status) = child.try_wait().expect("poll") {
            assert!(
                status.success(),
                "restore failed on its own in round {round}"
            );
            break;
        }
        child.kill().expect("kill -9");
        child.wait().expect("reaped");
        left_by_kills.push(target.read_all().await.len());
    }
    let finished = ferry(&restore(false));
    assert!(
        finished.status.success(),
        "the last restore: {}",
        String::from_utf8_lossy(&finished.stderr)
    );
    assert!(
        left_by_kills.iter().any(|&left| left > 0 && left < items),
        "no kill landed between the first write and the last: {left_by_kills:?}"
    );
    let got = target.read_all().await;
    assert_eq!(got.len(), want.len(), "keys in the target");
    assert!(
        got == want,
        "the target differs from the source after the kills"
    );
}
