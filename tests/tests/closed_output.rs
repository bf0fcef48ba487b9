//! A server never dies of its own output (issue 10, item 12). A supervisor
//! or a script that reads only a server's first line (`ferry gateway ... |
//! head -1`) closes the pipe under it. Before, the gateway's next
//! `println!` panicked ("failed printing to stdout: Broken pipe") and took
//! every client's next call with it; and a log line that met a closed
//! stderr made tracing-subscriber report the failure with `eprintln!`,
//! which panicked on that same stderr in the task that logged. Each server
//! here loses its output, then is used, and must answer.

use ferry_agent::client::{ClientOptions, connect_source, connect_target};
use ferry_agent::gateway::connect_admin;
use ferry_proto::etcd::etcdserverpb::kv_client::KvClient;
use ferry_proto::etcd::etcdserverpb::{PutRequest, RangeRequest};
use ferry_proto::v1::{DescribeRequest, DigestRequest, GatewayStatusRequest};
use ferry_tests::etcd::EtcdServer;
use ferry_tests::process::{FerryProcess, Output, free_address};

/// Asks the admin service for the gateway's status, then writes and reads a
/// key through the gateway.
async fn use_the_gateway(listen: &str, admin: &str, key: &str) {
    connect_admin(admin)
        .await
        .expect("the admin service answers")
        .status(GatewayStatusRequest::default())
        .await
        .expect("the gateway tells its status after its output closed");
    let mut kv = KvClient::connect(format!("http://{listen}"))
        .await
        .expect("a kv client connects to the gateway");
    kv.put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"still here".to_vec(),
        ..PutRequest::default()
    })
    .await
    .expect("a Put through the gateway after its output closed");
    let read = kv
        .range(RangeRequest {
            key: key.as_bytes().to_vec(),
            ..RangeRequest::default()
        })
        .await
        .expect("a Range through the gateway after its output closed")
        .into_inner();
    assert_eq!(read.kvs.len(), 1, "the key written through the gateway");
    assert_eq!(read.kvs[0].value, b"still here");
}

/// Describe and Digest (which logs a line) on a source agent.
async fn use_the_source_agent(address: &str) {
    let mut source = connect_source(address, &ClientOptions::default())
        .await
        .expect("the source agent answers");
    source
        .describe(DescribeRequest::default())
        .await
        .expect("the source agent describes its plane after its output closed");
    source
        .digest(DigestRequest::default())
        .await
        .expect("the source agent digests its plane after its output closed");
}

/// Describe and Digest (which logs a line) on a target agent.
async fn use_the_target_agent(address: &str) {
    let mut target = connect_target(address, &ClientOptions::default())
        .await
        .expect("the target agent answers");
    target
        .describe(DescribeRequest::default())
        .await
        .expect("the target agent describes its plane after its output closed");
    target
        .digest(DigestRequest::default())
        .await
        .expect("the target agent digests its plane after its output closed");
}

/// Still running, and ignoring SIGPIPE (Rust's runtime sets SIG_IGN before
/// `main`, so a write to a closed pipe is an EPIPE error to handle, not a
/// signal that kills the process; this pins that nothing undoes it).
fn assert_alive_and_ignoring_sigpipe(process: &mut FerryProcess, name: &str) {
    assert_eq!(
        process.exited().expect("try_wait"),
        None,
        "the {name} exited after its output closed; its stderr:\n{}",
        process.stderr()
    );
    #[cfg(target_os = "linux")]
    {
        let status = std::fs::read_to_string(format!("/proc/{}/status", process.pid()))
            .expect("/proc/PID/status");
        let ignored = status
            .lines()
            .find_map(|line| line.strip_prefix("SigIgn:"))
            .map(|mask| u64::from_str_radix(mask.trim(), 16).expect("a hex signal mask"))
            .expect("a SigIgn line");
        const SIGPIPE: u32 = 13;
        assert_ne!(
            ignored & (1 << (SIGPIPE - 1)),
            0,
            "the {name} does not ignore SIGPIPE (SigIgn {ignored:x})"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_answer_after_their_stdout_and_stderr_close_after_the_ready_line() {
    let etcd = EtcdServer::start().expect("etcd");
    let url = etcd.url();
    // h2 logs every frame at debug, so every call below writes log lines
    // to the closed stderr (the agents' Digest logs at info as well).
    let start = |args: &[&str]| {
        FerryProcess::start_with_output(
            args,
            &[("RUST_LOG", "info,h2=debug")],
            Output::ClosedAfterReadyLine,
        )
        .expect("the server starts")
    };
    let mut gateway = start(&["gateway", "--listen", "127.0.0.1:0", "--upstream", &url]);
    let mut source = start(&[
        "agent",
        "source",
        "--control-plane",
        &url,
        "--listen",
        "127.0.0.1:0",
    ]);
    let mut target = start(&[
        "agent",
        "target",
        "--control-plane",
        &url,
        "--listen",
        "127.0.0.1:0",
    ]);

    use_the_gateway(
        &gateway.field("listen"),
        &gateway.field("admin"),
        "/closed/after",
    )
    .await;
    use_the_source_agent(&source.field("listen")).await;
    use_the_target_agent(&target.field("listen")).await;

    assert_alive_and_ignoring_sigpipe(&mut gateway, "gateway");
    assert_alive_and_ignoring_sigpipe(&mut source, "source agent");
    assert_alive_and_ignoring_sigpipe(&mut target, "target agent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_start_and_answer_when_stdout_is_closed_before_their_first_line() {
    let etcd = EtcdServer::start().expect("etcd");
    let url = etcd.url();
    let address = || free_address().expect("a free port");
    let (listen, admin, source_address, target_address) =
        (address(), address(), address(), address());
    let mut gateway = FerryProcess::start_with_stdout_closed(
        &[
            "gateway",
            "--listen",
            &listen,
            "--admin-listen",
            &admin,
            "--upstream",
            &url,
        ],
        &[],
        &[&listen, &admin],
    )
    .expect("the gateway starts");
    let mut source = FerryProcess::start_with_stdout_closed(
        &[
            "agent",
            "source",
            "--control-plane",
            &url,
            "--listen",
            &source_address,
        ],
        &[],
        &[&source_address],
    )
    .expect("the source agent starts");
    let mut target = FerryProcess::start_with_stdout_closed(
        &[
            "agent",
            "target",
            "--control-plane",
            &url,
            "--listen",
            &target_address,
        ],
        &[],
        &[&target_address],
    )
    .expect("the target agent starts");

    use_the_gateway(&listen, &admin, "/closed/before").await;
    use_the_source_agent(&source_address).await;
    use_the_target_agent(&target_address).await;

    for (process, name) in [
        (&mut gateway, "gateway"),
        (&mut source, "source agent"),
        (&mut target, "target agent"),
    ] {
        assert_alive_and_ignoring_sigpipe(process, name);
        let log = process.stderr();
        assert_eq!(
            log.matches("cannot write to stdout").count(),
            1,
            "the {name} says once that its stdout is gone:\n{log}"
        );
        assert!(!log.contains("panicked"), "the {name} panicked:\n{log}");
    }
}
