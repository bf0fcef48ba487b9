//! Secure by default (issue 10, item 11), with real servers: off loopback,
//! an agent or a gateway's admin service serves with TLS and a token (or
//! with `--insecure-listen`, said out loud), and answers there. The
//! refusals themselves are in `cli/tests/cli.rs`: they need no etcd.

use ferry_agent::client::{ClientOptions, connect_gateway, connect_source, connect_target};
use ferry_proto::v1::{DescribeRequest, GatewayStatusRequest};
use ferry_tests::etcd::EtcdServer;
use ferry_tests::process::FerryProcess;
use tonic::Code;

const TOKEN: &str = "secure-defaults-token-9d2e";

/// `127.0.0.1:PORT` for a server that printed `0.0.0.0:PORT`: it listens
/// on every address, this one included (the test certificate's).
fn on_loopback(listen: &str) -> String {
    let port = listen
        .strip_prefix("0.0.0.0:")
        .unwrap_or_else(|| panic!("{listen} is on every address"));
    format!("127.0.0.1:{port}")
}

/// The test PKI's CA and the server certificate and key for 127.0.0.1.
fn certificates(dir: &std::path::Path) -> (String, String, String) {
    ferry_tests::tls::write_test_pki(dir);
    let file = |name: &str| dir.join(name).display().to_string();
    (file("ca.pem"), file("server.pem"), file("server-key.pem"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_and_the_gateway_admin_serve_every_address_with_tls_and_a_token() {
    let etcd = EtcdServer::start().expect("etcd");
    let url = etcd.url();
    let dir = tempfile::tempdir().expect("temp dir");
    let (ca, cert, key) = certificates(dir.path());
    let tls = ["--tls-cert-file", &cert, "--tls-key-file", &key];
    let token = [("FERRY_AGENT_TOKEN", TOKEN)];
    let with_token = ClientOptions {
        token: Some(TOKEN.to_owned()),
        tls_ca_file: Some(ca.clone().into()),
        ..ClientOptions::default()
    };
    let without_token = ClientOptions {
        token: None,
        ..with_token.clone()
    };

    let agent = |role: &str| {
        let process = FerryProcess::start(
            &[
                &[
                    "agent",
                    role,
                    "--control-plane",
                    &url,
                    "--listen",
                    "0.0.0.0:0",
                ],
                &tls[..],
            ]
            .concat(),
            &token,
        )
        .expect("an agent with TLS and a token serves on every address");
        assert_eq!(process.ready()["tls"], true);
        assert_eq!(process.ready()["token_required"], true);
        process
    };
    let source = agent("source");
    let target = agent("target");
    let source_address = on_loopback(&source.field("listen"));
    connect_source(&source_address, &with_token)
        .await
        .expect("the source agent answers over TLS")
        .describe(DescribeRequest::default())
        .await
        .expect("Describe with the token");
    let refused = connect_source(&source_address, &without_token)
        .await
        .expect("the source agent answers over TLS")
        .describe(DescribeRequest::default())
        .await
        .expect_err("Describe without the token");
    assert_eq!(refused.code(), Code::Unauthenticated);
    connect_target(&on_loopback(&target.field("listen")), &with_token)
        .await
        .expect("the target agent answers over TLS")
        .describe(DescribeRequest::default())
        .await
        .expect("Describe with the token");

    let gateway = FerryProcess::start(
        &[
            &[
                "gateway",
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "0.0.0.0:0",
                "--upstream",
                &url,
            ],
            &tls[..],
        ]
        .concat(),
        &token,
    )
    .expect("a gateway whose admin service has TLS and a token serves it on every address");
    connect_gateway(&on_loopback(&gateway.field("admin")), &with_token)
        .await
        .expect("the admin service answers over TLS")
        .status(GatewayStatusRequest::default())
        .await
        .expect("Status with the token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_listen_serves_the_gateway_admin_on_every_address_and_says_so() {
    let etcd = EtcdServer::start().expect("etcd");
    let gateway = FerryProcess::start(
        &[
            "gateway",
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "0.0.0.0:0",
            "--insecure-listen",
            "--upstream",
            &etcd.url(),
        ],
        &[],
    )
    .expect("--insecure-listen serves the admin service without TLS or a token");
    assert_eq!(gateway.ready()["tls"], false);
    assert_eq!(gateway.ready()["token_required"], false);
    connect_gateway(
        &on_loopback(&gateway.field("admin")),
        &ClientOptions::default(),
    )
    .await
    .expect("the admin service answers")
    .status(GatewayStatusRequest::default())
    .await
    .expect("Status without a token");
    let log = gateway.stderr();
    assert!(
        log.contains("--insecure-listen") && log.contains("without TLS and without a token"),
        "the gateway warns that it serves insecure on purpose:\n{log}"
    );
}
